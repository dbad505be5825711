"""The Prefect flow `ptuning`: DVC data preparation -> Optuna search -> final training -> evaluation -> MLflow
registration, for one benchmark and any number of (task, model, method) combinations.

    python -m flows.run lama                       one run in this process (embedded SQLite stores)
    python -m flows.serve                          serve the deployments ptuning/lama and ptuning/superglue
    prefect deployment run ptuning/lama -p tasks='["P19"]' -p overrides='{"search.n_trials": null}' --watch

Before anything happens, `plan` resolves and validates the whole run (every combination's RunConfig through
components.run_config.resolve, the search space, sampler and pruner, the stores): a bad task, model, value or
space key fails here, before `dvc repro`, before any Optuna study and before any MLflow run.

Steps (Prefect tasks; their progress goes to the terminal and to the run's logs in the Prefect UI):
  check_services  MLflow and the Optuna storage answer
  prepare_data    `dvc repro <the benchmark's prepare stage>` (DVC reruns only what changed)
  search          an Optuna study per combination; every trial a nested MLflow run, pruned on its dev score
  final_train     the best trial's parameters, once per seed (a nested MLflow run each)
  evaluate        the report figure over the seeds (mean, std) on the parent MLflow run
  register        the best seed's prompt as a model version (champion only if its dev score is the best)

Reuse: each training runs in a directory named by its fingerprint (parameters, code version, data version;
components/run_dir.py): a rerun reads finished runs back, resumes interrupted ones from their checkpoint, and
the study (named by the same fingerprint) resumes where it stopped; finished final runs and registered
versions are found again in MLflow instead of being logged twice. Tasks retry twice on transient failures;
bad input (ValueError and friends) fails at once.

The library (components/) knows nothing of Prefect: this module only wires it.
"""
from __future__ import annotations

import os

# Library progress (components.training's LogProgress, components.mlops.search) goes to Prefect's handlers:
# the terminal and the run's logs in the UI. Must be set before prefect is imported (see _bridge_logs too).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "components")

import contextlib
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.benchmarks import REGISTRY, get_benchmark
from components.common import numeric_metrics, safe_name, stable_hash
from components.config import ConfigError, apply_overrides, in_root, load_params, project_root
from components.reports.store import mean_std

SECTIONS = ("search", "tracking", "flow")  # override prefixes that address the flow's own settings
DEFAULT_TRACKING = "sqlite:///mlflow.db"
DEFAULT_STORAGE = "sqlite:///optuna.db"


# --- the plan: everything resolved and checked before any side effect -------------------------------

@dataclass
class Plan:
    benchmark: str
    root: Path
    combos: list[dict]  # {"task", "model", "method", "overrides"} per combination
    seeds: list[int]
    search: dict  # params/search.yaml with overrides; `space` validated
    tracking: dict  # params/tracking.yaml with overrides
    settings: dict  # params/flow.yaml's top level with overrides (outputs_dir, log_every)
    tracking_uri: str
    storage: str
    outputs_dir: Path
    report_key: str
    selection_key: str
    extra: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)  # params/flow.yaml's `<benchmark>.overrides`, then the run's

    def study(self, combo: dict) -> tuple[str, str]:
        """(study name, settings hash) of a combination: its fingerprint (data version included, so call it once
        the data is prepared) and the search's space, sampler and seed. The same inputs, the same study."""
        from components.run_config import resolve

        config = resolve(self.benchmark, combo["overrides"], self.root)
        key = stable_hash({"fingerprint": config.fingerprint(), "space": self.search["space"],
                           "sampler": self.search["sampler"], "seed": self.search["seed"]}, 8)
        return self.search.get("study") or safe_name(self.benchmark, combo["task"], combo["model"], combo["method"], key), key


def absolute_sqlite(url: str, root: Path) -> str:
    """`sqlite:///rel.db` relative to the checkout (a served or worker run has another cwd)."""
    if not url.startswith("sqlite:///") or url.startswith("sqlite:////") or url in ("sqlite:///", "sqlite:///:memory:"):
        return url
    return "sqlite:///" + str(in_root(url[len("sqlite:///"):], root).resolve())


