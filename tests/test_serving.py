"""Registered prompts served for real: `mlflow models serve` over HTTP and `ptuning predict`, with pickle
loading disabled; answers in the task's terms (LAMA words, SuperGLUE labels), equal to the evaluation's and to
an independent computation; a jointly tuned LM travels with its prompt; unservable kinds are refused; a request
outside the limits (an empty, too long or unknown field, top_k out of 1..100) gets a 400 naming the field and its
limit from a server that stays up."""
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

import components.benchmarks.lama.run as lama
from components.method.model import PromptedLM, PromptEncoder, export_prompt, load_prompt
from components.method.templates import collate, encode, parse_template, piece_ids
from components.method.model import export_lm
from components.mlops.serving import InvalidQuery, NotServable, PromptPredictor, check_servable
from components.mlops.bank import build_bank
from components.mlops.champion import CHAMPION
from components.mlops.tracking import Tracker
from components.models.catalog import load_lm
from components.run_config import resolve
from services import free_port, service_env, start, stop, wait_http
from helpers.lama import CITIES, PEOPLE, lama_prompt, make_lama

BIN = Path(sys.executable).parent
NO_PICKLE = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
RTE = "{premise} Question: {hypothesis} ? [P] Answer: [Y] ."


def independent_scores(prompt_dir: Path, rows: list[dict], words: list[str], lm=None) -> torch.Tensor:
    """Candidate logits computed here from the exported files: prompt vectors in the LM's input embeddings."""
    prompt, meta = load_prompt(prompt_dir)
    lm = lm or load_lm(meta["base_model"])
    model = PromptedLM(lm.model, prompt, lm.causal, freeze_lm=True).eval()
    ids = torch.tensor([piece_ids(lm.tokenizer, w)[0] for w in words])
    encoded = [encode(parse_template(meta["template"]), lm.tokenizer, row, lm.causal, max_length=512) for row in rows]
    with torch.no_grad():
        return model(**collate(encoded, lm.tokenizer.pad_token_id), candidate_ids=ids)[:, 0]


def superglue_prompt(directory: Path, seed: int = 0, **extra) -> Path:
    torch.manual_seed(seed)
    meta = {"benchmark": "superglue", "task": "rte", "kind": "classification", "setting": "fewshot",
            "labels": ["entailment", "not_entailment"], "verbalizer": {"entailment": "Yes", "not_entailment": "No"},
            "patterns": {"default": RTE}, "causal": True, "lm_trained": False, "max_length": 256, "truncate": "premise",
            **extra}
    return export_prompt(PromptEncoder(1, 32, "mlp"), directory, next(iter(meta["patterns"].values())), "tiny-gpt2", meta)


COPA = {"cause": "{choice1} or {choice2} ? {premise} because [P] [Y] .", "effect": "{choice1} or {choice2} ? {premise} so [P] [Y] ."}
# as COPA's reader leaves them (no final punctuation, choices lower-cased first), so the computation below reads them as is
CHOICES = [{"premise": "The man broke his toe", "choice1": "he dropped a hammer on his foot",
            "choice2": "he got a hole in his sock", "question": "cause"},
           {"premise": "I tipped the bottle", "choice1": "the liquid in the bottle froze",
            "choice2": "the liquid in the bottle poured out", "question": "effect"},
           {"premise": "The girl found a bug in her cereal", "choice1": "she poured milk in the bowl",
            "choice2": "she lost her appetite", "question": "effect"}]


def copa_prompt(directory: Path, seed: int = 0) -> Path:
    return superglue_prompt(directory, seed, task="copa", kind="choice_scoring", labels=["0", "1"], verbalizer=None,
                            patterns=COPA, max_length=96)


