"""Callbacks: how whoever watches training (pruning, tracking, progress) attaches to the loop."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from components.training.loop import TrainResult

log = logging.getLogger(__name__)


class Callback:
    """Hooks of the loop. Raising from one (e.g. optuna.TrialPruned) stops training."""

    def on_train_begin(self, info: dict) -> None: ...
    def on_step(self, step: int, loss: float, lr: float) -> None: ...
    def on_evaluate(self, step: int, epoch: int, metrics: dict, improved: bool) -> None: ...
    def on_train_end(self, result: "TrainResult") -> None: ...


class LogProgress(Callback):
    """Progress on the `components` logger: the terminal, and Prefect's logs when a flow runs this."""

    def __init__(self, every: int = 10, prefix: str = ""):
        self.every, self.prefix, self.total = every, prefix, None
        self.log = log

    def on_train_begin(self, info):
        self.total = info["total_steps"]
        self.log.info("%straining %s steps on %s (%s)%s", self.prefix, self.total, info["device"], info["precision"],
                      f", resumed at step {info['resumed_at_step']}" if info["resumed_at_step"] else "")

    def on_step(self, step, loss, lr):
        if step % self.every == 0:
            self.log.info("%sstep %d/%s loss %.4f lr %.2e", self.prefix, step, self.total, loss, lr)

    def on_evaluate(self, step, epoch, metrics, improved):
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self.log.info("%seval at step %d (epoch %d): %s%s", self.prefix, step, epoch, shown, " *" if improved else "")
