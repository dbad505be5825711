"""SuperGLUE / FewGLUE: the task table, readers on the real data, patterns, the prepare_fewglue stage,
truncation, each task kind on tiny models, every method end to end, the metrics' split names, bad inputs."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from components.benchmarks.superglue import kinds
from components.benchmarks.superglue.inputs import Inputs
from components.benchmarks.superglue.kinds import Classification
from components.benchmarks.superglue.methods import METHODS
from components.benchmarks.superglue.prepare import prepare
from components.benchmarks.superglue.run import load_splits, plan, run
from components.benchmarks.superglue.tasks import TASKS, Example, TaskError, read_examples, templates_for, verbalizer_ids
from components.common import flatten
from components.config import apply_overrides, load_params
from components.data.sources import DataError
from components.method.model import PromptedLM, PromptEncoder
from components.method.templates import encode
from components.models.catalog import load_lm
from components.run_config import resolve
from components.run_dir import execute


@pytest.fixture(scope="session")
def raw_dir(shared_dir):
    return shared_dir / "data"  # the mirror has data/raw's layout


@pytest.fixture(scope="session")
def bert():
    return load_lm("tiny-bert")


@pytest.fixture(scope="session")
def gpt2():
    return load_lm("tiny-gpt2")


def make_params(fewglue_dir, **overrides):
    return apply_overrides(load_params("superglue"), {"data_dir": str(fewglue_dir), **overrides})


def render(template, fields, n_masks=1, mask="[MASK]"):
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


SPAN_OPTIONS = load_params("superglue")["span_generation"]


# --- the task table and readers ------------------------------------------------------------------------

def test_registry_covers_the_seven_tasks():
    assert set(TASKS) == {"boolq", "cb", "copa", "multirc", "rte", "wic", "wsc"}
    for spec in TASKS.values():
        assert spec.metrics and spec.reader and spec.patterns
        for text in spec.patterns.values():
            assert "[P]" in text and "[Y]" in text
        # a verbalizer exactly for the kinds that classify through one
        assert (spec.verbalizer is not None) == isinstance(spec.kind, Classification)
        if spec.verbalizer:
            assert set(spec.verbalizer) == set(spec.labels)
    assert {name: spec.kind.name for name, spec in TASKS.items()} == {
        "boolq": "classification", "cb": "classification", "rte": "classification", "wic": "classification",
        "multirc": "grouped_classification", "copa": "choice_scoring", "wsc": "span_generation"}
    assert TASKS["cb"].metrics == ("acc", "f1_macro") and TASKS["multirc"].metrics == ("em", "f1a")
    assert set(TASKS["copa"].patterns) == {"cause", "effect"}
    assert [name for name, spec in TASKS.items() if not spec.full_train] == ["boolq"]


def test_no_task_name_appears_outside_its_row():
    package = Path(kinds.__file__).parent
    names = sorted({n for spec in TASKS.values() for n in (spec.name, spec.folder)}, key=len, reverse=True)
    pattern = re.compile(r"(?<![A-Za-z])(" + "|".join(names) + r")(?![A-Za-z])", re.IGNORECASE)
    sources = sorted(p for p in package.glob("*.py") if p.name != "tasks.py")
    assert {p.name for p in sources} >= {"__init__.py", "kinds.py", "methods.py", "prepare.py", "run.py"}
    found = [f"{p.name}:{i}: {line.strip()}" for p in sources
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []
    assert pattern.search('if spec.name == "multirc":') and pattern.search("def wsc_match(")  # what it catches


@pytest.mark.parametrize("task, split, expected", [
    ("boolq", "superglue/BoolQ/val", 3270), ("cb", "superglue/CB/val", 56), ("copa", "superglue/COPA/val", 100),
    ("rte", "superglue/RTE/val", 277), ("wic", "superglue/WiC/val", 638), ("wsc", "superglue/WSC/val", 104),
    ("multirc", "superglue/MultiRC/val", 4848),
    ("cb", "superglue/CB/train", 250), ("copa", "superglue/COPA/train", 400), ("rte", "superglue/RTE/train", 2490),
    ("wic", "superglue/WiC/train", 5428), ("wsc", "superglue/WSC/train", 554),
] + [(t, f"fewglue/{TASKS[t].folder}/train", 32) for t in TASKS if t != "multirc"])
def test_readers_read_every_example(raw_dir, task, split, expected):
    examples = read_examples(TASKS[task], raw_dir / f"{split}.jsonl")
    assert len(examples) == expected
    assert all(ex.label in TASKS[task].labels for ex in examples)


def test_multirc_reader_groups_answer_options_by_question(raw_dir):
    val = read_examples(TASKS["multirc"], raw_dir / "superglue/MultiRC/val.jsonl")
    assert len({ex.group for ex in val}) == 953  # README: 83 passages / 953 questions / 4848 answers
    assert len({ex.group.split("-")[0] for ex in val}) == 83
    train32 = read_examples(TASKS["multirc"], raw_dir / "fewglue/MultiRC/train.jsonl")
    assert len({ex.group for ex in train32}) == 32
    train = read_examples(TASKS["multirc"], raw_dir / "superglue/MultiRC/train.jsonl")
    assert len({ex.group.split("-")[0] for ex in train}) == 456


def test_grouped_classification_scores_and_shortens_by_whole_questions(raw_dir):
    spec = TASKS["multirc"]
    val = read_examples(spec, raw_dir / "superglue/MultiRC/val.jsonl")
    cut = spec.kind.limit(val, 5)
    assert len(cut) >= 5 and cut == val[:len(cut)] and val[len(cut)].group != cut[-1].group
    assert all(sum(ex.group == g for ex in cut) == sum(ex.group == g for ex in val) for g in {ex.group for ex in cut})
    assert spec.kind.groups(cut) == [ex.group for ex in cut]
    plain = TASKS["rte"].kind
    assert plain.limit(val, 5) == val[:5] and plain.groups(val) is None and plain.limit(val, None) == val


# --- patterns -----------------------------------------------------------------------------------------

RTE_FIELDS = {"premise": "A man walks his dog in the park.", "hypothesis": "A person is outside."}


def test_rte_pattern_manual_and_ptuning(tmp_path):
    spec = TASKS["rte"]
    row = {"premise": RTE_FIELDS["premise"], "hypothesis": RTE_FIELDS["hypothesis"], "label": "entailment", "idx": 0}
    path = tmp_path / "rte.jsonl"
    path.write_text(json.dumps(row) + "\n")
    ex = read_examples(spec, path)[0]
    assert ex.fields["hypothesis"] == "A person is outside"  # final punctuation stripped
    manual = METHODS["manual-zeroshot"].templates(spec, {})["default"]
    ptuning = METHODS["ptuning"].templates(spec, {})["default"]
    assert render(manual, ex.fields) == "A man walks his dog in the park. Question: A person is outside ? Answer: [MASK] ."
    assert render(ptuning, ex.fields) == "A man walks his dog in the park. Question: A person is outside ? [P] Answer: [MASK] ."
    assert ptuning.n_prompt_tokens == 1 and manual.n_prompt_tokens == 0
    assert METHODS["finetune"].templates(spec, {}) == {}


def test_rte_prompt_token_sits_between_question_mark_and_answer(bert, gpt2):
    template = templates_for(TASKS["rte"], {})["default"]
    for lm in (bert, gpt2):
        e = encode(template, lm.tokenizer, {"premise": "A man walks.", "hypothesis": "A person moves"}, lm.causal)
        p = e.prompt_index.index(0)
        assert lm.tokenizer.decode(e.input_ids[p - 1:p]).strip() == "?"
        assert lm.tokenizer.decode(e.input_ids[p + 1:p + 3]).replace(" ", "") == "Answer:"


def test_other_patterns_render_as_in_the_paper(bert, gpt2):
    def filled(task, method, fields, key="default", n=1, tokenizer=None, params=None):
        return render(METHODS[method].templates(TASKS[task], params or {}, tokenizer)[key], fields, n)

    cb = {"premise": "It rained.", "hypothesis": "it was wet"}
    assert filled("cb", "ptuning", cb, tokenizer=bert.tokenizer) == "It rained. [SEP] it was wet ? [P] answer: [MASK]"
    assert filled("cb", "manual-finetune", cb, tokenizer=gpt2.tokenizer) == "It rained. it was wet ? answer: [MASK]"
    assert filled("cb", "manual-finetune", cb, tokenizer=gpt2.tokenizer, params={"sep_fallback": "|"}) == \
        "It rained. | it was wet ? answer: [MASK]"
    bq = {"passage": "The sky is blue", "question": "is the sky blue"}
    assert filled("boolq", "ptuning", bq) == "The sky is blue . [P] Question: is the sky blue ? Answer: [MASK] ."
    mr = {"passage": "P", "question": "Q", "answer": "A"}
    assert filled("multirc", "ptuning", mr) == "P . Question: Q ? Is it A ? [P] [MASK] ."
    wic = {"sentence1": "S1.", "sentence2": "S2.", "word": "bank"}
    assert filled("wic", "manual-zeroshot", wic) == "S1. [SEP] S2. * bank *? [MASK]"


def test_copa_pattern_depends_on_the_question_and_masks_each_choice(tmp_path, bert):
    spec = TASKS["copa"]
    rows = [{"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.", "choice2": "He got a hole in his sock.",
             "question": "cause", "label": 0, "idx": 0},
            {"premise": "I tipped the bottle.", "choice1": "The liquid in the bottle froze.", "choice2": "The liquid in the bottle poured out.",
             "question": "effect", "label": 1, "idx": 1}]
    path = tmp_path / "copa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cause, effect = read_examples(spec, path)
    assert cause.pattern == "cause" and effect.pattern == "effect"
    assert cause.fields == {"premise": "The man broke his toe", "choice1": "he dropped a hammer on his foot",
                            "choice2": "he got a hole in his sock"}
    templates = templates_for(spec, {})
    assert render(templates["cause"], cause.fields, 2) == \
        "he dropped a hammer on his foot or he got a hole in his sock ? The man broke his toe because [P] [MASK] [MASK] ."
    assert " so [P] [MASK] ." in render(templates["effect"], effect.fields)
    inputs = Inputs(spec, bert.tokenizer, False, "tiny-bert", templates, 96)
    item = spec.kind.items([cause], inputs, train=True)[0]
    for choice, enc, target in zip(("choice1", "choice2"), item["encs"], item["targets"]):
        assert target == bert.tokenizer.encode(" " + cause.fields[choice], add_special_tokens=False)
        assert sum(i == bert.tokenizer.mask_token_id for i in enc.input_ids) == len(target) == len(enc.read_positions)
    # finetune reads (premise + connective, choice) per choice
    assert spec.pairs(effect) == [("I tipped the bottle so", "the liquid in the bottle froze"),
                                  ("I tipped the bottle so", "the liquid in the bottle poured out")]


def test_wsc_pattern_marks_the_pronoun(tmp_path):
    row = {"text": "The actress changed her name because she liked it.",
           "target": {"span1_index": 1, "span1_text": "actress", "span2_index": 6, "span2_text": "she"}, "label": True, "idx": 3}
    path = tmp_path / "wsc.jsonl"
    path.write_text(json.dumps(row) + "\n")
    ex = read_examples(TASKS["wsc"], path)[0]
    assert ex.fields["text"] == "The actress changed her name because *she* liked it."
    template = templates_for(TASKS["wsc"], {})["default"]
    assert template.n_prompt_tokens == 2
    assert render(template, ex.fields) == \
        "[P] The actress changed her name because *she* liked it. [P] pronoun '* she *' refers to [MASK] ."


def test_verbalizers_are_single_tokens_or_fail_clearly(bert, gpt2):
    for lm in (bert, gpt2):
        assert len(verbalizer_ids(TASKS["cb"], lm.tokenizer)) == 3
    assert gpt2.tokenizer.convert_ids_to_tokens(verbalizer_ids(TASKS["rte"], gpt2.tokenizer)) == ["ĠYes", "ĠNo"]
    bad = dataclasses.replace(TASKS["rte"], verbalizer={"entailment": "Yes", "not_entailment": "Supercalifragilistic"})
    with pytest.raises(TaskError, match="verbalizer word 'Supercalifragilistic' .*not a single token"):
        verbalizer_ids(bad, gpt2.tokenizer, "tiny-gpt2")
    # the classification kind checks it before any item is built
    inputs = Inputs(bad, gpt2.tokenizer, True, "tiny-gpt2", templates_for(bad, {}, gpt2.tokenizer), 64)
    with pytest.raises(TaskError, match="not a single token of tiny-gpt2"):
        bad.kind.check(inputs)


# --- prepare_fewglue ------------------------------------------------------------------------------------

def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prepare_builds_disjoint_dev32_no_larger_than_train32(fewglue_dir):
    stats = json.loads((fewglue_dir / "stats.json").read_text())
    for name, spec in TASKS.items():
        folder = fewglue_dir / spec.folder
        train32, dev32, val = (_jsonl(folder / f"{s}.jsonl") for s in ("train32", "dev32", "val"))
        record = stats["tasks"][name]
        assert record["dev32"] == 32 <= record["train32"]
        assert record["dev32_disjoint_from_train32"] and record["dev32_disjoint_from_val"]
        assert not {spec.key(r) for r in dev32} & ({spec.key(r) for r in train32} | {spec.key(r) for r in val})
        assert not {r["idx"] for r in dev32} & {r["idx"] for r in train32}
        if name == "multirc":
            assert sum(len(r["passage"]["questions"]) for r in dev32) == 32 == len(dev32)  # one question per passage
        else:
            assert len(dev32) == 32


def test_prepare_falls_back_to_the_published_dev32_for_boolq(fewglue_dir, raw_dir):
    record = json.loads((fewglue_dir / "stats.json").read_text())["tasks"]["boolq"]
    assert record["dev32_source"].startswith("published dev32") and "no full SuperGLUE train set" in record["dev32_source"]
    assert record["full"].startswith("unavailable")
    assert not (fewglue_dir / "BoolQ" / "train.jsonl").exists()
    assert _jsonl(fewglue_dir / "BoolQ" / "dev32.jsonl") == _jsonl(raw_dir / "fewglue_32dev_published/BoolQ/dev32.jsonl")


def test_prepare_full_setting_splits_train_into_disjoint_train_and_dev(fewglue_dir, raw_dir):
    for spec in (TASKS["rte"], TASKS["multirc"]):
        folder = fewglue_dir / spec.folder
        train, dev = _jsonl(folder / "train.jsonl"), _jsonl(folder / "dev.jsonl")
        full = _jsonl(raw_dir / "superglue" / spec.folder / "train.jsonl")
        assert len(train) + len(dev) == len(full)
        assert not {spec.key(r) for r in train} & {spec.key(r) for r in dev}
        assert 0.05 < len(dev) / len(full) < 0.15


def test_prepare_is_deterministic_for_a_seed(raw_dir, fewglue_dir, tmp_path):
    again = tmp_path / "again"
    prepare(raw_dir, again, seed=42, tasks=["rte", "multirc"])
    other = tmp_path / "other"
    prepare(raw_dir, other, seed=7, tasks=["rte"])
    for folder in ("RTE", "MultiRC"):
        for split in ("dev32", "train", "dev"):
            assert (again / folder / f"{split}.jsonl").read_bytes() == (fewglue_dir / folder / f"{split}.jsonl").read_bytes()
    assert (other / "RTE/dev32.jsonl").read_bytes() != (fewglue_dir / "RTE/dev32.jsonl").read_bytes()


# --- truncation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task, fields", [
    ("boolq", {"passage": "lorem ipsum " * 300, "question": "is the sky blue"}),
    ("multirc", {"passage": "lorem ipsum " * 300, "question": "what colour is the sky", "answer": "a bright blue"}),
])
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
def test_truncation_cuts_the_passage_only(task, fields, model, bert, gpt2):
    lm = bert if model == "tiny-bert" else gpt2
    spec = TASKS[task]
    inputs = Inputs(spec, lm.tokenizer, lm.causal, model, templates_for(spec, {}, lm.tokenizer), max_length=64)
    ex = Example("x", fields, "True" if task == "boolq" else "1")
    enc = spec.kind.items([ex], inputs, train=False)[0]["enc"]
    assert len(enc.input_ids) == 64
    assert sorted(i for i in enc.prompt_index if i >= 0) == [0]  # the prompt token survives
    text = lm.tokenizer.decode([t for t, p in zip(enc.input_ids, enc.prompt_index) if p < 0])
    assert text.count("lorem") < 300  # the passage lost tokens ...
    for kept in [fields["question"], *(["Is it", fields["answer"]] if task == "multirc" else ["Answer:"]), "Question:"]:
        assert kept.replace(" ", "") in text.replace(" ", "")  # ... and nothing else did
    # the answer slot and the final anchor are there: [MASK] . (masked) / the read position (causal)
    assert enc.target_positions and enc.read_positions[0] >= 0
    # the finetune baseline cuts the passage too
    head_inputs = Inputs(spec, lm.tokenizer, lm.causal, model, {}, max_length=64)
    ids = METHODS["finetune"].items([ex], head_inputs, train=False)[0]["ids"][0]
    assert len(ids) <= 64 and fields["question"].replace(" ", "") in lm.tokenizer.decode(ids).replace(" ", "")


# --- parameters: the plan --------------------------------------------------------------------------------

def test_setting_defaults_follow_the_paper(fewglue_dir):
    def config(task, setting):
        return plan(make_params(fewglue_dir, task=task, setting=setting, model="tiny-bert"))[0].train

    rte = config("rte", "fewshot")
    assert (rte.max_steps, rte.lr, rte.lm_lr, rte.warmup_steps, rte.batch_size, rte.eval_every, rte.patience) == \
        (3500, 1e-4, 1e-5, 150, 16, 20, 10)
    assert rte.epochs is None  # as many passes over train32 as the step count needs
    cb = config("cb", "fewshot")
    assert (cb.max_steps, cb.lr) == (250, 1e-5)
    full_rte, full_wic = config("rte", "full"), config("wic", "full")
    assert (full_rte.epochs, full_wic.epochs, full_rte.eval_every, full_rte.max_steps, full_rte.lr) == (20, 10, None, None, 1e-5)
    assert full_rte.patience is not None
    assert plan(make_params(fewglue_dir, method="manual-zeroshot", model="tiny-bert"))[0].train is None  # nothing trains
    assert [t.task for t in plan(make_params(fewglue_dir, task="cb, rte", model="tiny-bert"))] == ["cb", "rte"]


# --- each kind on a tiny model ---------------------------------------------------------------------------

@pytest.mark.parametrize("task, model", [("rte", "tiny-bert"), ("multirc", "tiny-gpt2"), ("copa", "tiny-bert"),
                                         ("copa", "tiny-gpt2"), ("wsc", "tiny-bert"), ("wsc", "tiny-gpt2")])
def test_each_kind_gives_a_loss_that_reaches_the_prompt_and_predicts_labels(fewglue_dir, task, model, bert, gpt2):
    lm = bert if model == "tiny-bert" else gpt2
    spec = TASKS[task]
    examples = read_examples(spec, fewglue_dir / spec.folder / "train32.jsonl")[:6]
    templates = templates_for(spec, {}, lm.tokenizer)
    inputs = Inputs(spec, lm.tokenizer, lm.causal, model, templates, 128, options=SPAN_OPTIONS, seed=1)
    kind = spec.kind
    kind.check(inputs)
    torch.manual_seed(0)
    prompt = PromptEncoder(next(iter(templates.values())).n_prompt_tokens, lm.model.get_input_embeddings().embedding_dim, "lstm")
    prompted = PromptedLM(lm.model, prompt, lm.causal, freeze_lm=True)
    train = kind.items(examples, inputs, train=True)
    assert train and all(kind.length(i) > 0 for i in train)
    loss = kind.loss(prompted, kind.collate(train, inputs))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in prompt.parameters())
    evaluation = kind.items(examples, inputs, train=False)
    with torch.no_grad():
        predicted = kind.predict(prompted, kind.collate(evaluation, inputs), evaluation, inputs)
    assert len(predicted) == len(examples) and set(predicted) <= set(spec.labels)


# --- end to end ----------------------------------------------------------------------------------------------

def _run(fewglue_dir, tmp_path, **overrides):
    config = resolve("superglue", {"data_dir": str(fewglue_dir), "train.max_steps": 2, "train.eval_every": 2,
                                   "max_eval_examples": 16, "eval_batch_size": 16, **overrides})
    metrics, reused = execute(config, tmp_path)
    assert not reused
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert (tmp_path / "history.json").exists()
    for key in ("benchmark", "task", "model", "method", "setting", "dev", "val", "tasks", "prompts"):
        assert key in metrics
    # every figure names its split: no flat `acc` or `score` at the top
    assert not {"acc", "score", "dev_score", "val_score", "f1a", "em"} & set(metrics)
    for split in ("dev", "val"):  # a task's score is the mean of its metrics, the run's the mean of its tasks'
        tasks = metrics["tasks"]
        for name, task in tasks.items():
            names = TASKS[name].metrics
            assert task[split]["score"] == pytest.approx(sum(task[split][n] for n in names) / len(names))
        assert metrics[split]["score"] == pytest.approx(sum(t[split]["score"] for t in tasks.values()) / len(tasks))
    assert not (tmp_path / "checkpoint").exists()  # removed after a finished run
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
def test_every_method_runs_on_rte(fewglue_dir, tmp_path, method, model):
    metrics = _run(fewglue_dir, tmp_path, task="rte", model=model, method=method)
    task = metrics["tasks"]["rte"]
    assert task["steps"] == (0 if method == "manual-zeroshot" else 2)
    assert metrics["val"] == task["val"] and metrics["dev"]["score"] == metrics["dev"]["acc"] == task["dev"]["acc"]
    history = json.loads((tmp_path / "history.json").read_text())["rte"]
    assert [h["step"] for h in history] == ([] if method == "manual-zeroshot" else [0, 2])  # the start, then the end
    assert all(set(h) == {"step", "epoch", "dev.acc"} for h in history)  # what the tracker logs, split named
    if method == "ptuning":
        assert (tmp_path / "prompt" / "prompt.safetensors").exists() and metrics["prompts"] == {"rte": str(tmp_path / "prompt")}
        meta = json.loads((tmp_path / "prompt" / "prompt.json").read_text())
        causal = model == "tiny-gpt2"
        assert {k: meta[k] for k in ("benchmark", "task", "kind", "labels", "verbalizer", "lm_trained", "causal",
                                      "setting", "max_length", "truncate")} == {
            "benchmark": "superglue", "task": "rte", "kind": "classification", "labels": ["entailment", "not_entailment"],
            "verbalizer": {"entailment": "Yes", "not_entailment": "No"}, "lm_trained": True, "causal": causal,
            "setting": "fewshot", "max_length": 256, "truncate": "premise"}
        assert meta["patterns"] == {"default": meta["template"]} and "[P]" in meta["template"]
    else:
        assert metrics["prompts"] == {}


@pytest.mark.slow
@pytest.mark.parametrize("task, model, method", [
    ("copa", "tiny-bert", "ptuning"), ("copa", "tiny-gpt2", "ptuning"), ("copa", "tiny-gpt2", "finetune"),
    ("wsc", "tiny-bert", "ptuning"), ("wsc", "tiny-gpt2", "ptuning"), ("wsc", "tiny-bert", "finetune"),
    ("multirc", "tiny-bert", "ptuning"), ("multirc", "tiny-gpt2", "manual-finetune"),
    ("cb", "tiny-gpt2", "ptuning"), ("wic", "tiny-bert", "manual-zeroshot"), ("boolq", "tiny-bert", "ptuning"),
])
def test_special_tasks_run_end_to_end(fewglue_dir, tmp_path, task, model, method):
    metrics = _run(fewglue_dir, tmp_path, task=task, model=model, method=method)
    names = TASKS[task].metrics
    assert set(metrics["val"]) == set(names) | {"score"}
    assert metrics["dev"]["score"] == pytest.approx(sum(metrics["dev"][n] for n in names) / len(names))
    if task == "wsc" and method != "finetune":
        assert metrics["tasks"]["wsc"]["n_train"] == 32  # FewGLUE's WSC train32 holds True examples only
    if method == "ptuning":
        assert json.loads((tmp_path / "prompt" / "prompt.json").read_text())["kind"] == TASKS[task].kind.name
    if method != "manual-zeroshot":  # the kept state's dev figures are its selection's, not a second evaluation's
        best = max(json.loads((tmp_path / "history.json").read_text())[task], key=lambda h: h["step"] == metrics["tasks"][task]["best_step"])
        assert {n: metrics["dev"][n] for n in names} == {n: best[f"dev.{n}"] for n in names}


def test_fewshot_training_takes_as_many_passes_as_its_steps_need(fewglue_dir, tmp_path):
    # train32 in batches of 16: two steps per pass, so five steps take three passes
    metrics = _run(fewglue_dir, tmp_path, task="rte", model="tiny-bert", method="manual-finetune",
                   **{"train.max_steps": 5, "train.eval_every": 5})
    assert metrics["tasks"]["rte"]["steps"] == 5
    assert json.loads((tmp_path / "history.json").read_text())["rte"][-1]["epoch"] == 2


def test_several_tasks_report_each_and_the_mean_score(fewglue_dir, tmp_path):
    metrics = _run(fewglue_dir, tmp_path, task="cb,multirc", model="tiny-bert", method="manual-zeroshot")
    tasks = metrics["tasks"]
    assert set(tasks) == {"cb", "multirc"} and set(tasks["multirc"]["val"]) == {"em", "f1a", "score"}
    for split in ("dev", "val"):
        assert metrics[split] == {"score": pytest.approx((tasks["cb"][split]["score"] + tasks["multirc"][split]["score"]) / 2)}
    assert (tmp_path / "cb").is_dir() and (tmp_path / "multirc").is_dir()


@pytest.mark.slow
def test_full_setting_selects_on_the_held_out_dev(fewglue_dir, tmp_path):
    metrics = _run(fewglue_dir, tmp_path, task="cb", model="tiny-bert", method="ptuning", setting="full")
    task = metrics["tasks"]["cb"]
    assert task["selected_on"] == "dev" and task["n_train"] == 225 and task["n_dev"] == 16


@pytest.mark.slow
def test_cli_prints_the_metrics_as_its_last_line(fewglue_dir, tmp_path, capsys):
    from components.cli import main

    code = main(["train", "superglue", "--task", "rte", "--setting", "fewshot", "--model", "tiny-gpt2", "--method", "ptuning",
                 "--steps", "2", "--eval-every", "1", "--output-dir", str(tmp_path),
                 "--set", f"data_dir={fewglue_dir}", "--set", "max_eval_examples=16"])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads((tmp_path / "metrics.json").read_text())
    assert {"dev.acc", "dev.score", "val.acc", "val.score"} <= set(flatten(last))


# --- the special cases in detail ----------------------------------------------------------------------------

def test_copa_scores_each_choice_by_its_summed_teacher_forced_log_probability(gpt2):
    spec = TASKS["copa"]
    inputs = Inputs(spec, gpt2.tokenizer, True, "tiny-gpt2", METHODS["manual-finetune"].templates(spec, {}, gpt2.tokenizer), 96)
    ex = Example("c", {"premise": "The man broke his toe", "choice1": "he dropped a hammer on his foot",
                       "choice2": "he got a hole"}, "0", pattern="cause")
    kind = spec.kind
    item = kind.items([ex], inputs, train=True)[0]
    model = PromptedLM(gpt2.model, None, True, freeze_lm=True)
    batch = kind.collate([item], inputs)
    with torch.no_grad():
        scores = kinds.token_log_probs(model, batch).sum(-1)
        for row, (enc, target) in enumerate(zip(item["encs"], item["targets"])):
            logits = gpt2.model(input_ids=torch.tensor([enc.input_ids])).logits[0].log_softmax(-1)
            by_hand = sum(logits[p - 1, t] for p, t in zip(enc.target_positions, target))
            assert scores[row].item() == pytest.approx(by_hand.item(), abs=1e-4)
        assert len(item["targets"][0]) != len(item["targets"][1])  # multi-token answers of different lengths
        # hinge loss of the paper's code: max(0, 1 + CE(correct) - CE(wrong)), CE the mean token NLL
        ce = [-scores[i].item() / len(item["targets"][i]) for i in (0, 1)]
        assert kind.loss(model, batch).item() == pytest.approx(max(0.0, 1 + ce[0] - ce[1]), abs=1e-4)
        assert kind.predict(model, batch, [item], inputs) == [str(int(scores.argmax()))]


def test_wsc_trains_on_true_examples_with_padding_masks(bert):
    spec = TASKS["wsc"]
    inputs = Inputs(spec, bert.tokenizer, False, "tiny-bert", templates_for(spec, {}, bert.tokenizer), 128,
                    options={"train_extra_masks": 3, "eval_extra_tokens": {"masked": 1, "causal": 1}})
    yes = Example("a", {"text": "The dog chased the cat because *it* was hungry.", "pronoun": "it", "span": "The dog"}, "True")
    no = Example("b", {"text": "The dog chased the cat because *it* was hungry.", "pronoun": "it", "span": "the cat"}, "False")
    train = spec.kind.items([yes, no], inputs, train=True)
    assert [i["ex"].guid for i in train] == ["a"]
    span = bert.tokenizer.encode(" The dog", add_special_tokens=False)
    target = train[0]["target"]
    assert target[:len(span)] == span and set(target[len(span):]) <= {bert.tokenizer.pad_token_id} and len(target) <= len(span) + 3
    assert train[0]["enc"].input_ids.count(bert.tokenizer.mask_token_id) == len(target)
    evaluation = spec.kind.items([yes, no], inputs, train=False)
    assert [i["n"] for i in evaluation] == [len(span) + 1] * 2


@pytest.mark.parametrize("predicted, span, match", [
    ("the dog", "The dog", True), ("dog", "the dog", True), ("the dog.", "dog", True),
    ("cat", "the dog", False), ("the big cat", "the dog", False), ("Mr. Singer", "mr singer", True),
])
def test_wsc_answer_rule(predicted, span, match):
    assert kinds.span_match(predicted, span) is match


class _Scripted(torch.nn.Module):
    """A stand-in LM whose logits at each read position favour a scripted token (with given confidence)."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab, self.seen = script, vocab, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, read_positions, **_):
        self.seen.append(input_ids.clone())
        logits = torch.zeros(input_ids.shape[0], read_positions.shape[1], self.vocab)
        for j, (token, score) in enumerate(self.script):
            logits[:, j, token] = score
        return logits


