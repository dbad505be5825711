"""Register the deployments `ptuning/lama`, `ptuning/superglue`, `ptuning-report/lama` and `ptuning-report/superglue` with a work pool, for workers (on this or
other machines) to run: the alternative to `python -m flows.serve`, which needs neither pool nor worker.

    export PREFECT_API_URL=http://<prefect-server>:4200/api       # the Prefect server everyone shares
    python -m flows.deploy --pool ptuning --env MLFLOW_TRACKING_URI=http://<mlflow>:5000 \
        --env OPTUNA_STORAGE=postgresql://<user>@<db>:5432/<optuna>   # once, in a checkout
    prefect worker start --pool ptuning --limit 1                  # on each machine that trains
    prefect deployment run ptuning/lama -p tasks='["P19"]' --watch

Each deployment records the checkout this command runs in (or --root) as its pull step
(`prefect.deployments.steps.set_working_directory`): a worker's flow run, which a process worker starts in a
temporary directory, changes into that checkout before it imports the flow (`flows.pipeline`, `flows.paper_tables`),
and works there (params/, dvc.yaml, data/, outputs/). Every machine that runs a worker needs the project checked out
at that path with its environment installed (scripts/setup.sh, or `pip install -e .`) and the data mirror. Stores
that several machines share go to the runs' environment with --env (MLFLOW_TRACKING_URI, OPTUNA_STORAGE); the
embedded SQLite defaults would give each machine a store of its own.

prefect.yaml describes the same deployments, with the same pull step, for `prefect deploy`; with prefect 3.8.8
against its own server under fastapi 0.154, `prefect deploy` stops after the first deployment on a 422 from the
workers/filter endpoint (the deployment it printed is registered), which this script avoids.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from components.benchmarks import REGISTRY

RUN_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "components", "HF_HUB_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}


def ensure_pool(name: str, pool_type: str = "process") -> bool:
    """Create the work pool (with the worker type's default job template) unless it exists; True if created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template() if pool_type == "process" else {}
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
            return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="ptuning", help="work pool (default: ptuning; created as a process pool if missing)")
    parser.add_argument("--queue", default=None, help="work queue of the pool (default: the pool's default queue)")
    parser.add_argument("--only", action="append", choices=sorted(REGISTRY), help="register only this deployment (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the flow runs (repeatable), e.g. MLFLOW_TRACKING_URI=http://mlflow:5000")
    parser.add_argument("--root", default=None, metavar="PATH",
                        help="the checkout's path on the workers' machines (default: the checkout this command runs in)")
    args = parser.parse_args(argv)
    from components.config import ConfigError, parse_pairs, project_root

    try:
        env = {**RUN_ENV, **parse_pairs(args.env, flag="--env", as_yaml=False)}
        root = Path(args.root).expanduser().absolute() if args.root else project_root()
    except ConfigError as error:
        parser.error(str(error))
    from prefect.runner.storage import LocalStorage

    from flows.serve import deployments

    if ensure_pool(args.pool):
        print(f"created process work pool {args.pool!r}")
    for deployment in deployments(args.only, work_pool_name=args.pool, work_queue_name=args.queue,
                                  job_variables={"env": env}):
        # the pull step: a run changes into the checkout before it imports the flow (LocalStorage.to_pull_step)
        deployment.storage = LocalStorage(str(root))
        deployment_id = deployment.apply()
        print(f"registered {deployment.flow_name}/{deployment.name} ({deployment_id}) on work pool {args.pool!r}, "
              f"working in {root}")
    print(f"\nstart a worker on every machine that trains (the project checked out at {root}):  "
          f"prefect worker start --pool {args.pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
