"""Run the `ptuning` flow once, in this process, on the embedded defaults: no server to set up.

    python -m flows.run lama                                   # the README's main job (params/flow.yaml)
    python -m flows.run superglue --param tasks=[cb] --param seeds=[42,43]
    python -m flows.run lama --param models=[tiny-gpt2] --param n_trials=1 --set train.max_steps=5

--param NAME=VALUE sets a flow parameter (VALUE is YAML: lists [a,b], numbers, null); --set KEY=VALUE adds to
`overrides` (a dotted key of params/<benchmark>.yaml, as `ptuning train --set`).

Without PREFECT_API_URL, Prefect runs the flow against a temporary local API over its SQLite database
(~/.prefect/prefect.db, or $PREFECT_HOME); MLflow and Optuna default to sqlite:///mlflow.db and
sqlite:///optuna.db in the repository (params/tracking.yaml, params/search.yaml). Afterwards:

    prefect server start                                       # Prefect UI: http://127.0.0.1:4200 (same database)
    mlflow ui --backend-store-uri sqlite:///mlflow.db          # MLflow UI: http://127.0.0.1:5000 (from the repository)
"""
from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "components")
# The temporary local Prefect API migrates its SQLite database on a first start: give a busy machine time.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
for _name, _value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                      ("DVC_NO_ANALYTICS", "1")):
    os.environ.setdefault(_name, _value)

import argparse
import inspect
import json
import sys

import yaml


def parse_params(benchmark: str, pairs: list[str], sets: list[str]) -> dict:
    """Flow parameters from `--param name=value` (YAML values) and `--set key=value` (into `overrides`,
    on top of params/flow.yaml's overrides unless --param overrides=... replaces them)."""
    from flows.pipeline import flow_defaults, ptuning

    known = set(inspect.signature(ptuning.fn).parameters) - {"benchmark"}
    params: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--param {pair!r} is not of the form name=value")
        name, value = (part.strip() for part in pair.split("=", 1))
        if name not in known:
            raise ValueError(f"unknown flow parameter {name!r}; known: {', '.join(sorted(known))}")
        params[name] = yaml.safe_load(value)
    if sets:
        overrides = params.get("overrides")
        if overrides is None:
            overrides = dict(flow_defaults(benchmark).get("overrides") or {})
        for pair in sets:
            if "=" not in pair:
                raise ValueError(f"--set {pair!r} is not of the form key=value")
            key, value = pair.split("=", 1)
            overrides[key.strip()] = yaml.safe_load(value)
        params["overrides"] = overrides
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=("lama", "superglue"))
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a flow parameter")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of params/<benchmark>.yaml for every run (added to `overrides`)")
    args = parser.parse_args(argv)
    from flows.pipeline import REPO, ptuning

    try:
        params = parse_params(args.benchmark, args.param, args.set)
    except ValueError as error:
        print(f"flows.run: error: {error}", file=sys.stderr)
        return 2
    os.chdir(REPO)
    result = ptuning(benchmark=args.benchmark, **params)
    print(json.dumps(result, indent=2, default=str))
    uri = result["tracking_uri"]
    print("\nDone. To browse the results:", file=sys.stderr)
    if uri.startswith(("http://", "https://")):
        print(f"  MLflow UI:  {uri}", file=sys.stderr)
    else:
        print(f"  MLflow UI:  mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000", file=sys.stderr)
    if os.environ.get("PREFECT_API_URL"):
        print(f"  Prefect UI: {os.environ['PREFECT_API_URL'].removesuffix('/api')}", file=sys.stderr)
    else:
        print("  Prefect UI: prefect server start   then open http://127.0.0.1:4200", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