def _store(explicit: dict, section: dict, key: str, env: str, default: str, root: Path) -> str:
    """An explicit override > the environment variable > the params file > the embedded default."""
    chosen = explicit.get(key) or os.environ.get(env) or section.get(key.split(".")[-1]) or default
    return absolute_sqlite(str(chosen), root)


def plan(benchmark: str, tasks: list[str] | None = None, models: list[str] | None = None,
         methods: list[str] | None = None, seeds: list[int] | None = None, overrides: dict | None = None,
         root: str | Path | None = None) -> Plan:
    """Resolve the flow's parameters against the checkout's params/ (flow.yaml `<benchmark>:` gives the sweep and
    the main job's overrides; `overrides` come last). Keys `search.*`, `tracking.*`, `flow.*` address
    params/search.yaml, params/tracking.yaml and params/flow.yaml; every other key params/<benchmark>.yaml."""
    from components.mlops.search import grid_size, grid_space, make_pruner, make_sampler
    from components.run_config import check_writable, resolve

    spec = get_benchmark(benchmark)
    checkout = project_root(root)
    flow_file = load_params("flow", checkout)
    section = flow_file.get(benchmark) or {}
    given = {**(section.get("overrides") or {}), **(overrides or {})}
    own = {k: v for k, v in given.items() if k.split(".")[0] in SECTIONS}
    bench = {k: v for k, v in given.items() if k not in own}
    settings = apply_overrides({"search": load_params("search", checkout), "tracking": load_params("tracking", checkout),
                                "flow": {k: v for k, v in flow_file.items() if k not in REGISTRY}}, own)
    search, tracking = settings["search"], settings["tracking"]
    pick = lambda value, key: list(value) if value is not None else list(section.get(key) or [])
    tasks, models, methods = pick(tasks, "tasks"), pick(models, "models"), pick(methods, "methods")
    seeds = [int(s) for s in pick(seeds, "seeds")]
    if not (tasks and models and methods and seeds):
        raise ConfigError(f"tasks, models, methods and seeds must not be empty (got {tasks}, {models}, {methods}, {seeds})")
    space = grid_space(search)
    make_sampler(search["sampler"], space, search["seed"])
    make_pruner(search["pruner"], search.get("pruner_options"))
    if search["n_trials"] is not None and (not isinstance(search["n_trials"], int) or search["n_trials"] < 1):
        raise ConfigError(f"search.n_trials must be a positive integer or null (the whole grid), got {search['n_trials']!r}")
    if search["sampler"] != "grid" and search["n_trials"] is None:
        raise ConfigError(f"search.n_trials is null, but the {search['sampler']} sampler never runs out of points")
    outputs_dir = check_writable(in_root(settings["flow"]["outputs_dir"], checkout))
    combos = []
    for task_name in tasks:
        for model in models:
            for method in methods:
                combo = {**bench, "task": str(task_name), "model": model, "method": method}
                config = resolve(benchmark, combo, checkout)
                # every point of the grid must be a valid configuration, too
                first = {k: v[0] for k, v in space.items()}
                last = {k: v[-1] for k, v in space.items()}
                for point in (first, last):
                    config.with_overrides(point)
                combos.append({"task": str(task_name), "model": model, "method": method, "overrides": combo})
    return Plan(benchmark=spec.name, root=checkout, combos=combos, seeds=seeds, search={**search, "space": space},
                tracking=tracking, settings=settings["flow"],
                tracking_uri=_store(own, tracking, "tracking.uri", "MLFLOW_TRACKING_URI", DEFAULT_TRACKING, checkout),
                storage=_store(own, search, "search.storage", "OPTUNA_STORAGE", DEFAULT_STORAGE, checkout),
                outputs_dir=outputs_dir, report_key=spec.report_key, selection_key=spec.selection_key,
                extra={"grid_size": grid_size(space)}, overrides=given)


# --- helpers (plain functions: no Prefect state) ----------------------------------------------------