def test_wsc_greedy_fill_is_most_confident_first_for_masked_lms(bert):
    tok = bert.tokenizer
    the, dog = tok.convert_tokens_to_ids(["the", "dog"])
    model = _Scripted([(the, 5.0), (dog, 9.0)], len(tok))
    input_ids = torch.tensor([[tok.cls_token_id, tok.mask_token_id, tok.mask_token_id, tok.sep_token_id]])
    batch = {"input_ids": input_ids, "read_positions": torch.tensor([[1, 2]]), "attention_mask": torch.ones_like(input_ids),
             "prompt_index": -torch.ones_like(input_ids)}
    assert kinds.greedy_fill(model, batch, [2], causal=False, tokenizer=tok) == ["the dog"]
    assert model.seen[1][0, 2] == dog and model.seen[1][0, 1] == tok.mask_token_id  # "dog" (more confident) first


def test_wsc_causal_generation_through_the_kv_cache_equals_feeding_each_token_back(gpt2):
    """The cached decoder gives the tokens that a full pass per token, each token written back into the row,
    gives: on a real (tiny) causal LM with a trained-shaped prompt at two positions, rows of different lengths."""
    from components.method.model import PromptedLM, PromptEncoder

    torch.manual_seed(0)
    model = PromptedLM(gpt2.model, PromptEncoder(2, gpt2.model.get_input_embeddings().embedding_dim, "mlp"), True,
                       freeze_lm=True).eval()
    input_ids = torch.randint(5, 500, (2, 12))
    prompt_index = -torch.ones_like(input_ids)
    prompt_index[:, 1], prompt_index[:, 4] = 0, 1
    starts, n = [6, 8], [4, 3]
    for r in range(2):
        ids = input_ids[r:r + 1].clone()
        expected = []
        for j in range(n[r]):  # the reference: a full pass, then the token written after its read position
            read = torch.tensor([[starts[r] + j]])
            token = int(model(ids, prompt_index[r:r + 1], torch.ones_like(ids), read)[0, 0].argmax())
            expected.append(token)
            ids[0, starts[r] + j + 1] = token
        assert model.greedy_continue(input_ids[r], prompt_index[r], starts[r], n[r]) == expected


