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
from components.benchmarks.superglue.kinds import ChoiceScoring
from components.benchmarks.superglue.run import SETTINGS
from components.benchmarks.superglue.tasks import task_spec
from components.method.templates import piece_ids


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

    def check_servable(self, meta: dict, prompt_dir: Path) -> None:
        kind = task_spec(meta["task"]).kind
        if kind.not_servable:  # a kind that answers by generating, not with one of its labels
            raise ValueError(f"{prompt_dir}: {meta['task']} prompts are not servable: {kind.not_servable}; the served "
                             "model answers one of the task's labels per request")
        answered_by = "patterns" if isinstance(kind, ChoiceScoring) else "verbalizer"  # choices scored whole, or a word at [Y]
        if not meta.get("labels") or not meta.get(answered_by):
            raise ValueError(f"{prompt_dir}: prompt.json has no labels and {answered_by} to answer with")

    def answers(self, meta: dict, prompt_dir: Path, tokenizer) -> tuple[list[str], list[int]]:
        """The task's labels, each read at its verbalizer word's token (as evaluation does). A choice task's labels
        name its choices, each scored whole (ChoiceScoring.choice_scores): they have no token."""
        labels = [str(label) for label in meta["labels"]]
        if not meta.get("verbalizer"):
            return labels, []
        return labels, [piece_ids(tokenizer, meta["verbalizer"][label])[0] for label in labels]


BENCHMARK = SuperGlue()
