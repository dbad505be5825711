"""SuperGLUE / FewGLUE (paper Tables 3-5): the benchmark's registry row.

    tasks.py    the one table of tasks (reader, patterns, verbalizer, metrics, kind, ...)
    kinds.py    task kinds: items, collate, loss and prediction of each kind of task
    methods.py  finetune, manual-zeroshot, manual-finetune, ptuning
    inputs.py   a task as one model reads it
    metrics.py  accuracy, macro-F1, F1a, exact match
    prepare.py  the DVC stage prepare_fewglue
    run.py      plan (every check before a model loads) and run
"""
from __future__ import annotations

from pathlib import Path

from components.benchmarks import ChoiceOption
from components.benchmarks.superglue import run as runner
from components.benchmarks.superglue.run import SETTINGS


class SuperGlue(ChoiceOption):
    name = "superglue"
    prepare_stage = "prepare_fewglue"
    selection_key = "dev.score"  # dev32 (fewshot) or the held-out dev (full)
    report_key = "val.score"     # SuperGLUE val: its test labels are not public
    option, choices = "setting", SETTINGS  # --setting fewshot|full

    def plan(self, params: dict):
        return runner.plan(params)

    def prepare(self, raw: Path, out: Path, root: Path) -> dict:
        from components.benchmarks.superglue.prepare import prepare
        from components.config import load_params

        settings = load_params("superglue", root)["prepare"]
        return prepare(raw=raw, out=out, seed=settings["seed"], dev_size=settings["dev_size"],
                       full_dev_fraction=settings["full_dev_fraction"])

    def run(self, config, output_dir: Path, callbacks) -> dict:
        return runner.run(config, output_dir, callbacks)


BENCHMARK = SuperGlue()
