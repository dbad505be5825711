"""SuperGLUE metrics against values computed by hand (and, where it has them, scikit-learn)."""
import pytest

from components.benchmarks.superglue.metrics import accuracy, exact_match, f1a, macro_f1, primary_score, task_metrics


def test_accuracy():
    assert accuracy(["a", "b", "a", "c"], ["a", "a", "a", "c"]) == 3 / 4
    assert accuracy(["True"], ["True"]) == 1.0


def test_cb_macro_f1_with_a_class_never_predicted():
    labels = ["entailment", "entailment", "contradiction", "contradiction", "neutral", "neutral"]
    preds = ["entailment", "entailment", "contradiction", "entailment", "entailment", "contradiction"]
    # entailment: tp 2, fp 2, fn 0 -> 2*2 / (2*2 + 2 + 0) = 2/3
    # contradiction: tp 1, fp 1, fn 1 -> 2 / 4 = 1/2
    # neutral: never predicted: tp 0, fp 0, fn 2 -> 0
    expected = (2 / 3 + 1 / 2 + 0) / 3
    assert macro_f1(preds, labels) == pytest.approx(expected)  # 7/18
    assert macro_f1(preds, labels, classes=["contradiction", "entailment", "neutral"]) == pytest.approx(7 / 18)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert macro_f1(preds, labels) == pytest.approx(sklearn.f1_score(labels, preds, average="macro"))
    assert accuracy(preds, labels) == 3 / 6


def test_macro_f1_counts_a_class_that_is_only_predicted():
    # "neutral" predicted once but never the label: its F1 is 0 and it counts in the mean (scikit-learn too)
    labels, preds = ["e", "c", "c"], ["e", "c", "n"]
    # e: 1.0; c: tp 1, fp 0, fn 1 -> 2/3; n: tp 0, fp 1 -> 0
    assert macro_f1(preds, labels) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_multirc_em_groups_answers_by_question_and_f1a_counts_every_option():
    labels = ["1", "0", "1", "1", "0", "0"]
    preds = ["1", "0", "1", "1", "1", "0"]
    groups = ["q1", "q1", "q1", "q2", "q2", "q3"]
    # q1 all right, q2 one option wrong, q3 right -> EM 2/3
    assert exact_match(preds, labels, groups) == pytest.approx(2 / 3)
    # positive class "1": tp 3, fp 1 (q2's second option), fn 0 -> 6 / 7
    assert f1a(preds, labels) == pytest.approx(6 / 7)
    # grouping does not depend on the options being contiguous
    order = [5, 3, 0, 4, 1, 2]
    assert exact_match([preds[i] for i in order], [labels[i] for i in order], [groups[i] for i in order]) == pytest.approx(2 / 3)
    metrics = task_metrics(("em", "f1a"), preds, labels, groups)
    assert metrics == pytest.approx({"em": 2 / 3, "f1a": 6 / 7})
    assert primary_score(metrics, ("em", "f1a")) == pytest.approx((2 / 3 + 6 / 7) / 2)


def test_f1a_without_positive_predictions_or_labels_is_zero():
    assert f1a(["0", "0"], ["0", "0"]) == 0.0
    assert f1a(["0", "0"], ["1", "0"]) == 0.0


def test_bad_metric_inputs_fail_clearly():
    with pytest.raises(ValueError, match="differ in length"):
        accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])
    with pytest.raises(ValueError, match="unknown metric"):
        task_metrics(("bleu",), ["a"], ["a"])
    with pytest.raises(ValueError, match="question index"):
        task_metrics(("em",), ["1"], ["1"])
