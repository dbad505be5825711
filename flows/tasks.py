"""The Prefect tasks of the `ptuning` flow, one (task, model, method) combination's `Job` each; their progress goes
to the terminal and to the run's logs in the Prefect UI.

  check_services      MLflow and the Optuna storage answer
  prepare_data        `dvc repro <the benchmark's prepare stage>` (DVC reruns only what changed)
  search              an Optuna study per combination; every trial a nested MLflow run, pruned on its dev score
  final_train         the best trial's parameters, once per seed (a nested MLflow run each)
  evaluate            the report figure over the seeds (mean, std) on the parent MLflow run
  zero_shot_baseline  the untrained manual prompt on the same task, model and data, for comparison
  register            the best seed's prompt as a model version (champion only if its dev score is the best)

Tasks retry twice on transient failures; bad input (ValueError and friends) fails at once. A task that an earlier
attempt finished finds its work again (run directories by fingerprint, MLflow runs by tags) instead of redoing it.
"""
from __future__ import annotations

import contextlib
import logging

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common import numeric_metrics
from components.mlops.serving import NotServable
from components.reports.store import mean_std
from flows.dvc_repro import repro
from flows.plan import Job


def bridge_logs() -> None:
    """Send the library's loggers (`components.*`) to Prefect's handlers (terminal + API), whether or not
    PREFECT_LOGGING_EXTRA_LOGGERS was set before prefect was imported (flows/__init__.py)."""
    target = logging.getLogger("components")
    target.setLevel(logging.INFO)
    for handler in logging.getLogger("prefect.extra").handlers:  # the API handler; the console prints via root
        if handler not in target.handlers:
            target.addHandler(handler)


def is_transient(task, task_run, state) -> bool:
    """Retry condition: bad input (ValueError, KeyError, TypeError, FileNotFoundError) fails at once;
    anything else (a server or database blip, a DVC lock, a killed process) is retried."""
    try:
        state.result()
    except (ValueError, KeyError, TypeError, FileNotFoundError, NotImplementedError):
        return False
    except Exception:
        return True
    return True


RETRIES = dict(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=is_transient, cache_policy=NO_CACHE)


def _train(job: Job, config, run_name: str, run_params: dict, tags: dict, callbacks: list, parent_run_id: str | None):
    """Train `config` in its fingerprint's directory inside a (nested) MLflow run: (metrics, run_id, dir, reused)."""
    from components.run_dir import execute
    from components.training import LogProgress

    out = job.run_dir(config)
    tracker = job.tracker()
    with tracker.trial_run(run_name, {**run_params, "output_dir": str(out)}, tags, parent_run_id=parent_run_id) as run:
        metrics, reused = execute(config, out, [*callbacks, tracker.callback(), LogProgress(every=job.log_every)])
        tracker.log_result(metrics, output_dir=out)
        return metrics, run.info.run_id, out, reused


@task(name="check-services", cache_policy=NO_CACHE)
def check_services(tracking_uri: str, storage: str) -> dict:
    """Fail before any work when MLflow or the Optuna storage does not answer."""
    from components.mlops.stores import check_stores

    check_stores(tracking_uri, storage)  # TrackingUnreachable / StorageUnreachable name the URL and what to do
    get_run_logger().info("MLflow at %s and Optuna storage %s answer", tracking_uri, storage)
    return {"tracking_uri": tracking_uri, "storage": storage}


@task(name="prepare-data", **RETRIES)
def prepare_data(stages: list[str], root: str) -> None:
    """`dvc repro STAGES` in the checkout (their upstream stages too): DVC reruns only what changed."""
    repro(stages, root, get_run_logger())


