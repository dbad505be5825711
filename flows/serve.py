"""Serve the deployments `ptuning/lama`, `ptuning/superglue`, `ptuning-report/lama` and `ptuning-report/superglue` from this process.

    python -m flows.serve [--limit N] [--only lama|superglue]

The process registers the deployments with the Prefect API (PREFECT_API_URL; without it, a Prefect server
this process starts on its own for as long as it runs) and executes their flow runs as subprocesses of itself,
until it is stopped (Ctrl-C). Then, from any shell that points at the same API:

    prefect deployment run ptuning/lama -p tasks='["P19"]' -p overrides='{"search.n_trials": 2}' --watch
    prefect deployment run ptuning/superglue -p tasks='["rte"]' -p seeds='[42, 43]' --watch
    prefect deployment run ptuning-report/lama -p model=smollm2-135m --watch      # the LAMA table (resumes)
    prefect deployment run ptuning-report/superglue -p model=smollm2-135m --watch # the few-shot table (resumes)

Every parameter of the flows (flows/pipeline.py `ptuning`, flows/paper_tables.py `report`) can be given with -p;
those not given come from params/flow.yaml (`ptuning`) or params/report.yaml (`ptuning-report`) when the run
starts. Serving needs no work pool or worker; for workers on other machines see flows/deploy.py (README: "Workers
on other machines"), which registers these deployments on a work pool with the checkout as their pull step.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from components.benchmarks import REGISTRY
from components.reports import REPORTS
from flows.paper_tables import report
from flows.pipeline import ptuning


def description(benchmark: str) -> str:
    """The benchmark row's own one-line summary, and where the run's defaults come from."""
    summary = (importlib.import_module(REGISTRY[benchmark]).__doc__ or benchmark).strip().splitlines()[0]
    return f"{summary} Defaults: params/flow.yaml `{benchmark}:`."


def deployments(only: list[str] | None = None, **kwargs) -> list:
    """The RunnerDeployments `ptuning/<benchmark>` and `ptuning-report/<benchmark>`. The entry points are module
    paths (`flows.pipeline.ptuning`, `flows.paper_tables.report`): a run starts wherever this project is installed
    (no copy of the code travels). `kwargs` go to `to_deployment` (flows.deploy passes the work pool and the job's
    environment, and sets each deployment's storage to the checkout)."""
    from prefect.types.entrypoint import EntrypointType

    chosen = only or list(REGISTRY)
    common = dict(entrypoint_type=EntrypointType.MODULE_PATH, **kwargs)
    return ([ptuning.to_deployment(name=benchmark, parameters={"benchmark": benchmark}, description=description(benchmark),
                                   tags=["ptuning", benchmark], **common) for benchmark in chosen]
            + [report.to_deployment(name=benchmark, parameters={"benchmark": benchmark}, tags=["ptuning", "report", benchmark],
                                    description=f"The {benchmark} result table on one model (params/report.yaml).", **common)
               for benchmark in chosen if benchmark in REPORTS])


LOCAL_API = "http://127.0.0.1:4200/api"


def api_url() -> str | None:
    """The Prefect API the deployments go to: PREFECT_API_URL (env or profile), else a server already listening
    on 127.0.0.1:4200 (`prefect server start`). Serving against a throw-away temporary API would be of no use:
    `prefect deployment run` could not reach it."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return url
    import urllib.request

    try:
        with urllib.request.urlopen(f"{LOCAL_API}/health", timeout=3) as response:
            if response.status == 200:
                os.environ["PREFECT_API_URL"] = LOCAL_API  # for the flow-run subprocesses
                print(f"PREFECT_API_URL is not set; using the Prefect server at {LOCAL_API}", file=sys.stderr)
                return LOCAL_API
    except OSError:
        pass
    print("python -m flows.serve: no Prefect server: start one (`prefect server start`) and/or set PREFECT_API_URL, "
          f"e.g. export PREFECT_API_URL={LOCAL_API}", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="flow runs at most at once (default: no limit)")
    parser.add_argument("--only", action="append", choices=sorted(REGISTRY), help="serve only this deployment (repeatable)")
    args = parser.parse_args(argv)
    url = api_url()
    if not url:
        return 2
    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from components.config import project_root

    root = project_root()  # the checkout this command runs in: its params/, dvc.yaml, data/, outputs/
    os.environ["PTUNING_ROOT"] = str(root)  # flow-run subprocesses work in the same checkout
    os.chdir(root)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        serve(*deployments(args.only), limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
