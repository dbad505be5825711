"""Small ideas the whole library shares, each written once: nested-dict flattening, numeric metrics, names
safe for MLflow and Optuna, URLs with their password hidden, stable hashes, removing resume checkpoints."""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT_DIR = "checkpoint"  # a run directory's resume state: not needed once the run has finished


def flatten(values: dict | None, prefix: str = "") -> dict:
    """{"relations": {"P19": {"test_p1": 0.3}}} -> {"relations.P19.test_p1": 0.3}."""
    out = {}
    for key, value in (values or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def as_number(value: Any) -> float | None:
    """A finite float for ints, floats, booleans and numpy/torch scalars; None for anything else (NaN too)."""
    if isinstance(value, numbers.Number) and not isinstance(value, complex):
        number = float(value)
        return None if math.isnan(number) else number
    return None


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The numeric entries of a (nested) metrics dict, flattened: what a metrics store can keep."""
    return {k: n for k, v in flatten(metrics).items() if (n := as_number(v)) is not None}


def safe_name(*parts: Any, allowed: str = r"A-Za-z0-9_.\-", max_length: int = 250) -> str:
    """`parts` joined by `-`, every run of other characters replaced by `-` (a hub id's `/` too)."""
    name = "-".join(str(p).strip() for p in parts if p is not None and str(p).strip())
    name = re.sub(rf"[^{allowed}]+", "-", name)
    return re.sub(r"-{2,}", "-", name).strip("-")[:max_length]


def redact_url(url: str) -> str:
    """`scheme://user:secret@host/...` -> `scheme://user:***@host/...`."""
    return re.sub(r"(://[^/:@]*):[^/@]*@", r"\1:***@", str(url))


def stable_hash(value: Any, length: int = 12) -> str:
    """A short sha256 of `value`'s canonical JSON: equal values, equal hashes, across processes."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def remove_checkpoints(directory: str | Path) -> None:
    """Drop every resume checkpoint below `directory` (a finished run keeps only its results)."""
    for path in sorted(Path(directory).rglob(CHECKPOINT_DIR), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
