"""The SuperGLUE tasks: the one table `TASKS`, one row per task, and everything a row is read with.

A row says how to read the task's JSONL rows, its pattern(s) (`[P]` marks the continuous prompt tokens, every
other literal is an anchor, `{field}` an input slot and `[Y]` the answer), its verbalizer, the slot that long
inputs lose tokens from, its metrics, its kind (the object that turns examples into batches, losses and
predictions: kinds.py) and what the data preparation needs (the content key, how rows count). The patterns are
those of the paper's code (THUDM/P-tuning, PT-Fewshot/data_utils/task_pvps.py: the pieces flagged as blocks
there are the `[P]`s here); the manual pattern of a task is the same string without its `[P]`s.

No task name appears anywhere else in this package: what is special about a task is an attribute of its row
or the behaviour of its kind.

    BoolQ, CB, RTE, WiC   Classification: the verbalizer's word at the [Y] slot
    MultiRC               GroupedClassification: one item per answer option; EM groups them by question; a
                          raw row (a passage) holds several questions, and dev32 takes one of them
    COPA                  ChoiceScoring: each alternative is the answer, several tokens long; the pattern
                          depends on the question (cause: "because", effect: "so")
    WSC                   SpanGeneration: the answer is the referent span, generated and matched (PET's rule)
"""
from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from components.benchmarks.superglue.kinds import (ChoiceScoring, Classification, GroupedClassification, Kind,
                                                   SpanGeneration)
from components.data.sources import DataError, numbered_jsonl
from components.method.templates import Template, TemplateError, parse_template, piece_ids


class TaskError(ValueError):
    """A task, method or setting that cannot run (unknown name, no full train set, ...)."""


@dataclass
class Example:
    guid: str
    fields: dict[str, str]  # the pattern's input slots (and the answer texts of choices and spans)
    label: str  # the label as a string: "entailment", "True", "0", ...
    group: str | None = None  # the question an answer option belongs to (grouped classification)
    pattern: str = "default"  # which of the task's patterns reads it (e.g. "cause" or "effect")
    source: str = ""  # "file:line", for messages


# --- how raw rows count (the data preparation's units) ------------------------------------------------

class OnePerRow:
    """A raw row is one example."""

    def count(self, row: dict) -> int:
        return 1

    def pick_one(self, row: dict, rng: random.Random) -> dict:
        return row


class QuestionsOfPassage:
    """A raw row is a passage with several questions; each question (with its answer options) is one example."""

    def count(self, row: dict) -> int:
        return len(row["passage"]["questions"])

    def pick_one(self, row: dict, rng: random.Random) -> dict:
        return {**row, "passage": {**row["passage"], "questions": [rng.choice(row["passage"]["questions"])]}}


# --- readers ----------------------------------------------------------------------------------------

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


def _guid(spec: "TaskSpec", row: dict, where: str) -> str:
    return f"{spec.name}-{row.get('idx', where)}"


def _read_fields(*names: str, **transforms: Callable[[str], str]):
    """A reader of one example from the top-level fields `names` (each passed through its transform)."""
    def read(row: dict, where: str, spec: "TaskSpec") -> list[Example]:
        fields = {n: transforms.get(n, str)(str(_field(row, n, where))) for n in names}
        return [Example(_guid(spec, row, where), fields, _label(_field(row, "label", where), where, spec), source=where)]
    return read


