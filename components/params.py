"""Parameters: YAML files in params/, one per concern, read by DVC stages, the CLI and the flows alike.
Overrides are dotted `key=value` pairs (`train.lr=1e-3`), values parsed as YAML."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

PARAMS_DIR = Path(os.environ.get("PTUNING_PARAMS_DIR", Path(__file__).resolve().parents[1] / "params"))


def load_params(name: str, overrides: dict | list[str] | None = None, params_dir: str | Path | None = None) -> dict:
    path = Path(params_dir or PARAMS_DIR) / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no parameter file {path}")
    params = yaml.safe_load(path.read_text()) or {}
    return apply_overrides(params, overrides or {})


def _parse_value(text: str):
    """YAML scalars and lists (`1e-3`, `[3, 3, 3]`); text that is no YAML (a template) stays text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(params: dict, overrides: dict | list[str]) -> dict:
    """`overrides` is {dotted.key: value} or ["dotted.key=value", ...]; unknown top-level sections fail."""
    params = copy.deepcopy(params)
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            key, value = item.split("=", 1)
            pairs[key.strip()] = _parse_value(value)
        overrides = pairs
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {key!r}: {part!r} is not a parameter section (known: {sorted(node)})")
            node = node[part]
        if not parents and leaf not in params:
            raise ValueError(f"unknown parameter {key!r}; known: {sorted(params)}")
        node[leaf] = value
    return params
