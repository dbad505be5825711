"""The benchmarks, one registry row each. The CLI, the flow, the DVC stages and the served model reach a
benchmark only through the `Benchmark` protocol below, so a third benchmark is one folder and one row here.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from components.run_config import RunConfig
    from components.training import Callback, TrainConfig


@dataclass(frozen=True)
class TaskPlan:
    """One task of a run as validated before any model is loaded: its name and the training settings it
    will use (None: nothing is trained, e.g. a manual prompt)."""
    task: str
    train: "TrainConfig | None"


class Benchmark(Protocol):
    name: str              # the CLI's and the flow's name; params/<name>.yaml holds its parameters
    prepare_stage: str     # the DVC stage that writes its data
    selection_key: str     # the metric that selects models and search trials: a dev figure, never test
    report_key: str        # the figure a run reports (LAMA: test.p1; SuperGLUE: val.score)

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        """Options of `ptuning train <name>` beyond --task/--model/--method (e.g. --vocab)."""

    def cli_overrides(self, args: argparse.Namespace) -> dict:
        """Those options as dotted parameter overrides."""

    def plan(self, params: dict) -> list[TaskPlan]:
        """Validate everything that can be checked before a model is loaded; the tasks to run."""

    def prepare(self, raw: Path, out: Path, root: Path) -> dict:
        """The data preparation stage (`ptuning prepare <name>`): writes `out`, returns its stats."""

    def run(self, config: "RunConfig", output_dir: Path, callbacks: list["Callback"]) -> dict:
        """Train and evaluate; write `<output_dir>/metrics.json` and return it."""

    def check_servable(self, meta: dict, prompt_dir: Path) -> None:
        """Raise ValueError saying why an exported prompt (its prompt.json `meta`) cannot be served."""

    def answers(self, meta: dict, prompt_dir: Path, tokenizer) -> tuple[list[str], list[int]]:
        """What a served prompt answers: the answers (vocabulary words, labels) and the token id of each."""


class ChoiceOption:
    """A row's one extra CLI option: `--<option>` with fixed choices, setting the parameter of that name."""
    option: str
    choices: tuple[str, ...]

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(f"--{self.option}", choices=self.choices, help=f"{self.name} {self.option} (params: {self.option})")

    def cli_overrides(self, args: argparse.Namespace) -> dict:
        value = getattr(args, self.option, None)
        return {self.option: value} if value else {}


# name -> the module whose BENCHMARK is the row (imported on use: torch and transformers are not free)
REGISTRY = {"lama": "components.benchmarks.lama", "superglue": "components.benchmarks.superglue"}


class UnknownBenchmark(ValueError):
    pass


def get_benchmark(name: str) -> Benchmark:
    if name not in REGISTRY:
        raise UnknownBenchmark(f"unknown benchmark {name!r}; choose one of {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).BENCHMARK