def test_sorted_evaluation_returns_each_prediction_to_its_own_example(fewglue_dir, gpt2):
    """Evaluation runs in length-sorted chunks: every prediction still lands on its example (checked against
    one example per chunk, on a real tiny LM whose predictions differ between examples)."""
    from components.benchmarks.superglue.run import evaluate

    spec, params = TASKS["cb"], make_params(fewglue_dir, model="tiny-gpt2", method="manual-zeroshot")
    templates = METHODS["manual-zeroshot"].templates(spec, params, gpt2.tokenizer)
    inputs = Inputs(spec, gpt2.tokenizer, True, "tiny-gpt2", templates, 256)

    class Recording(Classification):
        def predict(self, model, batch, chunk, inputs):
            predicted = super().predict(model, batch, chunk, inputs)
            seen.update({item["ex"].source: p for item, p in zip(chunk, predicted)})
            return predicted

    head = Recording()
    items = head.items(load_splits(spec, params)["dev"][:24], inputs, train=False)
    assert len({head.length(i) for i in items}) > 5  # lengths differ: sorting reorders them
    model = PromptedLM(gpt2.model, None, True, freeze_lm=True)
    seen = {}
    one_by_one = evaluate(head, model, items, inputs, batch_size=1)
    alone = dict(seen)
    seen.clear()
    assert evaluate(head, model, items, inputs, batch_size=5) == one_by_one
    assert seen == alone and len(set(alone.values())) > 1


