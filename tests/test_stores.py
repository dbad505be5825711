"""The store URLs the README offers work end to end on the local PostgreSQL (issue 9: `postgresql://` passed
the reachability check, then MLflow failed with `ModuleNotFoundError: psycopg`): an MLflow run logged and
read back, an Optuna study stored and loaded, each in a fresh database (tests/test_search.py's fixture)."""
import json
import os
import subprocess
import sys
import textwrap

import optuna

from components.mlops.search import open_study, run_search, summary
from components.mlops.stores import check_database


def test_mlflow_logs_and_reads_back_a_run_in_postgresql(pg_database, tmp_path):
    check_database(pg_database, timeout=5)
    # A fresh process with only the environment variable, as a user sets it; MLflow migrates the new database.
    script = textwrap.dedent("""
        import json, mlflow
        from components.mlops.stores import check_reachable
        check_reachable(mlflow.get_tracking_uri())
        experiment = mlflow.create_experiment("stores", artifact_location=%r)
        with mlflow.start_run(experiment_id=experiment, run_name="pg") as run:
            mlflow.log_param("train.lr", 1e-5)
            mlflow.log_metric("dev.p1", 0.25, step=3)
        found = mlflow.MlflowClient().get_run(run.info.run_id)
        print(json.dumps({"params": found.data.params, "metrics": found.data.metrics, "status": found.info.status}))
    """ % str(tmp_path / "artifacts"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "MLFLOW_TRACKING_URI": pg_database})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"params": {"train.lr": "1e-05"},
                                                                "metrics": {"dev.p1": 0.25}, "status": "FINISHED"}


def test_optuna_stores_and_loads_a_study_in_postgresql(pg_database):
    study = open_study("stores", pg_database, {"train.lr": [1e-5, 2e-5]}, pruner="none")
    scores = {1e-5: 0.1, 2e-5: 0.2}
    run_search(study, lambda point, callbacks, trial: {"dev": {"score": scores[point["train.lr"]]}})
    loaded = optuna.load_study(study_name="stores", storage=pg_database)
    assert sorted((t.params["train.lr"], t.value) for t in loaded.trials) == [(1e-5, 0.1), (2e-5, 0.2)]
    assert summary(loaded)["best_params"] == {"train.lr": 2e-5}
