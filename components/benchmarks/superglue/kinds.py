"""Task kinds, as PET's task helpers: each kind owns how its examples become model items and batches, its
training loss and how a model's output becomes a predicted label. A task's row (tasks.py) holds its kind; the
finetune baseline (methods.py) answers the same questions with a classification head instead of a pattern.

    check(inputs)                         fail before training when the model cannot read the task
    items(examples, inputs, train)        the model inputs of each example (training may keep only some)
    length(item)                          its length in tokens (length bucketing)
    collate(chunk, inputs)                a batch; everything the loss and the prediction need is in it
    loss(model, batch)                    the training loss
    predict(model, batch, chunk, inputs)  the predicted label (a label string) of each item
    groups(examples), limit(examples, n)  how evaluation groups and shortens a split

`inputs` is the task as one model reads it (inputs.py): tokenizer, templates, length limit, the kind's settings.

    Classification          the verbalizer's words at [Y]: cross-entropy over the label words, argmax
    GroupedClassification   the same, items grouped (answer options by question) for exact match
    ChoiceScoring           each alternative is the answer, several tokens long. Its score is the sum over its
                            tokens of the log-softmax over the whole vocabulary (masked LM: as many [MASK]s as
                            the alternative has tokens, one pass; causal LM: the alternative teacher-forced); the
                            highest wins. Training: the paper's hinge loss max(0, 1 + CE(right) - CE(wrong)), CE
                            the mean token NLL. `choice_scores` gives the summed scores (a served choice prompt
                            answers with them: components/mlops/choice_serving.py)
    SpanGeneration          the answer is a span of the text. Training uses only the positive examples (target =
                            the span's tokens; masked LMs get 0..3 extra [MASK]s that learn to predict padding, as
                            in PET). Evaluation fills the masks greedily, most confident first (masked LM), or
                            generates greedily (causal LM), and predicts the positive label when the lower-cased
                            words of the output and of the span contain one another (PET's rule)
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from components.method.templates import collate, piece_ids

if TYPE_CHECKING:
    from components.benchmarks.superglue.inputs import Inputs
    from components.benchmarks.superglue.tasks import Example, TaskSpec


def pad_targets(targets: list[list[int]], width: int) -> torch.Tensor:
    """Target token ids per row, -100 (ignored) past each row's end."""
    out = torch.full((len(targets), width), -100, dtype=torch.long)
    for i, t in enumerate(targets):
        out[i, :len(t)] = torch.tensor(t)
    return out


def token_log_probs(model: nn.Module, batch: dict) -> torch.Tensor:
    """[B, T] log-probability of each target token (0 where the row has fewer targets)."""
    logits = model(**batch).float().log_softmax(-1)
    targets = batch["target_ids"]
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets != -100)


class Kind:
    name: ClassVar[str]
    # why a served prompt of this kind cannot answer with one of its task's labels (None: it can)
    not_servable: ClassVar[str | None] = None

    def check(self, inputs: "Inputs") -> None:
        """Nothing to check by default."""

    def length(self, item: dict) -> int:
        return len(item["enc"].input_ids)

    def finetune_outputs(self, spec: "TaskSpec") -> int:
        """Outputs of a classification head per input (finetune): one per label."""
        return len(spec.labels)

    def groups(self, examples: list["Example"]) -> list | None:
        """The group of each example for the metrics (exact match); None: no groups."""
        return None

    def limit(self, examples: list["Example"], n: int | None) -> list["Example"]:
        """The first `n` examples (smoke tests)."""
        return examples[:n] if n else examples


class Classification(Kind):
    """The verbalizer's word at the [Y] slot: one logit per label, the LM's logit of the label's word."""
    name = "classification"

    def check(self, inputs: "Inputs") -> None:
        inputs.verbalizer_ids  # a word that is not one token of the model fails now, before any training

    def items(self, examples: list["Example"], inputs: "Inputs", train: bool) -> list[dict]:
        return [{"enc": inputs.encode(ex), "label": inputs.spec.labels.index(ex.label), "ex": ex} for ex in examples]

    def collate(self, chunk: list[dict], inputs: "Inputs") -> dict:
        batch = collate([item["enc"] for item in chunk], inputs.pad)
        return {**batch, "labels": torch.tensor([item["label"] for item in chunk]), "candidate_ids": inputs.verbalizer_ids}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(model(**batch)[:, 0].float(), batch["labels"])

    def predict(self, model: nn.Module, batch: dict, chunk: list[dict], inputs: "Inputs") -> list[str]:
        return [inputs.spec.labels[i] for i in model(**batch)[:, 0].argmax(-1).tolist()]


class GroupedClassification(Classification):
    """Classification whose examples come in groups (the answer options of one question): exact match counts a
    group as right only when all of it is, and a shortened split keeps whole groups."""
    name = "grouped_classification"

    def groups(self, examples: list["Example"]) -> list:
        return [ex.group for ex in examples]

    def limit(self, examples: list["Example"], n: int | None) -> list["Example"]:
        if not n or n >= len(examples):
            return examples
        end = n
        while end < len(examples) and examples[end].group == examples[end - 1].group:
            end += 1
        return examples[:end]


