"""Optuna search: the paper's grid, two worker processes sharing one study in PostgreSQL (every grid
point exactly once, and no worker returns while another's trial still runs), pruning through the real
training loop, a dead worker's point taken over, and a clear error for a dead storage."""
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
import sqlalchemy

from components.config import load_params
from components.mlops.search import SKIPPED, PruningCallback, make_sampler, open_study, run_search, summary
from components.mlops.search_space import PAPER_GRID, grid_size, grid_space
from components.mlops.stores import StorageUnreachable
from helpers.search import tiny_train


def test_default_space_is_the_papers_grid(repo_dir):
    assert grid_space({}) == PAPER_GRID
    assert grid_size(grid_space({})) == 6
    from_file = grid_space(load_params("search"))
    assert from_file == {"train.lr": [1e-5, 2e-5, 3e-5], "train.batch_size": [16, 32]}
    assert all(isinstance(v, float) for v in from_file["train.lr"])
    assert grid_space({"space": {"train.lr": ["1e-5", "2e-5"]}}) == {"train.lr": [1e-5, 2e-5]}  # YAML 1.1 strings
    with pytest.raises(ValueError, match="no values"):
        grid_space({"space": {"train.lr": []}})


def test_unknown_sampler_and_pruner_are_named():
    with pytest.raises(ValueError, match="'annealing'"):
        make_sampler("annealing", PAPER_GRID, 0)
    assert isinstance(make_sampler("grid", PAPER_GRID, 0), optuna.samplers.GridSampler)
    assert isinstance(make_sampler("tpe", PAPER_GRID, 0), optuna.samplers.TPESampler)
    assert isinstance(make_sampler("random", PAPER_GRID, 0), optuna.samplers.RandomSampler)
    with pytest.raises(ValueError, match="'oracle'"):
        open_study("s", "sqlite:///:memory:", PAPER_GRID, pruner="oracle")


def test_the_exclusive_grid_marks_trials_as_optunas_grid_sampler_reads_them():
    """ExclusiveGridSampler sets a trial's system attributes through Optuna's private storage API (Study._storage,
    FrozenTrial._trial_id: there is no public one), and GridSampler's sampling reads `grid_id` back: an Optuna that
    changes either fails here. The points go by rank, in one order whatever the seed; a trial past the grid is
    `grid_extra`."""
    space = {"train.lr": [0.1, 0.2], "train.batch_size": [8, 16]}

    def ask(seed: int) -> tuple:
        study = optuna.create_study(direction="maximize", sampler=make_sampler("grid", space, seed=seed))
        trials = [study.ask() for _ in range(5)]
        return study, [(t.suggest_categorical("train.batch_size", [8, 16]), t.suggest_categorical("train.lr", [0.1, 0.2]))
                       for t in trials[:4]]

    study, points = ask(7)
    assert sorted(points) == [(8, 0.1), (8, 0.2), (16, 0.1), (16, 0.2)] and ask(0)[1] == points
    marks = [t.system_attrs for t in study.get_trials(deepcopy=False)]
    assert [m.get("grid_id") for m in marks] == [0, 1, 2, 3, None] and marks[4]["grid_extra"] is True
    assert all(m["search_space"] == {"train.batch_size": [8, 16], "train.lr": [0.1, 0.2]} for m in marks)


def test_unreachable_storage_fails_fast_before_training(monkeypatch):
    """Fast by construction, whatever the machine's speed: one connection attempt, bounded by open_study's check
    timeout, then StorageUnreachable naming the storage; Optuna's storage is never made (nor open_study's retries
    of the study's creation reached)."""
    ran, attempts = [], []
    create_engine = sqlalchemy.create_engine

    def spy_create_engine(url, connect_args, **kwargs):
        attempts.append(connect_args["connect_timeout"])
        return create_engine(url, connect_args=connect_args, **kwargs)

    monkeypatch.setattr(sqlalchemy, "create_engine", spy_create_engine)
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda *a, **k: pytest.fail("Optuna's storage was made"))
    with pytest.raises(StorageUnreachable, match=r"postgresql://127\.0\.0\.1:1/x"):
        study = open_study("never", "postgresql://127.0.0.1:1/x", PAPER_GRID)
        run_search(study, lambda p, cb, t: ran.append(p) or {"dev": {"score": 0.0}})
    check_timeout = inspect.signature(open_study).parameters["check_timeout"].default
    assert len(attempts) == 1 and 0 < attempts[0] <= math.ceil(check_timeout)
    assert ran == []


WORKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    from components.mlops.search import open_study, run_search
    from helpers.search import tiny_train
    storage, study_name, log_path, barrier, me = sys.argv[2:7]
    study = open_study(study_name, storage, {"train.lr": [0.01, 0.03, 0.1], "train.batch_size": [8, 16]},
                       pruner="none", heartbeat=5)
    open(os.path.join(barrier, me), "w").close()
    while len(os.listdir(barrier)) < 2:  # both workers start searching together
        time.sleep(0.05)

    def run_trial(point, callbacks, trial):
        with open(log_path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "trial": trial.number, "lr": point["train.lr"],
                                "batch_size": point["train.batch_size"]}) + "\\n")
        metrics = tiny_train(point, callbacks)
        time.sleep(0.4)  # a trial takes a while, as real ones do
        return metrics

    run_search(study, run_trial)
""")


def test_two_workers_share_one_postgres_study_and_run_every_grid_point_once(pg_database, tmp_path, repo_dir):
    log_path, barrier = tmp_path / "runs.jsonl", tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(repo_dir)}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(repo_dir), pg_database, "grid", str(log_path),
                                 str(barrier), f"w{i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]

    runs = [json.loads(line) for line in log_path.read_text().splitlines()]
    points = sorted((r["lr"], r["batch_size"]) for r in runs)
    assert points == sorted((lr, bs) for lr in (0.01, 0.03, 0.1) for bs in (8, 16)), (runs, outputs)  # each once
    assert len({r["pid"] for r in runs}) == 2, f"both workers should have run trials: {runs}"

    study = optuna.load_study(study_name="grid", storage=pg_database)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 6
    extra = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(SKIPPED in t.user_attrs for t in extra), extra  # only end-of-grid races, never trained
    assert summary(study)["complete"] == 6 and summary(study)["best_params"]["train.lr"] == 0.1
    # Joining the finished study runs nothing more.
    again = open_study("grid", pg_database, {"train.lr": [0.01, 0.03, 0.1], "train.batch_size": [8, 16]})
    run_search(again, lambda *a: pytest.fail("the grid is exhausted"))
    # Another grid under the same name is refused, naming the study.
    with pytest.raises(ValueError, match="'grid'.*another grid"):
        open_study("grid", pg_database, {"train.lr": [0.5]})


def test_a_trial_with_bad_reported_values_is_pruned_through_fit(tmp_path):
    space = {"train.lr": [0.05, 0.1, 1e-9], "train.batch_size": [16]}
    study = open_study("prune", f"sqlite:///{tmp_path / 'optuna.db'}", space, sampler="random", pruner="median",
                       pruner_options={"n_startup_trials": 2, "n_warmup_steps": 0})
    # Two configurations that learn finish first and set the median at every evaluation step; then one
    # that does not learn (lr 1e-9) reports worse values and is pruned at its first evaluation.
    for lr in (0.05, 0.1, 1e-9):
        study.enqueue_trial({"train.lr": lr, "train.batch_size": 16})

    def run_trial(point, callbacks, trial):
        assert any(isinstance(c, PruningCallback) for c in callbacks)
        return tiny_train(point, callbacks)

    run_search(study, run_trial, n_trials=3)
    good, bad = study.trials[:2], study.trials[2]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert all(sorted(t.intermediate_values) == [0, 3, 6, 9, 12] for t in good)  # the start, then every 3 steps
    assert bad.params["train.lr"] == 1e-9
    assert list(bad.intermediate_values) == [0, 3]  # training stopped at its first evaluation after the start
    assert bad.intermediate_values[3] < min(t.intermediate_values[3] for t in good)
    assert summary(study)["pruned"] == 1 and summary(study)["best_params"]["train.lr"] == 0.1


def test_pruning_callback_continues_steps_across_fits_and_picks_the_metric():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    cb = PruningCallback(trial, metric=None)
    cb.on_train_begin({})
    cb.on_evaluate(5, 1, {"dev.p1": 0.2}, True)
    cb.on_evaluate(10, 2, {"dev.p1": 0.3}, True)
    cb.on_train_begin({})  # the next relation's fit starts again at step 0
    cb.on_evaluate(5, 1, {"dev.acc": 0.5, "dev.f1": 0.7}, True)  # no single metric: their mean
    assert cb.reported == [(5, 0.2), (10, 0.3), (15, 0.6)]
    with pytest.raises(KeyError, match="dev.p1"):
        PruningCallback(trial, metric="dev.p1").on_evaluate(1, 0, {"dev.acc": 0.1}, True)


KILLED_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    from components.mlops.search import open_study, run_search
    study = open_study("crash", sys.argv[2], {"train.lr": [0.01, 0.03, 0.1]}, pruner="none", heartbeat=1, grace=2)

    def run_trial(point, callbacks, trial):
        time.sleep(1.5)  # the heartbeat has been recorded
        os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-trial

    run_search(study, run_trial)
""")


