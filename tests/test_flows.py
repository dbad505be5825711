"""End to end: a Prefect server and an MLflow server on 127.0.0.1, the deployments served by
`python -m flows.serve`, and `prefect deployment run ptuning/lama` (then ptuning/superglue) with a tiny model
and a 2 x 1 grid. Asserts the registered model version with alias `champion` and its artifacts, the nested
trial runs under the parent run, the Optuna study's trials, and that a second run with the same inputs
reuses the finished work (read back from fingerprinted run directories: no new MLflow runs, no new model
version). A run with a bad input fails before any side effect."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.config import load_params
from helpers.prefect import flow_logs
from services import REPO, start, stop, wait_http

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stack(prefect_server, mlflow_server, tmp_path_factory, shared_dir):
    """`python -m flows.serve` against the session's Prefect and MLflow servers, state under a tmp dir."""
    tmp = tmp_path_factory.mktemp("flows")
    env = {**prefect_server.env, "PTUNING_DATA_MIRROR": str(shared_dir / "data"),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}  # the served runner picks a new flow run up within a second
    serve = start([sys.executable, "-m", "flows.serve"], env, tmp / "serve.log")
    try:
        for name in ("ptuning/lama", "ptuning/superglue", "ptuning-report/lama", "ptuning-report/superglue"):
            wait_http(f"{prefect_server.uri}/deployments/name/{name}", serve, tmp / "serve.log")
        yield {"tmp": tmp, "env": env, "api": prefect_server.uri, "mlflow": mlflow_server.uri}
    finally:
        stop(serve)
        log = tmp / "serve.log"
        if log.exists():  # the flow runs' logs, for a failed test's report
            print(log.read_text()[-6000:])


def start_deployment(stack: dict, name: str, params: dict, timeout: int = 300, flow: str = "ptuning") -> dict:
    """Start `prefect deployment run FLOW/NAME -p k=v ... --watch` (it returns when the flow run ends)."""
    args = [str(BIN / "prefect"), "deployment", "run", f"{flow}/{name}", "--watch", "--watch-timeout", str(timeout)]
    for key, value in params.items():
        args += ["-p", f"{key}={json.dumps(value)}"]
    log = stack["tmp"] / f"run-{name}-{time.time_ns()}.log"  # two runs of one deployment may start in one second
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


def tiny(stack: dict, experiment: str, overrides: dict, **extra) -> dict:
    tmp = stack["tmp"]
    return {"models": ["tiny-gpt2"], "methods": ["ptuning"], "seeds": [34],
            "overrides": {"search.n_trials": 2, "search.space": {"train.lr": [1.0e-5, 3.0e-5], "train.batch_size": [8]},
                          "tracking.uri": stack["mlflow"], "tracking.experiment": experiment,
                          "search.storage": f"sqlite:///{tmp / 'optuna.db'}", "flow.outputs_dir": str(tmp / "outputs"),
                          **overrides}, **extra}


