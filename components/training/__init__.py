"""Training: the loop (`fit`), its settings (`TrainConfig`), the callbacks that watch it, and writes that
survive a full disk."""
from components.training.callbacks import Callback, LogProgress
from components.training.loop import (TrainConfig, TrainResult, fit, improved, length_batches, make_accelerator,
                                      make_optimizer, make_schedule, seed_everything)
from components.training.storage import DiskFull, atomic_write

__all__ = ["Callback", "DiskFull", "LogProgress", "TrainConfig", "TrainResult", "atomic_write", "fit", "improved",
           "length_batches", "make_accelerator", "make_optimizer", "make_schedule", "seed_everything"]
