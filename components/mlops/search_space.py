"""The search space of a study: `{dotted.param: [values]}` read from params/search.yaml's `space`, each value a
point of the grid along its key (the paper's grid, 3 learning rates x 2 batch sizes, when none is given)."""
from __future__ import annotations

import math
import re

PAPER_GRID = {"train.lr": [1e-5, 2e-5, 3e-5], "train.batch_size": [16, 32]}

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _scalar(key: str, value):
    if isinstance(value, str) and _NUMBER.match(value.strip()):  # YAML 1.1 reads `1e-5` as a string
        number = float(value)
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"search space {key!r}: {value!r} is not a number, string, boolean or null")


def grid_space(params_search: dict | None) -> dict[str, list]:
    """The search space `{dotted.param: [values]}` from params/search.yaml's `space` (the paper's
    grid, 3 learning rates x 2 batch sizes, when there is none)."""
    space = (params_search or {}).get("space") or PAPER_GRID
    if not isinstance(space, dict):
        raise ValueError(f"search space must be a mapping of dotted parameter -> list of values, got {space!r}")
    out = {}
    for key, values in space.items():
        values = values if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise ValueError(f"search space {key!r} has no values")
        values = [_scalar(key, v) for v in values]
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"search space {key!r} repeats a value: {values}")
        out[str(key)] = values
    return out


def grid_size(space: dict) -> int:
    """The number of points of the grid: the product of every key's number of values."""
    return math.prod(len(v) for v in space.values())