def check_registration(stack: dict, experiment: str, benchmark: str, task: str, variant: str, n_trials: int) -> tuple:
    import mlflow
    import optuna
    from mlflow import MlflowClient

    from components.mlops.champion import registered_name

    mlflow.set_tracking_uri(stack["mlflow"])  # models:/ URIs resolve through the global registry URI
    mlflow.set_registry_uri(stack["mlflow"])
    client = MlflowClient(tracking_uri=stack["mlflow"], registry_uri=stack["mlflow"])
    name = registered_name(benchmark, task, "tiny-gpt2", variant)
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
    assert all("best.dev.score" in r.data.metrics for r in trial_runs + final_runs)  # the kept state's
    assert all(not any(k in r.data.metrics for k in ("acc", "p1", "score", "dev_score")) for r in runs)  # splits named
    assert version.run_id in {r.info.run_id for r in runs}
    # trained by: the deployment run that trains this combination again, its parameters resolved
    command = version.tags["command"]
    assert command.startswith(f"prefect deployment run ptuning/{benchmark} -p ") and f'tasks=["{task}"]' in command, command

    # The study: both grid points, complete.
    storage = f"sqlite:///{stack['tmp'] / 'optuna.db'}"
    names = [s for s in optuna.get_all_study_names(storage) if s.startswith(f"{benchmark}-{task}-")]
    assert len(names) == 1, names
    study = optuna.load_study(study_name=names[0], storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == n_trials and {t.params["train.lr"] for t in complete} == {1.0e-5, 3.0e-5}
    return client, name, version, len(runs)


LAMA = {"tasks": ["P1376"], "overrides": {"train.max_steps": 2, "train.eval_every": 2}}
SUPERGLUE = {"tasks": ["cb"], "seeds": [42], "overrides": {"setting": "fewshot", "train.max_steps": 2,
                                                           "train.eval_every": 2, "max_eval_examples": 16, "freeze_lm": True}}


@pytest.fixture(scope="module")
def first_runs(stack):
    """The first runs of the deployments, all at once (LAMA; SuperGLUE's CB, its COPA, the flow's default task, and
    its WSC, whose prompt no served model answers for): flow-run subprocesses of the served process (their
    `dvc repro` calls queue on DVC's repository lock)."""
    handles = {"lama": start_deployment(stack, "lama", tiny(stack, "e2e-lama", **LAMA)),
               "superglue": start_deployment(stack, "superglue", tiny(stack, "e2e-superglue", **SUPERGLUE)),
               "copa": start_deployment(stack, "superglue", tiny(stack, "e2e-copa", **{**SUPERGLUE, "tasks": ["copa"]})),
               "wsc": start_deployment(stack, "superglue", tiny(stack, "e2e-wsc", tasks=["wsc"], seeds=[42], overrides={
                   **SUPERGLUE["overrides"], "search.n_trials": 1}))}  # one trial: its path is registration's
    for handle in handles.values():  # wait for all before judging any
        handle["process"].wait(timeout=handle["timeout"] + 60)
    return {key: finish_deployment(stack, handle) for key, handle in handles.items()}


def test_lama_deployment_end_to_end_and_rerun_reuses(stack, first_runs):
    client, name, version, n_runs = check_registration(stack, "e2e-lama", "lama", "P1376", "29k", n_trials=2)
    assert version.aliases == ["champion"] and version.tags["selection_key"] == "dev.score" and "test.p1" in version.tags
    logs = flow_logs(stack, first_runs["lama"])
    assert "trial 0 (1/2)" in logs and "trial 1 (2/2)" in logs and "eval at step 2" in logs, logs[-3000:]  # progress in Prefect's logs

    # The same inputs again: the finished runs are read back; nothing new in MLflow or Optuna.
    rerun = run_deployment(stack, "lama", tiny(stack, "e2e-lama", **LAMA))
    assert "finished earlier" in flow_logs(stack, rerun)
    assert len(client.search_runs([client.get_experiment_by_name("e2e-lama").experiment_id], max_results=200)) == n_runs
    assert client.get_model_version_by_alias(name, "champion").version == version.version
    assert len(client.search_model_versions(f"name='{name}'")) == 1


def test_report_deployment_writes_the_table_and_logs_it(stack, first_runs):
    """`prefect deployment run ptuning-report/lama`: the table's files, and an MLflow run holding them."""
    from mlflow import MlflowClient

    out = stack["tmp"] / "report"
    handle = start_deployment(stack, "lama", {
        "model": "tiny-gpt2", "tasks": ["P1376"], "methods": ["manual", "ptuning"],  # seeds: params/report.yaml's
        "output_dir": str(out), "overrides": {"train.max_steps": 2, "train.eval_every": 2,
                                              "tracking.uri": stack["mlflow"], "tracking.experiment": "e2e-report"}},
        flow="ptuning-report")
    finish_deployment(stack, handle)
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"manual", "ptuning"} and "P1376" in results["methods"]["ptuning"]["relations"]
    assert (out / "REPORT.md").read_text().startswith("#") and (out / "relations.png").exists()
    client = MlflowClient(stack["mlflow"])
    [run] = client.search_runs([client.get_experiment_by_name("e2e-report").experiment_id])
    assert "ptuning.macro_test_p1" in run.data.metrics
    # the run records the seeds the table was resolved to, not the flow's null parameter
    assert results["seeds"] == load_params("report", REPO)["lama"]["seeds"]
    assert run.data.params["seeds"] == str(results["seeds"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/REPORT.md", "report/results.json"}


def test_superglue_report_deployment_writes_the_fewshot_table(stack, first_runs):
    """`prefect deployment run ptuning-report/superglue`: the same flow, the other table."""
    from mlflow import MlflowClient

    out = stack["tmp"] / "report-superglue"
    handle = start_deployment(stack, "superglue", {
        "model": "tiny-gpt2", "tasks": ["cb"], "methods": ["manual-zeroshot", "ptuning"], "seeds": [42],
        "output_dir": str(out), "overrides": {"setting": "fewshot", "train.max_steps": 2, "train.eval_every": 2,
                                              "max_eval_examples": 8, "tracking.uri": stack["mlflow"],
                                              "tracking.experiment": "e2e-report-superglue"}},
        flow="ptuning-report")
    finish_deployment(stack, handle)
    results = json.loads((out / "results.json").read_text())
    assert results["setting"] == "fewshot" and set(results["methods"]["ptuning"]["tasks"]) == {"cb"}
    client = MlflowClient(stack["mlflow"])
    [run] = client.search_runs([client.get_experiment_by_name("e2e-report-superglue").experiment_id])
    assert run.data.metrics["ptuning.macro_val_score"] == pytest.approx(results["methods"]["ptuning"]["macro_val_score"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert logged >= {"report/REPORT.md", "report/tasks.png", "report/units"}
    assert (out / ".scratch").is_dir() and not [p for p in logged if p.startswith("report/.")]  # nor lock, nor scratch


def test_a_bad_task_fails_before_dvc_optuna_or_mlflow(stack, first_runs):
    """Unknown task: the flow run fails in its plan, before `dvc repro`, any Optuna study or any MLflow run."""
    import optuna
    from mlflow import MlflowClient

    storage = f"sqlite:///{stack['tmp'] / 'bad-optuna.db'}"
    handle = start_deployment(stack, "lama", tiny(stack, "e2e-bad", {"search.storage": storage}, tasks=["P999"]))
    handle["process"].wait(timeout=handle["timeout"])
    output = handle["log"].read_text()
    assert "Completed" not in output and handle["process"].returncode != 0, output[-2000:]
    logs = flow_logs(stack, re.search(r"UUID: ([0-9a-f-]{36})", output).group(1))
    assert "unknown LAMA relation(s) ['P999']" in logs and "dvc repro" not in logs, logs[-3000:]
    assert not (stack["tmp"] / "bad-optuna.db").exists() or optuna.get_all_study_names(storage) == []
    assert MlflowClient(stack["mlflow"]).get_experiment_by_name("e2e-bad") is None


def test_superglue_deployment_end_to_end(stack, first_runs):
    client, *_ = check_registration(stack, "e2e-superglue", "superglue", "cb", "fewshot", n_trials=2)
    # the zero-shot manual prompt on the same task: logged on the parent run, and the gain said in the flow's log
    exp = client.get_experiment_by_name("e2e-superglue")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if "final.val.score.mean" in r.data.metrics)
    zero_shot, trained = parent.data.metrics["baseline.manual-zeroshot.val.score"], parent.data.metrics["final.val.score.mean"]
    said = re.search(r"val.score ([0-9.]+), (beats|does not beat) the zero-shot manual prompt "
                     r"\(manual-zeroshot ([0-9.]+)\) by ([0-9.]+)", flow_logs(stack, first_runs["superglue"]))
    assert said, flow_logs(stack, first_runs["superglue"])[-3000:]
    assert float(said.group(3)) == pytest.approx(zero_shot, abs=1e-4) and float(said.group(1)) == pytest.approx(trained, abs=1e-4)
    assert (said.group(2) == "beats") == (trained > zero_shot)
    assert float(said.group(4)) == pytest.approx(abs(trained - zero_shot), abs=1e-4)


def test_the_default_task_copa_registers_a_prompt_that_answers_over_http(stack, first_runs, tmp_path):
    """The flow's default task answers by scoring its two choices: its prompt is registered, and `mlflow models
    serve` of the champion answers a COPA row with the label of the likelier choice, as the model loaded in
    process does."""
    import httpx
    import mlflow

    from services import free_port, service_env

    _, name, version, _ = check_registration(stack, "e2e-copa", "superglue", "copa", "fewshot", n_trials=2)
    row = {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
           "choice2": "He got a hole in his sock.", "question": "cause"}
    in_process = [dict(a) for a in mlflow.pyfunc.load_model(f"models:/{name}@champion").predict([row], params={"top_k": 2})]
    port = free_port()
    server = start([BIN / "mlflow", "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
                    "-p", port, "-h", "127.0.0.1"], service_env(MLFLOW_TRACKING_URI=stack["mlflow"],
                                                               MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"),
                   tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}/invocations"
        wait_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log", timeout=180)
        answer = httpx.post(url, json={"inputs": [row], "params": {"top_k": 2}}, timeout=120)
        assert answer.status_code == 200, answer.text[:2000]
        assert answer.json()["predictions"] == in_process and in_process[0]["prediction"] in ("0", "1")
        wrong = httpx.post(url, json={"inputs": [{**row, "question": "why"}]}, timeout=60)
        assert wrong.status_code == 400 and "question 'why' names none of the patterns" in wrong.json()["message"]
    finally:
        stop(server)


def test_a_prompt_no_model_can_serve_is_kept_as_artifacts_and_the_flow_completes(stack, first_runs):
    """WSC answers by generating the referent span, which no registered model serves: the flow (which once failed
    there, after all its training) completes, says why nothing was registered, and keeps the prompt on its final run."""
    from mlflow import MlflowClient

    from components.mlops.champion import registered_name

    logs = flow_logs(stack, first_runs["wsc"])
    said = re.search(r"wsc not registered, no registered model can serve it \([^)]*wsc prompts are not servable: "
                     r"it answers by generating the referent span[^)]*\); "
                     r"its files are the artifacts prompt/wsc of run ([0-9a-f]{32})", logs)
    assert said, logs[-3000:]
    client = MlflowClient(tracking_uri=stack["mlflow"], registry_uri=stack["mlflow"])
    assert client.search_registered_models(f"name = '{registered_name('superglue', 'wsc', 'tiny-gpt2', 'fewshot')}'") == []
    run = client.get_run(said.group(1))
    assert run.info.run_name.startswith("final-") and run.info.experiment_id == client.get_experiment_by_name("e2e-wsc").experiment_id
    kept = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "prompt/wsc")}
    assert {"prompt.safetensors", "encoder.safetensors", "prompt.json"} <= kept, kept


# --- the flow's plumbing, without servers --------------------------------------------------------------

def test_plan_resolves_params_files_and_overrides(tmp_path, repo_dir):
    from components.config import load_params
    from flows.plan import plan

    flow_file = load_params("flow")
    run = plan("lama", models=["tiny-gpt2"], seeds=[1, 2],
               overrides={"train.max_steps": 7, "search.n_trials": 3, "search.space": {"train.lr": [1e-5, 2e-5]},
                          "flow.outputs_dir": str(tmp_path), "tracking.experiment": "exp"})
    assert [c["task"] for c in run.combos] == [str(t) for t in flow_file["lama"]["tasks"]] and run.seeds == [1, 2]
    combo = run.combos[0]
    assert combo["overrides"]["model"] == "tiny-gpt2" and combo["overrides"]["train.max_steps"] == 7
    assert run.search["n_trials"] == 3 and run.search["space"] == {"train.lr": [1e-5, 2e-5]}
    assert run.tracking["experiment"] == "exp" and run.outputs_dir == tmp_path
    study, _ = run.study(combo)
    assert study.startswith(f"lama-{combo['task']}-tiny-gpt2-ptuning-")
    # Another search space is another study; the same inputs give the same name (the rerun resumes it).
    again = plan("lama", models=["tiny-gpt2"], seeds=[1, 2], overrides={"train.max_steps": 7, "search.n_trials": 3,
                                                                         "search.space": {"train.lr": [1e-5, 2e-5]}})
    other = plan("lama", models=["tiny-gpt2"], seeds=[1, 2], overrides={"train.max_steps": 7, "search.n_trials": 3,
                                                                         "search.space": {"train.lr": [1e-5]}})
    assert again.study(again.combos[0])[0] == study and other.study(other.combos[0])[0] != study


def test_relative_sqlite_stores_are_the_checkouts(monkeypatch, repo_dir):
    from flows.plan import plan

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    run = plan("lama", models=["tiny-gpt2"])
    assert run.tracking_uri == f"sqlite:///{repo_dir / 'mlflow.db'}" and run.storage == f"sqlite:///{repo_dir / 'optuna.db'}"
    monkeypatch.setenv("OPTUNA_STORAGE", "sqlite:////elsewhere/o.db")
    assert plan("lama", models=["tiny-gpt2"]).storage == "sqlite:////elsewhere/o.db"  # the environment beats the file
    explicit = plan("lama", models=["tiny-gpt2"], overrides={"search.storage": "sqlite:////x/y.db"})
    assert explicit.storage == "sqlite:////x/y.db"  # an explicit override beats the environment


def test_the_recorded_command_trains_the_same_combination_again():
    """A registered version's `command` is a command, not `prefect flow ptuning: ... tasks=None ...`: read back, it
    resolves to the same combination, seeds, search and overrides (params/flow.yaml's included)."""
    import shlex

    from flows.plan import plan
    from flows.retrain import retrain_command
    from flows.run import flow_arguments, parser

    run = plan("lama", tasks=["P19", "P36"], models=["tiny-gpt2"], seeds=[1, 2],
               overrides={"train.lr": 1e-3, "template": "[P*2] {sub} [P] [Y]", "search.n_trials": None,
                          "search.space": {"train.lr": [1e-5, 3e-4]}})
    combo = run.combos[1]
    assert run.overrides["train.max_steps"] == load_params("flow")["lama"]["overrides"]["train.max_steps"]  # flow.yaml's
    command = retrain_command(run.benchmark, combo, run.seeds, run.overrides)
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "flows.run", "lama"] and "None" not in command, command
    args = parser().parse_args(argv[3:])
    again = plan(**flow_arguments(args.benchmark, args.param, args.set))
    assert again.combos == [combo] and again.seeds == [1, 2] and again.overrides == run.overrides
    assert again.search == run.search and again.search["n_trials"] is None
    # the run of a served deployment records the deployment run, with the same parameters (-p name=JSON)
    deployed = shlex.split(retrain_command(run.benchmark, combo, run.seeds, run.overrides, deployment="lama"))
    assert deployed[:4] == ["prefect", "deployment", "run", "ptuning/lama"] and set(deployed[4::2]) == {"-p"}
    parameters = {name: json.loads(value) for name, value in (item.split("=", 1) for item in deployed[5::2])}
    assert parameters["tasks"] == ["P36"] and parameters["seeds"] == [1, 2]
    again = plan("lama", **parameters)
    assert again.combos == [combo] and again.search == run.search


def test_null_means_the_whole_grid():
    """`--set search.n_trials=null` runs the whole grid, as the comment in params/search.yaml says (it once ran
    params/flow.yaml's 2 trials)."""
    from flows.plan import plan
    from flows.run import flow_arguments

    arguments = flow_arguments("lama", ["models=[tiny-gpt2]"], ["search.n_trials=null"])
    assert arguments["overrides"] == {"search.n_trials": None}
    assert plan(**arguments).search["n_trials"] is None
    assert plan("lama", models=["tiny-gpt2"]).search["n_trials"] == 2  # params/flow.yaml's main job


@pytest.mark.parametrize("arguments, message", [
    ({"tasks": ["P999"]}, "unknown LAMA relation"),
    ({"models": ["no-such-model"]}, "no-such-model"),
    ({"methods": ["zero-shot"]}, "unknown LAMA method"),
    ({"overrides": {"train.lr": -1.0}}, "invalid training settings"),
    ({"overrides": {"search.space": {"train.lrr": [1e-5]}}}, "unknown parameter 'train.lrr'"),
    ({"overrides": {"search.space": {"train.lr": [1e-5, -1.0]}}}, "invalid training settings"),
    ({"overrides": {"search.sampler": "annealing"}}, "unknown sampler"),
    ({"overrides": {"search.n_trials": 0}}, "search.n_trials"),
    ({"overrides": {"search.nope": 1}}, "unknown parameter 'search.nope'"),
    ({"seeds": []}, "must not be empty"),
])
def test_bad_flow_input_fails_in_the_plan(arguments, message):
    from flows.plan import plan

    with pytest.raises(ValueError, match=re.escape(message)):
        plan("lama", **arguments)


@pytest.mark.parametrize("given, message", [
    (["--param", "tasks=[P999]"], "unknown LAMA relation(s) ['P999']"),
    (["--param", "n_trials=3"], "unknown flow parameter(s) ['n_trials']"),
    (["--set", "tracking.uri=http://127.0.0.1:9"], "MLflow tracking store http://127.0.0.1:9 is unreachable"),
    (["--set", "search.storage=postgresql://nobody@127.0.0.1:1/x"],
     "Optuna storage postgresql://nobody@127.0.0.1:1/x is unreachable"),
])
def test_the_flow_entry_refuses_bad_input_or_a_dead_store_in_one_line_before_any_side_effect(
        tmp_path, capfd, given, message):
    """flows.run's main (in this process: the test below runs the command itself): a bad input or a store that does
    not answer is one line, exit 2, before Prefect starts (it was three tracebacks, 120 lines, exit 1), and nothing
    is written (neither store, a new SQLite file, is created; no output folder)."""
    from flows.run import main

    capfd.readouterr()
    code = main(["lama", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                 "--set", f"search.storage=sqlite:///{tmp_path / 'o.db'}", "--set", f"flow.outputs_dir={tmp_path / 'out'}",
                 *given])
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"flows.run: error: {message}"), err[-3000:]
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.slow  # the command in a process of its own; its logic is the fast test's above
def test_python_m_flows_run_with_a_dead_store_prints_one_line_and_writes_nothing(tmp_path, repo_dir):
    """The command itself, in a process of its own: nothing else reaches stderr on the way (imports, Prefect)."""
    done = subprocess.run([sys.executable, "-m", "flows.run", "lama",
                           "--set", "tracking.uri=http://127.0.0.1:9",
                           "--set", f"search.storage=sqlite:///{tmp_path / 'o.db'}",
                           "--set", f"flow.outputs_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, cwd=repo_dir, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("flows.run: error: MLflow tracking store http://127.0.0.1:9 is unreachable")
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


def test_unreachable_stores_fail_first_with_a_clear_error(tmp_path):
    from components.mlops.stores import StorageUnreachable, TrackingUnreachable
    from flows.tasks import check_services

    with pytest.raises(TrackingUnreachable, match="127.0.0.1:9"):
        check_services.fn("http://127.0.0.1:9", f"sqlite:///{tmp_path / 'optuna.db'}")
    with pytest.raises(StorageUnreachable, match="does not exist"):
        check_services.fn(f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'missing' / 'optuna.db'}")


def test_report_writes_metrics_and_learning_curve(tmp_path):
    from flows.dvc_metrics import report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"test": {"p1": 0.5}, "dev": {"score": 0.4}, "prompts": {"P19": "/x"}}))
    (run / "history.json").write_text(json.dumps({"P19": [{"step": 2, "epoch": 0, "dev.p1": 0.3},
                                                           {"step": 4, "epoch": 0, "dev.p1": 0.4}]}))
    report(run, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"test": {"p1": 0.5}, "dev": {"score": 0.4}}
    lines = (tmp_path / "learning_curve.csv").read_text().splitlines()
    assert lines == ["step,epoch,task,dev.p1,dev_score", "2,0,P19,0.3,0.3", "4,0,P19,0.4,0.4"]
