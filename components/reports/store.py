"""Units of a report saved as they finish, and the means and deviations built from them."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path


class UnitStore:
    """`<root>/<method>/<task>-s<seed>.json`, each holding the hash of the settings that produced it: a unit of
    other settings is not reused (it is recomputed and overwritten)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, method: str, task: str, seed: int | None) -> Path:
        return self.root / method / (f"{task}-s{seed}.json" if seed is not None else f"{task}.json")

    def get(self, method: str, task: str, seed: int | None, settings_hash: str) -> dict | None:
        path = self.path(method, task, seed)
        if not path.exists():
            return None
        unit = json.loads(path.read_text())
        return unit if unit.get("settings_hash") == settings_hash else None

    def put(self, method: str, task: str, seed: int | None, settings_hash: str, unit: dict) -> None:
        path = self.path(method, task, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**unit, "method": method, "task": task, "seed": seed,
                                   "settings_hash": settings_hash}, indent=1))
        os.replace(tmp, path)  # a kill mid-write leaves no half unit


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
