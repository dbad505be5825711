"""A served choice prompt (SuperGLUE's COPA): a request row is the task's row without its label, read by the task's
reader and scored as evaluation scores an example (ChoiceScoring.items, collate and choice_scores); the answer is
the label of the likelier choice ("0": choice1, "1": choice2), its score that choice's share of the choices'
likelihood. serving.py serves a prompt of this kind through `ServedChoices`.
"""
from __future__ import annotations

import torch

from components.benchmarks.superglue.inputs import Inputs
from components.benchmarks.superglue.kinds import ChoiceScoring
from components.benchmarks.superglue.tasks import task_spec
from components.data.sources import DataError
from components.method.templates import TemplateError, parse_template
from components.mlops.serving import InvalidQuery, ServedPrompt

# a request example (MLflow's input example and signature): SuperGLUE COPA's own first validation row
EXAMPLE = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
           "choice2": "Water flowed from the spout.", "question": "effect"}


def is_choice_prompt(meta: dict) -> bool:
    return meta.get("benchmark") == "superglue" and meta.get("kind") == ChoiceScoring.name


def request_fields(meta: dict) -> list[str]:
    """The task's input slots and the field that picks the row's pattern (COPA: premise, choice1, choice2,
    question)."""
    spec = task_spec(meta["task"])
    return [*spec.slots, *([spec.pattern_field] if spec.pattern_field else [])]


class ServedChoices(ServedPrompt):
    """A choice task's prompt over its LM: each row's choices scored whole, the likeliest one's label the answer."""

    def __init__(self, directory, meta: dict, tokenizer, causal: bool, lm_config, answers_cache: dict | None = None):
        super().__init__(directory, meta, tokenizer, causal, lm_config, answers_cache)
        self.spec = task_spec(meta["task"])
        self.fields = request_fields(meta)
        templates = {key: parse_template(text, fields=self.spec.slots) for key, text in meta["patterns"].items()}
        self.inputs = Inputs(self.spec, tokenizer, causal, meta.get("base_model", ""), templates, self.max_length)

    def check(self, rows: list[dict], top_k, numbers: list[int] | None = None) -> None:
        """The fields and top_k as any prompt's; then each row must read as a task row and fit the model's input
        (`items` raises what does not)."""
        self.check_fields(rows, top_k, numbers)
        self.items(rows, numbers)

    def items(self, rows: list[dict], numbers: list[int] | None = None) -> list[dict]:
        """The model items of the rows, as evaluation builds them; a row the task cannot read is an InvalidQuery."""
        examples = []
        for n, row in zip(numbers or range(len(rows)), rows):
            where = f"inputs[{n}]"
            try:  # the label is the reader's, not the request's: any label of the task reads the row
                examples += self.spec.reader({**row, "label": self.spec.labels[0]}, where, self.spec)
            except DataError as error:
                raise InvalidQuery(str(error)) from None
        try:
            return self.spec.kind.items(examples, self.inputs, train=False)
        except TemplateError as error:
            raise InvalidQuery(f"{error} (the model reads at most {self.max_length} tokens)") from None

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
