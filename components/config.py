"""Parameters: the YAML files in the checkout's `params/`, one per concern, and dotted `key=value` overrides.

Every reader of parameters (the CLI, the flows, the DVC stages, `dvc exp run -S`) goes through here:
- the files are those of the checkout the command runs in (`project_root()`), never of the installed package;
- values parse as YAML 1.2 does, so `1e-3` is a float (PyYAML's YAML 1.1 reads it as a string);
- an override names an existing key (`train.lr=1e-3`); a typo is an error, not a new, unused key.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml


class ConfigError(ValueError):
    """A parameter that cannot be used; the message names it."""


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's floats: `1e-3`, `1E5` and `.5` are numbers."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=Loader)


def parse_value(text: str) -> Any:
    """A command-line value as YAML reads it (`1e-3`, `[3, 3, 3]`, `null`); text that is no YAML stays text."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def parse_pairs(pairs: Iterable[str], flag: str = "--set", as_yaml: bool = True) -> dict[str, Any]:
    """["train.lr=1e-3", "tasks=[P19,P36]"] -> {"train.lr": 0.001, "tasks": ["P19", "P36"]} (as_yaml=False:
    the values stay strings, as an environment needs them)."""
    out = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {pair!r} is not of the form key=value")
        out[key.strip()] = parse_value(value) if as_yaml else value
    return out


def project_root(start: str | Path | None = None) -> Path:
    """The checkout a command works in: $PTUNING_ROOT, else the nearest folder at or above `start` (the
    current directory) that holds `params/` and `dvc.yaml`."""
    if os.environ.get("PTUNING_ROOT"):
        return Path(os.environ["PTUNING_ROOT"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params").is_dir() and (folder / "dvc.yaml").is_file():
            return folder
    raise ConfigError(f"{here} is not inside a ptuning checkout (no folder with params/ and dvc.yaml at or above it): "
                      "run the command from the project, or set PTUNING_ROOT")


def in_root(path: str | Path, root: Path) -> Path:
    """`path` as given when absolute, else relative to the checkout."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (root / path)


def load_params(name: str, root: str | Path | None = None) -> dict:
    """The content of `params/<name>.yaml` in the checkout."""
    path = project_root(root) / "params" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no parameter file {path}")
    try:
        content = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a YAML text file (byte {error.start} is not UTF-8)") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if content is not None and not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters, got {type(content).__name__}")
    return content or {}


def apply_overrides(params: dict, overrides: dict[str, Any] | Iterable[str] | None) -> dict:
    """A copy of `params` with dotted overrides ({"train.lr": 1e-3} or ["train.lr=1e-3"]) applied.
    String values are parsed as YAML. Keys must exist; a mapping value replaces the mapping whole."""
    params = copy.deepcopy(params)
    if overrides is None:
        return params
    pairs = overrides if isinstance(overrides, dict) else parse_pairs(overrides)
    for key, value in pairs.items():
        *parents, leaf = str(key).split(".")
        node = params
        for depth, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                known = sorted(k for k, v in node.items() if isinstance(v, dict))
                raise ConfigError(f"unknown parameter {key!r}: {'.'.join(parents[:depth + 1])!r} is not a section "
                                  f"(sections here: {', '.join(known) or 'none'})")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown parameter {key!r}; known here: {', '.join(sorted(map(str, node)))}")
        node[leaf] = parse_value(value) if isinstance(value, str) else copy.deepcopy(value)
    return params


def apply_preset(params: dict, name: str | None) -> dict:
    """`params` with its `presets:` table's entry `name` applied as overrides (None: as they are). The table
    is dropped and the name kept: a run records which preset it used, not the others it could have."""
    presets = params.get("presets") or {}
    params = {k: v for k, v in params.items() if k != "presets"}
    if name is None:
        return params
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(map(str, presets)) or 'none in this file'}")
    return {**apply_overrides(params, presets[name]), "preset": name}


SHARED_ENV = {"mirror": "PTUNING_DATA_MIRROR", "tokenizers": "PTUNING_TOKENIZERS"}


def shared_path(key: str, given: str | Path | None = None, root: str | Path | None = None) -> Path:
    """A shared input folder (`mirror`, `tokenizers`): the explicit argument, else its environment variable
    ($PTUNING_DATA_MIRROR, $PTUNING_TOKENIZERS), else `params/data.yaml: <key>` of the checkout."""
    if given is not None:
        return Path(given).expanduser()
    if os.environ.get(SHARED_ENV[key]):
        return Path(os.environ[SHARED_ENV[key]]).expanduser()
    checkout = project_root(root)
    return in_root(load_params("data", checkout)[key], checkout).resolve()
