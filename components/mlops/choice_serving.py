"""A served choice prompt (SuperGLUE's COPA): a request row is the task's row without its label, read by the task's
reader and scored as evaluation scores an example (ChoiceScoring.items, collate and choice_scores); the answer is
the label of the likelier choice ("0": choice1, "1": choice2), its score that choice's share of the choices'
likelihood. serving.py serves a prompt of this kind through `ServedChoices`.
"""
from __future__ import annotations

import torch

from components.benchmarks.superglue.inputs import Inputs
from components.benchmarks.superglue.kinds import ChoiceScoring
from components.benchmarks.superglue.tasks import TaskSpec, task_spec
from components.data.sources import DataError
from components.method.templates import TemplateError, parse_template
from components.mlops.serving import InvalidQuery, ServedPrompt

# a request example per choice task (MLflow's input example): the task's own first validation row
EXAMPLES = {"copa": {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
                     "choice2": "Water flowed from the spout.", "question": "effect"}}


def choice_task(meta: dict) -> TaskSpec | None:
    """The task of a prompt whose task table row scores choices (COPA), else None."""
    if meta.get("benchmark") != "superglue":
        return None
    spec = task_spec(meta["task"])
    return spec if isinstance(spec.kind, ChoiceScoring) else None


def is_choice_prompt(meta: dict) -> bool:
    return choice_task(meta) is not None


def check_choice_prompt(meta: dict) -> None:
    """A choice prompt must carry one template per pattern of its task, each reading the task's fields."""
    spec = choice_task(meta)
    if spec is None:
        return
    patterns = meta.get("patterns") or {}
    if set(patterns) != set(spec.patterns):
        raise ValueError(f"prompt.json's patterns are {sorted(patterns)}, {spec.folder} needs {sorted(spec.patterns)}")
    for text in patterns.values():
        parse_template(text, fields=spec.slots)


def request_fields(meta: dict) -> list[str]:
    """The task's input slots and the field that picks the row's pattern (COPA: premise, choice1, choice2,
    question)."""
    spec = task_spec(meta["task"])
    return [*spec.slots, *([spec.pattern_field] if spec.pattern_field else [])]


class ServedChoices(ServedPrompt):
    """A choice task's prompt over its LM: each row's choices scored whole, the likeliest one's label the answer."""

    def __init__(self, directory, meta: dict, tokenizer, causal: bool, lm_config, answers_cache: dict | None = None):
        super().__init__(directory, meta, tokenizer, causal, lm_config, answers_cache)
        self.spec = task_spec(meta["task"])  # its fields are serving.input_fields', this module's request_fields
        templates = {key: parse_template(text, fields=self.spec.slots) for key, text in meta["patterns"].items()}
        self.inputs = Inputs(self.spec, tokenizer, causal, meta.get("base_model", ""), templates, self.max_length)

    def check(self, rows: list[dict], top_k, numbers: list[int] | None = None) -> None:
        """The fields and top_k; whether a row reads as the task's and fits the model is `items`' to say."""
        self.check_fields(rows, top_k, numbers)

    def items(self, rows: list[dict]) -> list[dict]:
        """The model items of the rows, as evaluation builds them; a row the task cannot read is an InvalidQuery."""
        examples = []
        for n, row in enumerate(rows):
            where = f"inputs[{n}]"
            try:  # the label is the reader's, not the request's: any label of the task reads the row
                [example] = self.spec.reader({**row, "label": self.spec.labels[0]}, where, self.spec)
            except DataError as error:
                raise InvalidQuery(str(error)) from None
            empty = [c for c in self.spec.kind.choices if not example.fields[c]]
            if empty:  # the reader drops a choice's final punctuation: "." leaves nothing to score
                raise InvalidQuery(f"{where}.{empty[0]} is {row[empty[0]]!r}: a choice holds a word at least")
            examples.append(example)
        try:
            return self.spec.kind.items(examples, self.inputs, train=False)
        except TemplateError as error:
            raise InvalidQuery(str(error)) from None

    def answer_all(self, model, rows: list[dict], top_k: int, pad: int, device, batch_size: int = 32) -> list[dict]:
        items = self.items(rows)
        order = sorted(range(len(items)), key=lambda i: self.spec.kind.length(items[i]))
        out: list[dict | None] = [None] * len(items)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = {k: v.to(device) for k, v in self.spec.kind.collate([items[i] for i in chunk], self.inputs).items()}
                for i, scores in zip(chunk, self.spec.kind.choice_scores(model, batch)):
                    out[i] = self.answer(scores, top_k)
        return out