def check_stores(tracking_uri: str, storage: str) -> None:
    """MLflow's store and Optuna's storage answer, each within a short timeout; else TrackingUnreachable /
    StorageUnreachable (both StoreUnreachable), naming the URL and what to do. Imports neither MLflow nor Optuna."""
    from components.mlops.stores import check_reachable, check_storage

    check_reachable(tracking_uri)
    check_storage(storage)


def _value(value) -> str:
    """A parameter value as `python -m flows.run` (YAML 1.2) and `prefect deployment run -p` (JSON) read it
    back: JSON, a store URL's password hidden."""
    import json

    from components.common import redact_url

    if isinstance(value, str) and "://" in value:
        value = redact_url(value)
    return json.dumps(value)


def retrain_command(benchmark: str, combo: dict, seeds: list[int], overrides: dict, prepare: bool = True,
                    deployment: str | None = None) -> str:
    """The command that trains one combination again: `python -m flows.run <benchmark> --param tasks=[...]
    ... --set key=value ...` with its task, model and method, the seeds and every override resolved
    (params/flow.yaml's `<benchmark>.overrides` and the run's), or, for a run of the served deployment
    `deployment`, `prefect deployment run ptuning/<deployment> -p ...` with the same parameters."""
    import shlex

    params = {"tasks": [combo["task"]], "models": [combo["model"]], "methods": [combo["method"]], "seeds": list(seeds)}
    if not prepare:
        params["prepare"] = False
    if deployment:
        params["overrides"] = dict(overrides)
        return shlex.join(["prefect", "deployment", "run", f"ptuning/{deployment}",
                           *(item for name, value in params.items() for item in ("-p", f"{name}={_value(value)}"))])
    return shlex.join(["python", "-m", "flows.run", benchmark,
                       *(item for name, value in params.items() for item in ("--param", f"{name}={_value(value)}")),
                       *(item for key, value in overrides.items() for item in ("--set", f"{key}={_value(value)}"))])


def _deployment_name() -> str | None:
    """The served deployment this flow run belongs to (ptuning/<name>), or None when it runs in-process."""
    with contextlib.suppress(Exception):
        from prefect.runtime import deployment

        return deployment.name
    return None


def _tool(name: str) -> str:
    """An executable of this environment (the venv's bin is not always on PATH in a served run)."""
    import shutil

    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _bridge_logs() -> None:
    """Send the library's loggers (`components.*`) to Prefect's handlers (terminal + API), whether or not
    PREFECT_LOGGING_EXTRA_LOGGERS was set before prefect was imported."""
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


def _tracker(job: dict):
    from components.mlops.tracking import Tracker

    return Tracker(job["tracking_uri"], job["experiment"], log_every=job["tracking_log_every"], project_dir=job["root"])


def _config(job: dict, extra: dict | None = None):
    from components.run_config import resolve

    return resolve(job["benchmark"], {**job["overrides"], **(extra or {})}, job["root"])


