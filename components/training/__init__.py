"""Training: the loop (`fit`), its settings (`TrainConfig`) and the callbacks that watch it."""
from components.training.callbacks import Callback, LogProgress
from components.training.loop import TrainConfig, TrainResult, fit, make_optimizer, seed_everything

__all__ = ["Callback", "LogProgress", "TrainConfig", "TrainResult", "fit", "make_optimizer", "seed_everything"]