def test_the_finetune_head_trains_at_train_lr_and_the_lm_at_lm_lr(fewglue_dir, gpt2):
    from components.training import TrainConfig, make_optimizer

    params = make_params(fewglue_dir, model="tiny-gpt2", method="finetune")
    model, _ = METHODS["finetune"].build(TASKS["cb"], gpt2, {}, params)
    groups = make_optimizer(model, TrainConfig(lr=1e-3, lm_lr=1e-5)).param_groups
    head = {id(p) for p in model.head.parameters()}
    assert [{id(p) for p in g["params"]} == head for g in groups] == [True, False, False]
    assert groups[0]["lr"] == 1e-3 and {g["lr"] for g in groups[1:]} == {1e-5}


def test_vocab_init_starts_the_prompt_at_word_embeddings(fewglue_dir, gpt2):
    params = make_params(fewglue_dir, model="tiny-gpt2", encoder="none", init="vocab")
    templates = METHODS["ptuning"].templates(TASKS["rte"], params, gpt2.tokenizer)
    _, prompt = METHODS["ptuning"].build(TASKS["rte"], gpt2, templates, params)
    embeddings = gpt2.model.get_input_embeddings().weight.detach()
    for vector in prompt().detach():  # each vector is one row of the LM's own embeddings
        assert (embeddings == vector).all(-1).any()
    _, random = METHODS["ptuning"].build(TASKS["rte"], gpt2, templates, {**params, "init": "random"})
    assert not any((embeddings == v).all(-1).any() for v in random().detach())


