"""The Prefect flow `ptuning-report`: a result table of the paper on one model (LAMA: Table 2, SuperGLUE: Table 5,
components/reports/), run as `ptuning report <benchmark>` runs it (a killed run resumes), then logged to MLflow.

    prefect deployment run ptuning-report/lama -p model=smollm2-135m --watch
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Optional

from prefect import flow, task

from components.benchmarks import get_benchmark
from components.common import safe_name
from components.config import apply_overrides, load_params, project_root
from flows.tasks import RETRIES, bridge_logs, prepare_data


def _resolve_report(benchmark: str, model: str, root: Path, seeds, methods, tasks, overrides: dict, output_dir, command: str):
    """The report module and its Report (every check of its settings, nothing run)."""
    from components.reports import get_report

    kind = get_report(benchmark)
    settings = load_params("report", root)[benchmark]
    # overrides may hold the report's own option (vocab, setting): from_settings takes it from there
    report = kind.Report.from_settings(settings, model, command, root, seeds=seeds,
                                       tasks=",".join(tasks) if tasks else None, methods=methods,
                                       output_dir=output_dir, params=overrides)
    return kind, settings, report


@task(name="report-table", **RETRIES)
def report_table(benchmark: str, model: str, root: str, seeds: list[int] | None, methods: list[str] | None,
                 tasks: list[str] | None, overrides: dict, output_dir: str | None, command: str) -> dict:
    """`ptuning report <benchmark>`: run what is missing of the table (a killed run resumes), with a progress bar
    in the Prefect UI; returns results.json's content, its headline figures and where the report is."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    bridge_logs()
    kind, settings, report = _resolve_report(benchmark, model, Path(root), seeds, methods, tasks, overrides, output_dir, command)
    progress = create_progress_artifact(progress=0.0, description=f"{benchmark} table of {model}")

    def on_progress(info: dict) -> None:  # shared P-tuning reports steps, one-by-one runs report units
        done, total = (info["steps"], info["total_steps"]) if "steps" in info else (info["done"], info["total"])
        with contextlib.suppress(Exception):
            update_progress_artifact(progress, progress=100.0 * done / max(1, total))

    results = kind.run_report(report, settings, Path(root), show_progress=False, on_progress=on_progress)
    return {"results": results, "headline": kind.headline(results), "output_dir": str(report.output_dir)}


@flow(name="ptuning-report", log_prints=True,
      description="A result table of the paper on one model (LAMA: Table 2, SuperGLUE: Table 5), logged to MLflow.")
def report(benchmark: str = "lama", model: str = "smollm2-135m", seeds: Optional[list[int]] = None,
           methods: Optional[list[str]] = None, tasks: Optional[list[str]] = None,
           overrides: Optional[dict[str, Any]] = None, output_dir: Optional[str] = None, prepare: bool = True) -> dict:
    """Run the table (resuming what an earlier run finished), write results.json, REPORT.md and its figures, and
    log them as artifacts of an MLflow run. Null parameters: params/report.yaml; `tasks`: LAMA relations or
    SuperGLUE tasks; `overrides`: keys of params/<benchmark>.yaml for every method (as `ptuning report --set`;
    `vocab` / `setting` choose the table), and `tracking.*`; `output_dir`: default reports/<benchmark>/..."""
    from prefect.artifacts import create_markdown_artifact

    from components.mlops.stores import check_reachable, tracking_store
    from components.mlops.tracking import Tracker

    root = project_root()
    os.chdir(root)
    own = {k: v for k, v in (overrides or {}).items() if k.startswith("tracking.")}
    overrides = {k: v for k, v in (overrides or {}).items() if k not in own}
    tracking = apply_overrides({"tracking": load_params("tracking", root)}, own)["tracking"]
    uri = tracking_store(own, tracking, root)
    command = (f"prefect flow ptuning-report: benchmark={benchmark} model={model} seeds={seeds} methods={methods} "
               f"tasks={tasks} overrides={overrides}")
    _resolve_report(benchmark, model, root, seeds, methods, tasks, overrides, output_dir, command)  # every check, before any side effect
    check_reachable(uri)
    if prepare:
        prepare_data([get_benchmark(benchmark).prepare_stage], str(root))
    done = report_table(benchmark, model, str(root), seeds, methods, tasks, overrides, output_dir, command)
    out = Path(done["output_dir"])
    tracker = Tracker(uri, tracking["experiment"], project_dir=root)
    results = done["results"]  # what the table was resolved to (null parameters: params/report.yaml)
    resolved = {"model": model, "seeds": results["seeds"], "methods": list(results["methods"]),
                "tasks": results.get("relations", results.get("tasks")), **overrides}
    with tracker.trial_run(f"report-{benchmark}-{model}", resolved,
                           {"role": "report", "benchmark": benchmark, "model": model}) as run:
        tracker.log_metrics(done["headline"])
        tracker.log_report(out, run.info.run_id)
    with contextlib.suppress(Exception):
        create_markdown_artifact((out / "REPORT.md").read_text(), key=f"report-{benchmark}-{safe_name(model).lower()}",
                                 description=f"{benchmark} table of {model}")
    return {"report": str(out / "REPORT.md"), "mlflow_run": run.info.run_id, **done["headline"]}
