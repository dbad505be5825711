"""The MLflow UI shows what the pipeline records: an MLflow server on 127.0.0.1 with a run and a registered
prompt (alias champion) made through components.mlops.tracking, rendered by headless Chromium (Debian's
`chromium` package, installed by scripts/setup.sh): the models page lists the registered model, its page shows
the champion version, and the experiment's runs page shows the run's name.

The MLflow UI is a React single-page app: `--dump-dom` prints the DOM after its scripts ran
(`--virtual-time-budget` lets them fetch and render)."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    port = free_port()
    log = tmp / "mlflow.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    process = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                                "--artifacts-destination", str(tmp / "mlartifacts")],
                               env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri, tmp
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def recorded(mlflow_server):
    """A parent run with a nested trial run, and a tiny exported prompt registered as `champion`."""
    from components.method.model import PromptEncoder, export_prompt
    from components.mlops.tracking import Tracker, registered_name

    uri, tmp = mlflow_server
    prompt_dir = export_prompt(PromptEncoder(3, 8, "mlp"), tmp / "prompt", "[P*3] {sub} [Y]", "tiny-gpt2",
                               {"benchmark": "lama", "task": "P19"})
    tracker = Tracker(uri, "ui-check")
    name = registered_name("lama", "P19", "tiny-gpt2")
    with tracker.parent_run("ui-parent-run", {"task": "P19", "model": "tiny-gpt2"}, {"benchmark": "lama"}):
        with tracker.trial_run("ui-trial-0", {"train.lr": 1e-5}):
            tracker.log_result({"dev_score": 0.25, "p1": 0.2})
        version = tracker.register_prompt(str(prompt_dir), name, {"dev_score": 0.25, "p1": 0.2})
    from mlflow import MlflowClient

    experiment_id = MlflowClient(uri).get_experiment_by_name("ui-check").experiment_id
    return {"uri": uri, "tmp": tmp, "name": name, "version": str(version.version), "experiment_id": experiment_id}


def render(url: str, profile: Path) -> str:
    """The page's text after its scripts ran, script and style bodies left out."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 0 and result.stdout, result.stderr[-2000:]
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", result.stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it: apt-get install -y chromium)")
def test_models_page_lists_the_registered_prompt(recorded):
    text = render(f"{recorded['uri']}/#/models", recorded["tmp"] / "profile-models")
    assert recorded["name"] in text, text[:2000]
    page = render(f"{recorded['uri']}/#/models/{recorded['name']}", recorded["tmp"] / "profile-model")
    assert "champion" in page and f"Version {recorded['version']}" in page, page[:2000]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it: apt-get install -y chromium)")
def test_experiment_page_shows_the_run(recorded):
    text = render(f"{recorded['uri']}/#/experiments/{recorded['experiment_id']}/runs", recorded["tmp"] / "profile-runs")
    assert "ui-parent-run" in text, text[:2000]