@pytest.mark.slow
def test_the_recipe_sweep_ranks_on_dev32_and_never_scores_val(tmp_path):
    from components.reports import superglue_sweep

    assert superglue_sweep.main(["--model", "tiny-gpt2", "--tasks", "cb,wsc", "--recipes",
                                 "manual-zeroshot;ptuning/encoder=mlp/train.lr=1e-3", "--steps", "2", "--eval-every", "1",
                                 "--out", str(tmp_path)]) == 0
    units = [json.loads(p.read_text()) for p in (tmp_path / "units").glob("*.json")]
    assert len(units) == 4 and all("val" not in json.dumps(u) for u in units)
    table = (tmp_path / "SWEEP.md").read_text()
    assert "| manual-zeroshot |" in table and "| ptuning/encoder=mlp/train.lr=0.001 |" in table


# --- bad inputs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"task": "squad"}, "unknown SuperGLUE task 'squad'; choose one of boolq, cb, copa, multirc, rte, wic, wsc"),
    ({"method": "prefix"}, "unknown SuperGLUE method 'prefix'; choose one of finetune, manual-zeroshot"),
    ({"setting": "zeroshot"}, "unknown SuperGLUE setting 'zeroshot'"),
    ({"task": "boolq", "setting": "full"}, "BoolQ has no full SuperGLUE train set .* use --setting fewshot"),
    ({"encoder": "gru"}, "unknown prompt encoder 'gru'"),
    ({"full.select_on": "test"}, "full.select_on must be one of heldout, val"),
    ({"task": "copa", "pattern": "{premise} [Y]"}, r"ptuning needs at least one \[P\] in the copa pattern"),
    ({"task": "copa", "pattern": {"cause": "[P] {premise} [Y]"}}, "pattern for copa must give the keys"),
    ({"train.lm_lr": -1.0}, "invalid training settings: lm_lr=-1.0"),
    ({"train.lr": "abc"}, "invalid training settings: lr='abc' \\(expected float\\)"),
    ({"init": "words"}, "unknown prompt init 'words'; choose one of random, vocab"),
    ({"max_eval_examples": {"squad": 3}}, "max_eval_examples: unknown task 'squad'"),
    ({"max_eval_examples": 0}, "max_eval_examples must be null or a count >= 1, got 0"),
    ({"max_eval_examples": {"cb": "all"}}, "max_eval_examples.cb must be null or a count >= 1"),
])
def test_bad_inputs_fail_in_plan_before_the_model_is_looked_at(fewglue_dir, overrides, message):
    # the model name is bad too: a plan that reached the model (or loaded it) would fail on it instead
    with pytest.raises(ValueError, match=message):
        plan(make_params(fewglue_dir, model="no-such-model", **overrides))


