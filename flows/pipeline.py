"""The Prefect flow `ptuning`: DVC data preparation -> Optuna search -> final training -> evaluation ->
MLflow registration, for one benchmark (LAMA or SuperGLUE) and any number of (task, model, method).

    python -m flows.run lama                       one run in this process (embedded SQLite stores)
    python -m flows.serve                          serve the deployments ptuning/lama and ptuning/superglue
    prefect deployment run ptuning/lama -p tasks='["P19"]' -p n_trials=2 --watch

Steps (each a Prefect task; progress is logged to the terminal and to Prefect's logs):
  check_services  MLflow and the Optuna storage answer, before anything else (a clear error otherwise)
  prepare_data    `dvc repro <prepare stages>`: DVC's own cache makes a second run a no-op
  search          an Optuna study per (task, model, method): every trial trains in a nested MLflow run
                  and reports its dev score for pruning
  final_train     the best trial's parameters, once per seed (a nested MLflow run each)
  evaluate        the test figures over the seeds (mean, std) on the parent MLflow run
  register        the best seed's prompt as a version of the registered model, alias `champion`

Reuse: search / final_train / evaluate / register are cached by Prefect on their inputs (every parameter,
the data version from dvc.lock, a hash of the library's code) and their own source: a rerun with the same
inputs finishes without training. Below that, a training directory is keyed by a hash of its parameters
and holds a checkpoint: an interrupted trial resumes, a finished one is read back, and the Optuna study
(named with a hash of the parameters) resumes where it stopped. Tasks retry twice on transient failures
(a server blip, a DVC lock); bad input (ValueError and friends) fails at once.

The library (components/) knows nothing of Prefect: this module only wires it.
"""
from __future__ import annotations

import os

# Library progress (components.training's LogProgress, components.mlops.search) goes to Prefect's handlers:
# the terminal and the run's logs in the UI. Must be set before prefect is imported (see _bridge_logs too).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "components")

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("lama", "superglue")


# --- helpers (plain functions: no Prefect state) ----------------------------------------------------

def flow_defaults(benchmark: str) -> dict:
    """params/flow.yaml's top level merged with its `<benchmark>` section."""
    path = REPO / "params" / "flow.yaml"
    data = yaml.safe_load(path.read_text()) if path.exists() else {}
    data = data or {}
    section = data.get(benchmark) or {}
    top = {k: v for k, v in data.items() if k not in BENCHMARKS}
    return {**top, **section}


def stable_hash(value: Any, length: int = 10) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


CODE = {"common": ("params", "training", "model", "templates", "catalog", "search"),
        "lama": ("lama",), "superglue": ("superglue", "metrics")}


def code_version(benchmark: str) -> str:
    """A hash of the library code that training results depend on: cached results are reused only for the
    same code. (Data preparation code is covered by the data version; tracking code changes no result.)"""
    digest = hashlib.sha256()
    for name in (*CODE["common"], *CODE.get(benchmark, ())):
        path = REPO / "components" / f"{name}.py"
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()[:12]


def data_version(stages: list[str]) -> dict:
    """The md5s of the outputs of `stages` as dvc.lock records them (changes when the data changes)."""
    lock = REPO / "dvc.lock"
    if not lock.exists():
        return {}
    recorded = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {stage: sorted(f"{o.get('path')}:{o.get('md5') or o.get('hash')}" for o in recorded.get(stage, {}).get("outs", []))
            for stage in stages}


def absolute_sqlite(url: str | None) -> str | None:
    """`sqlite:///rel.db` relative to the repository root (a served or worker run has another cwd)."""
    if not url or not url.startswith("sqlite:///") or url.startswith("sqlite:////"):
        return url
    path = url[len("sqlite:///"):]
    if not path or path == ":memory:":
        return url
    return "sqlite:///" + str((REPO / path).resolve())


def resolve(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO / path


def flatten(params: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def numeric(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))}