def _read_copa(row: dict, where: str, spec: "TaskSpec") -> list[Example]:
    question = _field(row, spec.pattern_field, where)
    if question not in spec.patterns:
        raise DataError(f"{where}: {spec.pattern_field} {question!r} names none of the patterns {sorted(spec.patterns)}")
    fields = {"premise": remove_final_punc(str(_field(row, "premise", where))),
              "choice1": remove_final_punc(lowercase_first(str(_field(row, "choice1", where)))),
              "choice2": remove_final_punc(lowercase_first(str(_field(row, "choice2", where))))}
    return [Example(_guid(spec, row, where), fields, _label(_field(row, "label", where), where, spec),
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
    return [Example(_guid(spec, row, where), fields, _label(_field(row, "label", where), where, spec), source=where)]


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
            examples.append(Example(f"{spec.name}-{group}-{a.get('idx', ai)}",
                                    {"passage": passage, "question": question, "answer": str(_field(row, f"{path}.text", where))},
                                    label, group=group, source=where))
    return examples


# --- the registry -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    name: str  # CLI name: rte
    folder: str  # data folder: RTE
    kind: Kind
    labels: tuple[str, ...]
    verbalizer: dict[str, str] | None  # label -> word (one token of the model); None: the kind needs none
    patterns: dict[str, str]  # pattern key -> P-tuning pattern; the manual pattern drops the [P]s
    truncate: str  # the slot long inputs are shortened from
    metrics: tuple[str, ...]  # their mean is the task's score
    size: str  # small | large: epochs of the full setting
    reader: Callable[[dict, str, "TaskSpec"], list[Example]]
    pairs: Callable[[Example], list[tuple[str, str]]]  # finetune: (text_a, text_b) per input; text_a is truncated
    key: Callable[[dict], str]  # identity of a raw row's content (disjointness of splits)
    slots: tuple[str, ...]  # the fields a pattern may use
    full_train: bool = True  # the mirror holds a SuperGLUE train set (the `full` setting and a sampled dev32)
    units: OnePerRow | QuestionsOfPassage = OnePerRow()
    pattern_field: str | None = None  # the raw field whose value names a row's pattern (COPA: question)


YES_NO = {"False": "No", "True": "Yes"}
CONNECTIVE = {"cause": "because", "effect": "so"}


def _pair(a: str, b: Callable[[dict], str] | str):
    """finetune's one input (fields[a], b) where b is a field name or a function of the fields."""
    return lambda ex: [(ex.fields[a], b(ex.fields) if callable(b) else ex.fields[b])]


def _key(*paths: str):
    return lambda row: json.dumps([row.get(p) for p in paths])


TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec(
        "boolq", "BoolQ", Classification(), ("False", "True"), YES_NO,
        {"default": "{passage} . [P] Question: {question} ? Answer: [Y] ."}, "passage", ("acc",), "large",
        _read_fields("passage", "question"), _pair("passage", "question"), _key("question", "passage"),
        ("passage", "question"), full_train=False),
    "cb": TaskSpec(
        "cb", "CB", Classification(), ("contradiction", "entailment", "neutral"),
        {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"},
        {"default": "{premise} [SEP] {hypothesis} ? [P] answer: [Y]"}, "premise", ("acc", "f1_macro"), "small",
        _read_fields("premise", "hypothesis"), _pair("premise", "hypothesis"), _key("premise", "hypothesis"),
        ("premise", "hypothesis")),
    "copa": TaskSpec(
        "copa", "COPA", ChoiceScoring(choices=("choice1", "choice2")), ("0", "1"), None,
        {"cause": "{choice1} or {choice2} ? {premise} because [P] [Y] .",
         "effect": "{choice1} or {choice2} ? {premise} so [P] [Y] ."}, "premise", ("acc",), "small",
        _read_copa,
        lambda ex: [(f"{ex.fields['premise']} {CONNECTIVE[ex.pattern]}", ex.fields[c]) for c in ("choice1", "choice2")],
        _key("premise", "choice1", "choice2", "question"), ("premise", "choice1", "choice2"), pattern_field="question"),
    "multirc": TaskSpec(
        "multirc", "MultiRC", GroupedClassification(), ("0", "1"), {"0": "No", "1": "Yes"},
        {"default": "{passage} . Question: {question} ? Is it {answer} ? [P] [Y] ."}, "passage", ("em", "f1a"), "large",
        _read_multirc, _pair("passage", lambda f: f"{f['question']} {f['answer']}"),
        lambda r: json.dumps((r.get("passage") or {}).get("text")), ("passage", "question", "answer"),
        units=QuestionsOfPassage()),
    "rte": TaskSpec(
        "rte", "RTE", Classification(), ("entailment", "not_entailment"), {"entailment": "Yes", "not_entailment": "No"},
        {"default": "{premise} Question: {hypothesis} ? [P] Answer: [Y] ."}, "premise", ("acc",), "small",
        _read_fields("premise", "hypothesis", hypothesis=remove_final_punc), _pair("premise", "hypothesis"),
        _key("premise", "hypothesis"), ("premise", "hypothesis")),
    "wic": TaskSpec(
        "wic", "WiC", Classification(), ("False", "True"), YES_NO,
        {"default": "{sentence1} [SEP] {sentence2} [P] *{word} *? [Y]"}, "sentence1", ("acc",), "large",
        _read_fields("sentence1", "sentence2", "word"), _pair("sentence1", lambda f: f"{f['word']} : {f['sentence2']}"),
        _key("word", "sentence1", "sentence2"), ("sentence1", "sentence2", "word")),
    "wsc": TaskSpec(
        "wsc", "WSC", SpanGeneration(answer="span", positive="True"), ("False", "True"), None,
        {"default": "[P] {text} [P] pronoun '*{pronoun}*' refers to [Y] ."}, "text", ("acc",), "small",
        _read_wsc, _pair("text", lambda f: f"{f['pronoun']} : {f['span']}"),
        lambda r: json.dumps(r.get("text")), ("text", "pronoun")),
}


def task_spec(name: str) -> TaskSpec:
    spec = TASKS.get(str(name).strip().lower())
    if spec is None:
        raise TaskError(f"unknown SuperGLUE task {name!r}; choose one of {', '.join(TASKS)}")
    return spec


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a JSONL file that must exist."""
    if not path.exists():
        raise DataError(f"{path} does not exist")
    return numbered_jsonl(path)


def read_examples(spec: TaskSpec, path: str | Path) -> list[Example]:
    """Every example of a JSONL file of the task; bad rows fail with `file:line: ...`."""
    path = Path(path)
    examples = []
    for line_no, row in read_rows(path):
        examples.extend(spec.reader(row, f"{path}:{line_no}", spec))
    if not examples:
        raise DataError(f"{path} has no examples")
    return examples


# --- patterns and verbalizers -------------------------------------------------------------------------

def pattern_texts(spec: TaskSpec, params: dict | None = None) -> dict[str, str]:
    """The task's P-tuning pattern(s), or the `pattern` parameter (a string, or a dict keyed like the task's)."""
    custom = (params or {}).get("pattern")
    if not custom:
        return dict(spec.patterns)
    if isinstance(custom, str):
        return {key: custom for key in spec.patterns}
    if not isinstance(custom, dict) or set(custom) != set(spec.patterns):
        raise TaskError(f"pattern for {spec.name} must give the keys {sorted(spec.patterns)}, got {custom!r}")
    return dict(custom)


def _separator(tokenizer, params: dict) -> str:
    """What `[SEP]` in a pattern becomes: the model's separator token, else `sep_fallback` (null: nothing)."""
    if tokenizer is not None and getattr(tokenizer, "sep_token", None):
        return tokenizer.sep_token
    return params.get("sep_fallback") or ""


def templates_for(spec: TaskSpec, params: dict, tokenizer=None, continuous: bool = True) -> dict[str, Template]:
    """Parsed templates per pattern key: with their [P]s (`continuous`, P-tuning) or without them (manual
    prompts). With a tokenizer, `[SEP]` becomes its separator token (or `sep_fallback`)."""
    out = {}
    for key, text in pattern_texts(spec, params).items():
        if tokenizer is not None:
            separator = _separator(tokenizer, params)
            text = text.replace("[SEP]", separator) if separator else re.sub(r"\s*\[SEP\]\s*", " ", text)
        template = parse_template(text, fields=spec.slots)
        if continuous and not template.n_prompt_tokens:
            raise TemplateError(f"ptuning needs at least one [P] in the {spec.name} pattern {text!r}")
        out[key] = template if continuous else template.without_prompts()
    counts = {t.n_prompt_tokens for t in out.values()}
    if len(counts) > 1:
        raise TemplateError(f"the patterns of {spec.name} must have the same number of [P] tokens, got {sorted(counts)}")
    return out


def verbalizer_ids(spec: TaskSpec, tokenizer, model_name: str = "") -> list[int]:
    """One token id per label, in `spec.labels` order; a word that is not one token of the model fails."""
    ids = []
    for label in spec.labels:
        word = spec.verbalizer[label]
        pieces = piece_ids(tokenizer, word)
        if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
            raise TaskError(f"{spec.name}: verbalizer word {word!r} (label {label}) is not a single token of "
                            f"{model_name or 'this model'}: {tokenizer.convert_ids_to_tokens(pieces)}")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise TaskError(f"{spec.name}: two labels share a verbalizer token: {ids}")
    return ids
