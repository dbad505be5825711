"""SuperGLUE / FewGLUE (paper Tables 3-5): seven tasks, four methods, two settings.

The task registry `TASKS` is the one table that says, per task, how to read its JSONL rows, its pattern(s)
(`[P]` marks the continuous prompt tokens, every other literal is an anchor, `{field}` an input slot and
`[Y]` the answer), its verbalizer, the slot that long inputs lose tokens from, and its metrics. The patterns
are those of the paper's code (THUDM/P-tuning, PT-Fewshot/data_utils/task_pvps.py: the pieces flagged as
blocks there are the `[P]`s here); the manual pattern of a task is the same string without its `[P]`s.

Methods (masked and causal LMs alike)
    finetune          the LM with a standard classification head on `text_a [SEP] text_b`; no pattern
    manual-zeroshot   the manual pattern, the LM as it is: no training
    manual-finetune   the manual pattern, the LM trained on the verbalizer's tokens (PET without ensembles
                      or distillation)
    ptuning           the P-tuning pattern: prompt encoder and LM trained together, each with its own
                      learning rate (`train.lr` for the encoder, `train.lm_lr` for the LM)

Special cases
    COPA     no verbalizer: each choice is the answer, several tokens long. Its score is the sum over its
             tokens of the log-softmax over the whole vocabulary (masked LM: as many [MASK]s as the choice
             has tokens, one pass; causal LM: the choice teacher-forced). The higher score wins. Training
             uses the paper's hinge loss max(0, 1 + CE(correct) - CE(wrong)), CE the mean token NLL.
    WSC      generative: the answer is the referent span. Training uses only the True examples (target =
             the span's tokens; masked LMs get 0..3 extra [MASK]s that learn to predict padding, as in
             PET). Evaluation fills the masks greedily, most confident first (masked LM), or generates
             greedily (causal LM), and predicts True when the lower-cased words of the output and of the
             span contain one another (PET's rule); accuracy is against the example's label.
    MultiRC  one item per answer option, each carrying its question (passage idx, question idx): EM counts
             a question only if all its options are right; F1a is binary F1 over all options.

Settings
    fewshot  train on train32, select on dev32 (built by `prepare`), report on val; the paper's step counts
             and encoder learning rates per task (params/superglue.yaml `tasks:`).
    full     train on the SuperGLUE train set minus a held-out dev carved from it (seeded, by `prepare`),
             select on that dev, report on val. The paper selects on val itself (`full.select_on: val`
             reproduces that: train on all of train, select on val); the default avoids selecting on the
             set that is reported. SuperGLUE's test labels are not public. BoolQ has no train set here.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from components.benchmarks.superglue.metrics import primary_score, task_metrics
from components.method.model import PromptedLM, PromptEncoder, export_prompt
from components.data.sources import DataError, numbered_jsonl, write_jsonl
from components.method.templates import Encoded, Template, TemplateError, collate, encode, parse_template
from components.training import Callback, TrainConfig, fit, seed_everything

log = logging.getLogger(__name__)

METHODS = ("finetune", "manual-zeroshot", "manual-finetune", "ptuning")
SETTINGS = ("fewshot", "full")
SPLITS = {"fewshot": ("train32", "dev32", "val"), "full": ("train", "dev", "val")}


class TaskError(ValueError):
    """A task, method or setting that cannot run (unknown name, BoolQ full, ...)."""


# --- examples and readers ---------------------------------------------------------------------------

@dataclass
class Example:
    guid: str
    fields: dict[str, str]  # the pattern's input slots (and, for COPA/WSC, the answer texts)
    label: str  # the label as a string: "entailment", "True", "0", ...
    group: str | None = None  # MultiRC: the question the answer option belongs to (EM grouping)
    pattern: str = "default"  # which of the task's patterns (COPA: "cause" or "effect")
    source: str = ""  # "file:line", for messages


def _field(row: dict, path: str, where: str):
    """`row[a][b]...` for the dotted `path`; a missing or null field is a DataError naming file and line."""
    node = row
    for key in re.findall(r"[^.\[\]]+", path):
        if isinstance(node, list):
            node = node[int(key)] if key.isdigit() and int(key) < len(node) else None
        elif isinstance(node, dict):
            node = node.get(key)
        else:
            node = None
        if node is None:
            raise DataError(f"{where}: missing field {path!r}")
    return node


def _label(value, where: str, spec: "TaskSpec", path: str = "label") -> str:
    text = str(value)  # JSON true -> "True", 0 -> "0"
    if text not in spec.labels:
        raise DataError(f"{where}: {path} {value!r} is not a label of {spec.folder}; its labels are {list(spec.labels)}")
    return text


def remove_final_punc(text: str) -> str:
    return text.rstrip(string.punctuation)


def lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _read_pair(first: str, second: str, second_fn: Callable[[str], str] = lambda s: s):
    def read(row: dict, where: str, spec: "TaskSpec") -> list[Example]:
        fields = {first: str(_field(row, first, where)), second: second_fn(str(_field(row, second, where)))}
        return [Example(f"{spec.name}-{row.get('idx', where)}", fields, _label(_field(row, "label", where), where, spec), source=where)]
    return read


def _read_wic(row: dict, where: str, spec: "TaskSpec") -> list[Example]:
    fields = {k: str(_field(row, k, where)) for k in ("sentence1", "sentence2", "word")}
    return [Example(f"wic-{row.get('idx', where)}", fields, _label(_field(row, "label", where), where, spec), source=where)]


def _read_copa(row: dict, where: str, spec: "TaskSpec") -> list[Example]:
    question = _field(row, "question", where)
    if question not in ("cause", "effect"):
        raise DataError(f"{where}: question {question!r} is neither 'cause' nor 'effect'")
    fields = {"premise": remove_final_punc(str(_field(row, "premise", where))),
              "choice1": remove_final_punc(lowercase_first(str(_field(row, "choice1", where)))),
              "choice2": remove_final_punc(lowercase_first(str(_field(row, "choice2", where))))}
    return [Example(f"copa-{row.get('idx', where)}", fields, _label(_field(row, "label", where), where, spec),
                    pattern=question, source=where)]


def _read_wsc(row: dict, where: str, spec: "TaskSpec") -> list[Example]:
    text = str(_field(row, "text", where))
    span, pronoun = str(_field(row, "target.span1_text", where)), str(_field(row, "target.span2_text", where))
    index = _field(row, "target.span2_index", where)
    words = text.split()
    if not isinstance(index, int) or not 0 <= index < len(words):
        raise DataError(f"{where}: target.span2_index {index!r} is not a word position of the text ({len(words)} words)")
    words[index] = "*" + words[index] + "*"  # mark the pronoun, as PET does
    fields = {"text": " ".join(words), "pronoun": pronoun, "span": span}
    return [Example(f"wsc-{row.get('idx', where)}", fields, _label(_field(row, "label", where), where, spec), source=where)]


def _read_multirc(row: dict, where: str, spec: "TaskSpec") -> list[Example]:
    passage = str(_field(row, "passage.text", where))
    questions = _field(row, "passage.questions", where)
    if not isinstance(questions, list) or not questions:
        raise DataError(f"{where}: passage.questions is empty")
    examples = []
    for qi, q in enumerate(questions):
        question = str(_field(row, f"passage.questions[{qi}].question", where))
        answers = _field(row, f"passage.questions[{qi}].answers", where)
        if not isinstance(answers, list) or not answers:
            raise DataError(f"{where}: passage.questions[{qi}].answers is empty")
        group = f"{row.get('idx', where)}-{q.get('idx', qi)}"
        for ai, a in enumerate(answers):
            path = f"passage.questions[{qi}].answers[{ai}]"
            label = _label(_field(row, f"{path}.label", where), where, spec, f"{path}.label")
            examples.append(Example(f"multirc-{group}-{a.get('idx', ai)}",
                                    {"passage": passage, "question": question, "answer": str(_field(row, f"{path}.text", where))},
                                    label, group=group, source=where))
    return examples


# --- the registry -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    name: str  # CLI name: rte
    folder: str  # data folder: RTE
    kind: str  # classify | copa | wsc
    labels: tuple[str, ...]
    verbalizer: dict[str, str] | None  # label -> word (one token of the model)
    patterns: dict[str, str]  # pattern key -> P-tuning pattern; the manual pattern drops the [P]s
    truncate: str  # the slot long inputs are shortened from
    metrics: tuple[str, ...]  # first: the primary metric; CB/MultiRC: both make the score
    size: str  # small | large: epochs of the full setting
    reader: Callable[[dict, str, "TaskSpec"], list[Example]]
    pair: Callable[[dict[str, str]], tuple[str, str]]  # finetune: (text_a, text_b); text_a is truncated
    key: Callable[[dict], str]  # identity of a raw row's content (disjointness of splits)
    slots: tuple[str, ...]  # the fields a pattern may use


YES_NO = {"False": "No", "True": "Yes"}

TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec(
        "boolq", "BoolQ", "classify", ("False", "True"), YES_NO,
        {"default": "{passage} . [P] Question: {question} ? Answer: [Y] ."}, "passage", ("acc",), "large",
        _read_pair("passage", "question"), lambda f: (f["passage"], f["question"]),
        lambda r: json.dumps([r.get("question"), r.get("passage")]), ("passage", "question")),
    "cb": TaskSpec(
        "cb", "CB", "classify", ("contradiction", "entailment", "neutral"),
        {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"},
        {"default": "{premise} [SEP] {hypothesis} ? [P] answer: [Y]"}, "premise", ("acc", "f1_macro"), "small",
        _read_pair("premise", "hypothesis"), lambda f: (f["premise"], f["hypothesis"]),
        lambda r: json.dumps([r.get("premise"), r.get("hypothesis")]), ("premise", "hypothesis")),
    "copa": TaskSpec(
        "copa", "COPA", "copa", ("0", "1"), None,
        {"cause": "{choice1} or {choice2} ? {premise} because [P] [Y] .",
         "effect": "{choice1} or {choice2} ? {premise} so [P] [Y] ."}, "premise", ("acc",), "small",
        _read_copa, lambda f: (f["premise"], f["choice"]),
        lambda r: json.dumps([r.get("premise"), r.get("choice1"), r.get("choice2"), r.get("question")]),
        ("premise", "choice1", "choice2")),
    "multirc": TaskSpec(
        "multirc", "MultiRC", "classify", ("0", "1"), {"0": "No", "1": "Yes"},
        {"default": "{passage} . Question: {question} ? Is it {answer} ? [P] [Y] ."}, "passage", ("em", "f1a"), "large",
        _read_multirc, lambda f: (f["passage"], f"{f['question']} {f['answer']}"),
        lambda r: json.dumps((r.get("passage") or {}).get("text")), ("passage", "question", "answer")),
    "rte": TaskSpec(
        "rte", "RTE", "classify", ("entailment", "not_entailment"), {"entailment": "Yes", "not_entailment": "No"},
        {"default": "{premise} Question: {hypothesis} ? [P] Answer: [Y] ."}, "premise", ("acc",), "small",
        _read_pair("premise", "hypothesis", remove_final_punc), lambda f: (f["premise"], f["hypothesis"]),
        lambda r: json.dumps([r.get("premise"), r.get("hypothesis")]), ("premise", "hypothesis")),
    "wic": TaskSpec(
        "wic", "WiC", "classify", ("False", "True"), YES_NO,
        {"default": "{sentence1} [SEP] {sentence2} [P] *{word} *? [Y]"}, "sentence1", ("acc",), "large",
        _read_wic, lambda f: (f["sentence1"], f"{f['word']} : {f['sentence2']}"),
        lambda r: json.dumps([r.get("word"), r.get("sentence1"), r.get("sentence2")]), ("sentence1", "sentence2", "word")),
    "wsc": TaskSpec(
        "wsc", "WSC", "wsc", ("False", "True"), None,
        {"default": "[P] {text} [P] pronoun '*{pronoun}*' refers to [Y] ."}, "text", ("acc",), "small",
        _read_wsc, lambda f: (f["text"], f"{f['pronoun']} : {f['span']}"),
        lambda r: json.dumps(r.get("text")), ("text", "pronoun")),
}


def task_spec(name: str) -> TaskSpec:
    spec = TASKS.get(str(name).strip().lower())
    if spec is None:
        raise TaskError(f"unknown SuperGLUE task {name!r}; choose one of {', '.join(TASKS)}")
    return spec


def _rows(path: Path) -> list[tuple[int, dict]]:
    if not path.exists():
        raise DataError(f"{path} does not exist")
    return numbered_jsonl(path)


def read_examples(spec: TaskSpec, path: str | Path) -> list[Example]:
    """Every example of a JSONL file of the task; bad rows fail with `file:line: ...`."""
    path = Path(path)
    examples = []
    for line_no, row in _rows(path):
        examples.extend(spec.reader(row, f"{path}:{line_no}", spec))
    if not examples:
        raise DataError(f"{path} has no examples")
    return examples


# --- patterns ---------------------------------------------------------------------------------------

def pattern_texts(spec: TaskSpec, params: dict | None = None) -> dict[str, str]:
    """The task's P-tuning pattern(s), or the `pattern` parameter (a string, or a dict for COPA)."""
    custom = (params or {}).get("pattern")
    if not custom:
        return dict(spec.patterns)
    if isinstance(custom, str):
        return {key: custom for key in spec.patterns}
    if set(custom) != set(spec.patterns):
        raise TaskError(f"pattern for {spec.name} must give the keys {sorted(spec.patterns)}, got {sorted(custom)}")
    return dict(custom)


