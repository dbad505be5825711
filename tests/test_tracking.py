"""MLflow tracking against a real server (started here) and the embedded sqlite default: nested runs,
per-step metrics, git and DVC data-version tags, a registered prompt served through pyfunc and the
`mlflow models predict` CLI with the same predictions as the components code."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

import components.benchmarks.lama.run as lama
from components.models.catalog import load_lm
from components.method.model import PromptedLM, PromptEncoder, export_prompt, load_prompt
from components.config import apply_overrides, load_params
from components.method.templates import collate, encode, lama_template, parse_template
from components.mlops.tracking import (CHAMPION, DEFAULT_URI, Tracker, TrackingUnreachable, check_reachable, data_version,
                                 registered_name, tracking_uri)

CITIES = ("Paris London Berlin Rome Madrid Tokyo Vienna Moscow Prague Dublin Athens Lisbon Warsaw Cairo Delhi "
          "Chicago Boston Toronto Sydney Oslo").split()
PEOPLE = [f"Person{i}" for i in range(40)]
MLFLOW_CLI = str(Path(sys.executable).parent / "mlflow")


def make_lama(root: Path) -> Path:
    """A LAMA-shaped data dir: relation P19, 24/8/8 facts, a 20-word vocabulary (one GPT-2 token each)."""
    relation = root / "29k" / "P19"
    relation.mkdir(parents=True)
    (root / "29k" / "vocab.json").write_text(json.dumps(sorted(CITIES)))
    (root / "relations.jsonl").write_text(json.dumps({"relation": "P19", "template": "[X] was born in [Y] ."}) + "\n")
    facts = [{"sub_label": p, "obj_label": CITIES[i % 5]} for i, p in enumerate(PEOPLE)]
    for split, rows in (("train", facts[:24]), ("dev", facts[24:32]), ("test", facts[32:])):
        (relation / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def direct_predictions(prompt_dir: Path, vocab: list[str], subjects: list[str]) -> list[str]:
    """What the components code predicts (as LAMA's evaluation does): argmax over the vocabulary."""
    prompt, meta = load_prompt(prompt_dir)
    lm = load_lm(meta["base_model"])
    words, ids = lama.candidate_vocabulary(vocab, lm.tokenizer)
    model = PromptedLM(lm.model, prompt, lm.causal, freeze_lm=True).eval()
    template = parse_template(meta["template"])
    encoded = [encode(template, lm.tokenizer, {"sub": s}, lm.causal, target_ids=[ids[0]], max_length=64, truncate="sub")
               for s in subjects]
    with torch.no_grad():
        logits = model(**collate(encoded, lm.tokenizer.pad_token_id), candidate_ids=torch.tensor(ids))[:, 0]
    return [words[i] for i in logits.argmax(-1).tolist()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def server_process(tmp_path_factory):
    """Started when the module starts, so that it boots while the first tests run."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen(
        [MLFLOW_CLI, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", server, root / "server.log"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture
def mlflow_server(server_process):
    uri, server, log = server_process
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1) as r:
                if r.status == 200:
                    return uri
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            pytest.fail(f"mlflow server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri({}) == DEFAULT_URI == "sqlite:///mlflow.db"
    assert tracking_uri({"uri": "http://tracking:5000"}) == "http://tracking:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert tracking_uri({"uri": "http://tracking:5000"}) == "http://elsewhere:5000"
    assert registered_name("lama", "P19", "smollm2-135m") == "ptuning-lama-P19-smollm2-135m"
    assert registered_name("superglue", "rte", "openai/gpt2 medium") == "ptuning-superglue-rte-openai-gpt2-medium"


@pytest.mark.parametrize("uri", ["http://127.0.0.1:1", "postgresql://127.0.0.1:1/x"])
def test_unreachable_store_fails_fast(uri):
    started = time.time()
    with pytest.raises(TrackingUnreachable, match=uri.replace(".", r"\.")):
        check_reachable(uri, timeout=3)
    with pytest.raises(TrackingUnreachable, match=uri.replace(".", r"\.")):
        Tracker(uri, "never")
    assert time.time() - started < 10


DVC_LOCK = """schema: '2.0'
stages:
  prepare_lama:
    cmd: ptuning prepare lama
    deps:
    - path: data/raw
      hash: md5
      md5: 0123456789abcdef0123456789abcdef.dir
      size: 100
      nfiles: 3
    outs:
    - path: data/lama
      hash: md5
      md5: fedcba9876543210fedcba9876543210.dir
      size: 50
      nfiles: 2
"""


def test_embedded_default_store_tags_data_version_and_moves_the_champion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.lock").write_text(DVC_LOCK)
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    tracker = Tracker(tracking_uri({}), "embedded", log_every=1)
    assert tracker.uri == "sqlite:///mlflow.db"
    # an untrained prompt for tiny-gpt2 (LAMA's causal shape), exported as the runners do
    torch.manual_seed(0)
    template = lama_template([3, 3, 3], causal=True)
    prompt_dirs = [export_prompt(PromptEncoder(6, 32, "lstm"), tmp_path / f"prompt{i}", template, "tiny-gpt2",
                                 {"benchmark": "lama", "task": "P19", "causal": True}) for i in range(2)]
    name = registered_name("lama", "P19", "tiny-gpt2")
    with tracker.parent_run("flow", {"task": "P19"}) as parent:
        for i, prompt_dir in enumerate(prompt_dirs):
            with tracker.trial_run(f"trial-{i}", {"train": {"lr": 0.1 * (i + 1)}}) as trial:
                cb = tracker.callback()
                cb.on_train_begin({"steps_per_epoch": 2, "resumed_at_step": 0})
                for step in (1, 2, 3, 4):
                    cb.on_step(step, 1.0 / step, 0.1)
                    if step % 2 == 0:
                        cb.on_evaluate(step, step // 2, {"dev_p1": 0.1 * step}, True)
                tracker.log_result({"p1": 0.5, "relations": {"P19": {"test_p1": 0.5, "n_test": 8}}, "model": "tiny-gpt2"})
                version = tracker.register_prompt(prompt_dir, name, {"p1": 0.5})

    client = tracker.client
    tags = client.get_run(parent.info.run_id).data.tags
    assert tags["mlflow.source.git.commit"] == head
    assert tags["dvc.prepare_lama.outs.data/lama"] == "fedcba9876543210fedcba9876543210.dir"
    assert tags["dvc.prepare_lama.deps.data/raw"] == "0123456789abcdef0123456789abcdef.dir"
    assert tags["data_version"] == data_version(tmp_path / "dvc.lock")["data_version"]
    assert client.get_run(parent.info.run_id).data.params["data_version"] == tags["data_version"]
    assert "dvc.lock" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    run = client.get_run(trial.info.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.metrics["relations.P19.test_p1"] == 0.5 and run.data.tags["result.model"] == "tiny-gpt2"
    assert [(m.step, m.value) for m in client.get_metric_history(trial.info.run_id, "train_loss")] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "dev_p1")] == [2, 4]
    assert [(m.step, m.value) for m in client.get_metric_history(trial.info.run_id, "epoch_train_loss")] == [
        (1, 0.75), (2, (1 / 3 + 0.25) / 2)]

    # the newest version is the champion; served predictions equal the components' (no vocab: any token)
    assert str(version.version) == "2" and CHAMPION in version.aliases
    assert CHAMPION not in client.get_model_version(name, "1").aliases
    served = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").predict(pd.DataFrame({"sub": PEOPLE[:4]}))
    prompt, meta = load_prompt(prompt_dirs[1])
    lm = load_lm("tiny-gpt2")
    model = PromptedLM(lm.model, prompt, True, freeze_lm=True).eval()
    encoded = [encode(parse_template(meta["template"]), lm.tokenizer, {"sub": s}, True, max_length=64) for s in PEOPLE[:4]]
    with torch.no_grad():
        best = model(**collate(encoded, lm.tokenizer.pad_token_id))[:, 0].argmax(-1).tolist()
    assert served["prediction"].tolist() == [lm.tokenizer.decode([i]).strip() for i in best]


def test_server_runs_metrics_registry_and_serving(mlflow_server, tmp_path, repo_dir):
    data = make_lama(tmp_path / "lama")
    params = apply_overrides(load_params("lama"), {
        "model": "tiny-gpt2", "data_dir": str(data), "train.max_steps": 6, "train.eval_every": 3,
        "train.batch_size": 4, "train.lr": 0.01, "train.precision": "fp32"})
    check_reachable(mlflow_server)
    tracker = Tracker(mlflow_server, "test-tracking", log_every=2, project_dir=repo_dir)
    name = registered_name("lama", "P19", "tiny-gpt2")
    with tracker.parent_run("search-lama-P19", {"search": {"sampler": "grid"}, "task": "P19"}, tags={"flow": "test"}) as parent:
        with tracker.trial_run("trial-0", params) as trial:
            metrics = lama.run(params, tmp_path / "out", callbacks=[tracker.callback()])
            tracker.log_result(metrics, output_dir=tmp_path / "out")
            version = tracker.register_prompt(metrics["prompts"]["P19"], name, metrics, vocab_file=data / "29k" / "vocab.json")

    client = tracker.client
    parent_run, trial_run = client.get_run(parent.info.run_id), client.get_run(trial.info.run_id)
    assert trial_run.data.tags["mlflow.parentRunId"] == parent_run.info.run_id
    assert parent_run.info.status == trial_run.info.status == "FINISHED"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True).stdout.strip()
    assert parent_run.data.tags["mlflow.source.git.commit"] == head and parent_run.data.tags["flow"] == "test"
    assert parent_run.data.params["search.sampler"] == "grid"
    assert trial_run.data.params["train.lr"] == "0.01" and trial_run.data.params["model"] == "tiny-gpt2"
    # per-step training metrics, evaluations at their steps, one epoch (24 facts / batch 4 = 6 steps)
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "train_loss")] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "lr")] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "dev_p1")] == [3, 6]
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "epoch_train_loss")] == [1]
    # final, flattened metrics and artifacts
    assert trial_run.data.metrics["relations.P19.test_p1"] == metrics["relations"]["P19"]["test_p1"]
    assert trial_run.data.metrics["p1"] == metrics["p1"] and trial_run.data.metrics["dev_score"] == metrics["dev_score"]
    assert {a.path for a in client.list_artifacts(trial.info.run_id)} >= {"metrics.json", "history.json"}

    # the registered version, its alias and its artifacts
    assert version.name == name and CHAMPION in version.aliases
    assert client.get_model_version_by_alias(name, CHAMPION).version == version.version
    assert version.tags["metric.p1"] == str(metrics["p1"]) and version.tags["base_model"] == "tiny-gpt2"
    assert version.tags["metric.task.test_p1"] == str(metrics["relations"]["P19"]["test_p1"])
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION}", dst_path=str(tmp_path / "dl")))
    stored = {p.name for p in (files / "artifacts" / "prompt").iterdir()}
    assert stored == {"prompt.safetensors", "encoder.safetensors", "prompt.json", "vocab.json"}
    assert json.loads((files / "artifacts" / "prompt" / "prompt.json").read_text())["base_model"] == "tiny-gpt2"

    # `mlflow models predict` in a separate process, while this one checks the in-process pyfunc
    subjects = PEOPLE[32:]
    (tmp_path / "in.json").write_text(json.dumps({"dataframe_records": [{"sub": s} for s in subjects]}))
    cli = subprocess.Popen([MLFLOW_CLI, "models", "predict", "-m", f"models:/{name}@{CHAMPION}", "-i", str(tmp_path / "in.json"),
                            "-t", "json", "-o", str(tmp_path / "out.json"), "--env-manager", "local"],
                           env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)

    # served predictions = the components' own, and score the same P@1 as the run
    expected = direct_predictions(Path(metrics["prompts"]["P19"]), CITIES, subjects)
    served = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").predict(pd.DataFrame({"sub": subjects}),
                                                                             params={"top_k": 3})
    assert served["prediction"].tolist() == expected
    assert all(len(k) == 3 and k[0] == p for k, p in zip(served["top_k"], served["prediction"]))
    truth = [CITIES[i % 5] for i in range(32, 40)]
    assert sum(p == t for p, t in zip(served["prediction"], truth)) / len(truth) == metrics["p1"]

    stderr = cli.communicate(timeout=180)[1]
    assert cli.returncode == 0, stderr[-3000:]
    answers = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert [a["prediction"] for a in answers] == expected
