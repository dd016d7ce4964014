"""PyTorch Lightning adapter: forward :class:`sdopt.SDOptimizer` records to the trainer's loggers.

Return an :class:`~sdopt.SDOptimizer` from ``configure_optimizers`` as you would any optimizer
(Lightning calls ``optimizer.step(closure)``, which SDOptimizer runs immediately under
``enable_grad``), and add :class:`SharpnessDimensionCallback` to the trainer::

    import lightning as L
    from sdopt.integrations.lightning import SharpnessDimensionCallback

    class Module(L.LightningModule):
        def configure_optimizers(self):
            base = torch.optim.AdamW(self.parameters(), lr=1e-3)
            return SDOptimizer(base, model=self, loss_fn=F.cross_entropy, data=batch, every=100)

    trainer = L.Trainer(callbacks=[SharpnessDimensionCallback()])

After every training batch the callback sends each new record's ``to_dict("sdopt/")`` to
every logger of the trainer (``trainer.loggers``) on rank 0, at ``step=trainer.global_step``.
Lightning saves and restores the optimizer's ``state_dict`` in its checkpoints, which includes
SDOptimizer's counters, LR scale, generator and eigenvector cache.

``lightning`` is optional: ``pip install lightning``.
"""

from __future__ import annotations

from typing import Any

from sdopt._checks import check_bool, check_str
from sdopt.integrations import find_sd_optimizers

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
    """Log new :class:`sdopt.records.EstimateRecord` s to the trainer's loggers.

    Args:
        prefix: Key prefix of the logged metrics.
        log_skipped: Also log records of skipped estimates (their numeric fields are NaN).

    Raises:
        ValueError: a non-string ``prefix`` or a non-bool ``log_skipped``.
    """

    def __init__(self, prefix: str = "sdopt/", *, log_skipped: bool = True) -> None:
        super().__init__()
        self.prefix = check_str("prefix", prefix)
        self.log_skipped = check_bool("log_skipped", log_skipped)
        self._seen: dict[int, int] = {}

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if getattr(trainer, "global_rank", 0) != 0:
            return
        for opt in find_sd_optimizers(getattr(trainer, "optimizers", [])):
            last = self._seen.get(id(opt), -1)
            new = [r for r in opt.history if r.step > last]
            for record in new:
                if record.ok or self.log_skipped:
                    for logger in getattr(trainer, "loggers", []):
                        logger.log_metrics(record.to_dict(self.prefix), step=trainer.global_step)
            if new:
                self._seen[id(opt)] = new[-1].step