def _separator(tokenizer, params: dict) -> str:
    """What `[SEP]` in a pattern becomes: the model's separator token, else `sep_fallback` (null: nothing)."""
    if tokenizer is not None and getattr(tokenizer, "sep_token", None):
        return tokenizer.sep_token
    return params.get("sep_fallback") or ""


def templates_for(spec: TaskSpec, method: str, params: dict, tokenizer=None) -> dict[str, Template]:
    """Parsed templates per pattern key: with their [P]s for ptuning, without them for the manual methods."""
    out = {}
    for key, text in pattern_texts(spec, params).items():
        if tokenizer is not None:
            separator = _separator(tokenizer, params)
            text = text.replace("[SEP]", separator) if separator else re.sub(r"\s*\[SEP\]\s*", " ", text)
        template = parse_template(text, fields=spec.slots)
        if method == "ptuning":
            if not template.n_prompt_tokens:
                raise TemplateError(f"ptuning needs at least one [P] in the {spec.name} pattern {text!r}")
        else:
            template = template.without_prompts()
        out[key] = template
    counts = {t.n_prompt_tokens for t in out.values()}
    if len(counts) > 1:
        raise TemplateError(f"the patterns of {spec.name} must have the same number of [P] tokens, got {sorted(counts)}")
    return out


