"""MLflow tracking and model registry: every MLflow call of the project lives here.

    tracker = Tracker(tracking_uri(load_params("tracking")), "ptuning-lama")   # checks the store first
    with tracker.parent_run("lama-P19", params):            # the flow run: params, git commit, data version
        with tracker.trial_run("lr=1e-05,bs=16", trial_params):   # one configuration, nested
            metrics = lama.run(trial_params, out, callbacks=[tracker.callback()])
            tracker.log_result(metrics, output_dir=out)
            tracker.register_prompt(metrics["prompts"]["P19"], registered_name("lama", "P19", model), metrics)

The store is `sqlite:///mlflow.db` (embedded, no server) unless MLFLOW_TRACKING_URI or
params/tracking.yaml name one (`http://host:5000`, `postgresql://...`). Runs are addressed by id through
an MlflowClient, never through MLflow's thread-local "active run", so Prefect tasks running in worker
threads log to the right run.

A registered prompt is a pyfunc model (`PromptModel`): the prompt vectors, the encoder state and
prompt.json (template, base model) as artifacts. Loading it loads the base LM from the model catalogue,
so the serving environment needs this project installed (`pip install .`) and the base model reachable:

    mlflow models predict -m models:/ptuning-lama-P19-smollm2-135m@champion -i in.json --env-manager local
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import mlflow.pyfunc

from components.mlops.stores import DatabaseUnreachable, check_database
from components.training import Callback

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
CHAMPION = "champion"
PROMPT_FILES = ("prompt.safetensors", "encoder.safetensors", "prompt.json")


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking store cannot be reached: raised before any training starts."""


# --- where runs go ------------------------------------------------------------------------------

def tracking_uri(params_tracking: dict | None = None) -> str:
    """env MLFLOW_TRACKING_URI > params/tracking.yaml `uri` > sqlite:///mlflow.db (embedded, no server)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (params_tracking or {}).get("uri") or DEFAULT_URI


def _auth_headers() -> dict:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode()}
    return {}


def _redact(uri: str) -> str:
    parsed = urlparse(uri)
    if parsed.password:
        return uri.replace(f":{parsed.password}@", ":***@")
    return uri


def _unreachable(uri: str, reason: str) -> TrackingUnreachable:
    return TrackingUnreachable(
        f"MLflow tracking store {_redact(uri)} is unreachable: {reason}. Start the server (mlflow server ...), "
        f"fix MLFLOW_TRACKING_URI / params/tracking.yaml `uri`, or leave both unset for the embedded {DEFAULT_URI}.")


def check_reachable(uri: str, timeout: float = 5) -> None:
    """http(s): GET /health (or the experiments search API) with a short timeout; a database URI: open a
    connection; a local path: its directory must exist. Raises TrackingUnreachable naming the URI."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        base = uri.rstrip("/")
        last = None
        for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
            request = urllib.request.Request(base + path, headers=_auth_headers())
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status} from {path}"
            except urllib.error.HTTPError as error:
                if error.code in (401, 403):
                    raise TrackingUnreachable(
                        f"MLflow tracking server {_redact(uri)} refused the request (HTTP {error.code}): set "
                        "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN") from None
                last = f"HTTP {error.code} from {path}"
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", error)
                raise _unreachable(uri, f"{type(reason).__name__}: {reason}") from None
        raise _unreachable(uri, f"it does not answer as an MLflow server ({last})")
    if scheme.startswith(("sqlite", "postgresql", "postgres", "mysql", "mssql")):
        try:
            check_database(uri, timeout)
        except DatabaseUnreachable as reason:
            raise _unreachable(uri, str(reason)) from None
        return
    if scheme in ("", "file"):
        path = Path(parsed.path if scheme == "file" else uri).expanduser().resolve()
        if not (path.exists() or path.parent.is_dir()):
            raise _unreachable(uri, f"neither {path} nor its directory exists")
        return
    log.info("tracking URI %s: no reachability check for scheme %r", _redact(uri), scheme)


# --- helpers ------------------------------------------------------------------------------------

