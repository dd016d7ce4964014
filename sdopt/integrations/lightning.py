"""PyTorch Lightning adapter: :class:`sdopt.SDOptimizer` records as Lightning metrics.

Return an :class:`~sdopt.SDOptimizer` from ``configure_optimizers`` as you would any optimizer
(Lightning calls ``optimizer.step(closure)``, which SDOptimizer runs immediately under
``enable_grad``), and add :class:`SharpnessDimensionCallback` to the trainer::

    import lightning as L
    from sdopt.integrations.lightning import SharpnessDimensionCallback

    class Module(L.LightningModule):
        def configure_optimizers(self):
            base = torch.optim.AdamW(self.parameters(), lr=1e-3)
            return SDOptimizer(base, model=self, loss_fn=F.cross_entropy, data=batch, every=100)

    trainer = L.Trainer(callbacks=[
        SharpnessDimensionCallback(prog_bar=("sharpness_dimension",)),
        L.pytorch.callbacks.ModelCheckpoint(monitor="sdopt/lambda_max", mode="min"),
    ])

After every training batch that made an estimate, the callback

- logs the record's ``to_dict("sdopt/")`` with ``pl_module.log_dict`` (``on_step=True``,
  ``logger=False``), so ``trainer.callback_metrics`` holds the ``sdopt/*`` keys for
  ``ModelCheckpoint(monitor=...)``, ``EarlyStopping`` and the progress bar; skipped estimates
  leave out their NaN fields there (a NaN would make ``EarlyStopping`` stop the run);
- writes the record to every logger of the trainer (``trainer.loggers``, on global rank 0) at
  the step of the parameters it measured: the step at which Lightning logs the training
  metrics of the same batch. ``log_dict`` itself does not feed the loggers because Lightning
  writes only every ``log_every_n_steps``-th batch, which would drop most records or repeat
  stale ones at later steps.

A record is logged once: records restored from a checkpoint (``trainer.fit(ckpt_path=...)``)
were logged by the run that made them and are not sent again, and a trainer logger that writes
where one of the SDOptimizer's own ``loggers`` already writes (Lightning's ``WandbLogger`` next
to an :class:`sdopt.loggers.WandbLogger`: the same ``wandb.run``) is left out, with a warning.

``lightning`` is optional: ``pip install lightning``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sdopt._checks import check_bool, check_str
from sdopt.integrations import find_sd_optimizers, without_duplicate_sinks

try:  # lightning 2.x ships as ``lightning``; older installs as ``pytorch_lightning``
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError(
            "sdopt.integrations.lightning needs PyTorch Lightning: pip install lightning"
        ) from exc

__all__ = ["SharpnessDimensionCallback"]


class SharpnessDimensionCallback(Callback):
    """Log new :class:`sdopt.records.EstimateRecord` s as Lightning metrics and to its loggers.

    Args:
        prefix: Key prefix of the logged metrics.
        log_skipped: Also log records of skipped estimates (their numeric fields are NaN in the
            loggers and absent from ``callback_metrics``).
        prog_bar: Record fields (without the prefix, e.g. ``"sharpness_dimension"``,
            ``"lambda_max"``) shown in the progress bar.

    Raises:
        ValueError: a non-string ``prefix``, a non-bool ``log_skipped`` or a ``prog_bar`` that
            is not a sequence of strings.
    """

    def __init__(
        self, prefix: str = "sdopt/", *, log_skipped: bool = True, prog_bar: Sequence[str] = ()
    ) -> None:
        super().__init__()
        self.prefix = check_str("prefix", prefix)
        self.log_skipped = check_bool("log_skipped", log_skipped)
        if isinstance(prog_bar, str) or not all(isinstance(n, str) for n in prog_bar):
            raise ValueError(
                f"Invalid prog_bar: {prog_bar!r} (must be a sequence of record field names, "
                "e.g. ('sharpness_dimension',))"
            )
        self.prog_bar = tuple(prog_bar)
        self._seen: dict[int, int] = {}
        self._left_out: set[int] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        opts = find_sd_optimizers(getattr(trainer, "optimizers", []))
        for opt in opts:  # restored from a checkpoint: the run that made them logged them
            self._seen[id(opt)] = opt.history[-1].step if opt.history else -1
        loggers = list(getattr(trainer, "loggers", []))
        taken = [lg for opt in opts for lg in opt.loggers]
        kept = without_duplicate_sinks(
            loggers, taken, what="the trainer's logger", owner="SDOptimizer(loggers=...)"
        )
        self._left_out = {id(lg) for lg in loggers if not any(lg is k for k in kept)}

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._left_out is None:  # on_train_start was not called (a hand-driven callback)
            self.on_train_start(trainer, pl_module)
        for opt in find_sd_optimizers(getattr(trainer, "optimizers", [])):
            last = self._seen.get(id(opt), -1)
            new = [r for r in opt.history if r.step > last and (r.ok or self.log_skipped)]
            if opt.history:
                self._seen[id(opt)] = max(last, opt.history[-1].step)
            if not new:
                continue
            now = _logger_step(trainer)  # the step Lightning logs this batch's metrics at
            for record in new:
                metrics = record.to_dict(self.prefix)
                # opt.step_count - 1 is the step of this batch's estimate
                step = now - (opt.step_count - 1 - record.step)
                if getattr(trainer, "is_global_zero", True):
                    for logger in getattr(trainer, "loggers", []):
                        if id(logger) not in (self._left_out or ()):
                            logger.log_metrics(metrics, step=step)
            finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
            shown = {self.prefix + name for name in self.prog_bar}
            for on_bar in (False, True):  # every rank: EarlyStopping decides on all of them
                part = {k: v for k, v in finite.items() if (k in shown) == on_bar}
                if part:
                    pl_module.log_dict(
                        part,
                        prog_bar=on_bar,
                        logger=False,
                        on_step=True,
                        on_epoch=False,
                        batch_size=1,
                    )


def _logger_step(trainer: Any) -> int:
    """The step at which Lightning logs the current training batch's metrics (the number of
    optimizer steps before this batch's), as Lightning's own ``LearningRateMonitor`` uses."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    if isinstance(step, int):
        return step
    return int(getattr(trainer, "global_step", 1)) - 1
