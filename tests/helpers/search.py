"""A tiny real task for Optuna's trials: fit a linear regression through the real training loop; dev score = -MSE.
The search tests' worker processes import it from here (tests/ on their sys.path)."""
import torch
from torch import nn

from components.training import TrainConfig, fit


def tiny_train(point: dict, callbacks: list, steps: int = 12, eval_every: int = 3) -> dict:
    """A search point {"train.lr": .., "train.batch_size": ..} -> nested metrics, as a benchmark returns them."""
    torch.manual_seed(0)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    x = torch.randn(64, 4)
    y = x @ w
    items = list(range(64))
    model = nn.Linear(4, 1)
    config = TrainConfig(lr=point["train.lr"], batch_size=point["train.batch_size"], epochs=50,
                         max_steps=steps, eval_every=eval_every, precision="fp32", optimizer="adam", seed=1)

    def loss_fn(m, batch):
        return nn.functional.mse_loss(m(batch["x"]).squeeze(-1), batch["y"])

    def evaluate(m):
        return {"dev.neg_mse": -nn.functional.mse_loss(m(x).squeeze(-1), y).item()}

    collate = lambda idx: {"x": x[idx], "y": y[idx]}
    result = fit(model, items, [1] * len(items), collate, loss_fn, evaluate, config, select=("dev.neg_mse",),
                 callbacks=callbacks)
    return {"dev": {"score": result.best_metrics["dev.neg_mse"]}, "steps": result.steps}