def flatten(values: dict, prefix: str = "") -> dict:
    """{"relations": {"P19": {"test_p1": 0.3}}} -> {"relations.P19.test_p1": 0.3}."""
    out = {}
    for key, value in (values or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


_KEY = re.compile(r"[^\w\-. /:]")


def _key(name: str) -> str:
    return _KEY.sub("_", str(name))[:250]


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:  # numpy / torch scalars
        import numbers

        if isinstance(value, numbers.Number):
            return float(value)
    except Exception:
        pass
    return None


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


def data_version(lock_path: str | Path) -> dict:
    """Tags from a dvc.lock: `dvc.<stage>.outs.<path>` / `dvc.<stage>.deps.<path>` = md5, and
    `data_version`, one hash over every stage output (what the data is, whatever produced it)."""
    import yaml

    lock = yaml.safe_load(Path(lock_path).read_text()) or {}
    tags, outs = {}, []
    for stage, body in sorted((lock.get("stages") or {}).items()):
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


def registered_name(benchmark: str, task: str, model: str) -> str:
    """`ptuning-<benchmark>-<task>-<model>`, e.g. ptuning-lama-P19-smollm2-135m; a hub id's `/` and any
    other character outside [A-Za-z0-9_.-] become `-`."""
    name = "-".join(str(p).strip() for p in ("ptuning", benchmark, task, model) if str(p).strip())
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.-]+", "-", name)).strip("-")


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

    @classmethod
    def from_params(cls, params_tracking: dict | None, experiment: str | None = None, **kwargs) -> "Tracker":
        """A tracker on tracking_uri(params) and params' experiment (or `experiment`), logging every
        params' `log_every` steps."""
        params_tracking = params_tracking or {}
        return cls(tracking_uri(params_tracking), experiment or params_tracking.get("experiment") or "ptuning",
                   log_every=int(params_tracking.get("log_every") or 10), **kwargs)

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        for _ in range(3):
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    self.client.restore_experiment(found.experiment_id)
                return found.experiment_id
            try:
                return self.client.create_experiment(name)
            except MlflowException:  # created meanwhile by another worker
                continue
        raise TrackingUnreachable(f"could not create or find experiment {name!r} in {_redact(self.uri)}")

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

        import time

        now = int(time.time() * 1000)
        items = [Metric(_key(k), value, now, step or 0) for k, v in flatten(metrics).items()
                 if (value := _number(v)) is not None]
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
        data_tags = data_version(lock) if lock.exists() else {}
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
        """Final metrics, flattened (relations.P19.test_p1 ...): numbers as metrics, strings as `result.*`
        tags; metrics.json and history.json (given, or from `output_dir`) as artifacts."""
        run_id = self._run_for(run_id)
        flat = flatten(metrics)
        self.log_metrics({k: v for k, v in flat.items() if _number(v) is not None}, run_id=run_id)
        self.set_tags({f"result.{k}": v for k, v in flat.items() if isinstance(v, str)}, run_id)
        self.client.log_dict(run_id, metrics, "metrics.json")
        if history is None and output_dir is not None and (Path(output_dir) / "history.json").exists():
            history = json.loads((Path(output_dir) / "history.json").read_text())
        if history is not None:
            self.client.log_dict(run_id, history, "history.json")

    def register_prompt(self, prompt_dir: str | Path, model_name: str, metrics: dict, *,
                        vocab_file: str | Path | None = None, run_id: str | None = None,
                        alias: str | None = CHAMPION, description: str | None = None):
        """Log the prompt as a pyfunc model (PromptModel; artifacts prompt.safetensors, encoder.safetensors,
        prompt.json and the benchmark's vocab.json when given), register it as a new version of
        `model_name`, tag the version with the metrics and point `alias` (champion) at it."""
        from mlflow.models import Model

        prompt_dir = Path(prompt_dir)
        meta_path = prompt_dir / "prompt.json"
        if not meta_path.exists() or not (prompt_dir / "prompt.safetensors").exists():
            raise FileNotFoundError(f"{prompt_dir} holds no exported prompt (prompt.json + prompt.safetensors)")
        meta = json.loads(meta_path.read_text())
        if meta.get("lm_trained"):
            raise ValueError(f"{prompt_dir}: the LM was trained with this prompt; the prompt alone does not reproduce it")
        run_id = run_id or self.current_run_id()
        # the version's tags: the run's top-level figures and this task's own (not all 41 relations')
        own = (metrics.get("relations") or {}).get(str(meta.get("task"))) if isinstance(metrics.get("relations"), dict) else None
        flat = {k: v for k, v in metrics.items() if _number(v) is not None}
        flat.update({f"task.{k}": v for k, v in flatten(own or {}).items() if _number(v) is not None})
        mlflow.set_tracking_uri(self.uri)  # Model.log resolves the store globally: this tracker's
        mlflow.set_registry_uri(self.uri)
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "prompt"
            staged.mkdir()
            for name in PROMPT_FILES:
                if (prompt_dir / name).exists():
                    shutil.copy2(prompt_dir / name, staged / name)
            if vocab_file is not None:
                shutil.copy2(vocab_file, staged / "vocab.json")
            elif (prompt_dir / "vocab.json").exists():
                shutil.copy2(prompt_dir / "vocab.json", staged / "vocab.json")
            logged = self.client.create_logged_model(
                self.experiment_id, name="prompt", source_run_id=run_id, model_type="ptuning-prompt",
                tags={"base_model": str(meta.get("base_model")), "template": str(meta.get("template"))[:8000]})
            info = Model.log(artifact_path=None, name="prompt", flavor=mlflow.pyfunc, run_id=run_id,
                             model_id=logged.model_id, python_model=PromptModel(), artifacts={"prompt": str(staged)},
                             signature=_signature(meta), pip_requirements=_requirements(),
                             registered_model_name=model_name,
                             metadata={"ptuning": {k: v for k, v in meta.items() if k != "encoder"},
                                       "requires": "the ptuning project installed (pip install .) and its base model"})
        version = self.client.get_model_version(model_name, str(info.registered_model_version))
        for key, value in {**{f"metric.{k}": v for k, v in flat.items()},
                           **{k: meta.get(k) for k in ("base_model", "benchmark", "task", "template", "vocab")}}.items():
            if value is not None:
                self.client.set_model_version_tag(model_name, version.version, _key(key), str(value)[:5000])
        if description:
            self.client.update_model_version(model_name, version.version, description=description)
        if alias:
            self.client.set_registered_model_alias(model_name, alias, version.version)
        return self.client.get_model_version(model_name, version.version)