def _tool(name: str) -> str:
    """An executable of this environment (the venv's bin is not always on PATH in a served run)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _bridge_logs() -> None:
    """Send the library's loggers (`components.*`) to Prefect's handlers (terminal + API), whether or not
    PREFECT_LOGGING_EXTRA_LOGGERS was set before prefect was imported."""
    target = logging.getLogger("components")
    target.setLevel(logging.INFO)
    handlers = logging.getLogger("prefect.extra").handlers
    for handler in handlers:  # the API handler; the console prints them through the root logger
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


RETRIES = dict(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=is_transient)
CACHED = INPUTS + TASK_SOURCE


def _benchmark_module(benchmark: str):
    import importlib

    return importlib.import_module(f"components.{benchmark}")


def train_once(benchmark: str, params: dict, output_dir: Path, callbacks: list, log_every: int) -> tuple[dict, bool]:
    """Train and evaluate one configuration in `output_dir` (components.<benchmark>.run). A directory that
    already holds the finished run of these very parameters is read back instead: (metrics, reused)."""
    from components.training import LogProgress

    done = output_dir / "done.json"
    if done.exists() and (output_dir / "metrics.json").exists():
        record = json.loads(done.read_text())
        if record.get("params") == json.loads(json.dumps(params, default=str)):
            return json.loads((output_dir / "metrics.json").read_text()), True
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "params.json").write_text(json.dumps(params, indent=2, default=str))
    metrics = _benchmark_module(benchmark).run(params, output_dir, callbacks=[*callbacks, LogProgress(every=log_every)])
    done.write_text(json.dumps({"params": params, "finished": time.time()}, default=str))
    for checkpoint in output_dir.rglob("checkpoint"):  # resume state: not needed once the run is done
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint, ignore_errors=True)
    return metrics, False


def load_benchmark_params(benchmark: str, combo: dict, overrides: dict | None) -> dict:
    """params/<benchmark>.yaml with the combination (task, model, method, vocab/setting) and the user's
    dotted overrides applied; relative data paths made absolute."""
    from components.config import load_params

    fixed = {"task": combo["task"], "model": combo["model"], "method": combo["method"]}
    if combo.get("vocab") is not None:
        fixed["vocab"] = combo["vocab"]
    if combo.get("setting") is not None:
        fixed["setting"] = combo["setting"]
    params = load_params(benchmark, {**fixed, **dict(overrides or {})})
    if "data_dir" in params:
        params["data_dir"] = str(resolve(params["data_dir"]))
    return params


# --- tasks -----------------------------------------------------------------------------------------

@task(name="check-services", cache_policy=NO_CACHE)
def check_services(tracking_uri: str, storage: str) -> dict:
    """Fail before any work when MLflow or the Optuna storage does not answer."""
    from components.mlops.search import check_storage
    from components.mlops.tracking import check_reachable

    check_reachable(tracking_uri)  # TrackingUnreachable / StorageUnreachable name the URL and what to do
    check_storage(storage)
    get_run_logger().info("MLflow at %s and Optuna storage %s answer", tracking_uri, storage)
    return {"tracking_uri": tracking_uri, "storage": storage}


@task(name="prepare-data", cache_policy=NO_CACHE, **RETRIES)
def prepare_data(stages: list[str]) -> dict:
    """`dvc repro STAGES` in the repository (their upstream stages too): DVC reruns only what changed.
    Returns the data version (dvc.lock's output hashes), an input of every later task."""
    logger = get_run_logger()
    if not (REPO / "dvc.yaml").exists():
        raise FileNotFoundError(f"{REPO / 'dvc.yaml'} not found: the flow runs the DVC stages of its repository")
    # Flow runs served side by side (lama and superglue) take turns: DVC's --wait-for-lock waits for the
    # repository lock only, and a second `dvc repro` still fails on the first one's lock of the shared stages'
    # outputs ("'data/raw' is busy").
    lock_path = REPO / ".dvc" / "tmp" / "ptuning-repro.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    command = [_tool("dvc"), "--wait-for-lock", "repro", *stages]
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        logger.info("data preparation: %s (in %s)", " ".join(["dvc", "repro", *stages]), REPO)
        process = subprocess.Popen(command, cwd=REPO, env=_subprocess_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        tail = []
        for line in process.stdout:
            line = line.rstrip()
            if line:
                tail = (tail + [line])[-40:]
                if len(line) < 400:  # the prepare stages print a long JSON summary as their last line
                    logger.info("dvc: %s", line)
        returncode = process.wait()
    if returncode != 0:
        message = "\n".join(tail)
        if "unable to acquire lock" in message.lower() or "is busy" in message:  # a DVC process outside the flow
            raise RuntimeError(f"dvc repro {' '.join(stages)}: another DVC process holds the repository (retried)\n{message}")
        raise ValueError(f"dvc repro {' '.join(stages)} failed (exit {returncode}):\n{message}")
    version = data_version(stages)
    logger.info("data version %s", stable_hash(version))
    return version


def _tracker(spec: dict):
    from components.mlops.tracking import Tracker

    return Tracker(spec["tracking_uri"], spec["experiment"], log_every=spec["log_every"], project_dir=REPO)


def _existing_parent(tracker, study: str) -> str | None:
    """The parent run an earlier attempt of this study left (a retry, or a rerun after a crash): the search
    goes on under it, so one study is one parent run whatever happened."""
    found = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.study = '{study}' and tags.role = 'search'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


@task(name="search", cache_policy=CACHED, **RETRIES)
def search(spec: dict) -> dict:
    """The Optuna study of one (task, model, method): trials until the grid (or n_trials) is done, each in a
    nested MLflow run under the combination's parent run. Returns the study's summary."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from components import search as opt

    logger = get_run_logger()
    _bridge_logs()
    benchmark, params = spec["benchmark"], spec["params"]
    s = spec["search"]
    study = opt.open_study(spec["study"], spec["storage"], s["space"], s["sampler"], s["seed"], s["pruner"],
                           pruner_options=s.get("pruner_options"), heartbeat=s.get("heartbeat"))
    n_grid = opt.grid_size(s["space"])
    budget = spec["n_trials"] or (n_grid if s["sampler"] == "grid" else None)
    if s["sampler"] == "grid" and budget:
        budget = min(budget, n_grid)
    already = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished() and opt.SKIPPED not in t.user_attrs)
    logger.info("study %s: %d trial(s) finished before, budget %s trial(s) (grid of %d)", spec["study"], already, budget, n_grid)
    progress = None
    with contextlib.suppress(Exception):  # a progress bar in the Prefect UI; never fail the search for it
        progress = create_progress_artifact(progress=100.0 * min(already, budget) / budget if budget else 0.0,
                                            description=f"trials of {spec['study']}")
    tracker = _tracker(spec)
    runs_root = resolve(spec["outputs_dir"]) / "runs"  # shared with final_train: same parameters, same directory
    count = {"ran": 0}

    def run_trial(trial_params: dict, callbacks: list, trial) -> dict:
        point = {key: trial.params[key] for key in sorted(trial.params)}
        out = runs_root / stable_hash(trial_params)
        logger.info("trial %d (%d/%s): %s -> %s", trial.number, already + count["ran"] + 1, budget or "?", point, out)
        try:
            with tracker.trial_run(f"trial-{trial.number}", {**point, "output_dir": str(out)},
                                   {"role": "trial", "study": spec["study"], "trial": trial.number}):
                metrics, reused = train_once(benchmark, trial_params, out, [*callbacks, tracker.callback()], spec["log_every"])
                tracker.log_result(metrics, output_dir=out)
        except Exception as error:  # optuna.TrialPruned among them: the search decides what it means
            logger.info("trial %d ended: %s: %s", trial.number, type(error).__name__, error)
            raise
        finally:
            count["ran"] += 1
            if progress is not None and budget:
                with contextlib.suppress(Exception):
                    update_progress_artifact(progress, progress=min(100.0, 100.0 * (already + count["ran"]) / budget))
        logger.info("trial %d: dev_score %.4f%s", trial.number, metrics["dev_score"], " (finished earlier, read back)" if reused else "")
        return metrics

    resume = _existing_parent(tracker, spec["study"])
    with tracker.parent_run(spec["study"], flatten(params), {**spec["tags"], "role": "search"}, run_id=resume) as parent:
        if resume:
            logger.info("study %s: resuming MLflow run %s", spec["study"], resume)
        remaining = None if spec["n_trials"] is None else max(0, spec["n_trials"] - already)
        if remaining != 0:
            opt.run_search(study, params, run_trial, n_trials=remaining, metric=s.get("metric", "dev_score"),
                           prune_by=s.get("prune_by", "step"))
        result = opt.summary(study)
        tracker.log_metrics({"best_dev_score": result["best_value"], "trials": result["trials"]}
                            if result["best_value"] is not None else {"trials": result["trials"]})
        parent_id = parent.info.run_id
    if result["best_params"] is None:
        raise RuntimeError(f"study {spec['study']}: no trial completed ({result})")
    logger.info("study %s: best dev_score %.4f with %s (trial %d; %d trial(s))", spec["study"], result["best_value"],
                result["best_params"], result["best_trial"], result["trials"])
    return {**result, "parent_run_id": parent_id}


@task(name="final-train", cache_policy=CACHED, **RETRIES)
def final_train(spec: dict, best_params: dict, seed: int, parent_run_id: str) -> dict:
    """Train with the best trial's parameters and `seed`; a nested MLflow run under the parent."""
    from components.config import apply_overrides

    logger = get_run_logger()
    _bridge_logs()
    params = apply_overrides(spec["params"], {**best_params, "train.seed": seed})
    out = resolve(spec["outputs_dir"]) / "runs" / stable_hash(params)
    logger.info("final training of %s, seed %d, %s -> %s", spec["study"], seed, best_params, out)
    tracker = _tracker(spec)
    with tracker.trial_run(f"final-seed-{seed}", {**best_params, "train.seed": seed, "output_dir": str(out)},
                           {"role": "final", "study": spec["study"], "seed": seed}, parent_run_id=parent_run_id) as run:
        metrics, reused = train_once(spec["benchmark"], params, out, [tracker.callback()], spec["log_every"])
        tracker.log_result(metrics, output_dir=out)
        run_id = run.info.run_id
    shown = metrics.get(spec["test_metric"])
    logger.info("final seed %d: dev_score %.4f, %s %s%s", seed, metrics["dev_score"], spec["test_metric"],
                "n/a" if shown is None else f"{shown:.4f}", " (finished earlier, read back)" if reused else "")
    return {"seed": seed, "run_id": run_id, "output_dir": str(out), "metrics": metrics,
            "vocab_file": _vocab_file(spec["benchmark"], params)}


def _vocab_file(benchmark: str, params: dict) -> str | None:
    """LAMA: the benchmark vocabulary, registered with the prompt so that the served model answers with its words."""
    if benchmark != "lama":
        return None
    path = Path(params["data_dir"]) / str(params["vocab"]) / "vocab.json"
    return str(path) if path.exists() else None


@task(name="evaluate", cache_policy=CACHED, **RETRIES)
def evaluate(spec: dict, finals: list[dict], parent_run_id: str) -> dict:
    """The figures over the seeds (mean, std) on the parent run; picks the best seed by dev score."""
    logger = get_run_logger()
    test_metric = spec["test_metric"]
    per_seed = [numeric(f["metrics"]) for f in finals]
    keys = sorted(set.intersection(*(set(m) for m in per_seed))) if per_seed else []
    summary = {}
    for key in keys:
        values = [m[key] for m in per_seed]
        summary[f"{key}_mean"] = statistics.fmean(values)
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    best = max(finals, key=lambda f: f["metrics"].get("dev_score", float("-inf")))
    result = {"test_metric": test_metric, "test_mean": summary.get(f"{test_metric}_mean"),
              "test_std": summary.get(f"{test_metric}_std"), "seeds": [f["seed"] for f in finals],
              "best_seed": best["seed"], "best_run_id": best["run_id"], "summary": summary}
    tracker = _tracker(spec)
    tracker.log_metrics({**{f"final.{k}": v for k, v in summary.items()}, "best_seed": best["seed"]}, run_id=parent_run_id)
    tracker.set_tags({"test_metric": test_metric, "best_final_run": best["run_id"]}, run_id=parent_run_id)
    shown = lambda v: "n/a" if v is None else f"{v:.4f}"
    logger.info("%s: %s %s ± %s over seeds %s (best seed %d by dev score)", spec["study"], test_metric,
                shown(result["test_mean"]), shown(result["test_std"]), result["seeds"], best["seed"])
    return result


@task(name="register", cache_policy=CACHED, **RETRIES)
def register(spec: dict, best_final: dict, evaluation: dict) -> list[dict]:
    """Register the best seed's prompt(s) as a new version of `ptuning-<benchmark>-<task>-<model>`, alias
    champion, logged from the final run that trained it."""
    from components.mlops.tracking import registered_name

    logger = get_run_logger()
    prompts = best_final["metrics"].get("prompts") or {}
    if not spec.get("register", True):
        logger.info("%s: registration is off (params/tracking.yaml register: false)", spec["study"])
        return []
    if not prompts:
        logger.info("%s: method %s exports no prompt; nothing to register", spec["study"], spec["method"])
        return []
    tracker = _tracker(spec)
    metrics = {**numeric(best_final["metrics"]),
               **{k: v for k, v in (("test_mean", evaluation["test_mean"]), ("test_std", evaluation["test_std"])) if v is not None}}
    registered = []
    for task_name, prompt_dir in sorted(prompts.items()):
        meta_file = Path(prompt_dir) / "prompt.json"
        if meta_file.exists() and json.loads(meta_file.read_text()).get("lm_trained"):
            logger.warning("%s: the LM was trained along with the prompt (freeze_lm false): the prompt alone does not "
                           "reproduce the result, so it is not registered (the run's artifacts hold it)", spec["study"])
            continue
        name = registered_name(spec["benchmark"], task_name, spec["model"])
        version = tracker.register_prompt(prompt_dir, name, metrics, vocab_file=best_final.get("vocab_file"),
                                          run_id=best_final["run_id"], alias=spec.get("alias", "champion"))
        registered.append({"name": name, "version": str(version.version), "alias": spec.get("alias"), "prompt_dir": prompt_dir,
                           "run_id": best_final["run_id"]})
        logger.info("registered %s version %s (alias %s) from %s", name, version.version, spec.get("alias"), prompt_dir)
    return registered


# --- the flow --------------------------------------------------------------------------------------

def _plan(benchmark: str, tasks, models, methods, vocab, setting, seeds, n_trials, search_space, overrides,
          experiment, tracking_uri, storage, outputs_dir, sampler) -> tuple[dict, list[dict]]:
    """Resolve the parameters against params/*.yaml: the run's settings and one spec per combination."""
    from components.config import load_params
    from components.mlops.search import grid_space, storage_url
    from components.mlops.tracking import tracking_uri as default_tracking_uri

    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {BENCHMARKS}")
    defaults = flow_defaults(benchmark)
    pick = lambda given, key, fallback=None: given if given is not None else defaults.get(key, fallback)
    params_search = load_params("search")
    tracking_params = load_params("tracking")
    tasks = [str(t) for t in pick(tasks, "tasks", [])]
    models, methods = list(pick(models, "models", [])), list(pick(methods, "methods", []))
    seeds = [int(s) for s in pick(seeds, "seeds", [])]
    if not tasks or not models or not methods or not seeds:
        raise ValueError(f"tasks, models, methods and seeds must not be empty (got {tasks}, {models}, {methods}, {seeds})")
    space = grid_space({"space": pick(search_space, "search_space") or params_search.get("space")})
    overrides = dict(pick(overrides, "overrides", {}) or {})
    run = {
        "benchmark": benchmark,
        "tracking_uri": absolute_sqlite(tracking_uri or default_tracking_uri(tracking_params)),
        "experiment": experiment or defaults.get("experiment") or tracking_params.get("experiment") or "ptuning",
        "register": bool(tracking_params.get("register", True)),
        "alias": tracking_params.get("alias", "champion"),
        "storage": absolute_sqlite(storage or storage_url(params_search)),
        "outputs_dir": str(resolve(pick(outputs_dir, "outputs_dir", "outputs/flow"))),
        "prepare_stages": list(defaults.get("prepare_stages") or []),
        "seeds": seeds,
    }
    search_settings = {
        "space": space, "sampler": sampler or params_search.get("sampler", "grid"), "seed": params_search.get("seed", 0),
        "pruner": params_search.get("pruner", "median"), "pruner_options": params_search.get("pruner_options"),
        "heartbeat": params_search.get("heartbeat"), "metric": params_search.get("metric", "dev_score"),
        "prune_by": params_search.get("prune_by", "step"),
    }
    n_trials = pick(n_trials, "n_trials", params_search.get("n_trials"))
    specs = []
    for task_name in tasks:
        for model in models:
            for method in methods:
                combo = {"task": task_name, "model": model, "method": method,
                         "vocab": pick(vocab, "vocab") if benchmark == "lama" else None,
                         "setting": pick(setting, "setting") if benchmark == "superglue" else None}
                params = load_benchmark_params(benchmark, combo, overrides)
                key = stable_hash({"params": params, "space": space, "sampler": search_settings["sampler"],
                                   "seed": search_settings["seed"]}, 8)
                from components.mlops.search import study_name

                name = study_name(benchmark, task_name, model, method, key)
                specs.append({
                    **{k: run[k] for k in ("benchmark", "tracking_uri", "experiment", "storage", "outputs_dir", "register", "alias")},
                    "task": task_name, "model": model, "method": method, "params": params, "study": name,
                    "search": search_settings, "n_trials": None if n_trials is None else int(n_trials),
                    "log_every": int(defaults.get("log_every", 10)),
                    "test_metric": defaults.get("test_metric", "dev_score"),
                    "tags": {"benchmark": benchmark, "task": task_name, "model": model, "method": method,
                             "study": name, "params_hash": key},
                })
    return run, specs


@flow(name="ptuning", log_prints=True,
      description="P-tuning: DVC data preparation -> Optuna search -> final training -> evaluation -> MLflow registration.")
def ptuning(
    benchmark: Literal["lama", "superglue"] = "lama",
    tasks: Optional[list[str]] = None,
    models: Optional[list[str]] = None,
    methods: Optional[list[str]] = None,
    setting: Optional[Literal["fewshot", "full"]] = None,
    vocab: Optional[Literal["29k", "34k"]] = None,
    seeds: Optional[list[int]] = None,
    n_trials: Optional[int] = None,
    search_space: Optional[dict[str, list[Any]]] = None,
    overrides: Optional[dict[str, Any]] = None,
    sampler: Optional[Literal["grid", "tpe", "random"]] = None,
    experiment: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    storage: Optional[str] = None,
    outputs_dir: Optional[str] = None,
    prepare: bool = True,
) -> dict:
    """Run the P-tuning pipeline for `benchmark`; every parameter left null comes from params/flow.yaml.

    Args:
        benchmark: lama | superglue.
        tasks: LAMA relations (P19, ...) or SuperGLUE tasks (rte, cb, ...).
        models: catalogue names (smollm2-135m, tiny-gpt2, ...), local HF directories or hub ids.
        methods: ptuning | finetune | manual-finetune | manual (LAMA) | manual-zeroshot (SuperGLUE).
        setting: SuperGLUE: fewshot | full.
        vocab: LAMA: 29k | 34k.
        seeds: final training seeds (one run each with the best parameters).
        n_trials: the search budget per (task, model, method); null: the whole grid.
        search_space: {dotted.param: [values]}; null: params/flow.yaml, then params/search.yaml.
        overrides: {dotted.param: value} applied to params/<benchmark>.yaml for every run (e.g. train.max_steps).
        sampler: grid | tpe | random (params/search.yaml's when null).
        experiment: MLflow experiment name.
        tracking_uri: MLflow tracking URI (env MLFLOW_TRACKING_URI / params/tracking.yaml when null).
        storage: Optuna storage URL (env OPTUNA_STORAGE / params/search.yaml when null).
        outputs_dir: where trial and final runs write (relative to the repository).
        prepare: run the DVC preparation stages first (false: use data/ as it is).
    """
    logger = get_run_logger()
    _bridge_logs()
    if Path.cwd() != REPO:  # served and worker runs start elsewhere; every relative path is the repository's
        os.chdir(REPO)
    run, specs = _plan(benchmark, tasks, models, methods, vocab, setting, seeds, n_trials, search_space, overrides,
                       experiment, tracking_uri, storage, outputs_dir, sampler)
    logger.info("ptuning/%s: %d combination(s) %s, seeds %s, MLflow %s (experiment %s), Optuna %s", benchmark,
                len(specs), [(s["task"], s["model"], s["method"]) for s in specs], run["seeds"], run["tracking_uri"],
                run["experiment"], run["storage"])
    check_services(run["tracking_uri"], run["storage"])

    version = prepare_data(run["prepare_stages"]) if prepare and run["prepare_stages"] else data_version(run["prepare_stages"])
    code = code_version(benchmark)
    results = []
    for i, spec in enumerate(specs, 1):
        spec = {**spec, "data_version": version, "code_version": code}
        logger.info("[%d/%d] %s", i, len(specs), spec["study"])
        found = search(spec)
        finals = [final_train(spec, found["best_params"], seed, found["parent_run_id"]) for seed in run["seeds"]]
        evaluation = evaluate(spec, finals, found["parent_run_id"])
        best = next(f for f in finals if f["seed"] == evaluation["best_seed"])
        registered = register(spec, best, evaluation)
        results.append({"study": spec["study"], "task": spec["task"], "model": spec["model"], "method": spec["method"],
                        "best_params": found["best_params"], "best_dev_score": found["best_value"],
                        "trials": found["trials"], "parent_run_id": found["parent_run_id"],
                        "test_metric": evaluation["test_metric"], "test_mean": evaluation["test_mean"],
                        "test_std": evaluation["test_std"], "registered": registered})
    _summary_artifact(benchmark, run, results)
    return {"benchmark": benchmark, "tracking_uri": run["tracking_uri"], "experiment": run["experiment"],
            "storage": run["storage"], "results": results}


def _summary_artifact(benchmark: str, run: dict, results: list[dict]) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = [f"# ptuning/{benchmark}", "", f"MLflow: `{run['tracking_uri']}` (experiment `{run['experiment']}`), "
             f"Optuna: `{run['storage']}`", "",
             "| study | best params | best dev | test (mean ± std) | registered |", "|---|---|---|---|---|"]
    for r in results:
        reg = ", ".join(f"{x['name']} v{x['version']} (@{x['alias']})" for x in r["registered"]) or "-"
        test = "-" if r["test_mean"] is None else f"{r['test_metric']} {r['test_mean']:.4f} ± {r['test_std'] or 0:.4f}"
        lines.append(f"| {r['study']} | {r['best_params']} | {r['best_dev_score']:.4f} | {test} | {reg} |")
    try:
        create_markdown_artifact("\n".join(lines), key=f"ptuning-{benchmark}", description="ptuning results")
    except Exception:
        pass
