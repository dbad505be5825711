"""The four methods (masked and causal LMs alike), one object each: which templates a task gets, which model
is built, and which head (the task's kind, or the finetune head) turns examples into batches and predictions.

    finetune          the LM with a standard classification head on `text_a [SEP] text_b`; no pattern (the
                      head at `train.lr`, the LM at `train.lm_lr`)
    manual-zeroshot   the manual pattern, the LM as it is: no training
    manual-finetune   the manual pattern, the LM trained on the verbalizer's tokens (PET without ensembles
                      or distillation)
    ptuning           the P-tuning pattern: prompt encoder and LM trained together, each with its own
                      learning rate (`train.lr` for the encoder, `train.lm_lr` for the LM; `freeze_lm: true`
                      trains the prompt alone)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from components.benchmarks.superglue.inputs import Inputs
from components.benchmarks.superglue.kinds import Kind
from components.benchmarks.superglue.tasks import Example, TaskSpec, templates_for
from components.method.model import PromptedLM, PromptEncoder
from components.method.templates import Template, TemplateError, pad_id, piece_ids


@dataclass(frozen=True)
class PromptMethod:
    """A pattern read by the LM itself: the task's kind is the head."""
    name: str
    continuous: bool  # the pattern keeps its [P] tokens (P-tuning) or drops them (manual)
    trains: bool

    def templates(self, spec: TaskSpec, params: dict, tokenizer=None) -> dict[str, Template]:
        return templates_for(spec, params, tokenizer, continuous=self.continuous)

    def head(self, spec: TaskSpec) -> Kind:
        return spec.kind

    def build(self, spec: TaskSpec, lm, templates: dict[str, Template], params: dict) -> tuple[nn.Module, PromptEncoder | None]:
        """The model to train and evaluate, and its prompt encoder (None without [P] tokens)."""
        n_prompt = next(iter(templates.values())).n_prompt_tokens
        embeddings = lm.model.get_input_embeddings().weight
        prompt = (PromptEncoder(n_prompt, embeddings.shape[1], params["encoder"], params.get("encoder_hidden"),
                                init=prompt_init(params["init"], n_prompt, embeddings, params["train"]["seed"]))
                  if n_prompt else None)
        freeze = not self.trains or (self.continuous and bool(params.get("freeze_lm")))
        return PromptedLM(lm.model, prompt, lm.causal, freeze_lm=freeze), prompt


INITS = ("random", "vocab")


def prompt_init(init: str, n_tokens: int, embeddings: torch.Tensor, seed: int) -> torch.Tensor | None:
    """The prompt encoder's starting embeddings: None (random, the paper's), or `vocab`: the LM's input embeddings
    of n_tokens vocabulary entries drawn with the run's seed, so that the prompt starts at the scale of the words
    around it (SmolLM2's token embeddings have norm ~3.2, a random prompt's output ~0.66)."""
    if init == "random":
        return None
    rows = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(seed))[:n_tokens]
    return embeddings[rows].detach().float().cpu()


class HeadModel(nn.Module):
    """An HF `*ForSequenceClassification`: its new classification head under `head`, trained at `train.lr` as a
    prompt encoder is, and the pretrained rest under `lm`, at `train.lm_lr` (a random head at the LM's 1e-5
    barely moves in a few-shot budget)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        # registered first: its parameters are named `head.*` (the module stays inside `lm` too)
        self.head = next(getattr(lm, name) for name in ("score", "classifier") if hasattr(lm, name))
        self.lm = lm

    def forward(self, input_ids, attention_mask, **_):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


class Finetune:
    """The baseline: no pattern; the LM with a sequence-classification head reads each input pair of an example
    (the row's `pairs`). A kind whose alternatives are scored alone (one output per pair) reads several pairs;
    the outputs of an example's pairs, side by side, are its label logits."""
    name = "finetune"
    trains = True

    def templates(self, spec: TaskSpec, params: dict, tokenizer=None) -> dict[str, Template]:
        return {}

    def head(self, spec: TaskSpec) -> "Finetune":
        return self

    def build(self, spec: TaskSpec, lm, templates: dict[str, Template], params: dict) -> tuple[nn.Module, None]:
        from transformers import AutoModelForSequenceClassification

        from components.models.catalog import model_dir

        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir(params["model"])), num_labels=spec.kind.finetune_outputs(spec))
        if lm.causal or model.config.pad_token_id is None:
            model.config.pad_token_id = pad_id(lm.tokenizer)
        return HeadModel(model), None

    # --- the head: the same questions a kind answers ---

    def check(self, inputs: Inputs) -> None:
        """A head reads any text."""

    @staticmethod
    def pair_ids(inputs: Inputs, a: str, b: str) -> list[int]:
        """text_a (truncated from its end when too long) and text_b, with the model's specials
        (masked LMs: [CLS] a [SEP] b [SEP]; causal LMs: a, `sep_fallback`, b)."""
        tok, limit = inputs.tokenizer, inputs.max_length
        if not inputs.causal:
            ids = tok(a, b, truncation="only_first", max_length=limit)["input_ids"]
            if len(ids) > limit:
                raise TemplateError(f"finetune input: text_b alone is longer than max_length={limit}")
            return ids
        ids_a, ids_b = piece_ids(tok, a, first=True), piece_ids(tok, b)
        sep = piece_ids(tok, inputs.sep_fallback) if inputs.sep_fallback else []
        excess = len(ids_a) + len(sep) + len(ids_b) - limit
        if excess >= len(ids_a):
            raise TemplateError(f"finetune input: text_b alone is longer than max_length={limit}")
        return ids_a[:len(ids_a) - max(excess, 0)] + sep + ids_b

    def items(self, examples: list[Example], inputs: Inputs, train: bool) -> list[dict]:
        spec = inputs.spec
        return [{"ids": [self.pair_ids(inputs, a, b) for a, b in spec.pairs(ex)], "label": spec.labels.index(ex.label),
                 "ex": ex} for ex in examples]

    def length(self, item: dict) -> int:
        return max(len(ids) for ids in item["ids"])

    def collate(self, chunk: list[dict], inputs: Inputs) -> dict:
        """Rows: every item's first pair, then every item's second pair, ..."""
        rows = [item["ids"][j] for j in range(len(chunk[0]["ids"])) for item in chunk]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), inputs.pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r)
            attention[i, :len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention,
                "labels": torch.tensor([item["label"] for item in chunk])}

    @staticmethod
    def label_logits(model: nn.Module, batch: dict) -> torch.Tensor:
        """[B, labels]: the outputs of each example's pairs side by side."""
        logits = model(**batch).float()
        examples = batch["labels"].shape[0]
        return logits.view(-1, examples, logits.shape[-1]).transpose(0, 1).reshape(examples, -1)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(self.label_logits(model, batch), batch["labels"])

    def predict(self, model: nn.Module, batch: dict, chunk: list[dict], inputs: Inputs) -> list[str]:
        return [inputs.spec.labels[i] for i in self.label_logits(model, batch).argmax(-1).tolist()]


METHODS: dict[str, PromptMethod | Finetune] = {
    "finetune": Finetune(),
    "manual-zeroshot": PromptMethod("manual-zeroshot", continuous=False, trains=False),
    "manual-finetune": PromptMethod("manual-finetune", continuous=False, trains=True),
    "ptuning": PromptMethod("ptuning", continuous=True, trains=True),
}
