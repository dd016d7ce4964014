"""Hugging Face ``transformers`` adapter: :class:`sdopt.SDOptimizer` records in the ``Trainer``'s
log history.

Wrap the optimizer the ``Trainer`` builds itself, by overriding ``create_optimizer`` (its
parameter groups keep the ``Trainer``'s weight-decay split: no decay on biases and norms), and
add :class:`SharpnessDimensionTrainerCallback`::

    from sdopt.integrations.huggingface import SharpnessDimensionTrainerCallback

    class SDTrainer(Trainer):
        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            if not isinstance(optimizer, SDOptimizer):  # a second train() reuses it
                self.optimizer = SDOptimizer(optimizer, model=self.model, loss_fn=loss_fn,
                                             data=curvature_batch, every=200)
            return self.optimizer

    trainer = SDTrainer(model=model, args=args, train_dataset=ds,
                        callbacks=[SharpnessDimensionTrainerCallback(loggers=[WandbLogger()])])

(``optimizers=(SDOptimizer(AdamW(model.parameters(), ...)), None)`` also works, but then the
optimizer is yours, not the ``Trainer``'s: ``args.weight_decay`` reaches no group unless you
build the groups yourself.)

At the end of every step the callback finds the SDOptimizer (also inside accelerate's
``AcceleratedOptimizer`` wrapper), and for each new record

- appends ``{**record.to_dict(prefix), "step": s}`` to ``state.log_history`` (saved in
  ``trainer_state.json`` with every checkpoint), where ``s`` is the ``global_step`` of the
  parameters the record measured: the estimate made during the optimizer step from ``s`` to
  ``s + 1`` is of the model that step ``s``'s evaluation and checkpoint see, so it is logged
  with step ``s``, not ``s + 1``;
- sends it, on the main process only, to the given sdopt ``loggers`` (a
  :class:`sdopt.loggers.WandbLogger` reuses the run the ``Trainer``'s own W&B integration
  opened).

A record is logged once: records restored with ``resume_from_checkpoint`` are already in the
restored log history (and were sent by the run that made them), so they are not sent again;
and a callback logger that writes where one of the SDOptimizer's own ``loggers`` writes (the
same object, two W&B loggers, two file loggers on one path) is left out, with a warning.

``transformers`` is optional: ``pip install transformers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sdopt._checks import check_str
from sdopt.integrations import check_loggers, find_sd_optimizers, without_duplicate_sinks

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sdopt.integrations.huggingface needs transformers: pip install transformers"
    ) from exc

__all__ = ["SharpnessDimensionTrainerCallback"]


class SharpnessDimensionTrainerCallback(TrainerCallback):
    """Add new SDOptimizer records to ``state.log_history`` and forward them to sdopt loggers.

    Args:
        loggers: sdopt loggers (objects with ``log(record)``), closed at the end of training.
        prefix: Key prefix of the entries added to ``state.log_history``.
        optimizer: The SDOptimizer to watch; found from the callback's ``optimizer`` argument
            when ``None``.

    Raises:
        ValueError: a logger without ``log()``, a non-string ``prefix``, or an ``optimizer``
            that is not (and does not wrap) an SDOptimizer.
    """

    def __init__(
        self, loggers: Sequence[Any] = (), *, prefix: str = "sdopt/", optimizer: Any = None
    ) -> None:
        self.loggers = check_loggers(loggers)
        self.prefix = check_str("prefix", prefix)
        if optimizer is not None and not find_sd_optimizers([optimizer]):
            raise ValueError(
                f"Invalid optimizer: {type(optimizer).__name__} (must be an sdopt.SDOptimizer, "
                "or a wrapper holding one in .optimizer; None finds it from the Trainer)"
            )
        self.optimizer = optimizer
        self._seen: dict[int, int] = {}
        self._active: list[Any] | None = None

    def _find(self, kwargs: dict[str, Any]) -> Any:
        candidates = [self.optimizer] if self.optimizer is not None else [kwargs.get("optimizer")]
        opts = find_sd_optimizers(candidates)
        return opts[0] if opts else None

    def _start(self, opt: Any) -> None:
        # records restored from a checkpoint were logged by the run that made them
        self._seen[id(opt)] = opt.history[-1].step if opt.history else -1
        self._active = without_duplicate_sinks(
            self.loggers,
            opt.loggers,
            what="SharpnessDimensionTrainerCallback(loggers=...)'s",
            owner="SDOptimizer(loggers=...)",
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        opt = self._find(kwargs)
        if opt is not None:
            self._start(opt)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        opt = self._find(kwargs)
        if opt is None:
            return
        if self._active is None or id(opt) not in self._seen:
            self._start(opt)
            self._seen[id(opt)] = -1  # not started by the Trainer: every record is new
        last = self._seen[id(opt)]
        new = [r for r in opt.history if r.step > last]
        if not new:
            return
        self._seen[id(opt)] = new[-1].step
        main = getattr(state, "is_world_process_zero", True)
        for record in new:
            # global_step counts the steps taken, opt.step_count - 1 is the one just taken
            step = state.global_step - (opt.step_count - record.step)
            state.log_history.append({**record.to_dict(self.prefix), "step": step})
            if main:
                for logger in self._active or ():
                    logger.log(record)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for logger in self._active if self._active is not None else self.loggers:
            close = getattr(logger, "close", None)
            if callable(close):
                close()
