"""Training logged to an MLflow run as it goes (`Tracker.callback()`): the loss, the learning rate's schedule,
each evaluation at its step. components.training calls it; it reaches MLflow only through the Tracker."""
from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING

from components.training import Callback

if TYPE_CHECKING:
    from components.mlops.tracking import Tracker

log = logging.getLogger(__name__)


def _schedule_factor(info: dict):
    """step -> the learning-rate schedule's factor after that many optimizer steps, as components.training's
    own schedule computes it for this fit (on_train_begin's `info`); None when `info` does not say."""
    try:
        import torch

        from components.training import TrainConfig, make_schedule

        config = TrainConfig.from_dict(info["config"])
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        return make_schedule(optimizer, config, info["total_steps"], info["steps_per_epoch"]).lr_lambdas[0]
    except Exception:
        return None


class TrackingCallback(Callback):
    """Training as it goes: `train_loss` (mean over the last `every` steps) and `lr_scale` every `every` steps,
    each evaluation's metrics at its step, `epoch_train_loss` per epoch, the best step at the end.
    Several fits in one run (LAMA `all`) continue one another's steps. A logging failure is reported
    once and never stops training.

    The learning rate: `lr`, the optimizer's learning rate before the schedule (its first parameter group: the
    prompt's, the LM's when only the LM trains), is logged once at step 0, and `lr_scale`, the schedule's factor
    (the learning rate at a step is lr x lr_scale), at the steps. MLflow draws a constant series on an axis of
    its value +-1 (plotly's autorange), so a constant lr of 3e-4 logged at each step read as a flat line at 0;
    a figure logged at step 0 only is drawn as a bar from 0, and the factor reads on the +-1 axis (1.0: the
    full lr, 0.98 after an epoch of exponential decay)."""

    def __init__(self, tracker: Tracker, run_id: str, every: int = 10):
        self.tracker, self.run_id, self.every = tracker, run_id, max(1, int(every))
        self.offset = self.last = 0
        self.epochs_before = self.epoch = 0
        self.window: list[float] = []
        self.epoch_losses: list[float] = []
        self.steps_per_epoch = None
        self.factor = None  # step -> the schedule's factor of the current fit
        self.base_lrs: tuple[float, ...] = ()
        self.lr_logged = False
        self.failed = False

    def _log(self, metrics: dict, step: int) -> None:
        try:
            self.tracker.log_metrics(metrics, step=step, run_id=self.run_id)
        except Exception as error:  # the tracking store went away: training goes on
            if not self.failed:
                log.warning("MLflow logging to run %s failed, training goes on: %s", self.run_id, error)
            self.failed = True

    def on_train_begin(self, info: dict) -> None:
        self.offset, self.epochs_before = self.last, self.epoch
        self.steps_per_epoch = info.get("steps_per_epoch")
        self.window, self.epoch_losses = [], []
        self.factor, self.lr_logged = _schedule_factor(info), False
        config = info.get("config") or {}
        self.base_lrs = tuple(config[k] for k in ("lr", "lm_lr") if isinstance(config.get(k), (int, float)))
        if info.get("resumed_at_step"):
            with contextlib.suppress(Exception):
                self.tracker.client.set_tag(self.run_id, "resumed_at_step", str(info["resumed_at_step"]))

    def _base_lr(self, lr: float, factor: float) -> float | None:
        """The learning rate before the schedule: lr / factor, as configured (train.lr or train.lm_lr) when it
        is one of them (no rounding error of the division in the record)."""
        if factor <= 0:
            return None
        base = lr / factor
        return next((b for b in self.base_lrs if math.isclose(b, base, rel_tol=1e-6)), base)

    def on_step(self, step: int, loss: float, lr: float) -> None:
        at = self.offset + step
        self.last = at
        self.window.append(loss)
        self.epoch_losses.append(loss)
        factor = self.factor(step) if self.factor is not None else None
        if factor is not None and not self.lr_logged and (base := self._base_lr(lr, factor)) is not None:
            self._log({"lr": base}, 0)
            self.lr_logged = True
        if step % self.every == 0:
            schedule = {"lr_scale": factor} if factor is not None else {"lr": lr}  # no schedule known: the lr itself
            self._log({"train_loss": sum(self.window) / len(self.window), **schedule}, at)
            self.window = []
        if self.steps_per_epoch and step % self.steps_per_epoch == 0:
            self.epoch = self.epochs_before + step // self.steps_per_epoch
            self._log({"epoch_train_loss": sum(self.epoch_losses) / len(self.epoch_losses)}, self.epoch)
            self.epoch_losses = []

    def on_evaluate(self, step: int, epoch: int, metrics: dict, improved: bool) -> None:
        at = self.offset + step
        self.last = max(self.last, at)
        self._log({**metrics, "epoch": self.epochs_before + epoch}, at)

    def on_train_end(self, result) -> None:
        if self.window:
            self._log({"train_loss": sum(self.window) / len(self.window)}, self.last)
            self.window = []
        self._log({"best_step": self.offset + result.best_step, "train_seconds": result.seconds}, self.last)