class TrackingCallback(Callback):
    """Training as it goes: `train_loss` (mean over the last `every` steps) and `lr` every `every` steps,
    each evaluation's metrics at its step, `epoch_train_loss` per epoch, the best step at the end.
    Several fits in one run (LAMA `all`) continue one another's steps. A logging failure is reported
    once and never stops training."""

    def __init__(self, tracker: Tracker, run_id: str, every: int = 10):
        self.tracker, self.run_id, self.every = tracker, run_id, max(1, int(every))
        self.offset = self.last = 0
        self.epochs_before = self.epoch = 0
        self.window: list[float] = []
        self.epoch_losses: list[float] = []
        self.steps_per_epoch = None
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
        if info.get("resumed_at_step"):
            with contextlib.suppress(Exception):
                self.tracker.client.set_tag(self.run_id, "resumed_at_step", str(info["resumed_at_step"]))

    def on_step(self, step: int, loss: float, lr: float) -> None:
        at = self.offset + step
        self.last = at
        self.window.append(loss)
        self.epoch_losses.append(loss)
        if step % self.every == 0:
            self._log({"train_loss": sum(self.window) / len(self.window), "lr": lr}, at)
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


# --- the served model ------------------------------------------------------------------------------

def _signature(meta: dict):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    from components.method.templates import parse_template

    slots = parse_template(meta["template"]).slots or ("sub",)
    inputs = Schema([ColSpec("string", slot) for slot in dict.fromkeys(slots)])
    outputs = Schema([ColSpec("string", "prediction"), ColSpec("double", "score"),
                      ColSpec(Array("string"), "top_k"), ColSpec(Array("double"), "top_k_scores")])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("top_k", "long", 5), ParamSpec("batch_size", "long", 32)]))


