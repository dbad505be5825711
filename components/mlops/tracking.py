"""MLflow tracking and model registry: runs, metrics, the data version and registered prompts.

    tracker = Tracker(tracking_uri(load_params("tracking")), "ptuning-lama")   # checks the store first
    with tracker.parent_run("lama-P19", params):            # the flow run: params, git commit, data version
        with tracker.trial_run("lr=1e-05,bs=16", trial_params):   # one configuration, nested
            metrics = lama.run(config, out, callbacks=[tracker.callback()])
            tracker.log_result(metrics, output_dir=out)
            tracker.register_prompt(metrics["prompts"]["P19"], None, metrics, report_key="test.p1",
                                    command="ptuning train lama --task P19")

The store is `sqlite:///mlflow.db` (embedded, no server) unless MLFLOW_TRACKING_URI or
params/tracking.yaml name one (`http://host:5000`, `postgresql://...`). Each store keeps its runs' artifacts
apart (artifact_location: `mlruns/<store>/<experiment>/` beside a SQLite file; a server keeps its own). Runs are addressed by id through
an MlflowClient, never through MLflow's thread-local "active run", so Prefect tasks running in worker
threads log to the right run.

A registered prompt is components.mlops.serving's models-from-code pyfunc. `champion` means best: a new
version takes it only when its dev selection score beats the current champion's (one registered model per
benchmark, task, vocabulary or setting, and base model); otherwise it is the `challenger`. Test figures are
recorded on the version, never used to decide.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow

from components.common import flatten, numeric_metrics, redact_url, safe_name
from components.mlops.serving import check_servable, input_fields, log_prompt_model
from components.mlops.stores import DEFAULT_TRACKING as DEFAULT_URI
from components.mlops.stores import TrackingUnreachable, check_reachable  # noqa: F401  (the tracker's face)
from components.training import Callback

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
# what makes two versions comparable: one registered model holds one scope (registered_name)
SCOPE = ("benchmark", "task", "vocab", "setting", "base_model")
# The experiment is a model-training one, not a GenAI app: its tag says so (MLflow's experiment kind). MLflow
# 3.17's UI lands on the tab of the browser's workflow toggle (GenAI by default, kept in localStorage), so the
# project's links carry `workflowType=machine_learning` too (experiment_url).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Evaluations during training log `dev.*` at their steps (TrackingCallback); the final figures of the state a
# run keeps (its best evaluation) are logged as `best.dev.*` (Tracker.log_result).
EVALUATED_SPLIT = "dev."
BEST_PREFIX = "best."


# --- where runs go ------------------------------------------------------------------------------

def tracking_uri(params_tracking: dict | None = None) -> str:
    """env MLFLOW_TRACKING_URI > params/tracking.yaml `uri` > sqlite:///mlflow.db (embedded, no server)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (params_tracking or {}).get("uri") or DEFAULT_URI


# --- helpers ------------------------------------------------------------------------------------

def _key(name: str) -> str:
    """A name MLflow accepts for a param, metric or tag."""
    return safe_name(name, allowed=r"\w\-. /:")