@task(name="search", **RETRIES)
def search(job: Job) -> dict:
    """The Optuna study of one combination: trials until the grid (or search.n_trials) is done, each in a nested
    MLflow run under the combination's parent run. Returns the study's summary and the parent run."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    import components.mlops.search as opt

    logger = get_run_logger()
    bridge_logs()
    s = job.search
    config = job.config()
    study = opt.open_study(job.study, job.storage, s["space"], s["sampler"], s["seed"], s["pruner"],
                           pruner_options=s.get("pruner_options"), heartbeat=s.get("heartbeat"))
    budget = min(s["n_trials"] or job.grid_size, job.grid_size) if s["sampler"] == "grid" else s["n_trials"]
    counts = opt.summary(study)
    already = counts["complete"] + counts["pruned"] + counts["fail"]
    logger.info("study %s: %d trial(s) finished before, budget %s (grid of %d)", job.study, already, budget, job.grid_size)
    progress = None
    with contextlib.suppress(Exception):  # a progress bar in the Prefect UI; never fail the search for it
        progress = create_progress_artifact(progress=100.0 * min(already, budget) / budget, description=f"trials of {job.study}")
    tracker = job.tracker()
    ran = [0]

    def run_trial(point: dict, callbacks: list, trial) -> dict:
        logger.info("trial %d (%d/%s): %s", trial.number, already + ran[0] + 1, budget, point)
        try:
            metrics, _, _, reused = _train(job, config.with_overrides(point), f"trial-{trial.number}", point,
                                           {"role": "trial", "study": job.study, "trial": trial.number},
                                           callbacks, parent_run_id=parent_id)
        finally:
            ran[0] += 1
            if progress is not None:
                with contextlib.suppress(Exception):
                    update_progress_artifact(progress, progress=min(100.0, 100.0 * (already + ran[0]) / budget))
        logger.info("trial %d: %s %.4f%s", trial.number, job.selection_key, numeric_metrics(metrics)[job.selection_key],
                    " (finished earlier, read back)" if reused else "")
        return metrics

    resume = tracker.latest_run_id(study=job.study, role="search")
    parent_params = {"benchmark": job.benchmark, **job.overrides, "search.space": s["space"],
                     "search.sampler": s["sampler"], "search.n_trials": s["n_trials"]}
    with tracker.parent_run(job.study, parent_params, {**job.tags, "role": "search"}, run_id=resume) as parent:
        parent_id = parent.info.run_id
        remaining = None if s["n_trials"] is None else max(0, s["n_trials"] - already)
        # even with no budget left it waits for other workers' trials: the best is picked from the whole study
        opt.run_search(study, run_trial, n_trials=remaining, metric=job.selection_key, prune_by=s["prune_by"])
        result = opt.summary(study)
        tracker.log_metrics({"search.best_dev_score": result["best_value"], "search.trials": result["trials"]}
                            if result["best_value"] is not None else {"search.trials": result["trials"]})
    if result["best_params"] is None:
        raise RuntimeError(f"study {job.study}: no trial completed ({result})")
    logger.info("study %s: best %s %.4f with %s (trial %d of %d)", job.study, job.selection_key, result["best_value"],
                result["best_params"], result["best_trial"], result["trials"])
    return {**result, "parent_run_id": parent_id}


@task(name="final-train", **RETRIES)
def final_train(job: Job, best_params: dict, seed: int, parent_run_id: str) -> dict:
    """Train with the best trial's parameters and `seed`; a nested MLflow run under the parent (found again,
    not logged twice, when an earlier flow run finished it)."""
    logger = get_run_logger()
    bridge_logs()
    point = {**best_params, "train.seed": seed}
    config = job.config(point)
    tracker = job.tracker()
    earlier = tracker.latest_run_id(study=job.study, role="final", seed=seed, fingerprint=config.fingerprint_hash())
    if earlier:
        from components.run_dir import finished_result

        out = job.run_dir(config)
        metrics = finished_result(out, config.fingerprint())
        if metrics is not None:
            logger.info("final seed %d: finished earlier (MLflow run %s), read back", seed, earlier)
            return {"seed": seed, "run_id": earlier, "output_dir": str(out), "metrics": metrics}
    logger.info("final training of %s, seed %d, %s", job.study, seed, best_params)
    metrics, run_id, out, _ = _train(job, config, f"final-seed-{seed}", point,
                                     {"role": "final", "study": job.study, "seed": seed,
                                      "fingerprint": config.fingerprint_hash()}, [], parent_run_id)
    shown = numeric_metrics(metrics)
    logger.info("final seed %d: %s %.4f, %s %s", seed, job.selection_key, shown[job.selection_key],
                job.report_key, f"{shown[job.report_key]:.4f}" if job.report_key in shown else "n/a")
    return {"seed": seed, "run_id": run_id, "output_dir": str(out), "metrics": metrics}


@task(name="evaluate", **RETRIES)
def evaluate(job: Job, finals: list[dict], parent_run_id: str) -> dict:
    """Every numeric figure over the seeds (mean, std) on the parent run; the best seed by dev score."""
    per_seed = [numeric_metrics(f["metrics"]) for f in finals]
    summary = {}
    for key in sorted(set.intersection(*(set(m) for m in per_seed))):
        summary[f"{key}.mean"], std = mean_std([m[key] for m in per_seed])
        if std is not None:  # one seed has no spread: no std metric, rather than a 0 that reads like one
            summary[f"{key}.std"] = std
    best = max(finals, key=lambda f: numeric_metrics(f["metrics"])[job.selection_key])
    result = {"report_key": job.report_key, "mean": summary.get(f"{job.report_key}.mean"),
              "std": summary.get(f"{job.report_key}.std"), "seeds": [f["seed"] for f in finals],
              "best_seed": best["seed"], "best_run_id": best["run_id"], "summary": summary}
    tracker = job.tracker()
    tracker.log_metrics({**{f"final.{k}": v for k, v in summary.items()}, "final.best_seed": best["seed"]}, run_id=parent_run_id)
    tracker.set_tags({"report_key": job.report_key, "best_final_run": best["run_id"]}, run_id=parent_run_id)
    shown = lambda v: "n/a" if v is None else f"{v:.4f}"
    get_run_logger().info("%s: %s %s ± %s over seeds %s (best seed %d by %s)", job.study, job.report_key,
                          shown(result["mean"]), shown(result["std"]), result["seeds"], best["seed"], job.selection_key)
    return result


# the untrained manual prompt of each benchmark: what every trained method's figure is read against
ZERO_SHOT = {"lama": "manual", "superglue": "manual-zeroshot"}


@task(name="zero-shot-baseline", **RETRIES)
def zero_shot_baseline(job: Job, parent_run_id: str) -> dict | None:
    """The manual prompt, untrained, on the same task, model and data: its report figure, logged on the parent run as
    `baseline.<method>.<report key>` (None for the zero-shot method itself). Its run directory is reused like any run's."""
    from components.run_dir import execute

    method = ZERO_SHOT[job.benchmark]
    if job.method == method:
        return None
    config = job.config({"method": method})
    metrics, reused = execute(config, job.run_dir(config))
    value = numeric_metrics(metrics).get(job.report_key)
    if value is not None:
        job.tracker().log_metrics({f"baseline.{method}.{job.report_key}": value}, run_id=parent_run_id)
    return {"method": method, "value": value}