@pytest.mark.slow  # a worker process killed mid-trial, its heartbeat's grace waited out in real time
def test_a_killed_workers_grid_point_is_requeued_and_run_by_another(tmp_path, repo_dir):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    dead = subprocess.run([sys.executable, "-c", KILLED_WORKER, str(repo_dir), storage], capture_output=True, text=True,
                          timeout=60)
    assert dead.returncode == -9, dead.stderr[-2000:]
    time.sleep(2.5)  # past the grace period: its trial is stale
    ran = []
    study = open_study("crash", storage, {"train.lr": [0.01, 0.03, 0.1]}, pruner="none", heartbeat=1, grace=2)
    run_search(study, lambda p, cb, t: ran.append(p["train.lr"]) or {"dev": {"score": p["train.lr"]}})
    assert sorted(ran) == [0.01, 0.03, 0.1]  # the dead worker's point ran again, the others once
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 3
    retried = [t for t in study.trials if "retry_of" in t.user_attrs]
    assert len(retried) == 1 and retried[0].user_attrs["retry_of"] == 0
    assert retried[0].params == study.trials[0].params


def test_the_value_is_the_flattened_metric_and_a_missing_one_is_named(tmp_path):
    study = open_study("values", f"sqlite:///{tmp_path / 'optuna.db'}", {"train.lr": [0.1, 0.2]}, pruner="none")
    run_search(study, lambda p, cb, t: {"dev": {"score": p["train.lr"] * 2, "p1": 0.5}, "task": "P19"})
    assert sorted(t.value for t in study.trials) == [0.2, 0.4]
    assert study.trials[0].user_attrs == {"dev.score": study.trials[0].value, "dev.p1": 0.5}  # numeric ones only
    other = open_study("missing", f"sqlite:///{tmp_path / 'optuna.db'}", {"train.lr": [0.1]}, pruner="none")
    with pytest.raises(KeyError, match=r"no numeric 'dev.score'.*\['dev.acc'\]"):
        run_search(other, lambda p, cb, t: {"dev": {"acc": 0.3}})