def choice_log_likelihoods(prompt_dir: Path, rows: list[dict]) -> torch.Tensor:
    """[row, choice] computed here from the exported files: each choice teacher-forced at [Y] in the row's
    pattern, its tokens' log-probabilities over the whole vocabulary summed."""
    prompt, meta = load_prompt(prompt_dir)
    lm = load_lm(meta["base_model"])
    model = PromptedLM(lm.model, prompt, lm.causal, freeze_lm=True).eval()
    scores = torch.zeros(len(rows), 2)
    with torch.no_grad():
        for r, row in enumerate(rows):
            for c, choice in enumerate((row["choice1"], row["choice2"])):
                target = piece_ids(lm.tokenizer, choice)
                encoded = encode(parse_template(COPA[row["question"]]), lm.tokenizer, row, lm.causal, target_ids=target)
                log_probs = model(**collate([encoded], lm.tokenizer.pad_token_id))[0].log_softmax(-1)
                scores[r, c] = log_probs[torch.arange(len(target)), torch.tensor(target)].sum()
    return scores


PAIRS = [{"premise": "A dog runs in the park", "hypothesis": "An animal moves"},
         {"premise": "The sun is hot", "hypothesis": "Ice is cold"},
         {"premise": "Paris is in France", "hypothesis": "Paris is in Spain"}]


