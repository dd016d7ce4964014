"""Hugging Face ``transformers`` adapter: forward :class:`sdopt.SDOptimizer` records.

Pass an :class:`~sdopt.SDOptimizer` to the ``Trainer`` through ``optimizers=(opt, scheduler)``
and add :class:`SharpnessDimensionTrainerCallback`::

    from sdopt.integrations.huggingface import SharpnessDimensionTrainerCallback

    base = torch.optim.AdamW(model.parameters(), lr=5e-5)
    opt = SDOptimizer(base, model=model, loss_fn=loss_fn, data=curvature_batch, every=200)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None),
                      callbacks=[SharpnessDimensionTrainerCallback(loggers=[WandbLogger()])])

At the end of every step the callback finds the SDOptimizer (also inside accelerate's
``AcceleratedOptimizer`` wrapper), and for each new record (on the main process only):

- sends it to the given sdopt ``loggers`` (a :class:`sdopt.loggers.WandbLogger` reuses the run
  the ``Trainer``'s own W&B integration opened), and
- appends ``{"step": global_step, **record.to_dict(prefix)}`` to ``state.log_history``, so the
  values are saved in ``trainer_state.json`` with every checkpoint.

``transformers`` is optional: ``pip install transformers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sdopt._checks import check_str
from sdopt.integrations import check_loggers, find_sd_optimizers

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sdopt.integrations.huggingface needs transformers: pip install transformers"
    ) from exc

__all__ = ["SharpnessDimensionTrainerCallback"]


class SharpnessDimensionTrainerCallback(TrainerCallback):
    """Forward new SDOptimizer records to sdopt loggers and to ``state.log_history``.

    Args:
        loggers: sdopt loggers (objects with ``log(record)``).
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
        self._last = -1

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        candidates = [self.optimizer] if self.optimizer is not None else [kwargs.get("optimizer")]
        opts = find_sd_optimizers(candidates)
        if not opts or not getattr(state, "is_world_process_zero", True):
            return
        opt = opts[0]
        new = [r for r in opt.history if r.step > self._last]
        for record in new:
            for logger in self.loggers:
                logger.log(record)
            state.log_history.append({"step": state.global_step, **record.to_dict(self.prefix)})
        if new:
            self._last = new[-1].step

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for logger in self.loggers:
            close = getattr(logger, "close", None)
            if callable(close):
                close()