@task(name="register", **RETRIES)
def register(job: Job, best_final: dict) -> list[dict]:
    """Register the best seed's prompt(s) as versions of `ptuning-<benchmark>-<task>-<vocab|setting>-<model>`; the
    tracker decides `champion` (the best dev score so far) or `challenger`. A run registered before is not
    registered again. A prompt no registered model can serve (WSC: it answers by generating a span) is
    logged as the run's artifacts instead, and the flow goes on."""
    logger = get_run_logger()
    metrics = best_final["metrics"]
    prompts = metrics.get("prompts") or {}
    if not job.register:
        logger.info("%s: registration is off (tracking.register: false)", job.study)
        return []
    if not prompts:
        logger.info("%s: method %s exports no prompt; nothing to register", job.study, job.method)
        return []
    tracker = job.tracker()
    earlier = {v.name: v for v in tracker.versions_of_run(best_final["run_id"])}
    registered = []
    for task_name, prompt_dir in sorted(prompts.items()):
        own = {**metrics["tasks"][task_name], "method": job.method, "model": job.model}  # this prompt's figures
        version = next((v for v in earlier.values() if v.tags.get("task") == task_name), None)
        if version is not None:
            logger.info("%s: %s version %s was registered from this run before", job.study, version.name, version.version)
        else:
            try:  # register_prompt refuses before it logs anything
                version = tracker.register_prompt(prompt_dir, None, own, run_id=best_final["run_id"],
                                                  selection_key=job.selection_key, report_key=job.report_key,
                                                  command=job.command)
            except NotServable as error:  # WSC: the run stands; its prompt is kept as files, not registered
                if not tracker.client.list_artifacts(best_final["run_id"], f"prompt/{task_name}"):
                    tracker.log_prompt_files(prompt_dir, best_final["run_id"], f"prompt/{task_name}")
                logger.warning("%s: %s not registered, no registered model can serve it (%s); its files are the "
                               "artifacts prompt/%s of run %s", job.study, task_name, error, task_name, best_final["run_id"])
                continue
        aliases = sorted(tracker.client.get_model_version(version.name, version.version).aliases)
        registered.append({"name": version.name, "version": str(version.version), "aliases": aliases,
                           "run_id": best_final["run_id"]})
        logger.info("registered %s version %s (%s)", version.name, version.version, ", ".join(aliases) or "no alias")
    return registered
