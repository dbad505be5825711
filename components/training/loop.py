"""The training loop. It knows nothing of tasks, Optuna or MLflow: a task hands it `loss_fn` and
`evaluate_fn`, and whoever watches (pruning, tracking, progress) attaches a `Callback`.

Runs on CUDA when present (bf16 autocast where supported), accumulates gradients for large effective
batches, batches examples of similar length together, keeps no gradients for a frozen LM, and saves a
checkpoint at every evaluation so that a killed run resumes where it was and ends with the same result.
Multi-GPU: launch with `accelerate launch` (or torchrun); the loop goes through `accelerate.Accelerator`.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from components.training.callbacks import Callback
from components.training.storage import load_checkpoint, save_checkpoint

CHECKPOINT = "last.safetensors"
# A checkpoint holds every trainable tensor and the optimizer's state (2 GiB for a jointly trained 135M LM, ~10 s to
# write on a CPU machine). After a write that took over CHEAP_WRITE_S, the next waits until training has run
# WRITE_SHARE_LIMIT's inverse times as long, so writes cost at most about a tenth of the run; cheap ones happen at every
# evaluation. Any evaluation is a valid resume point: when the writes happen never changes the figures.
CHEAP_WRITE_S, WRITE_SHARE_LIMIT = 1.0, 0.1


@dataclass
class TrainConfig:
    lr: float = 1e-5  # prompt encoder
    lm_lr: float = 1e-5  # LM, when it is trained
    weight_decay: float = 0.0
    lm_weight_decay: float = 0.0  # not applied to biases and LayerNorm weights
    optimizer: str = "adamw"  # adam | adamw
    batch_size: int = 8  # effective batch: one optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    epochs: int | None = 1  # None: as many passes as max_steps needs
    max_steps: int | None = None  # stops earlier than `epochs` when reached
    eval_every: int | None = None  # steps between evaluations; None: every epoch
    patience: int | None = None  # evaluations without improvement before stopping; None: never
    schedule: str = "constant"  # constant | linear (with warmup) | exponential (decay per epoch)
    warmup_steps: int = 0
    lr_decay: float = 1.0  # exponential schedule: factor per epoch
    max_grad_norm: float | None = 1.0
    precision: str = "auto"  # auto (bf16 on a CUDA device that has it) | bf16 | fp32
    length_bucketing: bool = True
    seed: int = 34
    deterministic: bool = True  # reproducible kernels (seed_everything): the same seed, the same figures

    def __post_init__(self):
        wrong = [f"{f.name}={getattr(self, f.name)!r} (expected {f.type})" for f in fields(self)
                 if not _has_type(getattr(self, f.name), f.type)]
        if wrong:
            raise ValueError(f"invalid training settings: {', '.join(wrong)}")
        checks = {
            "lr": self.lr > 0, "lm_lr": self.lm_lr > 0, "weight_decay": self.weight_decay >= 0,
            "lm_weight_decay": self.lm_weight_decay >= 0, "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0,
            "epochs": (self.epochs is None and self.max_steps is not None) or (self.epochs or 0) >= 1,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "eval_every": self.eval_every is None or self.eval_every >= 1,
            "patience": self.patience is None or self.patience >= 1, "warmup_steps": self.warmup_steps >= 0,
            "lr_decay": 0 < self.lr_decay <= 1, "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "optimizer": self.optimizer in ("adam", "adamw"),
            "schedule": self.schedule in ("constant", "linear", "exponential"),
            "precision": self.precision in ("auto", "bf16", "fp32"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"invalid training settings: {shown} (learning rates must be > 0, counts >= 1, "
                             "batch_size divisible by grad_accum, lr_decay in (0, 1])")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)


def _has_type(value, annotation: str) -> bool:
    """`value` fits a field annotated `annotation` ("float", "int | None", ...): an int is a float, a bool is no
    number, and a YAML string such as "abc" is none."""
    kinds = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,), "None": (type(None),)}
    accepted = tuple(t for part in annotation.split("|") for t in kinds[part.strip()])
    return isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)


@dataclass
class TrainResult:
    best_metrics: dict
    best_step: int
    steps: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def improved(new: dict, best: dict | None, keys: tuple[str, ...]) -> bool:
    """Better when no selection metric got worse and one got better (PET's rule for CB and MultiRC)."""
    if best is None:
        return True
    return all(new[k] >= best[k] for k in keys) and any(new[k] > best[k] for k in keys)


def length_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, bucketing: bool) -> list[list[int]]:
    """A seeded, epoch-dependent order of batches. With bucketing, examples are sorted by length inside
    windows of 50 batches so a batch pads little, and the batches are then shuffled."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if bucketing:
        window = 50 * batch_size
        order = [i for s in range(0, len(order), window) for i in sorted(order[s:s + window], key=lambda j: lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if bucketing:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python's and torch's generators (every CUDA device's too) and, with `deterministic`, make the
    kernels reproducible, so that a seeded run gives the same figures to the last digit.

    CPU: `torch.use_deterministic_algorithms(True)`. The one nondeterministic kernel on P-tuning's path is the
    backward of `vectors[prompt_index]` (PromptedLM.input_embeddings): `index_put_(accumulate=True)` adds each
    prompt position's gradient into its prompt vector from several threads in whatever order they finish.
    Measured with 2 threads: 30 of 30 repeats of that backward differed bitwise (0 of 30 with one thread, or
    with this flag, which switches to a sorted, ordered accumulation); the LSTM, the MLP, the frozen LM's
    matmuls, the loss, fused Adam and the seeded data order repeat exactly. Over 20 SmolLM2-135M steps it moved
    test P@1 on P19 by a few facts, as the issue reported (0.1642 vs 0.1614 after 60 steps).

    CUDA, as reproducible as the hardware allows, on the same GPU model, driver and library versions:
    - `torch.use_deterministic_algorithms(True)`: deterministic scatter/index_put/embedding backward and the
      deterministic backward of memory-efficient attention (SDPA); an op with no deterministic CUDA kernel
      raises instead of silently varying (pass deterministic=False, `--set train.deterministic=false`, to run it);
    - `CUBLAS_WORKSPACE_CONFIG=:4096:8`: cuBLAS picks reproducible reduction splits only with a fixed
      workspace; read once, at the process's first cuBLAS call, so it is set here only if still unset (export
      it in the environment when CUDA work precedes the first `fit`);
    - `torch.backends.cudnn.deterministic = True`, `torch.backends.cudnn.benchmark = False`: cuDNN (the LSTM)
      uses one fixed algorithm instead of the fastest of a timed race.
    Other GPU models, drivers or library versions (and TF32, bf16) may still round differently: the figures
    repeat on one machine, and agree across machines only to within that rounding."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def make_accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    use_bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    mixed_precision = "bf16" if use_bf16 else "no"
    # accelerate keeps one process-wide state and refuses a second Accelerator with another mixed_precision. A single
    # process that runs fit() with different precisions (an Optuna worker, a notebook, the tests) resets it; under a
    # distributed launcher every fit uses the launch's settings, so it is left alone there.
    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam/AdamW over the prompt encoder and, when it trains, the LM (its own lr; no decay on biases and norms).
    fused: one kernel per step instead of ~10 passes over every parameter and no transient copies
    (CPU, SmolLM2-135M joint: 830 -> 95 ms per optimizer step); CUDA has it as well."""
    optimizer_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(_param_groups(model, config), fused=True)


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    prompt = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("lm.")]
    lm_decay, lm_no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and name.startswith("lm."):
            (lm_no_decay if p.ndim < 2 or "norm" in name.lower() else lm_decay).append(p)
    groups = [{"params": prompt, "lr": config.lr, "weight_decay": config.weight_decay},
              {"params": lm_decay, "lr": config.lm_lr, "weight_decay": config.lm_weight_decay},
              {"params": lm_no_decay, "lr": config.lm_lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_schedule(optimizer, config: TrainConfig, total_steps: int, steps_per_epoch: int):
    def factor(step: int) -> float:
        if config.schedule == "linear":
            if step < config.warmup_steps:
                return (step + 1) / max(config.warmup_steps, 1)
            return max(0.0, (total_steps - step) / max(total_steps - config.warmup_steps, 1))
        if config.schedule == "exponential":
            return config.lr_decay ** (step // steps_per_epoch)
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _trainable_state(model: nn.Module) -> dict:
    """A CPU copy of the trainable tensors: the best state need not hold a second copy of a jointly tuned LM in
    GPU memory."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in names}


def fit(
    model: nn.Module,
    train_items: list,
    lengths: list[int],
    collate: Callable[[list], dict],
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    evaluate_fn: Callable[[nn.Module], dict],
    config: TrainConfig,
    select: tuple[str, ...],
    callbacks: list[Callback] = (),
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Train `model` on `train_items`, evaluate with `evaluate_fn` and keep the best trainable state
    by the `select` metrics. The model ends holding its best state."""
    if not train_items:
        raise ValueError("no training examples")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: every parameter is frozen")
    seed_everything(config.seed, config.deterministic)
    accelerator = make_accelerator(config.precision)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_items) / config.batch_size)
    epochs = config.epochs or math.ceil(config.max_steps / steps_per_epoch)
    total_steps = min(config.max_steps or math.inf, epochs * steps_per_epoch)
    scheduler = make_schedule(optimizer, config, total_steps, steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    state = {"step": 0, "epoch": 0, "best": None, "best_step": 0, "bad_evals": 0, "history": []}
    best_state = None
    checkpoint = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if checkpoint is not None and checkpoint.exists():
        saved = load_checkpoint(checkpoint)
        accelerator.unwrap_model(model).load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state, best_state = saved["state"], saved.get("best_state", saved["model"])
        torch.set_rng_state(saved["rng"])

    # `model`: a callback may set the starting weights of a run that is not resumed (ptuning train --init-from)
    for cb in callbacks:
        cb.on_train_begin({"config": asdict(config), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                           "resumed_at_step": state["step"], "device": str(device), "precision": accelerator.mixed_precision,
                           "model": accelerator.unwrap_model(model)})
    if best_state is None:
        best_state = _trainable_state(accelerator.unwrap_model(model))
    started = time.time()
    stop = False  # no checkpoint is written by the evaluation that ends training
    micro = config.batch_size // config.grad_accum
    writes = {"cost": 0.0, "at": time.time()}

    def write_checkpoint():
        """Everything a resumed run needs; the best state only where it is not the current one."""
        t0 = time.time()
        current = _trainable_state(accelerator.unwrap_model(model))
        payload = {"model": current, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "state": state, "rng": torch.get_rng_state()}
        if state["best_step"] != state["step"]:
            payload["best_state"] = best_state
        # atomic: a kill or a full disk (DiskFull) mid-write leaves the previous checkpoint and no partial file
        save_checkpoint(payload, checkpoint)
        writes.update(cost=time.time() - t0, at=time.time())

    def evaluate_and_checkpoint(ends_training: bool):
        model.eval()
        with torch.no_grad(), accelerator.autocast():
            metrics = evaluate_fn(accelerator.unwrap_model(model))
        model.train()
        better = improved(metrics, state["best"], select)
        if better:
            state.update(best=metrics, best_step=state["step"], bad_evals=0)
            best_state.update(_trainable_state(accelerator.unwrap_model(model)))
        else:
            state["bad_evals"] += 1
        state["history"].append({"step": state["step"], "epoch": state["epoch"], **metrics})
        patience_out = config.patience is not None and state["bad_evals"] >= config.patience
        # the evaluation that ends training writes none: its run ends in seconds, and a kill before then repeats only them
        due = writes["cost"] < CHEAP_WRITE_S or time.time() - writes["at"] >= writes["cost"] / WRITE_SHARE_LIMIT
        due = due and state["step"] > 0  # the start needs no checkpoint: a rerun begins there anyway
        if checkpoint is not None and accelerator.is_main_process and due and not (ends_training or patience_out):
            write_checkpoint()
        for cb in callbacks:
            cb.on_evaluate(state["step"], state["epoch"], metrics, better)
        return patience_out

    model.train()
    if state["step"] == 0:
        # the start is a candidate like any evaluated state, and the learning curve's first point
        stop = evaluate_and_checkpoint(False)
    while state["epoch"] < epochs and not stop:
        batches = length_batches(lengths, config.batch_size, config.seed, state["epoch"], config.length_bucketing)
        done_in_epoch = state["step"] - state["epoch"] * steps_per_epoch
        for indices in batches[done_in_epoch:]:
            step_loss = torch.zeros((), device=device)
            chunks = [indices[s:s + micro] for s in range(0, len(indices), micro)]
            for j, chunk in enumerate(chunks):
                batch = collate([train_items[i] for i in chunk])
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                # Only the last micro-batch of a step synchronises gradients across GPUs.
                sync = contextlib.nullcontext() if j == len(chunks) - 1 else accelerator.no_sync(model)
                with sync:
                    with accelerator.autocast():
                        # Micro-batches weigh by their share of the step's examples: same gradient as one batch.
                        loss = loss_fn(model, batch) * (len(chunk) / len(indices))
                    accelerator.backward(loss)
                step_loss += loss.detach().float()  # no host sync per micro-batch
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step_loss = step_loss.item()  # one host sync per step: callbacks get a float
            state["step"] += 1
            for cb in callbacks:
                cb.on_step(state["step"], step_loss, scheduler.get_last_lr()[0])
            last_step = config.max_steps is not None and state["step"] >= config.max_steps
            if (config.eval_every and state["step"] % config.eval_every == 0) or last_step:
                stop = evaluate_and_checkpoint(last_step) or last_step
                if stop:
                    break
        else:
            state["epoch"] += 1
            if config.eval_every is None:
                stop = evaluate_and_checkpoint(state["epoch"] >= epochs)

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(best_state, strict=False)
    result = TrainResult(best_metrics=state["best"] or {}, best_step=state["best_step"], steps=state["step"],
                         stopped_early=state["bad_evals"] >= (config.patience or math.inf),
                         history=state["history"], seconds=time.time() - started)
    for cb in callbacks:
        cb.on_train_end(result)
    return result
