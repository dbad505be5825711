"""SuperGLUE metrics, written out so that each can be checked against hand-computed values.

accuracy      share of predictions equal to the label (every task)
macro_f1      the unweighted mean of the per-class F1 over the classes that occur in the labels or the
              predictions (scikit-learn's `average="macro"`, which PET uses); a class that occurs but is
              never predicted (or never right) counts with F1 = 0
f1a           binary F1 of the positive class ("1", the answer is correct) over *all* answer options
exact_match   share of questions whose answer options are *all* predicted right, the options
              grouped by their question
"""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Sequence

# name -> what it needs; `task_metrics` computes the names a task asks for
METRICS = ("acc", "f1_macro", "f1a", "em")


def _check_lengths(*seqs: Sequence) -> int:
    lengths = {len(s) for s in seqs}
    if len(lengths) != 1:
        raise ValueError(f"predictions, labels (and groups) differ in length: {[len(s) for s in seqs]}")
    n = lengths.pop()
    if n == 0:
        raise ValueError("no predictions to score")
    return n


def accuracy(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    n = _check_lengths(predictions, labels)
    return sum(p == y for p, y in zip(predictions, labels)) / n


def _f1(tp: int, fp: int, fn: int) -> float:
    # precision or recall of 0/0 is 0, and so is F1 then (scikit-learn's zero_division=0)
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def f1_for_class(predictions: Sequence[Hashable], labels: Sequence[Hashable], positive: Hashable) -> float:
    _check_lengths(predictions, labels)
    tp = sum(p == positive and y == positive for p, y in zip(predictions, labels))
    fp = sum(p == positive and y != positive for p, y in zip(predictions, labels))
    fn = sum(p != positive and y == positive for p, y in zip(predictions, labels))
    return _f1(tp, fp, fn)


def macro_f1(predictions: Sequence[Hashable], labels: Sequence[Hashable], classes: Sequence[Hashable] | None = None) -> float:
    """Mean F1 over `classes` (default: the classes seen in labels or predictions)."""
    _check_lengths(predictions, labels)
    classes = list(classes) if classes is not None else sorted(set(labels) | set(predictions), key=str)
    return sum(f1_for_class(predictions, labels, c) for c in classes) / len(classes)


def f1a(predictions: Sequence[Hashable], labels: Sequence[Hashable], positive: Hashable = "1") -> float:
    """F1a: binary F1 over all answer options."""
    return f1_for_class(predictions, labels, positive)


def exact_match(predictions: Sequence[Hashable], labels: Sequence[Hashable], groups: Sequence[Hashable]) -> float:
    """EM: a question (group) counts as right only when every one of its options is right."""
    _check_lengths(predictions, labels, groups)
    right: dict[Hashable, bool] = defaultdict(lambda: True)
    for p, y, g in zip(predictions, labels, groups):
        right[g] = right[g] and p == y
    return sum(right.values()) / len(right)


def task_metrics(names: Sequence[str], predictions: Sequence[Hashable], labels: Sequence[Hashable],
                 groups: Sequence[Hashable] | None = None, classes: Sequence[Hashable] | None = None) -> dict[str, float]:
    """The metrics `names` (a subset of METRICS) of one prediction run."""
    out = {}
    for name in names:
        if name == "acc":
            out[name] = accuracy(predictions, labels)
        elif name == "f1_macro":
            out[name] = macro_f1(predictions, labels, classes)
        elif name == "f1a":
            out[name] = f1a(predictions, labels)
        elif name == "em":
            if groups is None:
                raise ValueError("exact match needs the question index (groups) of every answer option")
            out[name] = exact_match(predictions, labels, groups)
        else:
            raise ValueError(f"unknown metric {name!r}; known: {METRICS}")
    return out


def primary_score(metrics: dict[str, float], names: Sequence[str]) -> float:
    """One number per task: the mean of its metrics (acc alone; acc and macro-F1; EM and F1a)."""
    return sum(metrics[n] for n in names) / len(names)