def test_an_unknown_model_fails_in_plan(fewglue_dir):
    from components.models.catalog import UnknownModelError

    with pytest.raises(UnknownModelError, match="unknown model 'no-such-model'"):
        plan(make_params(fewglue_dir, model="no-such-model"))


def test_boolq_full_fails_clearly_and_all_means_the_tasks_with_a_train_set(fewglue_dir):
    assert [t.task for t in plan(make_params(fewglue_dir, task="boolq", setting="fewshot", model="tiny-bert"))] == ["boolq"]
    assert [t.task for t in plan(make_params(fewglue_dir, task="all", setting="full", model="tiny-bert"))] == \
        ["cb", "copa", "multirc", "rte", "wic", "wsc"]


def test_cli_reports_bad_input_in_one_line_before_any_side_effect(fewglue_dir, tmp_path, capsys):
    from components.cli import main

    out = tmp_path / "run"
    assert main(["train", "superglue", "--task", "nope", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "ptuning: error: unknown SuperGLUE task 'nope'; choose one of boolq, cb, copa, multirc, rte, wic, wsc"]
    assert main(["train", "superglue", "--task", "boolq", "--setting", "full", "--output-dir", str(out),
                 "--set", f"data_dir={fewglue_dir}"]) == 2
    assert "BoolQ has no full SuperGLUE train set" in capsys.readouterr().err
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("task, row, message", [
    ("rte", {"premise": "p", "label": "entailment", "idx": 1}, r":2: missing field 'hypothesis'"),
    ("rte", {"premise": "p", "hypothesis": "h", "label": "maybe", "idx": 1},
     r":2: label 'maybe' is not a label of RTE; its labels are \['entailment', 'not_entailment'\]"),
    ("boolq", {"passage": "p", "question": "q", "label": "yes"}, r":2: label 'yes' is not a label of BoolQ"),
    ("copa", {"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0}, r":2: question 'why'"),
    ("wsc", {"text": "a b", "target": {"span1_text": "a", "span2_text": "b"}, "label": True}, r":2: missing field 'target.span2_index'"),
    ("multirc", {"idx": 0, "passage": {"text": "t", "questions": [{"question": "q", "idx": 0, "answers": [
        {"text": "a", "label": 1}, {"text": "b"}]}]}}, r":2: missing field 'passage.questions\[0\].answers\[1\].label'"),
    ("multirc", {"idx": 0, "passage": {"text": "t", "questions": [{"question": "q", "idx": 0, "answers": [
        {"text": "a", "label": 2}]}]}}, r":2: passage.questions\[0\].answers\[0\].label 2 is not a label of MultiRC"),
])
def test_bad_rows_name_file_and_line(tmp_path, task, row, message):
    good = {"rte": {"premise": "p", "hypothesis": "h", "label": "entailment"},
            "boolq": {"passage": "p", "question": "q", "label": True},
            "copa": {"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": 0},
            "wsc": {"text": "a b", "target": {"span1_text": "a", "span2_text": "b", "span2_index": 1}, "label": True},
            "multirc": {"idx": 9, "passage": {"text": "t", "questions": [{"question": "q", "idx": 0,
                                                                          "answers": [{"text": "a", "label": 0}]}]}}}[task]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + message):
        read_examples(TASKS[task], path)


def test_invalid_json_and_missing_data_fail_clearly(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text('{"premise": "p", "hypothesis": "h", "label": "entailment"}\n{not json\n')
    with pytest.raises(DataError, match=r"val\.jsonl:2: .*JSON"):
        read_examples(TASKS["rte"], path)
    with pytest.raises(DataError, match="run `dvc repro prepare_fewglue`"):
        load_splits(TASKS["rte"], make_params(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="ptuning prepare data"):
        prepare(tmp_path / "no-raw", tmp_path / "out")


# --- real weights ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_reads_rte_zero_shot(fewglue_dir, tmp_path):
    config = resolve("superglue", {"data_dir": str(fewglue_dir), "task": "rte", "model": "smollm2-135m",
                                   "method": "manual-zeroshot", "max_eval_examples": 8, "eval_batch_size": 8})
    metrics = run(config, tmp_path)
    task = metrics["tasks"]["rte"]
    assert task["n_val"] == 8 and task["steps"] == 0
    right = metrics["val"]["acc"] * task["n_val"]
    assert right == pytest.approx(round(right), abs=1e-6)  # accuracy counts right answers over the 8 examples