def render(template: Template, fields: dict[str, str], n_masks: int = 1, mask: str = "[MASK]") -> str:
    """The pattern filled in as text: [P] for each continuous token, `mask` at the answer."""
    pieces = []
    for part in template.parts:
        if part.kind == "prompt":
            pieces += ["[P]"] * part.count
        elif part.kind == "slot":
            pieces.append(fields[part.value])
        elif part.kind == "anchor":
            pieces.append(part.value)
        else:
            pieces += [mask] * n_masks
    return " ".join(pieces)


def answer_ids(tokenizer, text: str) -> list[int]:
    """Tokens of an answer as it follows the pattern (after a space: ' Yes' for byte-level BPE)."""
    return tokenizer.encode(" " + text, add_special_tokens=False)


def verbalizer_ids(spec: TaskSpec, tokenizer, model_name: str = "") -> list[int]:
    """One token id per label, in `spec.labels` order; a word that is not one token of the model fails."""
    ids = []
    for label in spec.labels:
        word = spec.verbalizer[label]
        pieces = answer_ids(tokenizer, word)
        if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
            raise TaskError(f"{spec.name}: verbalizer word {word!r} (label {label}) is not a single token of "
                            f"{model_name or 'this model'}: {tokenizer.convert_ids_to_tokens(pieces)}")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise TaskError(f"{spec.name}: two labels share a verbalizer token: {ids}")
    return ids


# --- encoding ---------------------------------------------------------------------------------------