PACED_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    from components.mlops.search import open_study, run_search, summary
    storage, events, role = sys.argv[2:5]
    study = open_study("paced", storage, {"train.lr": [0.01, 0.02]}, pruner="none", heartbeat=1, grace=2)

    def note(what, **more):
        with open(events, "a") as f:
            f.write(json.dumps({"role": role, "what": what, **more}) + "\\n")

    def noted(who, what):
        return any(json.loads(line)["role"] == who and json.loads(line)["what"] == what for line in open(events))

    def started(who):
        return noted(who, "trial")

    def run_trial(point, callbacks, trial):
        note("trial", lr=point["train.lr"], number=trial.number)
        if role == "fast":
            while not started("slow") and not started("doomed"):  # the other worker holds the other point
                time.sleep(0.05)
        elif role == "slow":
            while not noted("fast", "trial-end"):  # the fast worker is out of points ...
                time.sleep(0.05)
            time.sleep(1.5)  # ... and this trial still runs: time enough for a fast worker that would not wait to return
        elif role == "doomed":
            time.sleep(1.5)  # its heartbeat is recorded
            os.kill(os.getpid(), signal.SIGKILL)
        note("trial-end", lr=point["train.lr"])
        return {"dev": {"score": point["train.lr"]}}

    if role != "fast":  # the fast worker asks first and takes trial 0
        while not started("fast"):
            time.sleep(0.05)
    run_search(study, run_trial, poll=0.2)
    note("returned", summary=summary(study))
""")


def _paced_workers(storage: str, events, roles: tuple[str, ...], repo_dir) -> dict:
    events.write_text("")
    workers = {role: subprocess.Popen([sys.executable, "-c", PACED_WORKER, str(repo_dir), storage, str(events), role],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for role in roles}
    outputs = {role: w.communicate(timeout=120)[0] for role, w in workers.items()}
    return {role: (workers[role].returncode, outputs[role]) for role in roles}


def test_a_worker_out_of_points_returns_only_after_the_other_workers_trial_finished(pg_database, tmp_path, repo_dir):
    events = tmp_path / "events.jsonl"
    done = _paced_workers(pg_database, events, ("fast", "slow"), repo_dir)
    assert all(rc == 0 for rc, _ in done.values()), done
    log = [json.loads(line) for line in events.read_text().splitlines()]
    at = {(e["role"], e["what"]): i for i, e in enumerate(log)}  # the order of events (appends to one file)
    assert {e["lr"] for e in log if e["what"] == "trial"} == {0.01, 0.02}  # one point each
    # The fast worker ran out of grid points while the slow one's trial ran: it waited for it to end.
    assert at["slow", "trial"] < at["fast", "trial-end"] < at["slow", "trial-end"] < at["fast", "returned"]
    seen_by_fast = log[at["fast", "returned"]]["summary"]
    assert seen_by_fast["complete"] == 2 and seen_by_fast["running"] == 0
    assert seen_by_fast["best_params"] == {"train.lr": 0.02}  # the slow worker's point, the better one


@pytest.mark.slow  # a worker process killed mid-trial, its heartbeat's grace waited out in real time
def test_a_waiting_worker_takes_over_the_point_of_a_worker_that_died(tmp_path, repo_dir):
    events = tmp_path / "events.jsonl"
    done = _paced_workers(f"sqlite:///{tmp_path / 'optuna.db'}", events, ("fast", "doomed"), repo_dir)
    assert done["doomed"][0] == -9 and done["fast"][0] == 0, done
    log = [json.loads(line) for line in events.read_text().splitlines()]
    doomed_lr = next(e["lr"] for e in log if e["role"] == "doomed" and e["what"] == "trial")
    fast_runs = [e["lr"] for e in log if e["role"] == "fast" and e["what"] == "trial-end"]
    assert sorted(fast_runs) == [0.01, 0.02] and doomed_lr in fast_runs  # its own point, then the dead one's
    summary_seen = next(e["summary"] for e in log if e["what"] == "returned")
    assert summary_seen["complete"] == 2 and summary_seen["fail"] == 1 and summary_seen["running"] == 0
