"""Units of a report saved as they finish, and the means and deviations built from them."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

from components.common import stable_hash


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

    def missing(self, method: str, units: list[tuple[str, int | None]], key: Callable) -> list[tuple[str, int | None]]:
        """The (task, seed) units of `method` that have no result of these settings yet."""
        return [(task, seed) for task, seed in units if self.get(method, task, seed, key(task, seed)) is None]

    def load(self, method: str, task: str, seeds: list[int | None], key: Callable) -> list[dict] | None:
        """The task's units over every seed, all of these settings; None while one is missing."""
        units = [self.get(method, task, seed, key(task, seed)) for seed in seeds]
        return None if None in units else units

    @property
    def timings(self) -> dict:
        """Per method: the seconds its runs took over every invocation, and its last invocation's figures."""
        path = self.root / "timing.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def add_timing(self, method: str, started: float, figures: dict | None = None) -> None:
        timings = self.timings
        seconds = timings.get(method, {}).get("seconds", 0.0) + time.time() - started
        timings[method] = {**(figures or {}), "seconds": seconds}
        write_atomic(self.root / "timing.json", json.dumps(timings, indent=1))


def scratch_dir(directory: Path, key: str) -> Path:
    """A unit's working directory, emptied unless a run of the same unit and settings left it: only that run's
    checkpoint may be resumed, never one trained with other settings."""
    marker = directory / "unit_key.txt"
    if not (marker.exists() and marker.read_text() == key):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        marker.write_text(key)
    return directory


def unit_key(config, **extra) -> Callable[[str, int | None], str]:
    """The settings hash of a report's (task, seed) unit: the run configuration's fingerprint (params, code and
    data versions) without its task list, plus `extra`. A unit computed otherwise is never reused."""
    fingerprint = config.fingerprint()
    fingerprint["params"] = {k: v for k, v in fingerprint["params"].items() if k != "task"}
    fingerprint.update(extra)
    # "relation": the field name the committed LAMA units were hashed with, for every benchmark's task
    return lambda task, seed: stable_hash({**fingerprint, "relation": task, "seed": seed})


def methods_and_seeds(settings: dict, methods, seeds, known: dict) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """A report's methods and seeds: the command line's, else params/report.yaml's; an unknown method or no seed
    fails here, before anything runs."""
    methods = tuple(methods or settings["methods"])
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown report method(s) {unknown}; choose from {', '.join(known)}")
    seeds = tuple(int(s) for s in (seeds or settings["seeds"]))
    if not seeds:
        raise ValueError("a report needs at least one seed")
    return methods, seeds


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
