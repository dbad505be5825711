"""LAMA knowledge probing (paper Table 2): the benchmark's registry row."""
from __future__ import annotations

import json
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

    def check_servable(self, meta: dict, prompt_dir: Path) -> None:
        if not (prompt_dir / "vocab.json").is_file():
            raise ValueError(f"{prompt_dir}: no vocab.json next to the prompt; LAMA answers words of its vocabulary")

    def answers(self, meta: dict, prompt_dir: Path, tokenizer) -> tuple[list[str], list[int]]:
        """The benchmark words that are one token of the model, as P@1 ranks them."""
        return probe.candidate_vocabulary(json.loads((prompt_dir / "vocab.json").read_text()), tokenizer)


BENCHMARK = Lama()
