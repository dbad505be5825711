"""The Prefect flow `ptuning`: DVC data preparation -> Optuna search -> final training -> evaluation -> MLflow
registration, for one benchmark and any number of (task, model, method) combinations.

    python -m flows.run lama                       one run in this process (embedded SQLite stores)
    python -m flows.serve                          serve the deployments ptuning/lama and ptuning/superglue
    prefect deployment run ptuning/lama -p tasks='["P19"]' -p overrides='{"search.n_trials": null}' --watch

Before anything happens, flows.plan resolves and validates the whole run: a bad task, model, value or space key
fails there, before `dvc repro`, before any Optuna study and before any MLflow run. Then, per combination, the
tasks of flows.tasks: search, final_train per seed, evaluate, zero_shot_baseline, register; the results go to a
markdown artifact (flows.summary).

Reuse: each training runs in a directory named by its fingerprint (parameters, code version, data version;
components/run_dir.py): a rerun reads finished runs back, resumes interrupted ones from their checkpoint, and
the study (named by the same fingerprint) resumes where it stopped; finished final runs and registered
versions are found again in MLflow instead of being logged twice.

The library (components/) knows nothing of Prefect: flows/ only wires it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

from prefect import flow, get_run_logger

from components.benchmarks import get_benchmark
from flows.plan import plan
from flows.retrain import retrain_command
from flows.summary import summary_artifact
from flows.tasks import (bridge_logs, check_services, evaluate, final_train, prepare_data, register, search,
                         zero_shot_baseline)


def _deployment_name() -> str | None:
    """The served deployment this flow run belongs to (ptuning/<name>), or None when it runs in-process."""
    with contextlib.suppress(Exception):
        from prefect.runtime import deployment

        return deployment.name
    return None


@flow(name="ptuning", log_prints=True,
      description="P-tuning: DVC data preparation -> Optuna search -> final training -> evaluation -> MLflow registration.")
def ptuning(
    benchmark: str = "lama",
    tasks: Optional[list[str]] = None,
    models: Optional[list[str]] = None,
    methods: Optional[list[str]] = None,
    seeds: Optional[list[int]] = None,
    overrides: Optional[dict[str, Any]] = None,
    prepare: bool = True,
) -> dict:
    """Run the P-tuning pipeline for `benchmark` (lama | superglue) in the checkout this process works in.

    Args:
        benchmark: lama | superglue.
        tasks: LAMA relations (P19, ...) or SuperGLUE tasks (rte, cb, ...); null: params/flow.yaml.
        models: catalogue names (smollm2-135m, tiny-gpt2, ...), local HF directories or hub ids; null: params/flow.yaml.
        methods: ptuning | finetune | manual-finetune | manual (LAMA) | manual-zeroshot (SuperGLUE); null: params/flow.yaml.
        seeds: final training seeds (one run each with the best parameters); null: params/flow.yaml.
        overrides: {dotted.key: value}, applied last: keys of params/<benchmark>.yaml (`train.lr`, `vocab`, `setting`),
            `search.*` (search.n_trials: null = the whole grid; search.space, search.sampler, search.storage),
            `tracking.*` (tracking.uri, tracking.experiment) and `flow.*` (flow.outputs_dir).
        prepare: run the benchmark's DVC preparation stage first (false: use data/ as it is).
    """
    logger = get_run_logger()
    bridge_logs()
    run = plan(benchmark, tasks, models, methods, seeds, overrides)  # every check, before any side effect
    os.chdir(run.root)  # served and worker runs start elsewhere; every relative path is the checkout's
    logger.info("ptuning/%s in %s: %d combination(s) %s, seeds %s, MLflow %s, Optuna %s", run.benchmark, run.root,
                len(run.combos), [(c["task"], c["model"], c["method"]) for c in run.combos], run.seeds,
                run.tracking_uri, run.storage)
    check_services(run.tracking_uri, run.storage)
    if prepare:
        prepare_data([get_benchmark(run.benchmark).prepare_stage], str(run.root))
    deployment = _deployment_name()
    results = []
    for i, combo in enumerate(run.combos, 1):
        # after prepare_data: the study is named by the data it trains on
        job = run.job(combo, retrain_command(run.benchmark, combo, run.seeds, run.overrides, prepare, deployment))
        logger.info("[%d/%d] %s", i, len(run.combos), job.study)
        found = search(job)
        finals = [final_train(job, found["best_params"], seed, found["parent_run_id"]) for seed in run.seeds]
        evaluation = evaluate(job, finals, found["parent_run_id"])
        baseline = zero_shot_baseline(job, found["parent_run_id"])
        if baseline and baseline["value"] is not None and evaluation["mean"] is not None:
            gain = evaluation["mean"] - baseline["value"]
            logger.info("%s: %s %.4f, %s the zero-shot manual prompt (%s %.4f) by %.4f", job.study, run.report_key,
                        evaluation["mean"], "beats" if gain > 0 else "does not beat", baseline["method"],
                        baseline["value"], abs(gain))
        best = next(f for f in finals if f["seed"] == evaluation["best_seed"])
        registered = register(job, best)
        results.append({"study": job.study, "task": combo["task"], "model": combo["model"], "method": combo["method"],
                        "best_params": found["best_params"], "best_dev_score": found["best_value"],
                        "trials": found["trials"], "parent_run_id": found["parent_run_id"],
                        "report_key": run.report_key, "mean": evaluation["mean"], "std": evaluation["std"],
                        "zero_shot": baseline,
                        "registered": registered})
    summary_artifact(run, results)
    return {"benchmark": run.benchmark, "tracking_uri": run.tracking_uri, "experiment": run.tracking["experiment"],
            "storage": run.storage, "results": results}