def test_lama_prompt_served_over_http_answers_as_the_evaluation_predicts(mlflow_server, tmp_path):
    data = make_lama(tmp_path / "lama", n_train=24)
    config = resolve("lama", {"task": "P19", "model": "tiny-gpt2", "data_dir": str(data), "train.max_steps": 6,
                              "train.eval_every": 3, "train.batch_size": 4, "train.lr": 0.05, "train.precision": "fp32"})
    tracker = Tracker(mlflow_server.uri, "serving")
    with tracker.trial_run("final", config.params):
        metrics = lama.run(config, tmp_path / "run", callbacks=[])
        version = tracker.register_prompt(metrics["prompts"]["P19"], "serving-ptuning-lama-P19-29k-tiny-gpt2", metrics, report_key="test.p1", command="ptuning train lama --task P19")
    uri = f"models:/{version.name}@{CHAMPION}"
    env = service_env(MLFLOW_TRACKING_URI=mlflow_server.uri, **NO_PICKLE)
    port = free_port()
    server = start([BIN / "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-p", port, "-h", "127.0.0.1"],
                   env, tmp_path / "serve.log", cwd=tmp_path)
    try:
        # meanwhile, without a server: `ptuning predict` on the test facts
        facts = [{"sub": p} for p in PEOPLE[32:]]
        (tmp_path / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
        done = subprocess.run([sys.executable, "-m", "components.cli", "predict", "--model", uri, "--input",
                               str(tmp_path / "facts.jsonl"), "--top-k", "3"], env=env, capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
        assert lines[-1] == {"model": uri, "answered": 8, "output": None}  # the CLI's closing summary line
        predicted = [line["prediction"] for line in lines[:-1]]

        # the evaluation's argmax: the served answers score exactly the run's test P@1
        truth = [CITIES[i % 5] for i in range(32, 40)]
        assert sum(p == t for p, t in zip(predicted, truth)) / len(truth) == metrics["test"]["p1"]
        expected = [CITIES[i] for i in independent_scores(Path(metrics["prompts"]["P19"]), facts, CITIES).argmax(-1).tolist()]
        assert predicted == expected
        assert all(line["input"] == f and len(line["top_k"]) == 3 and line["top_k"][0] == line["prediction"]
                   for line, f in zip(lines, facts))

        wait_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log", timeout=240)
        answer = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": facts, "params": {"top_k": 3}}, timeout=60)
        assert answer.status_code == 200, answer.text
        served = answer.json()["predictions"]
        assert [a["prediction"] for a in served] == expected
        assert [a["top_k"] for a in served] == [line["top_k"] for line in lines[:-1]]
        assert all(a["top_k"][0] in CITIES and a["score"] == a["top_k_scores"][0] for a in served)

        missing = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": [{"subject": "Dante"}]}, timeout=60)
        assert 400 <= missing.status_code < 500 and "sub" in missing.json()["message"] and "Field required" in missing.json()["message"]

        # what the model cannot answer as asked: a 400 naming the field and its limit; the server stays up
        url, good = f"http://127.0.0.1:{port}/invocations", {"inputs": facts[:2], "params": {"top_k": 3}}
        predictor = PromptPredictor(metrics["prompts"]["P19"])
        room, long_sub = room_for_fields(metrics["prompts"]["P19"], predictor.tokenizer), "Dante Alighieri " * 1250
        assert room == 57 and len(long_sub) == 20000  # max_length 64 - the template's 3 + 3 prompt tokens and [Y]
        limit = f"a text field holds 1 to {room} tokens (the model reads at most 64, the template takes 7)"
        refused(url, {"inputs": [{"sub": ""}]}, good, "inputs[0].sub is empty", limit)
        refused(url, {"inputs": [{"sub": "Dante"}, {"sub": " \t"}]}, good, "inputs[1].sub is empty", limit)
        refused(url, {"inputs": [{"sub": long_sub}]}, good,
                f"inputs[0].sub is {len(piece_ids(predictor.tokenizer, long_sub))} tokens long (20000 characters)", limit)
        refused(url, {"inputs": [{"sub": "Dante", "obj": "Florence"}]}, good, "unknown field(s) ['obj']", "fields ['sub']")
        for top_k in (100000, -1, 0):
            refused(url, {"inputs": facts[:1], "params": {"top_k": top_k}}, good, f"params.top_k={top_k}",
                    "top_k must be an integer from 1 to 100")
        refused(url, {"inputs": [{"sub": 3}]}, good, "sub", "Input should be a valid string")  # a wrong type, as before
        longest = httpx.post(url, json={"inputs": [{"sub": words(predictor.tokenizer, room)}], "params": {"top_k": 100}}, timeout=60)
        assert longest.status_code == 200 and len(longest.json()["predictions"][0]["top_k"]) == len(CITIES)  # all it has
        many = httpx.post(url, json={"inputs": [{"sub": PEOPLE[i % len(PEOPLE)]} for i in range(500)]}, timeout=120)
        assert many.status_code == 200 and len(many.json()["predictions"]) == 500
    finally:
        stop(server)


def room_for_fields(prompt_dir: Path, tokenizer) -> int:
    """The tokens a template leaves its fields in max_length, counted on the training path's encoding: its length
    with one-word fields, less those words."""
    meta = json.loads((Path(prompt_dir) / "prompt.json").read_text())
    template = parse_template(meta["template"])
    slots = [(i, p.value) for i, p in enumerate(template.parts) if p.kind == "slot"]
    full = encode(template, tokenizer, {name: "cat" for _, name in slots}, meta["causal"], max_length=10**6)
    return meta["max_length"] - (len(full.input_ids) - sum(len(piece_ids(tokenizer, "cat", i == 0)) for i, _ in slots))


def words(tokenizer, n: int, first: bool = False) -> str:
    """A text of exactly `n` tokens where it stands (the template's first slot or not)."""
    text = " ".join(["cat"] * n)
    assert len(piece_ids(tokenizer, text, first)) == n
    return text


def refused(url: str, body: dict, good: dict, *says: str) -> None:
    """`body` gets a 400 whose message says all of `says`; `good` is answered right after (the server is up)."""
    answer = httpx.post(url, json=body, timeout=60)
    assert answer.status_code == 400, (answer.status_code, answer.text[:1000])
    message = answer.json()["message"]
    assert all(part in message for part in says), (says, message[-3000:])
    assert httpx.post(url, json=good, timeout=60).status_code == 200


def test_superglue_prompt_served_over_http_refuses_text_outside_its_limits(mlflow_server, tmp_path):
    """The same limits for a SuperGLUE prompt's fields (RTE: premise, hypothesis; max_length 256): empty, longer
    than the room alone, unknown; fields too long together are shortened from the premise as in training, and
    refused only when the premise cannot absorb it."""
    prompt_dir = superglue_prompt(tmp_path / "rte")
    predictor = PromptPredictor(prompt_dir)
    tokenizer = predictor.tokenizer
    room = room_for_fields(prompt_dir, tokenizer)
    tracker = Tracker(mlflow_server.uri, "serving-superglue")
    with tracker.trial_run("final", {}):
        version = tracker.register_prompt(prompt_dir, "serving-ptuning-superglue-rte-fewshot-tiny-gpt2",
                                          {"dev.score": 0.5, "val.score": 0.5}, report_key="val.score")
    port = free_port()
    server = start([BIN / "mlflow", "models", "serve", "-m", f"models:/{version.name}@{CHAMPION}", "--env-manager", "local",
                    "-p", port, "-h", "127.0.0.1"], service_env(MLFLOW_TRACKING_URI=mlflow_server.uri, **NO_PICKLE),
                   tmp_path / "serve.log", cwd=tmp_path)
    try:
        url, good = f"http://127.0.0.1:{port}/invocations", {"inputs": PAIRS, "params": {"top_k": 2}}
        wait_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log", timeout=240)
        answer = httpx.post(url, json=good, timeout=60)
        assert answer.status_code == 200 and [a["prediction"] for a in answer.json()["predictions"]] == \
            [a["prediction"] for a in predictor.predict(PAIRS, top_k=2)]
        limit = f"a text field holds 1 to {room} tokens (the model reads at most 256, the template takes {256 - room})"
        refused(url, {"inputs": [{"premise": "", "hypothesis": "An animal moves"}]}, good, "inputs[0].premise is empty", limit)
        refused(url, {"inputs": [PAIRS[0], {"premise": "A dog runs", "hypothesis": "  "}]}, good, "inputs[1].hypothesis is empty", limit)
        refused(url, {"inputs": [{"premise": "x" * 20000, "hypothesis": "An animal moves"}]}, good, "inputs[0].premise is",
                "(20000 characters)", limit)
        refused(url, {"inputs": [{"premise": "A dog runs", "hypothesis": words(tokenizer, room + 1)}]}, good,
                f"inputs[0].hypothesis is {room + 1} tokens long", limit)
        refused(url, {"inputs": [{**PAIRS[0], "label": "entailment"}]}, good, "unknown field(s) ['label']",
                "fields ['premise', 'hypothesis']")
        # together too long: the premise is shortened as in training, unless it is too short to absorb the excess
        both = httpx.post(url, json={"inputs": [{"premise": words(tokenizer, room - 10, True),
                                                 "hypothesis": words(tokenizer, room - 5)}]}, timeout=60)
        assert both.status_code == 200 and both.json()["predictions"][0]["prediction"] in ("entailment", "not_entailment")
        short = len(piece_ids(tokenizer, "A dog runs", True))
        refused(url, {"inputs": [{"premise": "A dog runs", "hypothesis": words(tokenizer, room)}]}, good,
                f"inputs[0]: the fields ['hypothesis', 'premise'] are {room + short} tokens long together, at most {room} fit",
                f"'premise' is shortened to make room, as in training, but it is {short} tokens long")
        refused(url, {"inputs": PAIRS, "params": {"top_k": 0}}, good, "top_k must be an integer from 1 to 100")
        three = httpx.post(url, json={"inputs": PAIRS, "params": {"top_k": 3}}, timeout=60)  # at most its 2 labels
        assert three.status_code == 200 and all(len(a["top_k"]) == 2 for a in three.json()["predictions"])
    finally:
        stop(server)


def registered_and_loaded(prompt_dir: Path, tmp_path: Path, monkeypatch, new_mlflow_db) -> tuple:
    """The prompt registered (as champion) in a new SQLite store and loaded back as MLflow loads it, pickle refused."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    tracker = Tracker(f"sqlite:///{new_mlflow_db(tmp_path / 'mlflow.db')}", "superglue")
    with tracker.trial_run("final", {}):
        version = tracker.register_prompt(prompt_dir, None, {"dev.score": 0.5, "val.score": 0.5}, report_key="val.score")
    return version, mlflow.pyfunc.load_model(f"models:/{version.name}@{CHAMPION}")


def test_superglue_prompt_answers_its_labels_through_the_verbalizer(tmp_path, monkeypatch, new_mlflow_db):
    prompt_dir = superglue_prompt(tmp_path / "rte")
    answers = PromptPredictor(prompt_dir).predict(PAIRS, top_k=2)
    scores = independent_scores(prompt_dir, PAIRS, ["Yes", "No"])
    labels = ["entailment", "not_entailment"]
    assert [a["prediction"] for a in answers] == [labels[i] for i in scores.argmax(-1).tolist()]
    assert all(sorted(a["top_k"]) == labels and abs(sum(a["top_k_scores"]) - 1) < 1e-5 for a in answers)
    version, loaded = registered_and_loaded(prompt_dir, tmp_path, monkeypatch, new_mlflow_db)
    assert version.name == "ptuning-superglue-rte-fewshot-tiny-gpt2"
    assert [dict(a) for a in loaded.predict(PAIRS, params={"top_k": 2})] == answers
    assert "labels entailment ('Yes'), not_entailment ('No')" in version.description


def test_a_jointly_tuned_prompt_is_served_with_its_own_lm_weights(tmp_path, new_mlflow_db):
    tuned = load_lm("tiny-gpt2")
    with torch.no_grad():  # "training" moved the LM away from the catalogue's weights
        torch.manual_seed(1)
        for parameter in tuned.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    prompt_dir = superglue_prompt(tmp_path / "joint", lm_trained=True)
    with pytest.raises(NotServable, match="export_lm"):
        check_servable(prompt_dir)
    export_lm(tuned.model, tuned.tokenizer, prompt_dir)
    assert (prompt_dir / "lm" / "model.safetensors").is_file()
    answers = PromptPredictor(prompt_dir).predict(PAIRS)
    with_tuned = independent_scores(prompt_dir, PAIRS, ["Yes", "No"], lm=tuned).softmax(-1)
    with_base = independent_scores(prompt_dir, PAIRS, ["Yes", "No"]).softmax(-1)
    assert not torch.allclose(with_tuned, with_base, atol=1e-3)  # the weights matter, so the check below can fail
    assert [a["top_k_scores"][0] for a in answers] == pytest.approx(with_tuned.max(-1).values.tolist(), abs=1e-5)
    tracker = Tracker(f"sqlite:///{new_mlflow_db(tmp_path / 'mlflow.db')}", "joint")
    with tracker.trial_run("final", {}):
        version = tracker.register_prompt(prompt_dir, None, {"dev.score": 0.5})
    import mlflow

    stored = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}", dst_path=str(tmp_path / "dl")))
    assert (stored / "artifacts" / "prompt" / "lm" / "model.safetensors").is_file()
    assert not list(stored.rglob("*.pkl")) and (stored / "prompt_model.py").is_file()


def test_a_copa_prompt_answers_the_likelier_choice_scored_whole_and_is_registered(tmp_path, monkeypatch, new_mlflow_db):
    prompt_dir = copa_prompt(tmp_path / "copa", seed=2)
    predictor = PromptPredictor(prompt_dir)
    assert predictor.fields == ["premise", "choice1", "choice2", "question"]
    answers = predictor.predict(CHOICES, top_k=2)
    expected = choice_log_likelihoods(prompt_dir, CHOICES).softmax(-1)
    assert [a["prediction"] for a in answers] == [str(i) for i in expected.argmax(-1).tolist()]
    assert [a["score"] for a in answers] == pytest.approx(expected.max(-1).values.tolist(), abs=1e-5)
    assert all(sorted(a["top_k"]) == ["0", "1"] for a in answers)
    # a row as the data set writes it: the reader drops the final period and lower-cases a choice's first letter
    as_in_copa = {**CHOICES[0], "premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot."}
    assert predictor.predict([as_in_copa], top_k=2) == answers[:1]
    with pytest.raises(InvalidQuery, match=r"inputs\[1\]: question 'why' names none of the patterns \['cause', 'effect'\]"):
        predictor.predict([CHOICES[0], {**CHOICES[1], "question": "why"}])
    with pytest.raises(InvalidQuery, match=r"inputs\[0\]\.choice2 is empty"):
        predictor.predict([{**CHOICES[0], "choice2": " "}])
    with pytest.raises(InvalidQuery, match=r"inputs\[0\]: input is \d+ tokens longer than max_length=96"):
        predictor.predict([{**CHOICES[0], "choice1": "he ran " * 60}])
    with pytest.raises(InvalidQuery, match=r"inputs\[2\]\.choice1 is '\.': a choice holds a word at least"):
        predictor.predict([*CHOICES[:2], {**CHOICES[2], "choice1": "."}])
    with pytest.raises(InvalidQuery, match=r"input lacks field\(s\) \['question'\]: a row holds \['premise', 'choice1', 'choice2', 'question'\]"):
        predictor.predict([{k: v for k, v in CHOICES[0].items() if k != "question"}])
    version, loaded = registered_and_loaded(prompt_dir, tmp_path, monkeypatch, new_mlflow_db)
    assert version.name == "ptuning-superglue-copa-fewshot-tiny-gpt2"
    assert [dict(a) for a in loaded.predict(CHOICES, params={"top_k": 2})] == answers
    assert "request fields: premise, choice1, choice2, question" in version.description


def test_a_choice_prompt_without_its_tasks_patterns_is_refused_and_joins_no_bank(tmp_path):
    missing = superglue_prompt(tmp_path / "one", task="copa", kind="choice_scoring", labels=["0", "1"], verbalizer=None,
                               patterns={"cause": COPA["cause"]}, max_length=96)
    with pytest.raises(NotServable, match=r"prompt.json's patterns are \['cause'\], COPA needs \['cause', 'effect'\]"):
        check_servable(missing)
    with pytest.raises(NotServable, match=r"copa \(here\): a choice prompt scores each of a row's choices whole"):
        build_bank({"copa": (copa_prompt(tmp_path / "copa"), "here"), "rte": (superglue_prompt(tmp_path / "rte"), "here")},
                   tmp_path / "bank")
    assert not (tmp_path / "bank").exists()


@pytest.mark.parametrize("task, reason", [("wsc", "generating the referent span"),
                                          ("nope", "unknown SuperGLUE task 'nope'")])
def test_tasks_that_do_not_answer_one_label_are_refused_with_a_reason(tmp_path, task, reason):
    """Their benchmark row (its task table) decides, not what prompt.json claims."""
    with pytest.raises(NotServable, match=reason):
        check_servable(superglue_prompt(tmp_path / task, task=task))


@pytest.mark.slow  # `ptuning predict` in a subprocess
def test_predict_answers_from_a_local_prompt_directory_and_names_a_missing_field(tmp_path):
    prompt_dir = lama_prompt(tmp_path / "prompt", seed=3)
    facts = [{"sub": p} for p in PEOPLE[:3]]
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
    cli = [sys.executable, "-m", "components.cli", "predict", "--model", str(prompt_dir)]
    done = subprocess.run(cli + ["--input", str(tmp_path / "facts.jsonl"), "--output", str(tmp_path / "answers.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    expected = [CITIES[i] for i in independent_scores(prompt_dir, facts, CITIES).argmax(-1).tolist()]
    assert [a["prediction"] for a in answers] == expected and [a["input"] for a in answers] == facts
    (tmp_path / "bad.jsonl").write_text(json.dumps({"sub": "A"}) + "\n" + json.dumps({"subject": "B"}) + "\n")
    bad = subprocess.run(cli + ["--input", str(tmp_path / "bad.jsonl")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("bad.jsonl:2: missing field(s) sub")
    assert "Traceback" not in bad.stderr and bad.stdout == ""