def _earlier_run(tracker, job: dict, role: str, **tags) -> str | None:
    """The id of the MLflow run an earlier attempt left for this study (role and tags), else None."""
    query = " and ".join([f"tags.study = '{job['study']}'", f"tags.role = '{role}'",
                          *(f"tags.{k} = '{v}'" for k, v in tags.items())])
    found = tracker.client.search_runs([tracker.experiment_id], filter_string=query,
                                       order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


def _train(job: dict, config, run_name: str, run_params: dict, tags: dict, callbacks: list, parent_run_id: str | None):
    """Train `config` in its fingerprint's directory inside a (nested) MLflow run: (metrics, run_id, dir, reused)."""
    from components.run_dir import execute
    from components.training import LogProgress

    out = Path(job["outputs_dir"]) / "runs" / config.fingerprint_hash()
    tracker = _tracker(job)
    with tracker.trial_run(run_name, {**run_params, "output_dir": str(out)}, tags, parent_run_id=parent_run_id) as run:
        metrics, reused = execute(config, out, [*callbacks, tracker.callback(), LogProgress(every=job["log_every"])])
        tracker.log_result(metrics, output_dir=out)
        return metrics, run.info.run_id, out, reused


# --- tasks -----------------------------------------------------------------------------------------

@task(name="check-services", cache_policy=NO_CACHE)
def check_services(tracking_uri: str, storage: str) -> dict:
    """Fail before any work when MLflow or the Optuna storage does not answer."""
    check_stores(tracking_uri, storage)  # TrackingUnreachable / StorageUnreachable name the URL and what to do
    get_run_logger().info("MLflow at %s and Optuna storage %s answer", tracking_uri, storage)
    return {"tracking_uri": tracking_uri, "storage": storage}


@task(name="prepare-data", **RETRIES)
def prepare_data(stages: list[str], root: str) -> None:
    """`dvc repro STAGES` in the checkout (their upstream stages too): DVC reruns only what changed."""
    from filelock import FileLock

    logger = get_run_logger()
    # Flow runs served side by side (lama and superglue) take turns: DVC's --wait-for-lock waits for the repository
    # lock only, and a second `dvc repro` still fails on the first one's lock of shared outputs ("'data/raw' is busy").
    lock = Path(root) / ".dvc" / "tmp" / "ptuning-repro.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with FileLock(str(lock)):
        logger.info("data preparation: dvc repro %s (in %s)", " ".join(stages), root)
        process = subprocess.Popen([_tool("dvc"), "--wait-for-lock", "repro", *stages], cwd=root, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in process.stdout:
            if line := line.rstrip():
                tail = (tail + [line])[-40:]
                if len(line) < 400:  # the prepare stages print a long JSON summary as their last line
                    logger.info("dvc: %s", line)
        returncode = process.wait()
    if returncode != 0:
        message = "\n".join(tail)
        if "unable to acquire lock" in message.lower() or "is busy" in message:  # a DVC process outside the flow
            raise RuntimeError(f"dvc repro {' '.join(stages)}: another DVC process holds the repository (retried)\n{message}")
        raise ValueError(f"dvc repro {' '.join(stages)} failed (exit {returncode}):\n{message}")


@task(name="search", **RETRIES)
def search(job: dict) -> dict:
    """The Optuna study of one combination: trials until the grid (or search.n_trials) is done, each in a nested
    MLflow run under the combination's parent run. Returns the study's summary and the parent run."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    import components.mlops.search as opt

    logger = get_run_logger()
    _bridge_logs()
    s = job["search"]
    config = _config(job)
    study = opt.open_study(job["study"], job["storage"], s["space"], s["sampler"], s["seed"], s["pruner"],
                           pruner_options=s.get("pruner_options"), heartbeat=s.get("heartbeat"))
    budget = min(s["n_trials"] or job["grid_size"], job["grid_size"]) if s["sampler"] == "grid" else s["n_trials"]
    counts = opt.summary(study)
    already = counts["complete"] + counts["pruned"] + counts["fail"]
    logger.info("study %s: %d trial(s) finished before, budget %s (grid of %d)", job["study"], already, budget, job["grid_size"])
    progress = None
    with contextlib.suppress(Exception):  # a progress bar in the Prefect UI; never fail the search for it
        progress = create_progress_artifact(progress=100.0 * min(already, budget) / budget, description=f"trials of {job['study']}")
    tracker = _tracker(job)
    ran = [0]

    def run_trial(point: dict, callbacks: list, trial) -> dict:
        logger.info("trial %d (%d/%s): %s", trial.number, already + ran[0] + 1, budget, point)
        try:
            metrics, _, _, reused = _train(job, config.with_overrides(point), f"trial-{trial.number}", point,
                                           {"role": "trial", "study": job["study"], "trial": trial.number},
                                           callbacks, parent_run_id=parent_id)
        finally:
            ran[0] += 1
            if progress is not None:
                with contextlib.suppress(Exception):
                    update_progress_artifact(progress, progress=min(100.0, 100.0 * (already + ran[0]) / budget))
        logger.info("trial %d: %s %.4f%s", trial.number, job["selection_key"], numeric_metrics(metrics)[job["selection_key"]],
                    " (finished earlier, read back)" if reused else "")
        return metrics

    resume = _earlier_run(tracker, job, "search")
    parent_params = {"benchmark": job["benchmark"], **job["overrides"], "search.space": s["space"],
                     "search.sampler": s["sampler"], "search.n_trials": s["n_trials"]}
    with tracker.parent_run(job["study"], parent_params, {**job["tags"], "role": "search"}, run_id=resume) as parent:
        parent_id = parent.info.run_id
        remaining = None if s["n_trials"] is None else max(0, s["n_trials"] - already)
        # even with no budget left it waits for other workers' trials: the best is picked from the whole study
        opt.run_search(study, run_trial, n_trials=remaining, metric=job["selection_key"], prune_by=s["prune_by"])
        result = opt.summary(study)
        tracker.log_metrics({"search.best_dev_score": result["best_value"], "search.trials": result["trials"]}
                            if result["best_value"] is not None else {"search.trials": result["trials"]})
    if result["best_params"] is None:
        raise RuntimeError(f"study {job['study']}: no trial completed ({result})")
    logger.info("study %s: best %s %.4f with %s (trial %d of %d)", job["study"], job["selection_key"], result["best_value"],
                result["best_params"], result["best_trial"], result["trials"])
    return {**result, "parent_run_id": parent_id}


@task(name="final-train", **RETRIES)
def final_train(job: dict, best_params: dict, seed: int, parent_run_id: str) -> dict:
    """Train with the best trial's parameters and `seed`; a nested MLflow run under the parent (found again,
    not logged twice, when an earlier flow run finished it)."""
    logger = get_run_logger()
    _bridge_logs()
    point = {**best_params, "train.seed": seed}
    config = _config(job, point)
    tracker = _tracker(job)
    earlier = _earlier_run(tracker, job, "final", seed=seed, fingerprint=config.fingerprint_hash())
    if earlier:
        from components.run_dir import finished_result

        out = Path(job["outputs_dir"]) / "runs" / config.fingerprint_hash()
        metrics = finished_result(out, config.fingerprint())
        if metrics is not None:
            logger.info("final seed %d: finished earlier (MLflow run %s), read back", seed, earlier)
            return {"seed": seed, "run_id": earlier, "output_dir": str(out), "metrics": metrics}
    logger.info("final training of %s, seed %d, %s", job["study"], seed, best_params)
    metrics, run_id, out, _ = _train(job, config, f"final-seed-{seed}", point,
                                     {"role": "final", "study": job["study"], "seed": seed,
                                      "fingerprint": config.fingerprint_hash()}, [], parent_run_id)
    shown = numeric_metrics(metrics)
    logger.info("final seed %d: %s %.4f, %s %s", seed, job["selection_key"], shown[job["selection_key"]],
                job["report_key"], f"{shown[job['report_key']]:.4f}" if job["report_key"] in shown else "n/a")
    return {"seed": seed, "run_id": run_id, "output_dir": str(out), "metrics": metrics}


@task(name="evaluate", **RETRIES)
def evaluate(job: dict, finals: list[dict], parent_run_id: str) -> dict:
    """Every numeric figure over the seeds (mean, std) on the parent run; the best seed by dev score."""
    per_seed = [numeric_metrics(f["metrics"]) for f in finals]
    summary = {}
    for key in sorted(set.intersection(*(set(m) for m in per_seed))):
        summary[f"{key}.mean"], std = mean_std([m[key] for m in per_seed])
        if std is not None:  # one seed has no spread: no std metric, rather than a 0 that reads like one
            summary[f"{key}.std"] = std
    best = max(finals, key=lambda f: numeric_metrics(f["metrics"])[job["selection_key"]])
    result = {"report_key": job["report_key"], "mean": summary.get(f"{job['report_key']}.mean"),
              "std": summary.get(f"{job['report_key']}.std"), "seeds": [f["seed"] for f in finals],
              "best_seed": best["seed"], "best_run_id": best["run_id"], "summary": summary}
    tracker = _tracker(job)
    tracker.log_metrics({**{f"final.{k}": v for k, v in summary.items()}, "final.best_seed": best["seed"]}, run_id=parent_run_id)
    tracker.set_tags({"report_key": job["report_key"], "best_final_run": best["run_id"]}, run_id=parent_run_id)
    shown = lambda v: "n/a" if v is None else f"{v:.4f}"
    get_run_logger().info("%s: %s %s ± %s over seeds %s (best seed %d by %s)", job["study"], job["report_key"],
                          shown(result["mean"]), shown(result["std"]), result["seeds"], best["seed"], job["selection_key"])
    return result


# the untrained manual prompt of each benchmark: what every trained method's figure is read against
ZERO_SHOT = {"lama": "manual", "superglue": "manual-zeroshot"}


@task(name="zero-shot-baseline", **RETRIES)
def zero_shot_baseline(job: dict, parent_run_id: str) -> dict | None:
    """The manual prompt, untrained, on the same task, model and data: its report figure, logged on the parent run as
    `baseline.<method>.<report key>` (None for the zero-shot method itself). Its run directory is reused like any run's."""
    from components.run_dir import execute

    method = ZERO_SHOT[job["benchmark"]]
    if job["method"] == method:
        return None
    config = _config(job, {"method": method})
    metrics, reused = execute(config, Path(job["outputs_dir"]) / "runs" / config.fingerprint_hash())
    value = numeric_metrics(metrics).get(job["report_key"])
    if value is not None:
        _tracker(job).log_metrics({f"baseline.{method}.{job['report_key']}": value}, run_id=parent_run_id)
    return {"method": method, "value": value}


@task(name="register", **RETRIES)
def register(job: dict, best_final: dict) -> list[dict]:
    """Register the best seed's prompt(s) as versions of `ptuning-<benchmark>-<task>-<vocab|setting>-<model>`; the
    tracker decides `champion` (the best dev score so far) or `challenger`. A run registered before is not
    registered again."""
    logger = get_run_logger()
    metrics = best_final["metrics"]
    prompts = metrics.get("prompts") or {}
    if not job["register"]:
        logger.info("%s: registration is off (tracking.register: false)", job["study"])
        return []
    if not prompts:
        logger.info("%s: method %s exports no prompt; nothing to register", job["study"], job["method"])
        return []
    tracker = _tracker(job)
    earlier = {v.name: v for v in tracker.client.search_model_versions(f"run_id = '{best_final['run_id']}'")}
    registered = []
    for task_name, prompt_dir in sorted(prompts.items()):
        own = {**metrics["tasks"][task_name], "method": job["method"], "model": job["model"]}  # this prompt's figures
        version = next((v for v in earlier.values() if v.tags.get("task") == task_name), None)
        if version is not None:
            logger.info("%s: %s version %s was registered from this run before", job["study"], version.name, version.version)
        else:
            version = tracker.register_prompt(prompt_dir, None, own, run_id=best_final["run_id"],
                                              selection_key=job["selection_key"], report_key=job["report_key"],
                                              command=job["command"])
        aliases = sorted(tracker.client.get_model_version(version.name, version.version).aliases)
        registered.append({"name": version.name, "version": str(version.version), "aliases": aliases,
                           "run_id": best_final["run_id"]})
        logger.info("registered %s version %s (%s)", version.name, version.version, ", ".join(aliases) or "no alias")
    return registered


# --- the flow --------------------------------------------------------------------------------------

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
    _bridge_logs()
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
        study, key = run.study(combo)  # after prepare_data: the study is named by the data it trains on
        # what trains this combination again, recorded on its MLflow runs and its registered versions
        command = retrain_command(run.benchmark, combo, run.seeds, run.overrides, prepare, deployment)
        job = {"benchmark": run.benchmark, "root": str(run.root), "overrides": combo["overrides"], "study": study,
               "task": combo["task"], "model": combo["model"], "method": combo["method"], "search": run.search,
               "grid_size": run.extra["grid_size"], "tracking_uri": run.tracking_uri, "storage": run.storage,
               "experiment": run.tracking["experiment"], "log_every": int(run.settings["log_every"]),
               "tracking_log_every": int(run.tracking["log_every"]),
               "register": bool(run.tracking["register"]), "outputs_dir": str(run.outputs_dir),
               "report_key": run.report_key, "selection_key": run.selection_key, "command": command,
               "tags": {"benchmark": run.benchmark, "task": combo["task"], "model": combo["model"],
                        "method": combo["method"], "study": study, "params_hash": key, "command": command}}
        logger.info("[%d/%d] %s", i, len(run.combos), job["study"])
        found = search(job)
        finals = [final_train(job, found["best_params"], seed, found["parent_run_id"]) for seed in run.seeds]
        evaluation = evaluate(job, finals, found["parent_run_id"])
        baseline = zero_shot_baseline(job, found["parent_run_id"])
        if baseline and baseline["value"] is not None and evaluation["mean"] is not None:
            gain = evaluation["mean"] - baseline["value"]
            logger.info("%s: %s %.4f, %s the zero-shot manual prompt (%s %.4f) by %.4f", job["study"], run.report_key,
                        evaluation["mean"], "beats" if gain > 0 else "does not beat", baseline["method"],
                        baseline["value"], abs(gain))
        best = next(f for f in finals if f["seed"] == evaluation["best_seed"])
        registered = register(job, best)
        results.append({"study": job["study"], "task": combo["task"], "model": combo["model"], "method": combo["method"],
                        "best_params": found["best_params"], "best_dev_score": found["best_value"],
                        "trials": found["trials"], "parent_run_id": found["parent_run_id"],
                        "report_key": run.report_key, "mean": evaluation["mean"], "std": evaluation["std"],
                        "zero_shot": baseline,
                        "registered": registered})
    _summary_artifact(run, results)
    return {"benchmark": run.benchmark, "tracking_uri": run.tracking_uri, "experiment": run.tracking["experiment"],
            "storage": run.storage, "results": results}


def _summary_artifact(run: Plan, results: list[dict]) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = [f"# ptuning/{run.benchmark}", "", f"MLflow: `{run.tracking_uri}` (experiment `{run.tracking['experiment']}`), "
             f"Optuna: `{run.storage}`", "",
             f"| study | best params | best {run.selection_key} | {run.report_key} (mean ± std) | zero-shot manual prompt | registered |",
             "|---|---|---|---|---|---|"]
    for r in results:
        reg = ", ".join(f"{x['name']} v{x['version']} ({', '.join(x['aliases']) or '-'})" for x in r["registered"]) or "-"
        test = "-" if r["mean"] is None else f"{r['mean']:.4f}" + ("" if r["std"] is None else f" ± {r['std']:.4f}")
        zero = "-" if not r["zero_shot"] or r["zero_shot"]["value"] is None else f"{r['zero_shot']['value']:.4f}"
        lines.append(f"| {r['study']} | {r['best_params']} | {r['best_dev_score']:.4f} | {test} | {zero} | {reg} |")
    with contextlib.suppress(Exception):
        create_markdown_artifact("\n".join(lines), key=f"ptuning-{run.benchmark}", description="ptuning results")


# --- the result tables -------------------------------------------------------------------------------

def _report(benchmark: str, model: str, root: Path, seeds, methods, tasks, overrides: dict, output_dir, command: str):
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

    _bridge_logs()
    kind, settings, report = _report(benchmark, model, Path(root), seeds, methods, tasks, overrides, output_dir, command)
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

    from components.mlops.tracking import Tracker, check_reachable

    root = project_root()
    os.chdir(root)
    own = {k: v for k, v in (overrides or {}).items() if k.startswith("tracking.")}
    overrides = {k: v for k, v in (overrides or {}).items() if k not in own}
    tracking = apply_overrides({"tracking": load_params("tracking", root)}, own)["tracking"]
    uri = _store(own, tracking, "tracking.uri", "MLFLOW_TRACKING_URI", DEFAULT_TRACKING, root)
    command = (f"prefect flow ptuning-report: benchmark={benchmark} model={model} seeds={seeds} methods={methods} "
               f"tasks={tasks} overrides={overrides}")
    _report(benchmark, model, root, seeds, methods, tasks, overrides, output_dir, command)  # every check, before any side effect
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
