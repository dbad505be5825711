"""`ptuning train ... --init-from`: a run starts where a registered prompt ended, names it in its fingerprint, and
refuses a source it cannot start from with one line, before training."""
import json

import mlflow
import pytest
from mlflow import MlflowClient

from components.cli import main
from components.mlops.serving import log_prompt_model

pytestmark = pytest.mark.slow  # trains through the CLI


def train(small_lama, out, *extra):
    return main(["train", "lama", "--task", "P36", "--model", "tiny-gpt2", "--set", f"data_dir={small_lama}",
                 "--steps", "4", "--eval-every", "2", "--lr", "0.05", "--output-dir", str(out), *extra])


def test_a_run_resumes_training_from_a_registered_prompt(small_lama, tmp_path, monkeypatch, capsys):
    assert train(small_lama, tmp_path / "first") == 0
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # this store for tracking and the registry (an earlier test's mlflow.set_registry_uri exports another one)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("init-from", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_prompt_model(tmp_path / "first" / "prompt", run_id=run.info.run_id, registered_model_name="init-p36")
    MlflowClient().set_registered_model_alias("init-p36", "champion", info.registered_model_version)

    assert train(small_lama, tmp_path / "second", "--init-from", "models:/init-p36@champion") == 0
    history = json.loads((tmp_path / "second" / "history.json").read_text())["P36"]
    # the step-0 dev figure is the registered version's, and training goes on from there
    assert history[0]["step"] == 0 and history[0]["dev.p1"] == first["dev"]["p1"]
    assert [h["step"] for h in history] == [0, 2, 4]
    fingerprint = json.loads((tmp_path / "second" / "fingerprint.json").read_text())
    assert fingerprint["init_from"] == "models:/init-p36/1" and "init_from" not in json.loads(
        (tmp_path / "first" / "fingerprint.json").read_text())

    # what it cannot start from: one line, exit 2, no training
    capsys.readouterr()
    assert main(["train", "lama", "--task", "P1376", "--model", "tiny-gpt2", "--set", f"data_dir={small_lama}",
                 "--output-dir", str(tmp_path / "third"), "--init-from", str(tmp_path / "first" / "prompt")]) == 2
    assert "another task 'P36' (this run: 'P1376')" in capsys.readouterr().err
    assert train(small_lama, tmp_path / "fourth", "--set", "encoder=lstm", "--init-from", "models:/init-p36/1") == 2
    assert "another encoder kind 'mlp' (this run: 'lstm')" in capsys.readouterr().err
    assert train(small_lama, tmp_path / "fifth", "--init-from", "models:/init-p36@nobody") == 2
    assert "--init-from models:/init-p36@nobody" in capsys.readouterr().err
    # as many [P]s (the encoder's shape matches), in another place: another prompt
    assert train(small_lama, tmp_path / "sixth", "--set", "template={sub} [P*6] [Y]", "--init-from", "models:/init-p36/1") == 2
    assert "another template '[P*3] {sub} [P*3] [Y]' (this run: '{sub} [P*6] [Y]')" in capsys.readouterr().err
    assert not any((tmp_path / d / "history.json").exists() for d in ("third", "fourth", "fifth", "sixth"))


def test_a_superglue_run_resumes_from_its_frozen_lm_prompt_with_the_same_pattern_only(fewglue_dir, tmp_path, capsys):
    def train_rte(out, *extra, task="rte"):
        return main(["train", "superglue", "--task", task, "--model", "tiny-gpt2", "--method", "ptuning",
                     "--set", "freeze_lm=true", "--steps", "2", "--eval-every", "1", "--set", f"data_dir={fewglue_dir}",
                     "--set", "max_eval_examples=16", "--output-dir", str(out), *extra])

    assert train_rte(tmp_path / "first") == 0
    source = str(tmp_path / "first" / "prompt")
    assert train_rte(tmp_path / "second", "--init-from", source, task="RTE") == 0  # the task as the user spells it
    history = json.loads((tmp_path / "second" / "history.json").read_text())["rte"]
    assert history[0]["dev.acc"] == json.loads((tmp_path / "first" / "metrics.json").read_text())["dev"]["acc"]
    capsys.readouterr()
    assert train_rte(tmp_path / "third", "--set", "pattern={premise} [P] Question: {hypothesis} ? Answer: [Y] .",
                     "--init-from", source) == 2
    error = capsys.readouterr().err
    assert "another template '{premise} Question: {hypothesis} ? [P] Answer: [Y] .'" in error and error.count("\n") == 1
    assert not (tmp_path / "third" / "history.json").exists()
