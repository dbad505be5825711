"""A task as one model reads it: what a kind (kinds.py) or the finetune head needs to turn examples into items."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from components.benchmarks.superglue.tasks import Example, TaskSpec, verbalizer_ids
from components.method.templates import Encoded, Template, TemplateError, encode, pad_id


@dataclass
class Inputs:
    spec: TaskSpec
    tokenizer: object
    causal: bool
    model_name: str  # for messages
    templates: dict[str, Template]  # pattern key -> template (none for finetune)
    max_length: int
    options: dict = field(default_factory=dict)  # the kind's settings: params `<kind name>:`
    sep_fallback: str | None = None  # finetune of a causal LM: the text between text_a and text_b
    seed: int = 42

    @cached_property
    def pad(self) -> int:
        return pad_id(self.tokenizer)

    @cached_property
    def verbalizer_ids(self) -> torch.Tensor:
        """The token of each label's word, in label order (a TaskError when one is not a single token)."""
        return torch.tensor(verbalizer_ids(self.spec, self.tokenizer, self.model_name))

    def encode(self, ex: Example, target_ids: list[int] | None = None, n_target_tokens: int = 1) -> Encoded:
        """`ex` in its pattern; long inputs lose tokens from the task's truncation slot."""
        try:
            return encode(self.templates[ex.pattern], self.tokenizer, ex.fields, self.causal, target_ids=target_ids,
                          n_target_tokens=n_target_tokens, max_length=self.max_length, truncate=self.spec.truncate)
        except TemplateError as error:
            raise TemplateError(f"{ex.source}: {error}") from None
