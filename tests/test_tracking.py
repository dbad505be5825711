"""MLflow tracking against the embedded sqlite default and a real server (tests/services.py): nested runs,
per-step metrics, git and DVC data-version tags, the experiment's kind, and the registry's `champion`, which
goes to the best dev selection score, never to the newest or the best test figure."""
import json
import math
import os
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import urlparse

import pytest
import sqlalchemy

import components.benchmarks.lama.run as lama
from components.mlops.serving import NotServable
from components.mlops.champion import CHALLENGER, CHAMPION, registered_name
from components.mlops.provenance import dvc_lock_tags
from components.mlops.stores import CHECK_TIMEOUT, DEFAULT_TRACKING, TrackingUnreachable, check_reachable, tracking_store
from components.mlops.tracking import EXPERIMENT_KIND, Tracker
from components.run_config import resolve
from helpers.lama import lama_prompt, make_lama

def test_tracking_store_precedence_and_registered_names(monkeypatch, tmp_path):
    """An explicit override > MLFLOW_TRACKING_URI > params/tracking.yaml `uri` > the embedded default, in the checkout."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert DEFAULT_TRACKING == "sqlite:///mlflow.db"
    assert tracking_store({}, {}, tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert tracking_store({}, {"uri": "http://tracking:5000"}, tmp_path) == "http://tracking:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert tracking_store({}, {"uri": "http://tracking:5000"}, tmp_path) == "http://elsewhere:5000"
    assert tracking_store({"tracking.uri": "http://chosen:5000"}, {"uri": "http://tracking:5000"}, tmp_path) == "http://chosen:5000"
    assert registered_name("lama", "P19", "smollm2-135m", "29k") == "ptuning-lama-P19-29k-smollm2-135m"
    assert registered_name("superglue", "rte", "openai/gpt2 medium", "fewshot") == "ptuning-superglue-rte-fewshot-openai-gpt2-medium"


@pytest.mark.parametrize("uri", ["http://127.0.0.1:1", "postgresql://127.0.0.1:1/x"])
def test_unreachable_store_fails_fast(uri, monkeypatch):
    """Fast by construction, whatever the machine's speed: one connection attempt, bounded by the check's short
    timeout, then TrackingUnreachable naming the store; MLflow's client (which retried for minutes) is never made."""
    attempts = []  # the timeout of every connection attempt, in seconds
    urlopen, create_engine = urllib.request.urlopen, sqlalchemy.create_engine

    def spy_urlopen(request, timeout):
        attempts.append(timeout)
        return urlopen(request, timeout=timeout)

    def spy_create_engine(url, connect_args, **kwargs):
        attempts.append(connect_args["connect_timeout"])
        return create_engine(url, connect_args=connect_args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", spy_urlopen)
    monkeypatch.setattr(sqlalchemy, "create_engine", spy_create_engine)
    monkeypatch.setattr("mlflow.MlflowClient", lambda *a, **k: pytest.fail("MLflow's client was made"))
    with pytest.raises(TrackingUnreachable, match=uri.replace(".", r"\.")):
        check_reachable(uri, timeout=2)
    assert len(attempts) == 1 and 0 < attempts[0] <= 2
    with pytest.raises(TrackingUnreachable, match=uri.replace(".", r"\.")):
        Tracker(uri, "never")
    assert len(attempts) == 2 and 0 < attempts[1] <= math.ceil(CHECK_TIMEOUT)


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9", "postgresql://nobody@127.0.0.1:1/x", "sqlite:///absent.db"])
def test_predict_from_a_registry_that_does_not_answer_is_one_line(tmp_path, uri):
    """`ptuning predict --model models:/...` against a registry that does not answer: one line, exit 2, nothing
    written (MLflow's client retried an unreachable server for minutes, a database for 108 s with 217 lines)."""
    (tmp_path / "in.jsonl").write_text('{"sub": "Dante"}\n')
    # the registry is the tracking store; an in-process test's mlflow.set_registry_uri() exports MLFLOW_REGISTRY_URI
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_REGISTRY_URI"}, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run([sys.executable, "-m", "components.cli", "predict", "--model", "models:/ptuning-x@champion",
                           "--input", "in.jsonl"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and uri in lines[0], done.stderr[-3000:]
    assert lines[0].startswith("ptuning: error: ") and ("unreachable" in lines[0] or "does not exist" in lines[0])
    assert done.stdout == "" and [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


DVC_LOCK = """schema: '2.0'
stages:
  prepare_lama:
    cmd: ptuning prepare lama
    deps:
    - path: data/raw
      hash: md5
      md5: 0123456789abcdef0123456789abcdef.dir
    outs:
    - path: data/lama
      hash: md5
      md5: fedcba9876543210fedcba9876543210.dir
  prepare_fewglue:
    cmd: ptuning prepare fewglue
    outs:
    - path: data/fewglue
      hash: md5
      md5: 00000000000000000000000000000001.dir
"""


def test_dvc_lock_tags_are_read_from_dvc_lock(tmp_path):
    (tmp_path / "dvc.lock").write_text(DVC_LOCK)
    tags = dvc_lock_tags(tmp_path / "dvc.lock")
    assert tags["dvc.prepare_lama.outs.data/lama"] == "fedcba9876543210fedcba9876543210.dir"
    assert tags["dvc.prepare_lama.deps.data/raw"] == "0123456789abcdef0123456789abcdef.dir"
    lama_only = dvc_lock_tags(tmp_path / "dvc.lock", stages=["prepare_lama"])
    assert "dvc.prepare_fewglue.outs.data/fewglue" not in lama_only
    assert lama_only["data_version"] != tags["data_version"]  # a stage's data changes its version only
    (tmp_path / "dvc.lock").write_text(DVC_LOCK.replace("00000000000000000000000000000001", "2" * 32))
    assert dvc_lock_tags(tmp_path / "dvc.lock", stages=["prepare_lama"])["data_version"] == lama_only["data_version"]
    assert dvc_lock_tags(tmp_path / "dvc.lock")["data_version"] != tags["data_version"]
    assert dvc_lock_tags(tmp_path / "absent.lock") == {}


def test_embedded_store_nests_runs_logs_steps_and_tags_git_and_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.lock").write_text(DVC_LOCK)
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    tracker = Tracker(DEFAULT_TRACKING, "embedded", log_every=1)
    with tracker.parent_run("flow", {"task": "P19"}) as parent:
        with tracker.trial_run("trial-0", {"train": {"lr": 0.1}}) as trial:
            cb = tracker.callback()
            cb.on_train_begin({"steps_per_epoch": 2, "resumed_at_step": 0})
            for step in (1, 2, 3, 4):
                cb.on_step(step, 1.0 / step, 0.1)
                if step % 2 == 0:
                    cb.on_evaluate(step, step // 2, {"dev.p1": 0.1 * step}, True)
            tracker.log_result({"test": {"p1": 0.5}, "relations": {"P19": {"test": {"p1": 0.5}, "n_test": 8}},
                                "model": "tiny-gpt2"})

    client = tracker.client
    assert EXPERIMENT_KIND.items() <= client.get_experiment(tracker.experiment_id).tags.items()
    tags = client.get_run(parent.info.run_id).data.tags
    assert tags["mlflow.source.git.commit"] == head
    assert tags["dvc.prepare_lama.outs.data/lama"] == "fedcba9876543210fedcba9876543210.dir"
    assert tags["data_version"] == dvc_lock_tags(tmp_path / "dvc.lock")["data_version"]
    assert client.get_run(parent.info.run_id).data.params["data_version"] == tags["data_version"]
    assert "dvc.lock" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    run = client.get_run(trial.info.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["train.lr"] == "0.1"
    assert run.data.metrics["relations.P19.test.p1"] == 0.5 and run.data.tags["result.model"] == "tiny-gpt2"
    assert [(m.step, m.value) for m in client.get_metric_history(trial.info.run_id, "train_loss")] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "dev.p1")] == [2, 4]
    assert [(m.step, m.value) for m in client.get_metric_history(trial.info.run_id, "epoch_train_loss")] == [
        (1, 0.75), (2, (1 / 3 + 0.25) / 2)]


def test_each_store_keeps_its_own_artifacts(tmp_path, monkeypatch, new_mlflow_db):
    """Two SQLite stores used from one folder (sqlite:///a.db, sqlite:///b.db) once both put their artifacts in that
    folder's mlruns/<experiment id>/: the same folders for their first experiments. Each keeps them beside its file."""
    monkeypatch.chdir(tmp_path)
    places = {}
    for store in ("a.db", "b.db", "elsewhere/c.db"):
        new_mlflow_db(tmp_path / store)
        tracker = Tracker(f"sqlite:///{store}", "same-name")
        with tracker.trial_run("run", {}) as run:
            tracker.log_result({"test": {"p1": 0.5}})
        uri = tracker.client.get_run(run.info.run_id).info.artifact_uri
        places[store] = Path(urlparse(uri).path)
        assert (places[store] / "metrics.json").is_file(), uri
    stem = lambda store: Path(store).stem
    for store, place in places.items():
        assert place.is_relative_to((tmp_path / store).parent / "mlruns" / stem(store) / "same-name"), (store, place)
    assert not (tmp_path / "mlruns" / "1").exists()  # MLflow's default, which the stores shared


def test_a_database_store_keeps_its_artifacts_under_its_own_name(pg_database, tmp_path):
    """A PostgreSQL store's artifacts go to mlruns/<driver>-<host>-<port>-<database>/ of the checkout (project_dir),
    not to mlruns/<experiment id>/ of whatever folder the process runs in."""
    from sqlalchemy.engine import make_url

    tracker = Tracker(pg_database, "pg-artifacts", project_dir=tmp_path)
    with tracker.trial_run("run", {}) as run:
        tracker.log_result({"test": {"p1": 0.5}})
    place = Path(urlparse(tracker.client.get_run(run.info.run_id).info.artifact_uri).path)
    url = make_url(pg_database)
    assert place == tmp_path / "mlruns" / f"postgresql-{url.host}-{url.port}-{url.database}" / "pg-artifacts" / run.info.run_id / "artifacts"
    assert (place / "metrics.json").is_file()


def test_champion_is_the_best_dev_score_and_test_figures_never_decide(tmp_path, capfd, new_mlflow_db):
    tracker = Tracker(f"sqlite:///{new_mlflow_db(tmp_path / 'mlflow.db')}", "champions")
    name = registered_name("lama", "P19", "tiny-gpt2", "29k")
    figures = [  # (dev.score, test.p1): the second has the best test figure but a worse dev score
        (0.50, 0.40), (0.25, 0.90), (0.50, 0.10), (0.75, 0.20)]
    versions = []
    with tracker.parent_run("flow", {}):
        for i, (dev, test) in enumerate(figures):
            with tracker.trial_run(f"final-{i}", {}):
                capfd.readouterr()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    versions.append(tracker.register_prompt(
                        lama_prompt(tmp_path / f"p{i}", seed=i), None, {"dev": {"score": dev, "p1": dev}, "test": {"p1": test}},
                        report_key="test.p1", command=f"ptuning train lama --task P19 --seed {i}"))
                # registration prints no warnings: no pickle, a signature from type hints, an input example
                err = capfd.readouterr().err
                assert "warn" not in err.lower(), err
                assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []

    client = tracker.client
    assert [v.name for v in versions] == [name] * 4  # None: the name of the prompt's own scope
    aliases = {str(v.version): client.get_model_version(name, v.version).aliases for v in versions}
    # 1: first, champion; 2: worse dev (better test), challenger; 3: a tie does not beat; 4: better dev, champion
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "4"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "3"
    assert [v.aliases for v in versions] == [[CHAMPION], [CHALLENGER], [CHALLENGER], [CHAMPION]]  # when registered
    assert aliases == {"1": [], "2": [], "3": [CHALLENGER], "4": [CHAMPION]}
    second = client.get_model_version(name, "2")
    assert second.tags["test.p1"] == "0.9" and second.tags["dev.score"] == "0.25"  # recorded, not used
    assert second.tags["alias_decision"] == "dev.score 0.2500 does not beat champion version 1's 0.5000"
    assert second.tags["command"] == "ptuning train lama --task P19 --seed 1"
    assert {second.tags[k] for k in ("benchmark", "task", "vocab", "base_model")} == {"lama", "P19", "29k", "tiny-gpt2"}
    model = client.get_registered_model(name)
    assert model.description.startswith("Champion: version 4") and "dev.score = 0.7500" in model.description
    assert model.tags["base_model"] == "tiny-gpt2" and "29k vocabulary" in model.tags["answers"]


def test_registration_refuses_before_logging_anything(tmp_path, new_mlflow_db):
    tracker = Tracker(f"sqlite:///{new_mlflow_db(tmp_path / 'mlflow.db')}", "refusals")
    name = registered_name("lama", "P19", "tiny-gpt2", "29k")
    with tracker.trial_run("final", {}):
        tracker.register_prompt(lama_prompt(tmp_path / "ok", 0), name, {"dev.score": 0.5, "test.p1": 0.5})
        with pytest.raises(ValueError, match="no 'dev.score'"):
            tracker.register_prompt(lama_prompt(tmp_path / "a", 1), name, {"test.p1": 0.9})
        with pytest.raises(ValueError, match="scope .*'vocab': '34k'.* differs"):
            tracker.register_prompt(lama_prompt(tmp_path / "b", 2, vocab="34k"), name, {"dev.score": 0.9})
        with pytest.raises(ValueError, match="selected on 'dev.score', not 'dev.p1'"):
            tracker.register_prompt(lama_prompt(tmp_path / "c", 3), name, {"dev.p1": 0.9}, selection_key="dev.p1")
        no_vocab = lama_prompt(tmp_path / "d", 4)
        (no_vocab / "vocab.json").unlink()
        with pytest.raises(NotServable, match="no vocab.json"):
            tracker.register_prompt(no_vocab, name, {"dev.score": 0.9})
    assert [str(v.version) for v in tracker.client.search_model_versions(f"name='{name}'")] == ["1"]


def test_server_logs_a_real_run_and_registers_its_prompt(mlflow_server, tmp_path, repo_dir):
    data = make_lama(tmp_path / "lama", n_train=24)
    config = resolve("lama", {"task": "P19", "model": "tiny-gpt2", "data_dir": str(data), "train.max_steps": 6,
                              "train.eval_every": 3, "train.batch_size": 4, "train.lr": 0.01, "train.precision": "fp32",
                              "train.patience": None})
    tracker = Tracker(mlflow_server.uri, "test-tracking", log_every=2, project_dir=repo_dir)
    with tracker.parent_run("search-lama-P19", {"search": {"sampler": "grid"}, "task": "P19"}, tags={"flow": "test"}) as parent:
        with tracker.trial_run("trial-0", config.params) as trial:
            metrics = lama.run(config, tmp_path / "out", callbacks=[tracker.callback()])
            tracker.log_result(metrics, output_dir=tmp_path / "out")
            version = tracker.register_prompt(metrics["prompts"]["P19"], None, metrics, report_key="test.p1", command="ptuning train lama --task P19")

    client = tracker.client
    parent_run, trial_run = client.get_run(parent.info.run_id), client.get_run(trial.info.run_id)
    assert trial_run.data.tags["mlflow.parentRunId"] == parent_run.info.run_id
    assert parent_run.info.status == trial_run.info.status == "FINISHED"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True).stdout.strip()
    assert parent_run.data.tags["mlflow.source.git.commit"] == head and parent_run.data.tags["flow"] == "test"
    assert trial_run.data.params["train.lr"] == "0.01" and trial_run.data.params["model"] == "tiny-gpt2"
    # per-step training metrics, evaluations at their steps, one epoch (24 facts / batch 4 = 6 steps)
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "train_loss")] == [2, 4, 6]
    # dev.p1: the evaluations at their steps, nothing else (MLflow's latest value is the last evaluation's);
    # the kept state's figures have keys of their own, whichever evaluation it came from
    history = json.loads((tmp_path / "out" / "history.json").read_text())["P19"]
    assert [(m.step, m.value) for m in client.get_metric_history(trial.info.run_id, "dev.p1")] == [
        (h["step"], h["dev.p1"]) for h in history] and [h["step"] for h in history] == [0, 3, 6]
    assert trial_run.data.metrics["dev.p1"] == history[-1]["dev.p1"]
    assert trial_run.data.metrics["best.dev.p1"] == metrics["dev"]["p1"] == max(h["dev.p1"] for h in history)
    assert trial_run.data.metrics["best.dev.score"] == metrics["dev"]["score"] and "dev.score" not in trial_run.data.metrics
    assert trial_run.data.metrics["test.p1"] == metrics["test"]["p1"]
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "epoch_train_loss")] == [1]
    # the learning rate: the optimizer's (train.lr) once at step 0, which MLflow draws as a bar from 0 (a constant
    # series at its steps is drawn on an axis of its value +-1, a flat line at 0); the schedule's factor at the
    # steps (exponential decay per epoch: 24 facts / batch 4 = 6 steps an epoch)
    assert [(m.step, m.value) for m in client.get_metric_history(trial.info.run_id, "lr")] == [(0, 0.01)]
    assert [(m.step, m.value) for m in client.get_metric_history(trial.info.run_id, "lr_scale")] == [
        (2, 1.0), (4, 1.0), (6, pytest.approx(0.98))]
    assert {a.path for a in client.list_artifacts(trial.info.run_id)} >= {"metrics.json", "history.json"}
    # the version: champion (the first), logged from the trial run, with the run's figures as tags
    assert version.name == "ptuning-lama-P19-29k-tiny-gpt2" and CHAMPION in version.aliases
    assert version.run_id == trial.info.run_id and version.tags["test.p1"] == str(metrics["test"]["p1"])
