"""MLflow tracking: runs, metrics, the model registry's versions, and training logged as it goes.

    tracker = Tracker("sqlite:///mlflow.db", "ptuning-lama")   # checks the store first
    with tracker.parent_run("lama-P19", params):            # the flow run: params, git commit, data version
        with tracker.trial_run("lr=1e-05,bs=16", trial_params):   # one configuration, nested
            metrics = lama.run(config, out, callbacks=[tracker.callback()])
            tracker.log_result(metrics, output_dir=out)
            tracker.register_prompt(metrics["prompts"]["P19"], None, metrics, report_key="test.p1",
                                    command="ptuning train lama --task P19")

Which store a run uses is components.mlops.stores' choice (`tracking_store`). Each store keeps its runs'
artifacts apart (artifact_location: `mlruns/<store>/<experiment>/` beside a SQLite file; a server keeps its own).
Runs are addressed by id through an MlflowClient, never through MLflow's thread-local "active run", so Prefect
tasks running in worker threads log to the right run. Earlier runs are found again by their tags
(`latest_run_id`), so a rerun resumes or reads back instead of logging twice.

A registered prompt is components.mlops.serving's models-from-code pyfunc; its alias follows
components.mlops.champion, its description components.mlops.model_card.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow

from components.common import flatten, numeric_metrics, redact_url, safe_name
from components.mlops import model_card
from components.mlops.champion import CHAMPION, decide_alias, prompt_scope, registered_name
from components.mlops.provenance import dvc_lock_tags, git_tags
from components.mlops.serving import check_servable, log_prompt_model
from components.mlops.stores import TrackingUnreachable, check_reachable
from components.mlops.tracking_callback import TrackingCallback

log = logging.getLogger(__name__)

# The experiment is a model-training one, not a GenAI app: its tag says so (MLflow's experiment kind). MLflow
# 3.17's UI lands on the tab of the browser's workflow toggle (GenAI by default, kept in localStorage), so the
# project's links carry `workflowType=machine_learning` too (experiment_url).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Evaluations during training log `dev.*` at their steps (TrackingCallback); the final figures of the state a
# run keeps (its best evaluation) are logged as `best.dev.*` (Tracker.log_result).
EVALUATED_SPLIT = "dev."
BEST_PREFIX = "best."


def _key(name: str) -> str:
    """A name MLflow accepts for a param, metric or tag."""
    return safe_name(name, allowed=r"\w\-. /:")


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

    # -- earlier runs: what an interrupted or finished attempt left in the store --
    def latest_run_id(self, **tags) -> str | None:
        """The newest run of this experiment that carries every one of `tags`, else None."""
        query = " and ".join(f"tags.{key} = '{value}'" for key, value in tags.items())
        found = self.client.search_runs([self.experiment_id], filter_string=query,
                                        order_by=["attributes.start_time DESC"], max_results=1)
        return found[0].info.run_id if found else None

    def versions_of_run(self, run_id: str) -> list:
        """The model versions registered from run `run_id`."""
        return self.client.search_model_versions(f"run_id = '{run_id}'")

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
        all_tags = {**git_tags(self.project_dir or Path.cwd()), **data_tags, **(tags or {})}
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
            all_tags.update(git_tags(self.project_dir or Path.cwd()))
        with self._run(name, params, all_tags, parent) as run:
            stack = self._stack()
            stack.append(run.info.run_id)
            try:
                yield run
            finally:
                stack.pop()

    def callback(self, run_id: str | None = None, log_every: int | None = None) -> TrackingCallback:
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

    def log_prompt_files(self, prompt_dir: str | Path, run_id: str, artifact_path: str = "prompt") -> None:
        """An exported prompt's files (vectors, encoder, prompt.json; a jointly tuned LM under lm/) as artifacts
        of the run that trained it: what keeps a prompt that no registered model can serve."""
        self.client.log_artifacts(run_id, str(prompt_dir), artifact_path=artifact_path)

    def register_prompt(self, prompt_dir: str | Path, name: str | None, metrics: dict, *,
                        selection_key: str = "dev.score", report_key: str | None = None, run_id: str | None = None,
                        command: str | None = None):
        """Register the prompt exported in `prompt_dir` as a new version of `name` (None: registered_name of
        its prompt.json) and return that ModelVersion.

        `metrics`: THIS prompt's figures, nested or flat (a run of several tasks: pass the task's own), with
        `selection_key` (a dev figure) and `report_key` (e.g. test.p1 / val.score) among them. The version
        takes the alias components.mlops.champion.decide_alias gives it (`champion` when metrics[selection_key]
        beats the current champion's, else `challenger`); test figures are recorded as tags and never decide.
        `run_id`: the run that trained it (default: this thread's current run); `command`: what trained it,
        shown on the version. Refuses, before anything is logged: a prompt the served model cannot answer for
        (NotServable), a missing selection or report figure, a scope or selection key that differs from the
        champion's."""
        meta = check_servable(prompt_dir)
        scope = prompt_scope(meta)
        name = name or registered_name(meta.get("benchmark"), meta.get("task"), meta.get("base_model"),
                                       meta.get("vocab") or meta.get("setting"))
        figures = numeric_metrics(metrics)
        for key in (selection_key, report_key):
            if key is not None and key not in figures:
                raise ValueError(f"metrics have no {key!r} to register {name} with; they have {sorted(figures)}")
        decision = decide_alias(self.client, name, scope, selection_key, figures[selection_key])
        run_id = self._run_for(run_id)
        command = command or self.client.get_run(run_id).data.tags.get("command")
        strings = {k: v for k, v in flatten(metrics).items() if k in ("method", "model") and isinstance(v, str)}
        tags = {**scope, **strings, "template": meta["template"], "selection_key": selection_key,
                "report_key": report_key, **figures,
                "alias_decision": decision.reason, "command": command, "source_run_id": run_id}
        info = log_prompt_model(prompt_dir, run_id=run_id, registered_model_name=name,
                                tags={k: str(v) for k, v in scope.items()})
        version = str(info.registered_model_version)
        for key, value in tags.items():
            if value is not None:
                self.client.set_model_version_tag(name, version, _key(key), str(value)[:5000])
        self.client.update_model_version(name, version, description=model_card.describe(meta, figures, tags, version))
        self.client.set_registered_model_alias(name, decision.alias, version)
        if decision.alias == CHAMPION:  # the registered model says what it is and what its champion scores
            for key, value in {**scope, "template": meta["template"], "answers": model_card.answers(meta)}.items():
                self.client.set_registered_model_tag(name, key, str(value)[:5000])
            self.client.update_registered_model(
                name, description=model_card.describe(meta, figures, tags, version, champion=True))
        log.info("registered %s version %s as %s: %s", name, version, decision.alias, decision.reason)
        return self.client.get_model_version(name, version)