def git_commit(directory: str | Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git work tree around `directory` (cwd), or (None, None) outside one."""
    cwd = str(directory or Path.cwd())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def _entry_hash(entry: dict) -> str | None:
    for key in ("md5", "etag", "checksum"):
        if entry.get(key):
            return str(entry[key])
    return None


def dvc_lock_tags(lock_path: str | Path, stages: list[str] | tuple[str, ...] | None = None) -> dict:
    """The data version as dvc.lock records it (the project's one reader of dvc.lock): tags
    `dvc.<stage>.outs.<path>` / `dvc.<stage>.deps.<path>` = md5, `dvc.lock_md5`, and `data_version`, one
    hash over the stage outputs (what the data is, whatever produced it). `stages`: only these (default all).
    No dvc.lock: {}."""
    import yaml

    if not Path(lock_path).is_file():
        return {}
    lock = yaml.safe_load(Path(lock_path).read_text()) or {}
    tags, outs = {}, []
    for stage, body in sorted((lock.get("stages") or {}).items()):
        if stages is not None and stage not in stages:
            continue
        for kind in ("deps", "outs"):
            for entry in (body or {}).get(kind) or []:
                digest = _entry_hash(entry)
                if digest and entry.get("path"):
                    tags[_key(f"dvc.{stage}.{kind}.{entry['path']}")] = digest
                    if kind == "outs":
                        outs.append(f"{stage}:{entry['path']}:{digest}")
    tags["dvc.lock_md5"] = hashlib.md5(Path(lock_path).read_bytes()).hexdigest()
    if outs:
        tags["data_version"] = hashlib.md5("\n".join(sorted(outs)).encode()).hexdigest()[:12]
    return tags


def registered_name(benchmark: str, task: str, model: str, variant: str | None = None) -> str:
    """`ptuning-<benchmark>-<task>[-<variant>]-<model>`, e.g. ptuning-lama-P19-29k-smollm2-135m: one registered
    model per benchmark, task, vocabulary (LAMA) or setting (SuperGLUE), and base model, so that its champion
    is the best of comparable versions. A hub id's `/` and any other character outside [A-Za-z0-9_.-] become `-`."""
    return safe_name("ptuning", benchmark, task, variant, model)


def artifact_location(uri: str, experiment: str, project_dir: str | Path | None = None) -> str | None:
    """Where an experiment created in the store `uri` keeps its runs' artifacts, so that no two stores share a
    folder (MLflow's default for a database store is `./mlruns/<experiment id>` of the working directory: two
    stores used from one checkout wrote into the same folders). A SQLite store: `mlruns/<file stem>/<experiment>`
    beside its file (sqlite:///mlflow.db in the checkout: `mlruns/mlflow/ptuning/`); another database:
    `mlruns/<driver>-<host>-<port>-<database>/<experiment>` of `project_dir` (default: the working directory).
    None (the store's own choice) for a tracking server, which keeps or proxies its artifacts itself, and for a
    file store, which keeps them in its own folder."""
    scheme = urlparse(uri).scheme.lower()
    if not scheme.startswith(("sqlite", "postgresql", "postgres", "mysql", "mssql")):
        return None
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(uri)
    except Exception:
        return None
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
            return None
        database = Path(url.database).expanduser().resolve()
        root = database.parent / "mlruns" / safe_name(database.stem)
    else:
        store = safe_name(url.get_backend_name(), url.host, url.port, url.database)
        root = Path(project_dir or Path.cwd()).resolve() / "mlruns" / store
    return (root / safe_name(experiment)).as_uri()


def best_metric_key(key: str) -> str:
    """The MLflow key of a final figure: `dev.p1` -> `best.dev.p1` (the kept state's; `dev.*` steps are the
    evaluations' curve), anything else unchanged (`test.p1`, `tasks.P19.dev.p1`)."""
    return f"{BEST_PREFIX}{key}" if key.startswith(EVALUATED_SPLIT) else key


def experiment_url(uri: str, experiment_id: str) -> str:
    """The UI page of an experiment on an MLflow server, opening on its training runs."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def prompt_scope(meta: dict) -> dict:
    """The scope of an exported prompt (prompt.json): benchmark, task, vocab or setting, base model."""
    return {k: str(meta[k]) for k in SCOPE if meta.get(k) is not None}


# --- the tracker ---------------------------------------------------------------------------------

class Tracker:
    """Runs of one experiment in one tracking store. `parent_run` is the flow's run; `trial_run`s nest
    under it (from any thread); `callback()` logs training as it goes; `register_prompt` versions a
    trained prompt in the model registry and points the `champion` alias at it."""

    def __init__(self, uri: str, experiment: str, *, log_every: int = 10, project_dir: str | Path | None = None,
                 check: bool = True):
        from mlflow import MlflowClient

        if check:
            check_reachable(uri)
        self.uri, self.experiment, self.log_every = uri, experiment, log_every
        self.project_dir = Path(project_dir) if project_dir else None
        # Model logging and the registry resolve the store globally: point them here too.
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.experiment_id = self._experiment_id(experiment)
        self._parent: str | None = None
        self._local = threading.local()

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        for _ in range(3):
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    self.client.restore_experiment(found.experiment_id)
                if not EXPERIMENT_KIND.items() <= found.tags.items():
                    for key, value in EXPERIMENT_KIND.items():
                        self.client.set_experiment_tag(found.experiment_id, key, value)
                return found.experiment_id
            try:
                return self.client.create_experiment(
                    name, artifact_location=artifact_location(self.uri, name, self.project_dir), tags=EXPERIMENT_KIND)
            except MlflowException:  # created meanwhile by another worker
                continue
        raise TrackingUnreachable(f"could not create or find experiment {name!r} in {redact_url(self.uri)}")

    # -- run bookkeeping --
    def _stack(self) -> list[str]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def current_run_id(self) -> str | None:
        """This thread's innermost trial run, else the parent run."""
        stack = self._stack()
        return stack[-1] if stack else self._parent

    def _run_for(self, run_id: str | None) -> str:
        run_id = run_id or self.current_run_id()
        if run_id is None:
            raise RuntimeError("no MLflow run: open tracker.parent_run(...) or tracker.trial_run(...) first")
        return run_id

    def log_params(self, params: dict, run_id: str | None = None) -> None:
        from mlflow.entities import Param

        items = [Param(_key(k), str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self._run_for(run_id), params=items[start:start + 100])

    def set_tags(self, tags: dict, run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(_key(k), str(v)[:8000]) for k, v in tags.items() if v is not None]
        for start in range(0, len(items), 100):
            self.client.log_batch(self._run_for(run_id), tags=items[start:start + 100])

    def log_metrics(self, metrics: dict, step: int | None = None, run_id: str | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_key(k), v, now, step or 0) for k, v in numeric_metrics(metrics).items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self._run_for(run_id), metrics=items[start:start + 1000])

    def _source_tags(self) -> dict:
        directory = self.project_dir or Path.cwd()
        commit, dirty = git_commit(directory)
        tags = {}
        if commit:
            tags.update({"mlflow.source.git.commit": commit, "git_commit": commit, "git_dirty": str(dirty).lower()})
        return tags

    @contextlib.contextmanager
    def _run(self, name: str, params: dict, tags: dict, nested_in: str | None, resume: str | None = None):
        from mlflow.entities import RunStatus

        if resume:
            run_id = resume
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_tags = dict(tags)
            if nested_in:
                run_tags["mlflow.parentRunId"] = nested_in
            run_id = self.client.create_run(self.experiment_id, run_name=name,
                                            tags={_key(k): str(v) for k, v in run_tags.items()}).info.run_id
            if params:
                self.log_params(params, run_id)
        status = RunStatus.FINISHED
        try:
            yield self.client.get_run(run_id)
        except BaseException as error:
            if type(error).__name__ == "TrialPruned":  # optuna's: a normal end for a search trial
                self.client.set_tag(run_id, "pruned", "true")
            else:
                status = RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED
                with contextlib.suppress(Exception):
                    self.client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:8000])
            raise
        finally:
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, RunStatus.to_string(status))

    @contextlib.contextmanager
    def parent_run(self, name: str, params: dict, tags: dict | None = None, *, run_id: str | None = None):
        """The flow run's MLflow run: flattened params; tags git commit (`git rev-parse HEAD`) and the data
        version from dvc.lock (logged as an artifact too) when there is one. `run_id` resumes a run."""
        lock = (self.project_dir or Path.cwd()) / "dvc.lock"
        data_tags = dvc_lock_tags(lock)
        all_tags = {**self._source_tags(), **data_tags, **(tags or {})}
        with self._run(name, params, all_tags, None, resume=run_id) as run:
            if run_id:
                self.set_tags(all_tags, run.info.run_id)
            if lock.exists():
                self.client.log_artifact(run.info.run_id, str(lock))
                if "data_version" in data_tags and not run_id:
                    self.log_params({"data_version": data_tags["data_version"]}, run.info.run_id)
            previous, self._parent = self._parent, run.info.run_id
            try:
                yield run
            finally:
                self._parent = previous

    @contextlib.contextmanager
    def trial_run(self, name: str, params: dict, tags: dict | None = None, *, parent_run_id: str | None = None):
        """A run nested under the parent run (this tracker's, or `parent_run_id` from another process);
        a top-level run when there is none. Inside it, callback()/log_result()/register_prompt() use it."""
        parent = parent_run_id or self._parent
        all_tags = dict(tags or {})
        if parent is None:
            all_tags.update(self._source_tags())
        with self._run(name, params, all_tags, parent) as run:
            stack = self._stack()
            stack.append(run.info.run_id)
            try:
                yield run
            finally:
                stack.pop()

    def callback(self, run_id: str | None = None, log_every: int | None = None) -> "TrackingCallback":
        return TrackingCallback(self, self._run_for(run_id), log_every or self.log_every)

    def log_result(self, metrics: dict, *, history=None, output_dir: str | Path | None = None,
                   run_id: str | None = None) -> None:
        """Final metrics, flattened (tasks.P19.test.p1 ...): numbers as metrics, strings as `result.*` tags;
        metrics.json and history.json (given, or from `output_dir`) as artifacts. The figures of the kept (best)
        state on the split the evaluations measure go under keys of their own, `best.dev.p1`, `best.dev.score`
        (best_metric_key): under `dev.p1` they would join the evaluations' curve, and MLflow's latest value (the
        largest step) would show the last evaluation's figure, not the kept state's."""
        run_id = self._run_for(run_id)
        flat = flatten(metrics)
        self.log_metrics({best_metric_key(k): v for k, v in numeric_metrics(metrics).items()}, run_id=run_id)
        self.set_tags({f"result.{k}": v for k, v in flat.items() if isinstance(v, str)}, run_id)
        self.client.log_dict(run_id, metrics, "metrics.json")
        if history is None and output_dir is not None and (Path(output_dir) / "history.json").exists():
            history = json.loads((Path(output_dir) / "history.json").read_text())
        if history is not None:
            self.client.log_dict(run_id, history, "history.json")

    def log_report(self, report_dir: str | Path, run_id: str | None = None) -> None:
        """A report folder's files under `report/`: results.json, REPORT.md, the figures and units, not its
        lock or its units' scratch dirs (`.run.lock`, `.scratch/`)."""
        run_id = self._run_for(run_id)
        for entry in sorted(Path(report_dir).iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                self.client.log_artifacts(run_id, str(entry), artifact_path=f"report/{entry.name}")
            else:
                self.client.log_artifact(run_id, str(entry), artifact_path="report")

    def register_prompt(self, prompt_dir: str | Path, name: str | None, metrics: dict, *,
                        selection_key: str = "dev.score", report_key: str | None = None, run_id: str | None = None,
                        command: str | None = None):
        """Register the prompt exported in `prompt_dir` as a new version of `name` (None: registered_name of
        its prompt.json) and return that ModelVersion.

        `metrics`: THIS prompt's figures, nested or flat (a run of several tasks: pass the task's own), with
        `selection_key` (a dev figure) and `report_key` (e.g. test.p1 / val.score) among them. The version
        takes the alias `champion` when metrics[selection_key] beats the current champion's, else
        `challenger`; test figures are recorded as tags and never decide. `run_id`: the run that trained it
        (default: this thread's current run); `command`: what trained it, shown on the version.
        Refuses, before anything is logged: a prompt the served model cannot answer for (NotServable), a
        missing selection or report figure, a scope or selection key that differs from the champion's."""
        from mlflow.exceptions import MlflowException

        meta = check_servable(prompt_dir)
        scope = prompt_scope(meta)
        name = name or registered_name(meta.get("benchmark"), meta.get("task"), meta.get("base_model"),
                                       meta.get("vocab") or meta.get("setting"))
        figures = numeric_metrics(metrics)
        for key in (selection_key, report_key):
            if key is not None and key not in figures:
                raise ValueError(f"metrics have no {key!r} to register {name} with; they have {sorted(figures)}")
        score = figures[selection_key]
        try:
            champion = self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:  # no such model, or no champion yet
            champion = None
        if champion is not None:
            theirs = {k: champion.tags.get(k) for k in SCOPE if champion.tags.get(k) is not None}
            if theirs != scope:
                raise ValueError(f"{name}: this prompt's scope {scope} differs from its champion's {theirs} "
                                 f"(version {champion.version}); register it under registered_name(...) of its own")
            if champion.tags.get("selection_key") != selection_key:
                raise ValueError(f"{name}: its champion was selected on {champion.tags.get('selection_key')!r}, "
                                 f"not {selection_key!r}: the scores are not comparable")
        best = float(champion.tags[selection_key]) if champion is not None and selection_key in champion.tags else None
        wins = best is None or score > best
        run_id = self._run_for(run_id)
        command = command or self.client.get_run(run_id).data.tags.get("command")
        strings = {k: v for k, v in flatten(metrics).items() if k in ("method", "model") and isinstance(v, str)}
        decision = (f"{selection_key} {score:.4f} " + ("(first version)" if champion is None else
                    f"{'beats' if wins else 'does not beat'} champion version {champion.version}'s {best:.4f}"))
        tags = {**scope, **strings, "template": meta["template"], "selection_key": selection_key,
                "report_key": report_key, **figures,
                "alias_decision": decision, "command": command, "source_run_id": run_id}
        info = log_prompt_model(prompt_dir, run_id=run_id, registered_model_name=name,
                                tags={k: str(v) for k, v in scope.items()})
        version = str(info.registered_model_version)
        for key, value in tags.items():
            if value is not None:
                self.client.set_model_version_tag(name, version, _key(key), str(value)[:5000])
        self.client.update_model_version(name, version, description=_describe(meta, figures, tags, version))
        self.client.set_registered_model_alias(name, CHAMPION if wins else CHALLENGER, version)
        if wins:  # the registered model says what it is and what its champion scores
            for key, value in {**scope, "template": meta["template"], "answers": _answers(meta)}.items():
                self.client.set_registered_model_tag(name, key, str(value)[:5000])
            self.client.update_registered_model(name, description=_describe(meta, figures, tags, version, champion=True))
        log.info("registered %s version %s as %s: %s", name, version, CHAMPION if wins else CHALLENGER, decision)
        return self.client.get_model_version(name, version)


def _answers(meta: dict) -> str:
    if not meta.get("labels"):  # LAMA: no fixed labels, the benchmark vocabulary
        return f"words of the {meta.get('vocab', 'benchmark')} vocabulary, top-k with scores"
    return "labels " + ", ".join(f"{label} ({meta['verbalizer'][label]!r})" for label in meta["labels"]) + ", with scores"


def _describe(meta: dict, figures: dict, tags: dict, version: str, champion: bool = False) -> str:
    """What a version (or its registered model, through its champion) is, as the MLflow UI shows it."""
    variant = f"vocab {meta['vocab']}" if meta.get("vocab") else f"setting {meta.get('setting')}"
    figure = lambda key: f"{key} = {figures[key]:.4f}"
    dev = [figure(k) for k in sorted(figures) if k.startswith("dev.")]
    test = [figure(k) for k in sorted(figures) if k.startswith(("test.", "val."))]
    lines = [f"P-tuning prompt: benchmark {meta.get('benchmark')}, task {meta.get('task')}, {variant}, "
             f"base model {meta.get('base_model')}" + (" (LM tuned with the prompt)" if meta.get("lm_trained") else "") + ".",
             "", f"- template: `{meta['template']}`",
             f"- dev figures (selection on {tags['selection_key']}): {', '.join(dev) or 'none'}",
             f"- test figures (reported: {tags['report_key'] or 'none'}; never used to select): {', '.join(test) or 'none'}",
             f"- alias: {tags['alias_decision']}",
             f"- trained by: `{tags['command'] or 'unknown'}` (run {tags['source_run_id']})",
             f"- answers: {_answers(meta)}; request fields: {', '.join(input_fields(meta))}"]
    if champion:
        lines.insert(0, f"Champion: version {version}, the best {tags['selection_key']} of this model's versions.\n")
    return "\n".join(lines)


def _schedule_factor(info: dict):
    """step -> the learning-rate schedule's factor after that many optimizer steps, as components.training's
    own schedule computes it for this fit (on_train_begin's `info`); None when `info` does not say."""
    try:
        import torch

        from components.training import TrainConfig, make_schedule

        config = TrainConfig.from_dict(info["config"])
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        return make_schedule(optimizer, config, info["total_steps"], info["steps_per_epoch"]).lr_lambdas[0]
    except Exception:
        return None


class TrackingCallback(Callback):
    """Training as it goes: `train_loss` (mean over the last `every` steps) and `lr_scale` every `every` steps,
    each evaluation's metrics at its step, `epoch_train_loss` per epoch, the best step at the end.
    Several fits in one run (LAMA `all`) continue one another's steps. A logging failure is reported
    once and never stops training.

    The learning rate: `lr`, the optimizer's learning rate before the schedule (its first parameter group: the
    prompt's, the LM's when only the LM trains), is logged once at step 0, and `lr_scale`, the schedule's factor
    (the learning rate at a step is lr x lr_scale), at the steps. MLflow draws a constant series on an axis of
    its value +-1 (plotly's autorange), so a constant lr of 3e-4 logged at each step read as a flat line at 0;
    a figure logged at step 0 only is drawn as a bar from 0, and the factor reads on the +-1 axis (1.0: the
    full lr, 0.98 after an epoch of exponential decay)."""

    def __init__(self, tracker: Tracker, run_id: str, every: int = 10):
        self.tracker, self.run_id, self.every = tracker, run_id, max(1, int(every))
        self.offset = self.last = 0
        self.epochs_before = self.epoch = 0
        self.window: list[float] = []
        self.epoch_losses: list[float] = []
        self.steps_per_epoch = None
        self.factor = None  # step -> the schedule's factor of the current fit
        self.base_lrs: tuple[float, ...] = ()
        self.lr_logged = False
        self.failed = False

    def _log(self, metrics: dict, step: int) -> None:
        try:
            self.tracker.log_metrics(metrics, step=step, run_id=self.run_id)
        except Exception as error:  # the tracking store went away: training goes on
            if not self.failed:
                log.warning("MLflow logging to run %s failed, training goes on: %s", self.run_id, error)
            self.failed = True

    def on_train_begin(self, info: dict) -> None:
        self.offset, self.epochs_before = self.last, self.epoch
        self.steps_per_epoch = info.get("steps_per_epoch")
        self.window, self.epoch_losses = [], []
        self.factor, self.lr_logged = _schedule_factor(info), False
        config = info.get("config") or {}
        self.base_lrs = tuple(config[k] for k in ("lr", "lm_lr") if isinstance(config.get(k), (int, float)))
        if info.get("resumed_at_step"):
            with contextlib.suppress(Exception):
                self.tracker.client.set_tag(self.run_id, "resumed_at_step", str(info["resumed_at_step"]))

    def _base_lr(self, lr: float, factor: float) -> float | None:
        """The learning rate before the schedule: lr / factor, as configured (train.lr or train.lm_lr) when it
        is one of them (no rounding error of the division in the record)."""
        if factor <= 0:
            return None
        base = lr / factor
        return next((b for b in self.base_lrs if math.isclose(b, base, rel_tol=1e-6)), base)

    def on_step(self, step: int, loss: float, lr: float) -> None:
        at = self.offset + step
        self.last = at
        self.window.append(loss)
        self.epoch_losses.append(loss)
        factor = self.factor(step) if self.factor is not None else None
        if factor is not None and not self.lr_logged and (base := self._base_lr(lr, factor)) is not None:
            self._log({"lr": base}, 0)
            self.lr_logged = True
        if step % self.every == 0:
            schedule = {"lr_scale": factor} if factor is not None else {"lr": lr}  # no schedule known: the lr itself
            self._log({"train_loss": sum(self.window) / len(self.window), **schedule}, at)
            self.window = []
        if self.steps_per_epoch and step % self.steps_per_epoch == 0:
            self.epoch = self.epochs_before + step // self.steps_per_epoch
            self._log({"epoch_train_loss": sum(self.epoch_losses) / len(self.epoch_losses)}, self.epoch)
            self.epoch_losses = []

    def on_evaluate(self, step: int, epoch: int, metrics: dict, improved: bool) -> None:
        at = self.offset + step
        self.last = max(self.last, at)
        self._log({**metrics, "epoch": self.epochs_before + epoch}, at)

    def on_train_end(self, result) -> None:
        if self.window:
            self._log({"train_loss": sum(self.window) / len(self.window)}, self.last)
            self.window = []
        self._log({"best_step": self.offset + result.best_step, "train_seconds": result.seconds}, self.last)
