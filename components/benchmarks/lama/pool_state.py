"""What a LAMA prompt pool (shared.py) keeps to resume exactly and to say where it is: its checkpoint (safetensors
+ JSON, no pickle), the random generators' states, a digest of a prompt's state, and a progress line."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from components.training.storage import atomic_write

log = logging.getLogger("components.benchmarks.lama.shared")
CHECKPOINT = "pool.json"   # beside it, the tensors: pool-<shared step>.safetensors


class Heartbeat:
    """At most one line every `every_s` seconds on a logger (`components...`: the terminal, and Prefect's logs when
    a flow runs this): a long phase without a progress bar still says where it is."""

    def __init__(self, every_s: float, logger: logging.Logger = log,
                 clock: Callable[[], float] = time.monotonic):
        self.every_s, self.log, self.clock = every_s, logger, clock
        self.last = clock()

    def __call__(self, message: str, *args) -> bool:
        """Log the line if `every_s` have passed since the last one (or the start); True when it did."""
        now = self.clock()
        if now - self.last < self.every_s:
            return False
        self.last = now
        self.log.info(message, *args)
        return True


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict (names, dtypes, shapes and bytes, in name order): two prompts trained alike to the
    last bit have the same digest."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class PoolCheckpoint:
    """A pool's state in `directory`: `pool.json` (the jobs, the queue, each active job's bookkeeping, optimizer
    settings and schedule, the Python RNG, the timing) naming `pool-<step>.safetensors` (every tensor: encoders,
    best states, optimizer moments, torch's RNG states) with its sha256. Both are written atomically, the tensors
    first, so that a kill at any moment leaves the previous checkpoint whole; nothing is unpickled on loading."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / CHECKPOINT

    def read(self) -> dict | None:
        """pool.json's content, or None when there is no checkpoint."""
        return json.loads(self.path.read_text()) if self.path.exists() else None

    def pending(self) -> list[dict] | None:
        """The jobs (`job_record`: key, relation, seed ...) active or queued at the checkpoint, in its order."""
        meta = self.read()
        return None if meta is None else meta["jobs"]

    def save(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        name = f"pool-{meta['shared_step']:09d}.safetensors"
        data = save_safetensors(tensors)
        atomic_write(self.directory / name, data, needed=len(data))
        meta = {**meta, "tensors": name, "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write(self.path, json.dumps(meta))
        for old in self.directory.glob("pool-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta = self.read()
        data = (self.directory / meta["tensors"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError(f"the pool checkpoint {self.directory / meta['tensors']} does not match its sha256 in "
                             f"{self.path}: remove {self.directory} to start the pool afresh")
        return meta, load_safetensors(data)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        for old in self.directory.glob("pool-*.safetensors"):
            old.unlink(missing_ok=True)


def rng_state(tensors: dict[str, torch.Tensor]) -> dict:
    """Python's RNG state (returned, JSON) and torch's CPU and CUDA states (added to `tensors`)."""
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, state, gauss = random.getstate()
    return {"python": [version, list(state), gauss], "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def restore_rng(saved: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    torch.set_rng_state(tensors["rng.torch"])
    if saved["cuda_devices"]:
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(saved["cuda_devices"])])


def job_record(job) -> dict:
    """What a checkpoint says of a job (shared.Job), to check that a resumed pool is given the jobs it had."""
    return {"key": job.key, "relation": job.data.relation, "seed": job.config.seed, "encoder": job.encoder,
            "config": json.loads(json.dumps(asdict(job.config))),
            "facts": {split: len(facts) for split, facts in job.data.splits.items()}}
