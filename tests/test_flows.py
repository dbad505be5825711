"""End to end: a Prefect server and an MLflow server on 127.0.0.1, the deployments served by
`python -m flows.serve`, and `prefect deployment run ptuning/lama` (then ptuning/superglue) with a tiny model
and a 2 x 1 grid. Asserts the registered model version with alias `champion` and its artifacts, the nested
trial runs under the parent run, the Optuna study's trials, and that a second run with the same inputs
reuses the finished work (cached tasks, no new MLflow runs, no new model version)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # A process group of its own: stopping it stops its children too (uvicorn workers, flow-run subprocesses).
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start_mlflow(tmp: Path, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                     "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "mlartifacts")],
                    {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, tmp / "mlflow.log")
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared_dir):
    """Prefect server + MLflow server + `python -m flows.serve`, all on 127.0.0.1, state under a tmp dir."""
    tmp = tmp_path_factory.mktemp("flows")
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # the served runner picks a new flow run up within a second
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
           "PTUNING_DATA_MIRROR": str(shared_dir / "data"), "PYTHONUNBUFFERED": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    processes = []
    try:
        prefect_port = free_port()
        server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                       env, tmp / "prefect-server.log")
        processes.append(server)
        mlflow_server, mlflow_uri = start_mlflow(tmp, env)
        processes.append(mlflow_server)
        api = f"http://127.0.0.1:{prefect_port}/api"
        wait_http(f"{api}/health", server, tmp / "prefect-server.log")
        wait_http(f"{mlflow_uri}/health", mlflow_server, tmp / "mlflow.log")
        env["PREFECT_API_URL"] = api
        serve = start([sys.executable, "-m", "flows.serve"], env, tmp / "serve.log")
        processes.append(serve)
        for name in ("lama", "superglue"):
            wait_http(f"{api}/deployments/name/ptuning/{name}", serve, tmp / "serve.log")
        yield {"tmp": tmp, "env": env, "api": api, "mlflow": mlflow_uri}
    finally:
        for process in reversed(processes):
            stop(process)
        log = tmp / "serve.log"
        if log.exists():  # the flow runs' logs, for a failed test's report
            print(log.read_text()[-6000:])


def start_deployment(stack: dict, name: str, params: dict, timeout: int = 300) -> dict:
    """Start `prefect deployment run ptuning/NAME -p k=v ... --watch` (it returns when the flow run ends)."""
    args = [str(BIN / "prefect"), "deployment", "run", f"ptuning/{name}", "--watch", "--watch-timeout", str(timeout)]
    for key, value in params.items():
        args += ["-p", f"{key}={json.dumps(value)}"]
    log = stack["tmp"] / f"run-{name}-{time.time():.0f}.log"
    process = subprocess.Popen(args, env=stack["env"], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
    return {"name": name, "process": process, "log": log, "started": time.time(), "timeout": timeout}


def finish_deployment(stack: dict, handle: dict) -> str:
    """Wait for a started `prefect deployment run --watch`; the flow run id, or an error with its logs."""
    process = handle["process"]
    try:
        process.wait(timeout=handle["timeout"] + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    print(f"prefect deployment run ptuning/{handle['name']}: {time.time() - handle['started']:.0f}s")
    output = handle["log"].read_text()
    if process.returncode != 0 or "Completed" not in output:
        log = (stack["tmp"] / "serve.log").read_text()[-8000:]
        raise AssertionError(f"ptuning/{handle['name']} failed ({process.returncode}):\n{output[-4000:]}\n--- serve.log ---\n{log}")
    return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)


def run_deployment(stack: dict, name: str, params: dict) -> str:
    return finish_deployment(stack, start_deployment(stack, name, params))


def task_states(stack: dict, flow_run_id: str) -> dict[str, list[str]]:
    response = httpx.post(f"{stack['api']}/task_runs/filter",
                          json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200}, timeout=10)
    response.raise_for_status()
    states: dict[str, list[str]] = {}
    for run in response.json():
        states.setdefault(run["name"].rsplit("-", 1)[0], []).append(run["state_name"])  # "search-a1b" -> "search"
    return states


def flow_logs(stack: dict, flow_run_id: str) -> str:
    """The flow run's logs as Prefect's API stores them (what its UI shows)."""
    messages, offset = [], 0
    while True:
        response = httpx.post(f"{stack['api']}/logs/filter", timeout=10, json={
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200, "offset": offset, "sort": "TIMESTAMP_ASC"})
        response.raise_for_status()
        page = response.json()
        messages += [entry["message"] for entry in page]
        if len(page) < 200:
            return "\n".join(messages)
        offset += 200


def tiny(stack: dict, experiment: str, **extra) -> dict:
    tmp = stack["tmp"]
    return {"models": ["tiny-gpt2"], "methods": ["ptuning"], "seeds": [34], "n_trials": 2,
            "search_space": {"train.lr": [1.0e-5, 3.0e-5], "train.batch_size": [8]},
            "tracking_uri": stack["mlflow"], "experiment": experiment, "storage": f"sqlite:///{tmp / 'optuna.db'}",
            "outputs_dir": str(tmp / "outputs"), **extra}


def check_registration(stack: dict, experiment: str, benchmark: str, task: str, n_trials: int) -> tuple:
    import mlflow
    import optuna
    from mlflow import MlflowClient

    from components.mlops.tracking import registered_name

    mlflow.set_tracking_uri(stack["mlflow"])  # models:/ URIs resolve through the global registry URI
    mlflow.set_registry_uri(stack["mlflow"])
    client = MlflowClient(tracking_uri=stack["mlflow"], registry_uri=stack["mlflow"])
    name = registered_name(benchmark, task, "tiny-gpt2")
    version = client.get_model_version_by_alias(name, "champion")
    assert version.status == "READY"
    # Its artifacts: the exported prompt (vectors + the metadata that loads them).
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@champion",
                                                     dst_path=str(stack["tmp"] / f"dl-{benchmark}")))
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert "prompt.safetensors" in files and "prompt.json" in files, files

    # The parent run of the search holds the trial runs (nested) and the final run(s).
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    parents = {r.data.tags["mlflow.parentRunId"] for r in children}
    assert len(parents) == 1, [(r.info.run_name, r.data.tags.get("mlflow.parentRunId")) for r in runs]
    trial_runs = [r for r in children if r.info.run_name.startswith("trial-")]
    final_runs = [r for r in children if r.info.run_name.startswith("final-")]
    assert len(trial_runs) == n_trials and len(final_runs) == 1, [r.info.run_name for r in children]
    assert all("dev_score" in r.data.metrics for r in trial_runs + final_runs)
    assert version.run_id in {r.info.run_id for r in runs}

    # The study: both grid points, complete.
    storage = f"sqlite:///{stack['tmp'] / 'optuna.db'}"
    names = [s for s in optuna.get_all_study_names(storage) if s.startswith(f"{benchmark}-{task}-")]
    assert len(names) == 1, names
    study = optuna.load_study(study_name=names[0], storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == n_trials and {t.params["train.lr"] for t in complete} == {1.0e-5, 3.0e-5}
    return client, name, version, len(runs)


SUPERGLUE_READY = "prepare_fewglue" in (REPO / "dvc.yaml").read_text()
LAMA = {"tasks": ["P1376"], "overrides": {"train.max_steps": 2, "train.eval_every": 2}}
SUPERGLUE = {"tasks": ["cb"], "setting": "fewshot", "seeds": [42],
             "overrides": {"train.max_steps": 2, "train.eval_every": 2, "max_eval_examples": 16, "freeze_lm": True}}


@pytest.fixture(scope="module")
def first_runs(stack):
    """The first run of each deployment, both at once: two flow-run subprocesses of the served process (their
    `dvc repro` calls queue on DVC's repository lock)."""
    handles = [start_deployment(stack, "lama", tiny(stack, "e2e-lama", **LAMA))]
    if SUPERGLUE_READY:
        handles.append(start_deployment(stack, "superglue", tiny(stack, "e2e-superglue", **SUPERGLUE)))
    for handle in handles:  # wait for all before judging any
        handle["process"].wait(timeout=handle["timeout"] + 60)
    return {handle["name"]: finish_deployment(stack, handle) for handle in handles}


def test_lama_deployment_end_to_end_and_rerun_reuses(stack, first_runs):
    client, name, version, n_runs = check_registration(stack, "e2e-lama", "lama", "P1376", n_trials=2)
    logs = flow_logs(stack, first_runs["lama"])
    assert "trial 0 (1/2)" in logs and "trial 1 (2/2)" in logs and "eval at step 2" in logs, logs[-3000:]  # progress in Prefect's logs

    # The same inputs again: every expensive task is a cache hit; nothing new in MLflow or Optuna.
    rerun = run_deployment(stack, "lama", tiny(stack, "e2e-lama", **LAMA))
    states = task_states(stack, rerun)
    for step in ("search", "final-train", "evaluate", "register"):
        assert states.get(step) == ["Cached"], states
    assert len(client.search_runs([client.get_experiment_by_name("e2e-lama").experiment_id], max_results=200)) == n_runs
    assert client.get_model_version_by_alias(name, "champion").version == version.version
    assert len(client.search_model_versions(f"name='{name}'")) == 1


@pytest.mark.skipif(not SUPERGLUE_READY, reason="dvc.yaml has no prepare_fewglue stage: the superglue deployment cannot prepare its data")
def test_superglue_deployment_end_to_end(stack, first_runs):
    check_registration(stack, "e2e-superglue", "superglue", "cb", n_trials=2)


# --- the flow's plumbing, without servers --------------------------------------------------------------

def test_plan_resolves_params_files_and_overrides(tmp_path):
    from flows.pipeline import REPO as repo, _plan, flow_defaults

    defaults = flow_defaults("lama")
    run, specs = _plan("lama", None, ["tiny-gpt2"], None, None, None, [1, 2], 3, {"train.lr": [1e-5, 2e-5]},
                       {"train.max_steps": 7}, "exp", "sqlite:///mlflow.db", "sqlite:///optuna.db", str(tmp_path), None)
    assert [s["task"] for s in specs] == [str(t) for t in defaults["tasks"]] and run["seeds"] == [1, 2]
    spec = specs[0]
    assert spec["params"]["model"] == "tiny-gpt2" and spec["params"]["train"]["max_steps"] == 7
    assert Path(spec["params"]["data_dir"]).is_absolute() and spec["n_trials"] == 3
    assert spec["search"]["space"] == {"train.lr": [1e-5, 2e-5]}
    assert spec["tracking_uri"] == f"sqlite:///{repo / 'mlflow.db'}"  # relative stores are the repository's
    assert spec["study"].startswith(f"lama-{spec['task']}-tiny-gpt2-ptuning-")
    # Another search space is another study; the same inputs give the same name (the rerun resumes it).
    _, again = _plan("lama", None, ["tiny-gpt2"], None, None, None, [1, 2], 3, {"train.lr": [1e-5, 2e-5]},
                     {"train.max_steps": 7}, "exp", None, None, str(tmp_path), None)
    _, other = _plan("lama", None, ["tiny-gpt2"], None, None, None, [1, 2], 3, {"train.lr": [1e-5]},
                     {"train.max_steps": 7}, "exp", None, None, str(tmp_path), None)
    assert again[0]["study"] == spec["study"] and other[0]["study"] != spec["study"]
    with pytest.raises(ValueError, match="unknown parameter"):
        _plan("lama", None, None, None, None, None, None, None, None, {"no_such_key": 1}, None, None, None, None, None)


def test_unreachable_stores_fail_first_with_a_clear_error(tmp_path):
    from components.mlops.search import StorageUnreachable
    from components.mlops.tracking import TrackingUnreachable
    from flows.pipeline import check_services

    with pytest.raises(TrackingUnreachable, match="127.0.0.1:9"):
        check_services.fn("http://127.0.0.1:9", f"sqlite:///{tmp_path / 'optuna.db'}")
    with pytest.raises(StorageUnreachable, match="does not exist"):
        check_services.fn(f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'missing' / 'optuna.db'}")


def test_run_entry_parses_params_and_sets(tmp_path):
    from flows.run import parse_params

    params = parse_params("lama", ["tasks=[P19, P36]", "n_trials=4", "seeds=[1]"], ["train.max_steps=5"])
    assert params["tasks"] == ["P19", "P36"] and params["n_trials"] == 4 and params["seeds"] == [1]
    assert params["overrides"]["train.max_steps"] == 5 and "train.eval_every" in params["overrides"]  # flow.yaml's kept
    with pytest.raises(ValueError, match="unknown flow parameter"):
        parse_params("lama", ["nope=1"], [])


def test_report_writes_metrics_and_learning_curve(tmp_path):
    from flows.report import report

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "last.pt").write_bytes(b"x")
    (run / "metrics.json").write_text(json.dumps({"p1": 0.5, "dev_score": 0.4, "prompts": {"P19": "/x"}}))
    (run / "history.json").write_text(json.dumps({"P19": [{"step": 2, "epoch": 0, "dev_p1": 0.3},
                                                           {"step": 4, "epoch": 0, "dev_p1": 0.4}]}))
    report(run, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"p1": 0.5, "dev_score": 0.4}
    lines = (tmp_path / "learning_curve.csv").read_text().splitlines()
    assert lines == ["step,epoch,task,dev_p1,dev_score", "2,0,P19,0.3,0.3", "4,0,P19,0.4,0.4"]
    assert not (run / "checkpoint").exists()
