"""SuperGLUE / FewGLUE: the task registry, readers on the real data, patterns, the prepare_fewglue stage,
truncation, every method end to end on tiny models, the special cases (COPA, WSC, MultiRC), bad inputs."""
import dataclasses
import json
import math

import pytest
import torch

import components.benchmarks.superglue.run as sg
from components.models.catalog import load_lm
from components.config import load_params
from components.data.sources import DataError
from components.benchmarks.superglue.run import TASKS, TaskError
from components.method.templates import encode


@pytest.fixture(scope="session")
def raw_dir(shared_dir):
    return shared_dir / "data"  # the mirror has data/raw's layout


@pytest.fixture(scope="session")
def fewglue_dir(raw_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fewglue")
    sg.prepare(raw_dir, out, seed=42)
    return out


@pytest.fixture(scope="session")
def bert():
    return load_lm("tiny-bert")


@pytest.fixture(scope="session")
def gpt2():
    return load_lm("tiny-gpt2")


def make_params(fewglue_dir, **overrides):
    return load_params("superglue", {"data_dir": str(fewglue_dir), **overrides})


# --- registry and readers ----------------------------------------------------------------------------

def test_registry_covers_the_seven_tasks():
    assert set(TASKS) == {"boolq", "cb", "copa", "multirc", "rte", "wic", "wsc"}
    for spec in TASKS.values():
        assert spec.metrics and spec.reader and spec.patterns
        for text in spec.patterns.values():
            assert "[P]" in text and "[Y]" in text
        assert (spec.verbalizer is None) == (spec.name in ("copa", "wsc"))
        if spec.verbalizer:
            assert set(spec.verbalizer) == set(spec.labels)
    assert TASKS["cb"].metrics == ("acc", "f1_macro") and TASKS["multirc"].metrics == ("em", "f1a")
    assert set(TASKS["copa"].patterns) == {"cause", "effect"}


@pytest.mark.parametrize("task, split, expected", [
    ("boolq", "superglue/BoolQ/val", 3270), ("cb", "superglue/CB/val", 56), ("copa", "superglue/COPA/val", 100),
    ("rte", "superglue/RTE/val", 277), ("wic", "superglue/WiC/val", 638), ("wsc", "superglue/WSC/val", 104),
    ("multirc", "superglue/MultiRC/val", 4848),
    ("cb", "superglue/CB/train", 250), ("copa", "superglue/COPA/train", 400), ("rte", "superglue/RTE/train", 2490),
    ("wic", "superglue/WiC/train", 5428), ("wsc", "superglue/WSC/train", 554),
] + [(t, f"fewglue/{TASKS[t].folder}/train", 32) for t in TASKS if t != "multirc"])
def test_readers_read_every_example(raw_dir, task, split, expected):
    examples = sg.read_examples(TASKS[task], raw_dir / f"{split}.jsonl")
    assert len(examples) == expected
    assert all(ex.label in TASKS[task].labels for ex in examples)


def test_multirc_reader_groups_answer_options_by_question(raw_dir):
    val = sg.read_examples(TASKS["multirc"], raw_dir / "superglue/MultiRC/val.jsonl")
    assert len({ex.group for ex in val}) == 953  # README: 83 passages / 953 questions / 4848 answers
    assert len({ex.group.split("-")[0] for ex in val}) == 83
    train32 = sg.read_examples(TASKS["multirc"], raw_dir / "fewglue/MultiRC/train.jsonl")
    assert len({ex.group for ex in train32}) == 32
    train = sg.read_examples(TASKS["multirc"], raw_dir / "superglue/MultiRC/train.jsonl")
    assert len({ex.group.split("-")[0] for ex in train}) == 456


# --- patterns -----------------------------------------------------------------------------------------

RTE_FIELDS = {"premise": "A man walks his dog in the park.", "hypothesis": "A person is outside."}


def test_rte_pattern_manual_and_ptuning(tmp_path):
    spec = TASKS["rte"]
    row = {"premise": RTE_FIELDS["premise"], "hypothesis": RTE_FIELDS["hypothesis"], "label": "entailment", "idx": 0}
    path = tmp_path / "rte.jsonl"
    path.write_text(json.dumps(row) + "\n")
    ex = sg.read_examples(spec, path)[0]
    assert ex.fields["hypothesis"] == "A person is outside"  # final punctuation stripped
    manual = sg.templates_for(spec, "manual-zeroshot", {})["default"]
    ptuning = sg.templates_for(spec, "ptuning", {})["default"]
    assert sg.render(manual, ex.fields) == "A man walks his dog in the park. Question: A person is outside ? Answer: [MASK] ."
    assert sg.render(ptuning, ex.fields) == "A man walks his dog in the park. Question: A person is outside ? [P] Answer: [MASK] ."
    assert ptuning.n_prompt_tokens == 1 and manual.n_prompt_tokens == 0


def test_rte_prompt_token_sits_between_question_mark_and_answer(bert, gpt2):
    template = sg.templates_for(TASKS["rte"], "ptuning", {})["default"]
    for lm in (bert, gpt2):
        e = encode(template, lm.tokenizer, {"premise": "A man walks.", "hypothesis": "A person moves"}, lm.causal)
        p = e.prompt_index.index(0)
        assert lm.tokenizer.decode(e.input_ids[p - 1:p]).strip() == "?"
        assert lm.tokenizer.decode(e.input_ids[p + 1:p + 3]).replace(" ", "") == "Answer:"


def test_other_patterns_render_as_in_the_paper(bert, gpt2):
    def render(task, method, fields, key="default", n=1, tokenizer=None, params=None):
        return sg.render(sg.templates_for(TASKS[task], method, params or {}, tokenizer)[key], fields, n)

    cb = {"premise": "It rained.", "hypothesis": "it was wet"}
    assert render("cb", "ptuning", cb, tokenizer=bert.tokenizer) == "It rained. [SEP] it was wet ? [P] answer: [MASK]"
    assert render("cb", "manual-finetune", cb, tokenizer=gpt2.tokenizer) == "It rained. it was wet ? answer: [MASK]"
    assert render("cb", "manual-finetune", cb, tokenizer=gpt2.tokenizer, params={"sep_fallback": "|"}) == \
        "It rained. | it was wet ? answer: [MASK]"
    bq = {"passage": "The sky is blue", "question": "is the sky blue"}
    assert render("boolq", "ptuning", bq) == "The sky is blue . [P] Question: is the sky blue ? Answer: [MASK] ."
    mr = {"passage": "P", "question": "Q", "answer": "A"}
    assert render("multirc", "ptuning", mr) == "P . Question: Q ? Is it A ? [P] [MASK] ."
    wic = {"sentence1": "S1.", "sentence2": "S2.", "word": "bank"}
    assert render("wic", "manual-zeroshot", wic) == "S1. [SEP] S2. * bank *? [MASK]"


def test_copa_pattern_depends_on_the_question_and_masks_each_choice(tmp_path, bert):
    spec = TASKS["copa"]
    rows = [{"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.", "choice2": "He got a hole in his sock.",
             "question": "cause", "label": 0, "idx": 0},
            {"premise": "I tipped the bottle.", "choice1": "The liquid in the bottle froze.", "choice2": "The liquid in the bottle poured out.",
             "question": "effect", "label": 1, "idx": 1}]
    path = tmp_path / "copa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cause, effect = sg.read_examples(spec, path)
    assert cause.pattern == "cause" and effect.pattern == "effect"
    assert cause.fields == {"premise": "The man broke his toe", "choice1": "he dropped a hammer on his foot",
                            "choice2": "he got a hole in his sock"}
    templates = sg.templates_for(spec, "ptuning", {})
    assert sg.render(templates["cause"], cause.fields, 2) == \
        "he dropped a hammer on his foot or he got a hole in his sock ? The man broke his toe because [P] [MASK] [MASK] ."
    assert " so [P] [MASK] ." in sg.render(templates["effect"], effect.fields)
    encoder = sg.Encoder(spec, "ptuning", bert.tokenizer, False, templates, 96)
    item = encoder.items([cause], train=True)[0]
    for enc, target in zip(item["encs"], item["targets"]):
        assert target == bert.tokenizer.encode(" " + cause.fields["choice1" if target is item["targets"][0] else "choice2"],
                                               add_special_tokens=False)
        assert sum(i == bert.tokenizer.mask_token_id for i in enc.input_ids) == len(target) == len(enc.read_positions)


def test_wsc_pattern_marks_the_pronoun(tmp_path):
    row = {"text": "The actress changed her name because she liked it.",
           "target": {"span1_index": 1, "span1_text": "actress", "span2_index": 6, "span2_text": "she"}, "label": True, "idx": 3}
    path = tmp_path / "wsc.jsonl"
    path.write_text(json.dumps(row) + "\n")
    ex = sg.read_examples(TASKS["wsc"], path)[0]
    assert ex.fields["text"] == "The actress changed her name because *she* liked it."
    template = sg.templates_for(TASKS["wsc"], "ptuning", {})["default"]
    assert template.n_prompt_tokens == 2
    assert sg.render(template, ex.fields) == \
        "[P] The actress changed her name because *she* liked it. [P] pronoun '* she *' refers to [MASK] ."


def test_verbalizers_are_single_tokens_or_fail_clearly(bert, gpt2):
    for lm in (bert, gpt2):
        assert len(sg.verbalizer_ids(TASKS["cb"], lm.tokenizer)) == 3
    assert gpt2.tokenizer.convert_ids_to_tokens(sg.verbalizer_ids(TASKS["rte"], gpt2.tokenizer)) == ["ĠYes", "ĠNo"]
    bad = dataclasses.replace(TASKS["rte"], verbalizer={"entailment": "Yes", "not_entailment": "Supercalifragilistic"})
    with pytest.raises(TaskError, match="verbalizer word 'Supercalifragilistic' .*not a single token"):
        sg.verbalizer_ids(bad, gpt2.tokenizer, "tiny-gpt2")


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
            assert sum(len(r["passage"]["questions"]) for r in dev32) == 32
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
    sg.prepare(raw_dir, again, seed=42, tasks=["rte", "multirc"])
    other = tmp_path / "other"
    sg.prepare(raw_dir, other, seed=7, tasks=["rte"])
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
    templates = sg.templates_for(spec, "ptuning", {}, lm.tokenizer)
    encoder = sg.Encoder(spec, "ptuning", lm.tokenizer, lm.causal, templates, max_length=64)
    ex = sg.Example("x", fields, "True" if task == "boolq" else "1")
    enc = encoder.items([ex], train=False)[0]["enc"]
    assert len(enc.input_ids) == 64
    assert sorted(i for i in enc.prompt_index if i >= 0) == [0]  # the prompt token survives
    text = lm.tokenizer.decode([t for t, p in zip(enc.input_ids, enc.prompt_index) if p < 0])
    assert text.count("lorem") < 300  # the passage lost tokens ...
    for kept in [fields["question"], *(["Is it", fields["answer"]] if task == "multirc" else ["Answer:"]), "Question:"]:
        assert kept.replace(" ", "") in text.replace(" ", "")  # ... and nothing else did
    # the answer slot and the final anchor are there: [MASK] . (masked) / the read position (causal)
    assert enc.target_positions and enc.read_positions[0] >= 0
    # the finetune baseline cuts the passage too
    head = sg.Encoder(spec, "finetune", lm.tokenizer, lm.causal, {}, max_length=64)
    ids = head.items([ex], train=False)[0]["ids"][0]
    assert len(ids) <= 64 and fields["question"].replace(" ", "") in lm.tokenizer.decode(ids).replace(" ", "")


# --- parameters --------------------------------------------------------------------------------------------

def test_setting_defaults_follow_the_paper(fewglue_dir):
    rte = sg.train_config(make_params(fewglue_dir, setting="fewshot"), TASKS["rte"], 32)
    assert (rte.max_steps, rte.lr, rte.lm_lr, rte.warmup_steps, rte.batch_size, rte.eval_every, rte.patience) == \
        (3500, 1e-4, 1e-5, 150, 16, 20, 10)
    assert rte.epochs == math.ceil(3500 / 2)
    cb = sg.train_config(make_params(fewglue_dir, setting="fewshot"), TASKS["cb"], 32)
    assert (cb.max_steps, cb.lr) == (250, 1e-5)
    full_rte = sg.train_config(make_params(fewglue_dir, setting="full"), TASKS["rte"], 2240)
    full_wic = sg.train_config(make_params(fewglue_dir, setting="full"), TASKS["wic"], 4885)
    assert (full_rte.epochs, full_wic.epochs, full_rte.eval_every, full_rte.max_steps, full_rte.lr) == (20, 10, None, None, 1e-5)
    assert full_rte.patience is not None


# --- end to end ----------------------------------------------------------------------------------------------

def _run(fewglue_dir, tmp_path, **overrides):
    params = make_params(fewglue_dir, **{"train.max_steps": 2, "train.eval_every": 2, "max_eval_examples": 16,
                                         "eval_batch_size": 16, **overrides})
    metrics = sg.run(params, tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert (tmp_path / "history.json").exists()
    for key in ("benchmark", "task", "model", "method", "setting", "dev_score", "prompts", "val", "dev"):
        assert key in metrics
    assert 0.0 <= metrics["dev_score"] <= 1.0
    assert not (tmp_path / "checkpoint").exists()  # removed after a finished run (keep_checkpoint: false)
    return metrics


@pytest.mark.parametrize("method", sg.METHODS)
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
def test_every_method_runs_on_rte(fewglue_dir, tmp_path, method, model):
    metrics = _run(fewglue_dir, tmp_path, task="rte", model=model, method=method)
    assert metrics["steps"] == (0 if method == "manual-zeroshot" else 2)
    assert metrics["acc"] == metrics["val"]["acc"] and metrics["dev_score"] == metrics["dev"]["acc"]
    if method == "ptuning":
        assert (tmp_path / "prompt" / "prompt.safetensors").exists() and metrics["prompts"] == {"rte": str(tmp_path / "prompt")}
    else:
        assert metrics["prompts"] == {}


@pytest.mark.parametrize("task, model, method", [
    ("copa", "tiny-bert", "ptuning"), ("copa", "tiny-gpt2", "ptuning"), ("copa", "tiny-gpt2", "finetune"),
    ("wsc", "tiny-bert", "ptuning"), ("wsc", "tiny-gpt2", "ptuning"), ("wsc", "tiny-bert", "finetune"),
    ("multirc", "tiny-bert", "ptuning"), ("multirc", "tiny-gpt2", "manual-finetune"),
    ("cb", "tiny-gpt2", "ptuning"), ("wic", "tiny-bert", "manual-zeroshot"), ("boolq", "tiny-bert", "ptuning"),
])
def test_special_tasks_run_end_to_end(fewglue_dir, tmp_path, task, model, method):
    metrics = _run(fewglue_dir, tmp_path, task=task, model=model, method=method)
    names = TASKS[task].metrics
    assert set(metrics["val"]) == set(names)
    assert metrics["dev_score"] == pytest.approx(sum(metrics["dev"][n] for n in names) / len(names))
    if task == "wsc" and method != "finetune":
        assert metrics["n_train"] == 32  # FewGLUE's WSC train32 holds True examples only (False ones are dropped)


def test_full_setting_selects_on_the_held_out_dev(fewglue_dir, tmp_path):
    metrics = _run(fewglue_dir, tmp_path, task="cb", model="tiny-bert", method="ptuning", setting="full")
    assert metrics["selected_on"] == "dev" and metrics["n_train"] == 225 and metrics["n_dev"] == 16


def test_cli_prints_the_metrics_as_its_last_line(fewglue_dir, tmp_path, capsys):
    from components.cli import main

    code = main(["train", "superglue", "--task", "rte", "--setting", "fewshot", "--model", "tiny-gpt2", "--method", "ptuning",
                 "--steps", "2", "--eval-every", "1", "--output-dir", str(tmp_path),
                 "--set", f"data_dir={fewglue_dir}", "--set", "max_eval_examples=16"])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads((tmp_path / "metrics.json").read_text())


# --- the special cases in detail ----------------------------------------------------------------------------

def test_copa_scores_each_choice_by_its_summed_teacher_forced_log_probability(gpt2):
    spec = TASKS["copa"]
    templates = sg.templates_for(spec, "manual-finetune", {}, gpt2.tokenizer)
    encoder = sg.Encoder(spec, "manual-finetune", gpt2.tokenizer, True, templates, 96)
    ex = sg.Example("c", {"premise": "The man broke his toe", "choice1": "he dropped a hammer on his foot",
                          "choice2": "he got a hole"}, "0", pattern="cause")
    item = encoder.items([ex], train=True)[0]
    from components.method.model import PromptedLM
    model = PromptedLM(gpt2.model, None, True, freeze_lm=True)
    batch = encoder.collate([item])
    with torch.no_grad():
        scores = sg._token_log_probs(model, batch).sum(-1)
        for row, (enc, target) in enumerate(zip(item["encs"], item["targets"])):
            logits = gpt2.model(input_ids=torch.tensor([enc.input_ids])).logits[0].log_softmax(-1)
            by_hand = sum(logits[p - 1, t] for p, t in zip(enc.target_positions, target))
            assert scores[row].item() == pytest.approx(by_hand.item(), abs=1e-4)
        assert len(item["targets"][0]) != len(item["targets"][1])  # multi-token answers of different lengths
        # hinge loss of the paper's code: max(0, 1 + CE(correct) - CE(wrong)), CE the mean token NLL
        ce = [-scores[i].item() / len(item["targets"][i]) for i in (0, 1)]
        loss = sg.make_loss(spec, "manual-finetune", None)(model, batch)
        assert loss.item() == pytest.approx(max(0.0, 1 + ce[0] - ce[1]), abs=1e-4)
    predictions = sg.predict(model, [item], encoder, None, 8)
    assert predictions == [str(int(scores.argmax()))]


def test_wsc_trains_on_true_examples_with_padding_masks(bert):
    spec = TASKS["wsc"]
    templates = sg.templates_for(spec, "ptuning", {}, bert.tokenizer)
    encoder = sg.Encoder(spec, "ptuning", bert.tokenizer, False, templates, 128, wsc={"train_extra_masks": 3,
                         "eval_extra_tokens": {"masked": 1, "causal": 1}})
    yes = sg.Example("a", {"text": "The dog chased the cat because *it* was hungry.", "pronoun": "it", "span": "The dog"}, "True")
    no = sg.Example("b", {"text": "The dog chased the cat because *it* was hungry.", "pronoun": "it", "span": "the cat"}, "False")
    train = encoder.items([yes, no], train=True)
    assert [i["ex"].guid for i in train] == ["a"]
    span = bert.tokenizer.encode(" The dog", add_special_tokens=False)
    target = train[0]["target"]
    assert target[:len(span)] == span and set(target[len(span):]) <= {bert.tokenizer.pad_token_id} and len(target) <= len(span) + 3
    assert train[0]["enc"].input_ids.count(bert.tokenizer.mask_token_id) == len(target)
    evaluation = encoder.items([yes, no], train=False)
    assert [i["n"] for i in evaluation] == [len(span) + 1] * 2


@pytest.mark.parametrize("predicted, span, match", [
    ("the dog", "The dog", True), ("dog", "the dog", True), ("the dog.", "dog", True),
    ("cat", "the dog", False), ("the big cat", "the dog", False), ("Mr. Singer", "mr singer", True),
])
def test_wsc_answer_rule(predicted, span, match):
    assert sg.wsc_match(predicted, span) is match


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
    answers = sg._wsc_generate(model, batch, [2], causal=False, tokenizer=tok)
    assert answers == ["the dog"]
    assert model.seen[1][0, 2] == dog and model.seen[1][0, 1] == tok.mask_token_id  # "dog" (more confident) first


def test_wsc_greedy_generation_feeds_each_token_back_for_causal_lms(gpt2):
    tok = gpt2.tokenizer
    the, dog = tok.encode(" the dog")
    model = _Scripted([(the, 5.0), (dog, 1.0)], len(tok))
    input_ids = torch.tensor([[10, 11, 12, 0, 0]])
    batch = {"input_ids": input_ids, "read_positions": torch.tensor([[2, 3]]), "attention_mask": torch.ones_like(input_ids),
             "prompt_index": -torch.ones_like(input_ids)}
    assert sg._wsc_generate(model, batch, [2], causal=True, tokenizer=tok) == [" the dog"]
    assert model.seen[1][0, 3] == the  # the first generated token is fed back before the second is read


# --- bad inputs ----------------------------------------------------------------------------------------------

def test_unknown_task_method_or_setting_fail_clearly(fewglue_dir):
    with pytest.raises(TaskError, match="unknown SuperGLUE task 'squad'; choose one of boolq, cb"):
        sg.validate(make_params(fewglue_dir, task="squad"))
    with pytest.raises(TaskError, match="unknown SuperGLUE method 'prefix'"):
        sg.validate(make_params(fewglue_dir, method="prefix"))
    with pytest.raises(TaskError, match="unknown SuperGLUE setting"):
        sg.validate(make_params(fewglue_dir, setting="zeroshot"))


def test_boolq_full_fails_clearly(fewglue_dir):
    with pytest.raises(TaskError, match="BoolQ has no full SuperGLUE train set .* use --setting fewshot"):
        sg.validate(make_params(fewglue_dir, task="boolq", setting="full"))
    sg.validate(make_params(fewglue_dir, task="boolq", setting="fewshot"))
    # `all` in the full setting means the six tasks that have a train set
    assert [s.name for s in sg.validate(make_params(fewglue_dir, task="all", setting="full"))] == \
        ["cb", "copa", "multirc", "rte", "wic", "wsc"]


def test_cli_reports_bad_input_without_a_traceback(fewglue_dir, capsys):
    from components.cli import main

    assert main(["train", "superglue", "--task", "boolq", "--setting", "full", "--set", f"data_dir={fewglue_dir}"]) == 2
    assert "BoolQ has no full SuperGLUE train set" in capsys.readouterr().err


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
        sg.read_examples(TASKS[task], path)


def test_invalid_json_and_missing_data_fail_clearly(tmp_path, fewglue_dir):
    path = tmp_path / "val.jsonl"
    path.write_text('{"premise": "p", "hypothesis": "h", "label": "entailment"}\n{not json\n')
    with pytest.raises(DataError, match=r"val\.jsonl:2: .*JSON"):
        sg.read_examples(TASKS["rte"], path)
    with pytest.raises(DataError, match="run `dvc repro prepare_fewglue`"):
        sg.load_splits(TASKS["rte"], make_params(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="ptuning prepare data"):
        sg.prepare(tmp_path / "no-raw", tmp_path / "out")


# --- real weights ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_reads_rte_zero_shot(fewglue_dir, tmp_path):
    metrics = sg.run(make_params(fewglue_dir, task="rte", model="smollm2-135m", method="manual-zeroshot",
                                 max_eval_examples=16, eval_batch_size=16), tmp_path)
    assert metrics["n_val"] == 16 and 0.0 <= metrics["acc"] <= 1.0 and metrics["steps"] == 0
