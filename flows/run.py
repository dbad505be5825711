"""Run the `ptuning` flow once, in this process, on the embedded defaults: no server to set up.

    python -m flows.run lama                                   # the README's main job (params/flow.yaml)
    python -m flows.run superglue --param tasks=[cb] --param seeds=[42,43]
    python -m flows.run lama --param models=[tiny-gpt2] --set search.n_trials=null --set train.max_steps=5

--param NAME=VALUE sets a flow parameter (tasks, models, methods, seeds, prepare; VALUE is YAML); --set KEY=VALUE
adds to `overrides`: a key of params/<benchmark>.yaml (as `ptuning train --set`), or search.*, tracking.*, flow.*.

Without PREFECT_API_URL, Prefect runs the flow against a temporary local API over its SQLite database
(~/.prefect/prefect.db, or $PREFECT_HOME); MLflow and Optuna default to sqlite:///mlflow.db and sqlite:///optuna.db
in the checkout (params/tracking.yaml, params/search.yaml). Afterwards:

    prefect server start                                       # Prefect UI: http://127.0.0.1:4200 (same database)
    mlflow ui --backend-store-uri sqlite:///mlflow.db          # MLflow UI: http://127.0.0.1:5000 (from the checkout)
"""
from __future__ import annotations

import os

# The temporary local Prefect API migrates its SQLite database on a first start: give a busy machine time.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
for _name, _value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                      ("DVC_NO_ANALYTICS", "1")):
    os.environ.setdefault(_name, _value)

import argparse
import inspect
import json
import sys

from components.benchmarks import REGISTRY


def flow_arguments(benchmark: str, params: list[str], sets: list[str]) -> dict:
    """The flow's keyword arguments: `--param name=value` pairs and `--set key=value` pairs (into `overrides`)."""
    from components.config import ConfigError, parse_pairs
    from flows.pipeline import ptuning

    known = set(inspect.signature(ptuning.fn).parameters) - {"benchmark", "overrides"}
    arguments = parse_pairs(params, flag="--param")
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise ConfigError(f"unknown flow parameter(s) {unknown}; known: {', '.join(sorted(known))} "
                          "(any other setting: --set key=value)")
    if sets:
        arguments["overrides"] = parse_pairs(sets)
    return {"benchmark": benchmark, **arguments}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flows.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(REGISTRY))
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a flow parameter")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override (see above)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from components.mlops.stores import StoreUnreachable, check_stores
    from flows.pipeline import ptuning
    from flows.plan import plan

    try:
        arguments = flow_arguments(args.benchmark, args.param, args.set)
        # bad input or a store that does not answer: one line, exit 2, before Prefect starts and before anything
        # is written
        run = plan(**{k: v for k, v in arguments.items() if k != "prepare"})
        check_stores(run.tracking_uri, run.storage)
    except (ValueError, StoreUnreachable) as error:
        print(f"flows.run: error: {error}", file=sys.stderr)
        return 2
    result = ptuning(**arguments)
    print(json.dumps(result, indent=2, default=str))
    from mlflow import MlflowClient

    from components.mlops.tracking import experiment_url

    uri = result["tracking_uri"]
    experiment = MlflowClient(uri).get_experiment_by_name(result["experiment"])
    server = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    print("\nDone. To browse the results:", file=sys.stderr)
    if not uri.startswith(("http://", "https://")):
        print(f"  MLflow UI:  mlflow ui --backend-store-uri {uri}", file=sys.stderr)
    print(f"  MLflow runs: {experiment_url(server, experiment.experiment_id)}", file=sys.stderr)
    if os.environ.get("PREFECT_API_URL"):
        print(f"  Prefect UI: {os.environ['PREFECT_API_URL'].removesuffix('/api')}", file=sys.stderr)
    else:
        print("  Prefect UI: prefect server start   then open http://127.0.0.1:4200", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