def _requirements() -> list[str]:
    """Pinned to what logged the model: no requirement inference (it is slow, and imports the model)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("mlflow", "torch", "transformers", "safetensors", "accelerate", "pandas", "numpy", "pyyaml", "gguf"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


class PromptModel(mlflow.pyfunc.PythonModel):
    """A trained continuous prompt served with its (frozen) base LM.

    Input: a DataFrame with the template's input columns (LAMA: `sub`). Output: `prediction` (top-1:
    a word of the benchmark vocabulary when vocab.json was logged, the verbalizer's label when
    prompt.json has a `verbalizer`, else any token of the LM), `score` (its probability among the
    candidates), `top_k` and `top_k_scores` (params: top_k, default 5)."""

    def load_context(self, context):
        import torch

        from components.models.catalog import load_lm
        from components.method.model import PromptedLM, load_prompt
        from components.method.templates import parse_template

        directory = Path(context.artifacts["prompt"])
        prompt, self.meta = load_prompt(directory)
        lm = load_lm(self.meta["base_model"])
        self.tokenizer, self.causal = lm.tokenizer, lm.causal
        self.template = parse_template(self.meta["template"])
        self.model = PromptedLM(lm.model, prompt, lm.causal, freeze_lm=True).eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.labels, ids = None, None
        verbalizer = self.meta.get("verbalizer")
        if verbalizer:  # SuperGLUE: label -> word, one token after a space
            self.labels = [str(label) for label in verbalizer]
            words = [verbalizer[label] if isinstance(verbalizer[label], str) else verbalizer[label][0] for label in verbalizer]
            ids = [self.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words]
        elif (directory / "vocab.json").exists():  # LAMA: the benchmark's vocabulary, one token each
            from components.benchmarks.lama.run import candidate_vocabulary

            self.labels, ids = candidate_vocabulary(json.loads((directory / "vocab.json").read_text()), self.tokenizer)
        self.candidate_ids = torch.tensor(ids) if ids is not None else None
        limit = getattr(lm.model.config, "max_position_embeddings", None) or getattr(lm.model.config, "n_positions", None) or 512
        self.max_length = min(int(self.meta.get("max_length", limit)), int(limit))
        slots = self.template.slots
        self.truncate = self.meta.get("truncate") or (slots[0] if len(set(slots)) == 1 else None)

    def _word(self, index: int) -> str:
        if self.labels is not None:
            return self.labels[index]
        return self.tokenizer.decode([index]).strip()

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from components.method.templates import collate, encode

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        slots = list(dict.fromkeys(self.template.slots))
        missing = [s for s in slots if s not in frame.columns]
        if missing:
            raise ValueError(f"input lacks column(s) {missing}; the template {self.meta['template']!r} reads {slots}")
        params = params or {}
        top_k, batch_size = int(params.get("top_k", 5)), int(params.get("batch_size", 32))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        encoded = [encode(self.template, self.tokenizer, {s: str(row[s]) for s in slots}, self.causal,
                          n_target_tokens=1, max_length=self.max_length, truncate=self.truncate)
                   for row in frame.to_dict("records")]
        rows = []
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = {k: v.to(self.device) for k, v in collate(encoded[start:start + batch_size], pad_id).items()}
                candidates = self.candidate_ids.to(self.device) if self.candidate_ids is not None else None
                logits = self.model(**batch, candidate_ids=candidates)[:, 0].float()
                probs = logits.softmax(-1)
                k = min(top_k, probs.shape[-1])
                best = logits.argmax(-1)  # the same argmax as evaluation (precision_at_1)
                top_p, top_i = probs.topk(k, dim=-1)
                for row in range(len(best)):
                    rows.append({"prediction": self._word(int(best[row])), "score": float(probs[row, best[row]]),
                                 "top_k": [self._word(int(i)) for i in top_i[row]],
                                 "top_k_scores": [float(p) for p in top_p[row]]})
        return pd.DataFrame(rows, columns=["prediction", "score", "top_k", "top_k_scores"])
