"""The run configuration: one function, `resolve`, builds it for every entry point (`ptuning train`, the DVC
stages, `dvc exp run -S`, the flow and `prefect deployment run -p`), and it checks everything it can before
anything happens: benchmark, tasks, models, methods, templates, training settings and the output directory.

    params/<benchmark>.yaml  --preset, overrides-->  params  --Benchmark.plan-->  TaskPlan(task, TrainConfig)
                                                                        (the one place a TrainConfig is built)

A `RunConfig` also knows its fingerprint: the resolved parameters, the version of the library code that
training results depend on, and the version of the data it reads. A run directory records it, and a run only
resumes from (or reuses) a directory with the same fingerprint.
"""
from __future__ import annotations

import ast
import hashlib
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import components
from components.benchmarks import Benchmark, TaskPlan, get_benchmark
from components.common import stable_hash
from components.config import ConfigError, apply_overrides, apply_preset, in_root, load_params, parse_pairs, project_root

PATH_KEYS = ("data_dir",)  # parameters that name a folder of the checkout


@dataclass(frozen=True)
class RunConfig:
    benchmark: str
    params: dict  # params/<benchmark>.yaml with the overrides applied, paths made absolute
    tasks: tuple[TaskPlan, ...]
    root: Path  # the checkout
    overrides: dict = field(default_factory=dict)  # as given: what a person typed, for the record
    init_from: str | None = None  # the learned prompt the run starts from (components/mlops/init_from.py)

    @property
    def spec(self) -> Benchmark:
        return get_benchmark(self.benchmark)

    def with_overrides(self, overrides: dict) -> "RunConfig":
        """The same run with more overrides (a search trial's point, a final run's seed), resolved anew."""
        return replace(resolve(self.benchmark, {**self.overrides, **overrides}, self.root), init_from=self.init_from)

    def fingerprint(self) -> dict:
        """What a result depends on: parameters, library code, data. Equal fingerprints, equal results."""
        start = {"init_from": self.init_from} if self.init_from else {}  # absent otherwise: earlier runs keep theirs
        return {"benchmark": self.benchmark, "params": _portable(self.params, self.root), **start,
                "code_version": code_version(self.benchmark), "data_version": prepared_data_hash(self.params.get("data_dir"))}

    def fingerprint_hash(self) -> str:
        return stable_hash(self.fingerprint(), 16)


def resolve(benchmark: str, overrides: dict[str, Any] | list[str] | None = None, root: str | Path | None = None) -> RunConfig:
    """params/<benchmark>.yaml of the checkout with `overrides` (dotted keys; strings parsed as YAML),
    validated by the benchmark: every bad input is a ConfigError (or another ValueError) here."""
    spec = get_benchmark(benchmark)
    checkout = project_root(root)
    given = dict(overrides) if isinstance(overrides, dict) else parse_pairs(overrides or [])
    params = load_params(spec.name, checkout)
    params = apply_overrides(apply_preset(params, given.get("preset", params.get("preset"))), given)
    for key in PATH_KEYS:
        if params.get(key):
            params[key] = str(in_root(params[key], checkout).resolve())
    tasks = tuple(spec.plan(params))
    return RunConfig(spec.name, params, tasks, checkout, given)


def _portable(params: dict, root: Path) -> dict:
    """Paths relative to the checkout, so that two checkouts of the same commit share fingerprints."""
    out = dict(params)
    for key in PATH_KEYS:
        if out.get(key):
            try:
                out[key] = str(Path(out[key]).relative_to(root))
            except ValueError:
                pass
    return out


def check_writable(directory: str | Path) -> Path:
    """The output directory, or the nearest folder above it that exists, must be writable."""
    directory = Path(directory).resolve()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {directory} is not writable ({existing} is not a writable folder)")
    return directory


# --- versions of code and data ---------------------------------------------------------------------

def _module_file(name: str) -> Path | None:
    base = Path(components.__file__).parent.joinpath(*name.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(name: str, path: Path) -> set[str]:
    """The `components.*` modules that module `name` imports (packages above each count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            parts = target.split(".")
            if parts[0] == "components":
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in found if _module_file(m) is not None}


@lru_cache(maxsize=None)
def code_modules(benchmark: str) -> tuple[str, ...]:
    """Every library module the benchmark's row imports, directly or not (and the registry itself)."""
    todo, seen = [get_benchmark.__module__, f"components.benchmarks.{benchmark}"], set()
    while todo:
        name = todo.pop()
        if name in seen or (path := _module_file(name)) is None:
            continue
        seen.add(name)
        todo.extend(_imports(name, path) - seen)
    return tuple(sorted(seen))


def code_statements(source: str) -> list[str]:
    """A module's code as it runs: its top-level statements' syntax trees, without docstrings, comments,
    formatting or import statements (they say where code sits, not what it does). Sorted, so a definition moved
    to another module, or a module renamed, leaves them as they were. (`ast.dump`'s form may change with the
    Python version: a Python upgrade recomputes results once.)"""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        for block in ("body", "orelse", "finalbody"):
            if isinstance(getattr(node, block, None), list):
                setattr(node, block, [s for s in getattr(node, block) if not isinstance(s, (ast.Import, ast.ImportFrom))])
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            del body[0]
    return sorted(ast.dump(statement) for statement in tree.body)


def source_version(*paths: Path) -> str:
    """A hash of the `code_statements` of these files, pooled."""
    statements = sorted(s for path in paths for s in code_statements(path.read_text()))
    return hashlib.sha256("\n".join(statements).encode()).hexdigest()[:12]


@lru_cache(maxsize=None)
def code_version(benchmark: str) -> str:
    """The `source_version` of `code_modules`: a result computed by other code is never reused, and one whose
    code only moved, or gained a comment, is. Derived from the imports themselves, so no hand-kept list can
    fall behind."""
    return source_version(*(_module_file(name) for name in code_modules(benchmark)))


def prepared_data_hash(data_dir: str | Path | None) -> str | None:
    """A hash of every file under the benchmark's prepared data (names and contents); None without one."""
    if not data_dir or not Path(data_dir).is_dir():
        return None
    digest = hashlib.sha256()
    root = Path(data_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:12]