def pad_id_of(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return value


@dataclass
class Encoder:
    """Turns examples into model items for one task, method and model."""
    spec: TaskSpec
    method: str
    tokenizer: object
    causal: bool
    templates: dict[str, Template]
    max_length: int
    wsc: dict = field(default_factory=dict)  # train_extra_masks, eval_extra_tokens {masked, causal}
    sep_fallback: str | None = None  # causal finetune: text between text_a and text_b (no separator token)
    seed: int = 42

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    def _encode(self, ex: Example, target_ids=None, n_target_tokens=1) -> Encoded:
        try:
            return encode(self.templates[ex.pattern], self.tokenizer, ex.fields, self.causal, target_ids=target_ids,
                          n_target_tokens=n_target_tokens, max_length=self.max_length, truncate=self.spec.truncate)
        except TemplateError as error:
            raise TemplateError(f"{ex.source}: {error}") from None

    def _pair(self, a: str, b: str) -> list[int]:
        """finetune input: text_a (truncated from its end when too long) and text_b, with the model's specials
        (masked LMs: [CLS] a [SEP] b [SEP]; causal LMs: a, `sep_fallback`, b)."""
        tok = self.tokenizer
        if not self.causal:
            ids = tok(a, b, truncation="only_first", max_length=self.max_length)["input_ids"]
            if len(ids) > self.max_length:
                raise TemplateError(f"finetune input: text_b alone is longer than max_length={self.max_length}")
            return ids
        ids_a, ids_b = tok.encode(a, add_special_tokens=False), tok.encode(" " + b, add_special_tokens=False)
        sep = tok.encode(" " + self.sep_fallback, add_special_tokens=False) if self.sep_fallback else []
        excess = len(ids_a) + len(sep) + len(ids_b) - self.max_length
        if excess >= len(ids_a):
            raise TemplateError(f"finetune input: text_b alone is longer than max_length={self.max_length}")
        return ids_a[:len(ids_a) - max(excess, 0)] + sep + ids_b

    def items(self, examples: list[Example], train: bool) -> list[dict]:
        if self.method == "finetune":
            return self._finetune_items(examples)
        kind = self.spec.kind
        if kind == "classify":
            index = {label: i for i, label in enumerate(self.spec.labels)}
            return [{"enc": self._encode(ex), "label": index[ex.label], "ex": ex} for ex in examples]
        if kind == "copa":
            out = []
            for ex in examples:
                targets = [answer_ids(self.tokenizer, ex.fields[c]) for c in ("choice1", "choice2")]
                out.append({"encs": [self._encode(ex, target_ids=t) for t in targets], "targets": targets,
                            "label": int(ex.label), "ex": ex})
            return out
        # WSC: train on the True examples only, target = the span (+ padding masks for masked LMs)
        rng = random.Random(self.seed)
        out = []
        for ex in examples:
            span = answer_ids(self.tokenizer, ex.fields["span"])
            if train:
                if ex.label != "True":
                    continue
                extra = 0 if self.causal else rng.randint(0, int(self.wsc.get("train_extra_masks", 3)))
                target = span + [self.pad_id] * extra
                out.append({"enc": self._encode(ex, target_ids=target), "target": target, "ex": ex})
            else:
                n = len(span) + int(self.wsc.get("eval_extra_tokens", {}).get("causal" if self.causal else "masked", 1))
                out.append({"enc": self._encode(ex, n_target_tokens=n), "n": n, "ex": ex})
        return out

    def _finetune_items(self, examples: list[Example]) -> list[dict]:
        out = []
        for ex in examples:
            if self.spec.kind == "copa":
                connective = "because" if ex.pattern == "cause" else "so"
                ids = [self._pair(f"{ex.fields['premise']} {connective}", ex.fields[c]) for c in ("choice1", "choice2")]
                out.append({"ids": ids, "label": int(ex.label), "ex": ex})
            else:
                a, b = self.spec.pair(ex.fields)
                out.append({"ids": [self._pair(a, b)], "label": self.spec.labels.index(ex.label), "ex": ex})
        return out

    @staticmethod
    def length(item: dict) -> int:
        if "enc" in item:
            return len(item["enc"].input_ids)
        if "encs" in item:
            return max(len(e.input_ids) for e in item["encs"])
        return max(len(i) for i in item["ids"])

    def collate(self, chunk: list[dict]) -> dict:
        """A batch of items. COPA and finetune-COPA put all first choices, then all second choices."""
        if self.method == "finetune":
            rows = [ids for item in chunk for ids in item["ids"]]
            if len(chunk[0]["ids"]) == 2:  # COPA: [first choices; second choices]
                rows = [item["ids"][0] for item in chunk] + [item["ids"][1] for item in chunk]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                input_ids[i, :len(r)] = torch.tensor(r)
                attention[i, :len(r)] = 1
            return {"input_ids": input_ids, "attention_mask": attention,
                    "labels": torch.tensor([item["label"] for item in chunk])}
        if "encs" in chunk[0]:
            encs = [item["encs"][0] for item in chunk] + [item["encs"][1] for item in chunk]
            targets = [item["targets"][0] for item in chunk] + [item["targets"][1] for item in chunk]
            batch = collate(encs, self.pad_id)
            batch["target_ids"] = _pad_targets(targets, batch["read_positions"].shape[1])
            batch["labels"] = torch.tensor([item["label"] for item in chunk])
            return batch
        batch = collate([item["enc"] for item in chunk], self.pad_id)
        if "label" in chunk[0]:
            batch["labels"] = torch.tensor([item["label"] for item in chunk])
        if "target" in chunk[0]:
            batch["target_ids"] = _pad_targets([item["target"] for item in chunk], batch["read_positions"].shape[1])
        return batch


def _pad_targets(targets: list[list[int]], width: int) -> torch.Tensor:
    out = torch.full((len(targets), width), -100, dtype=torch.long)
    for i, t in enumerate(targets):
        out[i, :len(t)] = torch.tensor(t)
    return out


# --- models, losses, predictions ----------------------------------------------------------------------

class HeadModel(nn.Module):
    """An HF `*ForSequenceClassification` under the name `lm` (so the training loop gives it `lm_lr`)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, **_):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "target_ids")}


def _token_log_probs(model: nn.Module, batch: dict) -> torch.Tensor:
    """[B, T] log-probability of each target token (0 where the row has fewer targets)."""
    logits = model(**_model_inputs(batch)).float().log_softmax(-1)
    targets = batch["target_ids"]
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets != -100)


def make_loss(spec: TaskSpec, method: str, candidate_ids: torch.Tensor | None) -> Callable:
    def finetune_loss(model, batch):
        logits = model(**batch).float()
        if spec.kind == "copa":  # one score per (premise, choice): rows are [first choices; second choices]
            logits = logits.view(2, -1).t()
        return nn.functional.cross_entropy(logits, batch["labels"])

    def classify_loss(model, batch):
        logits = model(**_model_inputs(batch), candidate_ids=candidate_ids.to(batch["input_ids"].device))[:, 0]
        return nn.functional.cross_entropy(logits.float(), batch["labels"])

    def copa_loss(model, batch):
        # the paper's code: hinge on the cross-entropies of the correct and the wrong choice
        log_probs = _token_log_probs(model, batch)
        n_tokens = (batch["target_ids"] != -100).sum(-1).clamp(min=1)
        ce = (-log_probs.sum(-1) / n_tokens).view(2, -1)  # [choice, example]
        labels = batch["labels"]
        rows = torch.arange(labels.shape[0], device=labels.device)
        correct, wrong = ce[labels, rows], ce[1 - labels, rows]
        return torch.clamp(1 + correct - wrong, min=0).mean()

    def wsc_loss(model, batch):
        logits = model(**_model_inputs(batch)).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["target_ids"].flatten(), ignore_index=-100)

    if method == "finetune":
        return finetune_loss
    return {"classify": classify_loss, "copa": copa_loss, "wsc": wsc_loss}[spec.kind]


def _words(text: str) -> list[str]:
    return [w for w in re.split("[^a-zA-Z]", text.lower().strip()) if w]


def wsc_match(predicted: str, span: str) -> bool:
    """PET's rule (after T5): the lower-cased words of one contain all words of the other."""
    actual, expected = _words(predicted), _words(span)
    return all(w in expected for w in actual) or all(w in actual for w in expected)


@torch.no_grad()
def _wsc_generate(model: PromptedLM, batch: dict, n: list[int], causal: bool, tokenizer) -> list[str]:
    """Greedy answers: masked LMs fill their [MASK]s most-confident first, causal LMs decode left to right."""
    batch = dict(batch)
    input_ids = batch["input_ids"].clone()
    reads = batch["read_positions"]
    rows = input_ids.shape[0]
    filled = [[None] * k for k in n]
    for step in range(max(n)):
        batch["input_ids"] = input_ids
        probs = model(**_model_inputs(batch)).float().softmax(-1)  # [B, T, V]
        best_p, best_id = probs.max(-1)  # [B, T]
        for r in range(rows):
            if step >= n[r]:
                continue
            if causal:
                j = step
            else:
                open_slots = [j for j in range(n[r]) if filled[r][j] is None]
                j = max(open_slots, key=lambda k: best_p[r, k].item())
            token = int(best_id[r, j])
            filled[r][j] = token
            input_ids[r, reads[r, j] + (1 if causal else 0)] = token
    special = set(tokenizer.all_special_ids)
    return [tokenizer.decode([t for t in f if t not in special]) for f in filled]


@torch.no_grad()
def predict(model: nn.Module, items: list[dict], encoder: Encoder, candidate_ids: torch.Tensor | None,
            batch_size: int) -> list[str]:
    """The predicted label (as a label string) of every item."""
    spec = encoder.spec
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = {k: v.to(device) for k, v in encoder.collate(chunk).items()}
        if encoder.method == "finetune":
            logits = model(**batch)
            if spec.kind == "copa":
                logits = logits.view(2, -1).t()
            predictions += [spec.labels[i] for i in logits.argmax(-1).tolist()]
        elif spec.kind == "classify":
            logits = model(**_model_inputs(batch), candidate_ids=candidate_ids.to(device))[:, 0]
            predictions += [spec.labels[i] for i in logits.argmax(-1).tolist()]
        elif spec.kind == "copa":
            scores = _token_log_probs(model, batch).sum(-1).view(2, -1)  # summed log-probability of each choice
            predictions += [str(i) for i in scores.argmax(0).tolist()]
        else:
            answers = _wsc_generate(model, batch, [item["n"] for item in chunk], encoder.causal, encoder.tokenizer)
            predictions += [str(wsc_match(a, item["ex"].fields["span"])) for a, item in zip(answers, chunk)]
    model.train(was_training)
    return predictions


def evaluate(model, items, encoder, candidate_ids, batch_size) -> dict[str, float]:
    predictions = predict(model, items, encoder, candidate_ids, batch_size)
    examples = [item["ex"] for item in items]
    # macro-F1 over the classes seen in labels or predictions, as scikit-learn (and so PET) computes it
    return task_metrics(encoder.spec.metrics, predictions, [ex.label for ex in examples],
                        groups=[ex.group for ex in examples])


# --- parameters ---------------------------------------------------------------------------------------

def _task_table(params: dict, spec: TaskSpec) -> dict:
    table = (params.get("tasks") or {}).get(spec.name)
    if not table:
        raise TaskError(f"params has no `tasks.{spec.name}` entry (max_steps, lr, max_length, warmup_steps)")
    return table


def train_config(params: dict, spec: TaskSpec, n_train: int) -> TrainConfig:
    """TrainConfig of one task: `train:` values, nulls filled from the setting and the task table."""
    values = dict(params["train"])
    table, setting = _task_table(params, spec), params["setting"]
    defaults = params[setting]
    batch = values.get("batch_size") or defaults.get("batch_size", 16)
    values["batch_size"] = batch
    if values.get("patience") is None:
        values["patience"] = defaults.get("patience")
    if setting == "fewshot":
        values["lr"] = values.get("lr") or table["lr"]
        values["max_steps"] = values.get("max_steps") or table["max_steps"]
        values["eval_every"] = values.get("eval_every") or defaults["eval_every"]
        if values.get("warmup_steps") is None:
            values["warmup_steps"] = table.get("warmup_steps", 0)
        if not values.get("epochs"):  # the step count decides: as many passes over train32 as it takes
            values["epochs"] = max(1, math.ceil(values["max_steps"] / max(1, math.ceil(n_train / batch))))
    else:
        values["lr"] = values.get("lr") or defaults["lr"]
        values["epochs"] = values.get("epochs") or defaults["epochs"][spec.size]
        if values.get("warmup_steps") is None:
            values["warmup_steps"] = 0
    return TrainConfig.from_dict(values)


def validate(params: dict) -> list[TaskSpec]:
    """Everything that can be checked before a model is loaded; returns the tasks to run."""
    if params.get("method") not in METHODS:
        raise TaskError(f"unknown SuperGLUE method {params.get('method')!r}; choose one of {METHODS}")
    if params.get("setting") not in SETTINGS:
        raise TaskError(f"unknown SuperGLUE setting {params.get('setting')!r}; choose one of {SETTINGS}")
    names = str(params["task"]).lower()
    if names == "all":  # `all` in the full setting: the six tasks that have a train set (BoolQ has none here)
        specs = [s for s in TASKS.values() if params["setting"] == "fewshot" or s.name != "boolq"]
    else:
        specs = [task_spec(t) for t in names.split(",") if t.strip()]
    if not specs:
        raise TaskError("no SuperGLUE task given")
    if params["setting"] == "full" and params.get("full", {}).get("select_on", "heldout") not in ("heldout", "val"):
        raise TaskError(f"full.select_on must be heldout or val, got {params['full']['select_on']!r}")
    for spec in specs:
        if params["setting"] == "full" and spec.name == "boolq":
            raise TaskError("BoolQ has no full SuperGLUE train set in this data mirror (superglue/BoolQ/train.jsonl "
                            "is missing), so the `full` setting cannot run for BoolQ; use --setting fewshot")
        templates_for(spec, params["method"], params)
        train_config(params, spec, 32)
    return specs


# --- data preparation (DVC stage prepare_fewglue) -------------------------------------------------------

def _units(spec: TaskSpec, rows: list[dict]) -> int:
    """How many examples a list of raw rows holds (MultiRC: questions; others: rows)."""
    if spec.name == "multirc":
        return sum(len(r["passage"]["questions"]) for r in rows)
    return len(rows)


def _load_raw(spec: TaskSpec, path: Path) -> list[dict]:
    read_examples(spec, path)  # validates every row (file:line errors)
    return [row for _, row in _rows(path)]


def _sample_dev32(spec: TaskSpec, train: list[dict], train32: list[dict], val: list[dict], size: int, seed: int):
    """dev32: `size` examples (never more than train32 has) drawn, seeded, from training rows that train32
    does not use and that share no content with train32 or val. MultiRC: one question from each of `size`
    passages that train32 does not use (the FewGLUE layout: one question per row)."""
    used_idx = {r.get("idx") for r in train32}
    banned = {spec.key(r) for r in train32} | {spec.key(r) for r in val}
    pool, seen = [], set()
    for row in train:
        key = spec.key(row)
        if row.get("idx") in used_idx or key in banned or key in seen:
            continue
        seen.add(key)
        pool.append(row)
    n = min(size, _units(spec, train32))
    if len(pool) < n:
        raise DataError(f"{spec.folder}: only {len(pool)} unused training rows for a dev32 of {n}")
    rng = random.Random(f"{seed}-{spec.name}-dev32")
    picked = sorted(rng.sample(range(len(pool)), n))
    dev = [pool[i] for i in picked]
    if spec.name == "multirc":
        dev = [{**row, "passage": {**row["passage"], "questions": [rng.choice(row["passage"]["questions"])]}} for row in dev]
    return dev, len(pool)


def _split_full(spec: TaskSpec, train: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out dev of the full setting: a seeded `fraction` of the train set's distinct contents
    (rows with the same content go to the same side)."""
    by_key: dict[str, list[dict]] = {}
    for row in train:
        by_key.setdefault(spec.key(row), []).append(row)
    keys = list(by_key)
    random.Random(f"{seed}-{spec.name}-full").shuffle(keys)
    n_dev = max(1, round(fraction * len(keys)))
    dev_keys = set(keys[:n_dev])
    train_rows = [r for r in train if spec.key(r) not in dev_keys]
    dev_rows = [r for r in train if spec.key(r) in dev_keys]
    return train_rows, dev_rows


def _disjoint(spec: TaskSpec, a: list[dict], b: list[dict]) -> bool:
    return not ({spec.key(r) for r in a} & {spec.key(r) for r in b})


def prepare(raw: str | Path = "data/raw", out: str | Path = "data/fewglue", seed: int = 42,
            dev_size: int | None = None, full_dev_fraction: float | None = None, tasks: list[str] | None = None) -> dict:
    """Build `<out>/<Task>/{train32,dev32,val}.jsonl` (few-shot) and `{train,dev}.jsonl` (full) from the
    materialised mirror in `raw`, check that dev32 is disjoint from train32 and val, and write the
    figures to `<out>/stats.json`. BoolQ has no full train set: its dev32 is the published one."""
    if dev_size is None or full_dev_fraction is None:
        from components.config import load_params
        defaults = load_params("superglue").get("prepare", {})
        dev_size = dev_size if dev_size is not None else defaults.get("dev_size", 32)
        full_dev_fraction = full_dev_fraction if full_dev_fraction is not None else defaults.get("full_dev_fraction", 0.1)
    if not 0 < full_dev_fraction < 1:
        raise ValueError(f"full_dev_fraction must lie in (0, 1), got {full_dev_fraction}")
    raw, out = Path(raw), Path(out)
    if not (raw / "superglue").is_dir():
        raise DataError(f"{raw / 'superglue'} does not exist: run `dvc repro materialise` (or `ptuning prepare data`) first")
    stats = {"seed": seed, "dev_size": dev_size, "full_dev_fraction": full_dev_fraction, "raw": str(raw), "tasks": {}}
    for spec in (task_spec(t) for t in (tasks or TASKS)):
        val = _load_raw(spec, raw / "superglue" / spec.folder / "val.jsonl")
        train32 = _load_raw(spec, raw / "fewglue" / spec.folder / "train.jsonl")
        full_path = raw / "superglue" / spec.folder / "train.jsonl"
        task_out = out / spec.folder
        record: dict = {"train32": _units(spec, train32), "val": _units(spec, val)}
        if full_path.exists():
            train = _load_raw(spec, full_path)
            dev32, pool = _sample_dev32(spec, train, train32, val, dev_size, seed)
            full_train, full_dev = _split_full(spec, train, full_dev_fraction, seed)
            train_idx = {r.get("idx") for r in train}
            record.update(dev32_source="sampled from unused SuperGLUE train examples", dev32_pool=pool,
                          train32_in_train=sum(r.get("idx") in train_idx for r in train32),
                          full={"train": _units(spec, full_train), "dev": _units(spec, full_dev),
                                "dev_disjoint_from_train": _disjoint(spec, full_train, full_dev),
                                "dev_disjoint_from_val": _disjoint(spec, full_dev, val)})
            assert record["full"]["dev_disjoint_from_train"] and record["full"]["dev_disjoint_from_val"], spec.folder
            write_jsonl(task_out / "train.jsonl", full_train)
            write_jsonl(task_out / "dev.jsonl", full_dev)
        else:
            published = raw / "fewglue_32dev_published" / spec.folder / "dev32.jsonl"
            if not published.exists():
                raise DataError(f"{full_path} is missing and so is the published dev32 {published}: no dev32 for {spec.folder}")
            dev32 = _load_raw(spec, published)[:min(dev_size, len(train32))]
            record.update(dev32_source=f"published dev32 ({published}): no full SuperGLUE train set for "
                                       f"{spec.folder} here, so dev32 cannot be drawn from unused training data",
                          full=f"unavailable: {full_path} is missing")
            for stale in ("train.jsonl", "dev.jsonl"):
                (task_out / stale).unlink(missing_ok=True)
        record.update(dev32=_units(spec, dev32),
                      dev32_disjoint_from_train32=_disjoint(spec, dev32, train32) and
                      not {r.get("idx") for r in dev32} & {r.get("idx") for r in train32},
                      dev32_disjoint_from_val=_disjoint(spec, dev32, val))
        if record["dev32"] > record["train32"]:
            raise DataError(f"{spec.folder}: dev32 ({record['dev32']}) is larger than train32 ({record['train32']})")
        if not (record["dev32_disjoint_from_train32"] and record["dev32_disjoint_from_val"]):
            raise DataError(f"{spec.folder}: dev32 overlaps train32 or val: {record}")
        write_jsonl(task_out / "train32.jsonl", train32)
        write_jsonl(task_out / "dev32.jsonl", dev32)
        write_jsonl(task_out / "val.jsonl", val)
        stats["tasks"][spec.name] = record
        log.info("%s: train32 %d, dev32 %d (%s), val %d", spec.folder, record["train32"], record["dev32"],
                 record["dev32_source"], record["val"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


# --- running ----------------------------------------------------------------------------------------

def _limit(examples: list[Example], n: int | None) -> list[Example]:
    """The first `n` examples, completed to a whole MultiRC question (smoke tests)."""
    if not n or n >= len(examples):
        return examples
    end = n
    while end < len(examples) and examples[end].group is not None and examples[end].group == examples[end - 1].group:
        end += 1
    return examples[:end]


def load_splits(spec: TaskSpec, params: dict) -> dict[str, list[Example]]:
    """{"train", "dev", "val"} examples of the setting, read from the prepared data."""
    data_dir = Path(params["data_dir"]) / spec.folder
    setting = params["setting"]
    if setting == "full" and spec.name == "boolq":
        raise TaskError("BoolQ has no full SuperGLUE train set: the `full` setting cannot run for BoolQ")
    paths = dict(zip(("train", "dev", "val"), (data_dir / f"{s}.jsonl" for s in SPLITS[setting])))
    for path in paths.values():
        if not path.exists():
            raise DataError(f"{path} does not exist: run `dvc repro prepare_fewglue` (or `ptuning prepare fewglue`) first")
    splits = {name: read_examples(spec, path) for name, path in paths.items()}
    if setting == "full" and params["full"].get("select_on", "heldout") == "val":
        splits["train"] = splits["train"] + splits["dev"]  # the paper: all of train, select on val
        splits["dev"] = splits["val"]
    limit = params.get("max_eval_examples")
    splits["dev"], splits["val"] = _limit(splits["dev"], limit), _limit(splits["val"], limit)
    return splits


def _sequence_classifier(params: dict, lm, num_labels: int) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    from components.models.catalog import model_dir

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir(params["model"])), num_labels=num_labels)
    if lm.causal or model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id_of(lm.tokenizer)
    return HeadModel(model)


def run_task(spec: TaskSpec, lm, params: dict, output_dir: Path, callbacks: list[Callback] = ()) -> dict:
    """Train (unless manual-zeroshot), select on dev, evaluate on val; export the prompt of ptuning."""
    method, setting = params["method"], params["setting"]
    splits = load_splits(spec, params)
    table = _task_table(params, spec)
    config = train_config(params, spec, len(splits["train"]))
    seed_everything(config.seed)
    templates = templates_for(spec, method, params, lm.tokenizer)
    encoder = Encoder(spec, method, lm.tokenizer, lm.causal, templates, params.get("max_length") or table["max_length"],
                      wsc=params.get("wsc") or {}, sep_fallback=params.get("sep_fallback"), seed=config.seed)
    candidate_ids = (torch.tensor(verbalizer_ids(spec, lm.tokenizer, params["model"]))
                     if spec.verbalizer and method != "finetune" else None)

    prompt = None
    if method == "finetune":
        n_labels = 1 if spec.kind == "copa" else len(spec.labels)
        model = _sequence_classifier(params, lm, n_labels)
    else:
        n_prompt = next(iter(templates.values())).n_prompt_tokens
        if n_prompt:
            prompt = PromptEncoder(n_prompt, lm.model.get_input_embeddings().embedding_dim, params.get("encoder", "lstm"),
                                   params.get("encoder_hidden"))
        freeze = method == "manual-zeroshot" or (method == "ptuning" and bool(params.get("freeze_lm")))
        model = PromptedLM(lm.model, prompt, lm.causal, freeze_lm=freeze)

    items = {name: encoder.items(examples, train=name == "train") for name, examples in splits.items()}
    batch_size = params.get("eval_batch_size", 32)
    evaluate_dev = lambda m: evaluate(m, items["dev"], encoder, candidate_ids, batch_size)

    output_dir.mkdir(parents=True, exist_ok=True)
    result, history = None, []
    if method != "manual-zeroshot":
        if not items["train"]:
            raise DataError(f"{spec.folder}: no training items")
        checkpoint_dir = output_dir / "checkpoint"
        result = fit(model, items["train"], [encoder.length(i) for i in items["train"]], encoder.collate,
                     make_loss(spec, method, candidate_ids), evaluate_dev, config, select=spec.metrics,
                     callbacks=callbacks, checkpoint_dir=checkpoint_dir)
        history = result.history
        if not params.get("keep_checkpoint", False):
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    dev = evaluate_dev(model)
    val = evaluate(model, items["val"], encoder, candidate_ids, batch_size)

    prompt_dir = None
    if prompt is not None:
        prompt_dir = export_prompt(prompt, output_dir / "prompt", next(iter(templates.values())).text, params["model"],
                                   {"benchmark": "superglue", "task": spec.name, "setting": setting, "causal": lm.causal,
                                    "patterns": {k: t.text for k, t in templates.items()},
                                    "lm_trained": not model.freeze_lm})
    out = {
        "task": spec.name, "val": val, "dev": dev,
        "val_score": primary_score(val, spec.metrics), "dev_score": primary_score(dev, spec.metrics),
        "n_train": len(items["train"]), "n_dev": len(items["dev"]), "n_val": len(items["val"]),
        "steps": result.steps if result else 0, "best_step": result.best_step if result else 0,
        "stopped_early": result.stopped_early if result else False,
        "selected_on": "val" if setting == "full" and params["full"].get("select_on") == "val" else SPLITS[setting][1],
        "patterns": {k: t.text for k, t in templates.items()} if method != "finetune" else None,
        "prompt_dir": str(prompt_dir) if prompt_dir else None, "history": history,
    }
    stats = Path(params["data_dir"]) / "stats.json"
    if stats.exists():
        out["dev32_source"] = json.loads(stats.read_text()).get("tasks", {}).get(spec.name, {}).get("dev32_source")
    log.info("%s %s %s: val %s, dev %s after %d steps", spec.name, method, setting, val, dev, out["steps"])
    return out


def run(params: dict, output_dir: str | Path, callbacks: list[Callback] = ()) -> dict:
    """`params` as in params/superglue.yaml; `params['task']` is a task, a comma list or `all`.
    Writes `<output_dir>/metrics.json` (and history.json) and returns the metrics."""
    from components.models.catalog import load_lm

    specs = validate(params)
    output_dir = Path(output_dir)
    results = []
    lm = None
    for spec in specs:
        if lm is None or params["method"] != "manual-zeroshot":  # a trained LM is never reused
            lm = load_lm(params["model"])
        task_dir = output_dir / spec.name if len(specs) > 1 else output_dir
        results.append(run_task(spec, lm, params, task_dir, callbacks))
    metrics = {"benchmark": "superglue", "task": str(params["task"]).lower(), "model": params["model"],
               "method": params["method"], "setting": params["setting"]}
    if metrics["task"] == "all" and params["setting"] == "full":
        metrics["skipped"] = {"boolq": "no full SuperGLUE train set in the data mirror"}
    per_task = {r["task"]: {k: v for k, v in r.items() if k not in ("task", "history")} for r in results}
    if len(results) == 1:
        only = per_task[results[0]["task"]]
        metrics.update(only["val"])  # the val figures at the top, e.g. "acc"
        metrics.update({k: v for k, v in only.items() if k != "prompt_dir"})
    else:
        metrics["tasks"] = per_task
        metrics["val_score"] = sum(r["val_score"] for r in results) / len(results)
        metrics["dev_score"] = sum(r["dev_score"] for r in results) / len(results)
    metrics["score"] = metrics["val_score"]
    metrics["prompts"] = {r["task"]: r["prompt_dir"] for r in results if r["prompt_dir"]}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (output_dir / "history.json").write_text(json.dumps({r["task"]: r["history"] for r in results}, indent=2))
    return metrics
