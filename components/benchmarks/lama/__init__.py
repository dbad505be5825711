"""LAMA knowledge probing (paper Table 2): the benchmark's registry row."""
from __future__ import annotations

from pathlib import Path

from components.benchmarks import ChoiceOption
from components.benchmarks.lama import run as probe
from components.benchmarks.lama.run import VOCABS


class Lama(ChoiceOption):
    name = "lama"
    prepare_stage = "prepare_lama"
    selection_key = "dev.score"  # mean dev P@1 over the relations
    report_key = "test.p1"       # mean test P@1 over the relations (macro)
    option, choices = "vocab", VOCABS  # --vocab 29k|34k: the answer vocabulary

    def plan(self, params: dict):
        return probe.plan(params)

    def prepare(self, raw: Path, out: Path, root: Path) -> dict:
        from components.benchmarks.lama.prepare import prepare
        from components.config import load_params

        return prepare(raw=raw, out=out, params=load_params("data", root))

    def run(self, config, output_dir: Path, callbacks) -> dict:
        return probe.run(config, output_dir, callbacks)


BENCHMARK = Lama()
