"""The README's "Workers on other machines", run as written: its commands are read from the README's code
block, the placeholders replaced by the session's Prefect server, MLflow server and a fresh PostgreSQL
database. `python -m flows.deploy` once, two `prefect worker start` processes (two "machines": each its own
working directory and PREFECT_HOME, neither in the checkout) and both `prefect deployment run`s at once. A process
worker starts a flow run in a temporary directory: the run finds the checkout only through the pull step that
flows.deploy recorded. Each run completes on its own worker and registers its prompt in the shared MLflow."""
import re
import shlex
import subprocess
import time

import pytest

from services import REPO, service_env, start, stop
from helpers.prefect import flow_logs

pytestmark = pytest.mark.slow  # two flow runs through two workers: the full tier (make test)


def readme_commands() -> list[str]:
    """The lines of the bash block under the README's "### Workers on other machines"."""
    section = (REPO / "README.md").read_text().split("### Workers on other machines\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_workers_on_other_machines(prefect_server, mlflow_server, pg_database, tmp_path):
    from mlflow import MlflowClient

    places = {"http://<server>:4200/api": prefect_server.uri, "http://<mlflow>:5000": mlflow_server.uri,
              "postgresql://<user>@<db>:5432/<optuna>": pg_database}
    commands = readme_commands()
    text = "\n".join(commands)
    assert all(place in text for place in places), text
    for place, value in places.items():
        text = text.replace(place, value)
    assert not re.search(r"<[a-z]+>", text), text
    commands = text.splitlines()
    exports = [c for c in commands if c.startswith("export ")]
    deploy = [c for c in commands if c.startswith("python -m flows.deploy")]
    worker = [c for c in commands if c.startswith("prefect worker start")]
    runs = [c for c in commands if c.startswith("prefect deployment run")]
    assert len(exports) + len(deploy) + len(worker) + len(runs) == len(commands) and len(deploy) == len(worker) == 1
    assert len(runs) == 2, runs

    env = service_env()  # no PREFECT_API_URL / MLFLOW_TRACKING_URI of the caller's: only what the commands set
    for line in exports:
        key, value = shlex.split(line)[1].split("=", 1)
        env[key] = value

    # once, in the checkout
    done = subprocess.run(shlex.split(deploy[0]), cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    machines, workers = [], []
    try:
        for i in range(2):  # a machine: its own directory and Prefect home; workers poll every second
            machine = tmp_path / f"machine-{i}"
            (machine / "home").mkdir(parents=True)
            machines.append(machine)
            workers.append(start(shlex.split(worker[0]), {**env, "PREFECT_HOME": str(machine / "home"),
                                                          "PREFECT_WORKER_QUERY_SECONDS": "1"},
                                 machine / "worker.log", cwd=machine))
        started = time.time()
        handles = []
        for i, line in enumerate(runs):  # from any shell: both at once
            log = tmp_path / f"run-{i}.log"
            handles.append((subprocess.Popen(shlex.split(line), cwd=tmp_path, env=env, stdout=log.open("w"),
                                             stderr=subprocess.STDOUT), log))
        for process, _ in handles:
            try:
                process.wait(timeout=max(1, 480 - (time.time() - started)))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        print(f"both flow runs: {time.time() - started:.0f}s")
        worker_logs = [(m / "worker.log").read_text() for m in machines]
        ids = []
        for (process, log), line in zip(handles, runs):
            output = log.read_text()
            assert process.returncode == 0 and "Completed" in output, (
                f"{line}\n{output[-3000:]}\n--- workers ---\n" + "\n---\n".join(w[-6000:] for w in worker_logs))
            ids.append(re.search(r"UUID: ([0-9a-f-]{36})", output).group(1))
    finally:
        for process in workers:
            stop(process)

    # each run on a worker of its own (--limit 1), working in the checkout the deployment recorded
    worker_logs = [(m / "worker.log").read_text() for m in machines]
    ran = [set(re.findall(r"/flow-run/([0-9a-f-]{36})", w)) for w in worker_logs]  # the run's output, in its worker's log
    assert sorted(map(len, ran)) == [1, 1] and set().union(*ran) == set(ids), ran
    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    for flow_run_id, line in zip(ids, runs):
        task = re.search(r"tasks='\[\"(P\d+)\"\]'", line).group(1)
        logs = flow_logs({"api": prefect_server.uri}, flow_run_id)
        assert f"(in {REPO})" in logs, logs[-3000:]  # `dvc repro` ran in the checkout
        name = f"ptuning-lama-{task}-29k-tiny-gpt2"
        registered = re.search(rf"registered {name} version (\d+)", logs)
        assert registered, logs[-3000:]
        version = client.get_model_version(name, registered.group(1))
        assert version.status == "READY" and version.tags["task"] == task
        assert client.get_run(version.run_id).info.experiment_id == client.get_experiment_by_name("ptuning").experiment_id
    import optuna  # both studies in the database every worker shares

    studies = optuna.get_all_study_names(pg_database)
    assert sorted(s.split("-")[1] for s in studies) == sorted(re.findall(r"tasks='\[\"(P\d+)\"\]'", "\n".join(runs))), studies