@dataclass(frozen=True)
class ChoiceScoring(Kind):
    """Each of the `choices` fields is the answer in turn; the label is the index of the right one."""
    choices: tuple[str, ...]
    name: ClassVar[str] = "choice_scoring"

    def items(self, examples: list["Example"], inputs: "Inputs", train: bool) -> list[dict]:
        out = []
        for ex in examples:
            targets = [piece_ids(inputs.tokenizer, ex.fields[c]) for c in self.choices]
            out.append({"encs": [inputs.encode(ex, target_ids=t) for t in targets], "targets": targets,
                        "label": inputs.spec.labels.index(ex.label), "ex": ex})
        return out

    def length(self, item: dict) -> int:
        return max(len(e.input_ids) for e in item["encs"])

    def finetune_outputs(self, spec: "TaskSpec") -> int:
        return 1  # a head scores each (premise, alternative) input alone

    def collate(self, chunk: list[dict], inputs: "Inputs") -> dict:
        """Rows: every item's first choice, then every item's second choice, ..."""
        picks = [(item, c) for c in range(len(self.choices)) for item in chunk]
        batch = collate([item["encs"][c] for item, c in picks], inputs.pad)
        batch["target_ids"] = pad_targets([item["targets"][c] for item, c in picks], batch["read_positions"].shape[1])
        batch["labels"] = torch.tensor([item["label"] for item in chunk])
        return batch

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        # the paper's code: hinge on the cross-entropies of the right and each wrong choice
        log_probs = token_log_probs(model, batch)
        n_tokens = (batch["target_ids"] != -100).sum(-1).clamp(min=1)
        ce = (-log_probs.sum(-1) / n_tokens).view(len(self.choices), -1)  # [choice, example]
        right = batch["labels"].unsqueeze(0)
        hinge = torch.clamp(1 + ce.gather(0, right) - ce, min=0)
        wrong = torch.ones_like(hinge, dtype=torch.bool).scatter(0, right, False)
        return hinge[wrong].mean()

    def choice_scores(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """[example, choice] the summed log-probability of each choice's tokens: what predict ranks (and a served
        prompt answers with)."""
        return token_log_probs(model, batch).sum(-1).view(len(self.choices), -1).T

    def predict(self, model: nn.Module, batch: dict, chunk: list[dict], inputs: "Inputs") -> list[str]:
        return [inputs.spec.labels[i] for i in self.choice_scores(model, batch).argmax(-1).tolist()]


def _words(text: str) -> list[str]:
    return [w for w in re.split("[^a-zA-Z]", text.lower().strip()) if w]


def span_match(predicted: str, span: str) -> bool:
    """PET's rule (after T5): the lower-cased words of one contain all words of the other."""
    actual, expected = _words(predicted), _words(span)
    return all(w in expected for w in actual) or all(w in actual for w in expected)


@torch.no_grad()
def greedy_fill(model: nn.Module, batch: dict, n: list[int], causal: bool, tokenizer) -> list[str]:
    """Greedy answers of `n[row]` tokens: masked LMs fill their [MASK]s most confident first (a full pass per
    token: each filled mask changes every other position's output), causal LMs decode left to right through the
    KV cache (PromptedLM.greedy_continue)."""
    reads = batch["read_positions"]
    if causal:
        filled = [model.greedy_continue(batch["input_ids"][r], batch["prompt_index"][r], int(reads[r, 0]), k)
                  for r, k in enumerate(n)]
    else:
        batch = dict(batch)
        input_ids = batch["input_ids"].clone()
        filled = [[None] * k for k in n]
        for step in range(max(n)):
            batch["input_ids"] = input_ids
            best_p, best_id = model(**batch).float().softmax(-1).max(-1)  # [B, T]
            for r in range(input_ids.shape[0]):
                if step >= n[r]:
                    continue
                open_slots = [j for j in range(n[r]) if filled[r][j] is None]
                j = max(open_slots, key=lambda k: best_p[r, k].item())
                token = int(best_id[r, j])
                filled[r][j] = token
                input_ids[r, reads[r, j]] = token
    special = set(tokenizer.all_special_ids)
    return [tokenizer.decode([t for t in f if t not in special]) for f in filled]


@dataclass(frozen=True)
class SpanGeneration(Kind):
    """The `answer` field is a span the LM must produce; an example labelled `positive` says the span is right.
    Settings (params `span_generation:`): train_extra_masks, eval_extra_tokens {masked, causal}."""
    answer: str
    positive: str
    name: ClassVar[str] = "span_generation"
    not_servable: ClassVar[str | None] = "it answers by generating the referent span"

    def items(self, examples: list["Example"], inputs: "Inputs", train: bool) -> list[dict]:
        rng = random.Random(inputs.seed)
        extra_masks = int(inputs.options["train_extra_masks"])
        extra_tokens = int(inputs.options["eval_extra_tokens"]["causal" if inputs.causal else "masked"])
        out = []
        for ex in examples:
            span = piece_ids(inputs.tokenizer, ex.fields[self.answer])
            if train:
                if ex.label != self.positive:
                    continue  # a wrong span is no target to learn
                target = span + [inputs.pad] * (0 if inputs.causal else rng.randint(0, extra_masks))
                out.append({"enc": inputs.encode(ex, target_ids=target), "target": target, "ex": ex})
            else:
                n = len(span) + extra_tokens
                out.append({"enc": inputs.encode(ex, n_target_tokens=n), "n": n, "ex": ex})
        return out

    def collate(self, chunk: list[dict], inputs: "Inputs") -> dict:
        batch = collate([item["enc"] for item in chunk], inputs.pad)
        if "target" in chunk[0]:
            batch["target_ids"] = pad_targets([item["target"] for item in chunk], batch["read_positions"].shape[1])
        return batch

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(**batch).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["target_ids"].flatten(), ignore_index=-100)

    def predict(self, model: nn.Module, batch: dict, chunk: list[dict], inputs: "Inputs") -> list[str]:
        negative = next(label for label in inputs.spec.labels if label != self.positive)
        answers = greedy_fill(model, batch, [item["n"] for item in chunk], inputs.causal, inputs.tokenizer)
        return [self.positive if span_match(a, item["ex"].fields[self.answer]) else negative
                for a, item in zip(answers, chunk)]
