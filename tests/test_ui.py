"""The MLflow UI says what each model is: an MLflow server (tests/services.py) with a flow run, a trial run and a
registered prompt made through components.mlops.tracking, read by headless Chromium. The model version page
(screenshotted) and the registered model's page show the benchmark, task, template, base model, dev and test
figures and the command that trained it; the experiment opens on its training runs, not on the GenAI overview."""
import pytest

from helpers.lama import lama_prompt

COMMAND = "ptuning train lama --task P19 --model tiny-gpt2 --steps 6"
WHAT_IT_IS = ["benchmark lama", "task P19", "vocab 29k", "base model tiny-gpt2", "[P*3] {sub} [P*3] [Y]",
              "dev.score = 0.2500", "test.p1 = 0.2000", COMMAND]


@pytest.fixture(scope="module")
def recorded(mlflow_server, tmp_path_factory):
    """A parent run with a nested trial run whose prompt is registered (champion)."""
    from components.mlops.tracking import Tracker

    tmp = tmp_path_factory.mktemp("ui")
    tracker = Tracker(mlflow_server.uri, "ui-check")
    with tracker.parent_run("ui-parent-run", {"task": "P19", "model": "tiny-gpt2"}, {"benchmark": "lama"}):
        with tracker.trial_run("ui-trial-0", {"train.lr": 1e-5}):
            figures = {"dev": {"score": 0.25, "p1": 0.25}, "test": {"p1": 0.2}}
            tracker.log_result(figures)
            version = tracker.register_prompt(lama_prompt(tmp / "prompt", seed=0), "ui-ptuning-lama-P19-29k-tiny-gpt2",
                                              figures, report_key="test.p1", command=COMMAND)
    return {"uri": mlflow_server.uri, "tmp": tmp, "name": version.name, "version": str(version.version),
            "experiment_id": tracker.experiment_id}


def test_the_model_version_page_says_what_the_model_is(recorded, chromium):
    url = f"{recorded['uri']}/#/models/{recorded['name']}/versions/{recorded['version']}"
    shot = chromium.screenshot(url, recorded["tmp"] / "model-version.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = chromium.text(url)
    missing = [item for item in WHAT_IT_IS + ["champion"] if item not in text]
    assert not missing, (missing, text[:3000])


def test_the_registered_model_page_describes_its_champion(recorded, chromium):
    text = chromium.text(f"{recorded['uri']}/#/models/{recorded['name']}")
    assert f"Champion: version {recorded['version']}" in text and "champion" in text, text[:3000]
    missing = [item for item in WHAT_IT_IS if item not in text]
    assert not missing, (missing, text[:3000])
    assert recorded["name"] in chromium.text(f"{recorded['uri']}/#/models")


def test_the_experiment_opens_on_its_training_runs(recorded, chromium):
    from mlflow import MlflowClient

    from components.mlops.tracking import EXPERIMENT_KIND, experiment_url

    tags = MlflowClient(recorded["uri"]).get_experiment(recorded["experiment_id"]).tags
    assert EXPERIMENT_KIND.items() <= tags.items()  # a model-training experiment, not a GenAI app
    text = chromium.text(experiment_url(recorded["uri"], recorded["experiment_id"]))
    assert "ui-parent-run" in text and "No data available for the selected time range" not in text, text[:3000]
