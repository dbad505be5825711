"""Hyper-parameter search with Optuna: the paper's grid (lr x batch size) by default, TPE or random on
request, median pruning of trials whose dev score lags, and one study shared by any number of workers.

A study lives in a storage (components.mlops.stores.study_storage): `sqlite:///optuna.db` by default (one
machine), any database URL (`postgresql://user@host/db`) for several workers on several machines. Every worker calls
`open_study` + `run_search` with the same study name; with the grid sampler every grid point runs
exactly once across all of them:

* a new trial takes the grid point of its rank among the study's trials (re-queued ones left out);
  the storage creates trials one at a time under a lock and numbers them, so two workers never get
  the same point (Optuna's own GridSampler picks at random among unfinished points and can repeat one);
* a worker stops asking for trials once every grid point is taken; a trial created in the race at the
  very end (rank >= grid size) is closed at once as PRUNED with user attribute `skipped`, untrained;
* a worker killed mid-trial stops its heartbeat: after `grace` seconds its trial is failed and re-queued
  (same grid point, user attribute `retry_of`) for whichever worker asks next;
* `run_search` returns only when no trial of the study is still running, in any worker: the first worker
  out of work waits for the others' trials (taking over a dead one's re-queued point), so whoever picks the
  best trial afterwards picks it from the whole grid.

Nothing here knows MLflow, Prefect or the run configuration: the caller's `run_trial` turns a point of the
space into a configuration, trains (and tracks) it and returns its metrics.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import optuna
from optuna.trial import TrialState

from components.common import numeric_metrics, redact_url
from components.mlops.search_space import grid_size, grid_space
from components.mlops.stores import check_storage
from components.training import Callback

log = logging.getLogger(__name__)

SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("median", "percentile", "hyperband", "successive_halving", "none")
SKIPPED = "skipped"  # user attribute of a trial closed without training


@dataclass(frozen=True)
class _Opened:
    """What open_study made a study with: its space, and the storage it built (for its heartbeat interval)."""
    space: dict
    storage: optuna.storages.RDBStorage


_OPENED: "weakref.WeakKeyDictionary[optuna.Study, _Opened]" = weakref.WeakKeyDictionary()


# --- samplers, pruners, storage --------------------------------------------------------------------

def _requeued(attrs: dict) -> bool:
    """A re-queued trial (a dead worker's, or enqueued by hand): it brings its own parameters."""
    return "failed_trial" in attrs or "fixed_params" in attrs


class ExclusiveGridSampler(optuna.samplers.GridSampler):
    """GridSampler for several workers: a trial takes the grid point of its rank (its number less the
    re-queued trials before it), so each point goes to exactly one trial; a trial ranked past the grid
    is marked `grid_extra` (run_search closes it untrained). Stopping is left to run_search."""

    def __init__(self, search_space: dict, seed: int | None = None) -> None:
        # Every worker must map grid ids to the same points: one fixed order, whatever the seed.
        super().__init__(search_space, seed=0)
        self.space = {name: list(values) for name, values in sorted(search_space.items())}  # GridSampler's order
        self.size = grid_size(self.space)

    def same_space(self, other: dict) -> bool:
        """Is `other` (a trial's `search_space` system attribute) this grid?"""
        return {name: list(values) for name, values in other.items()} == self.space

    def before_trial(self, study: optuna.Study, trial) -> None:
        if "grid_id" in trial.system_attrs or _requeued(trial.system_attrs):
            return
        earlier = study.get_trials(deepcopy=False)
        rank = sum(1 for t in earlier if t.number < trial.number and not _requeued(t.system_attrs))
        _mark(study, trial, "search_space", self.space)
        if rank < self.size:
            _mark(study, trial, "grid_id", rank)
        else:
            _mark(study, trial, "grid_extra", True)

    def after_trial(self, study, trial, state, values) -> None:
        pass  # GridSampler would stop the study while a re-queued point still waits


def _mark(study: optuna.Study, trial: optuna.trial.FrozenTrial, key: str, value) -> None:
    # Optuna has no public API for a sampler to set a trial's system attribute: this is what GridSampler's own
    # before_trial does, and its sampling reads `grid_id` back (tests/test_search.py pins both).
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def make_sampler(name: str, space: dict, seed: int | None = 0) -> optuna.samplers.BaseSampler:
    """`grid` (every point of `space` once, in one fixed order shared by all workers: the seed does not
    change it), `tpe` or `random` (sample `space`'s values; with several workers, give each its own seed)."""
    name = (name or "grid").lower()
    if name == "grid":
        return ExclusiveGridSampler(space, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")


def make_pruner(name: str | None, options: dict | None = None) -> optuna.pruners.BasePruner:
    name, options = (name or "none").lower(), dict(options or {})
    if name == "median":
        return optuna.pruners.MedianPruner(**options)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(**{"percentile": 25.0, **options})
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(**options)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**options)
    if name in ("none", "nop", "off"):
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}; choose one of {PRUNERS}")


def _rdb_storage(url: str, heartbeat: int | None, grace: int | None, max_retry: int) -> optuna.storages.RDBStorage:
    kwargs = {}
    if heartbeat:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        kwargs = {"heartbeat_interval": int(heartbeat), "grace_period": int(grace or 2 * heartbeat),
                  "heartbeat_stale_trial_callback": retry}
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "mysql", "mariadb")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    # Several workers opening a fresh database at once race on creating its tables: try again.
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except Exception as error:  # sqlalchemy IntegrityError / ProgrammingError on a concurrent CREATE
            if attempt == 4:
                raise
            log.info("opening %s failed (%s), trying again", redact_url(url), type(error).__name__)
            time.sleep(0.2 + 0.3 * attempt)
    raise AssertionError("unreachable")


def open_study(
    study_name: str,
    storage: str,
    space: dict,
    sampler: str = "grid",
    seed: int | None = 0,
    pruner: str = "median",
    *,
    direction: str = "maximize",
    pruner_options: dict | None = None,
    heartbeat: int | None = 60,
    grace: int | None = None,
    max_retry: int = 2,
    check_timeout: float = 5,
) -> optuna.Study:
    """Create the study or join it (load_if_exists) in the database `storage` (a URL: see
    components.mlops.stores.study_storage). The storage is checked first: StorageUnreachable (naming the URL)
    before anything trains.
    `heartbeat` (seconds, database storages): a trial whose worker died is failed after `grace`
    (default 2 x heartbeat) and re-queued, at most `max_retry` times; None turns this off."""
    space = grid_space({"space": space}) if space is not None else grid_space(None)
    sampler_obj = make_sampler(sampler, space, seed)  # a bad name fails before the storage is touched
    pruner_obj = make_pruner(pruner, pruner_options)
    check_storage(storage, timeout=check_timeout)
    rdb = _rdb_storage(storage, heartbeat, grace, max_retry)
    for attempt in range(5):
        try:
            study = optuna.create_study(study_name=study_name, storage=rdb, sampler=sampler_obj, pruner=pruner_obj,
                                        direction=direction, load_if_exists=True)
            break
        except Exception as error:  # concurrent creation of the same study by several workers
            if attempt == 4 or isinstance(error, ValueError):
                raise
            time.sleep(0.2 + 0.3 * attempt)
    if list(study.directions) != [optuna.study.StudyDirection[direction.upper()]]:
        raise ValueError(f"study {study_name!r} in {redact_url(storage)} optimises {study.directions[0].name.lower()}, "
                         f"not {direction}: use another study name")
    if isinstance(sampler_obj, ExclusiveGridSampler):
        for trial in study.get_trials(deepcopy=False):
            other = trial.system_attrs.get("search_space")
            if other is not None and not sampler_obj.same_space(other):
                raise ValueError(f"study {study_name!r} in {redact_url(storage)} was searched over another grid "
                                 f"({other}); this grid is {space}: use another study name")
    _OPENED[study] = _Opened(space, rdb)
    try:  # for people reading the study (optuna-dashboard); concurrent workers write the same value
        if study.user_attrs.get("search_space") != space:
            study.set_user_attr("search_space", space)
    except Exception:
        pass
    log.info("study %s in %s: %s sampler over %s, %s pruner", study_name, redact_url(storage), sampler, space, pruner)
    return study


# --- pruning ----------------------------------------------------------------------------------------

class PruningCallback(Callback):
    """Reports every evaluation's selection metric to the Optuna trial and raises optuna.TrialPruned
    (which stops training) when the study's pruner says so.

    metric: the key of the evaluation metrics (e.g. `dev.p1`, `dev.acc`); None: the metric when there is
    one, the mean of the numeric ones otherwise. by: `step` (optimizer steps) or `epoch` (only with
    per-epoch evaluation). Several `fit`s in one trial (LAMA `all`) continue one another's steps."""

    def __init__(self, trial: optuna.Trial, metric: str | None = None, by: str = "step"):
        if by not in ("step", "epoch"):
            raise ValueError(f"PruningCallback: by must be 'step' or 'epoch', got {by!r}")
        self.trial, self.metric, self.by = trial, metric, by
        self.offset = 0  # steps (epochs) of the fits before this one
        self.last = 0
        self.reported: list[tuple[int, float]] = []

    def value_of(self, metrics: dict) -> float | None:
        if self.metric is not None:
            if self.metric not in metrics:
                raise KeyError(f"PruningCallback: no metric {self.metric!r} in the evaluation's {sorted(metrics)}")
            return float(metrics[self.metric])
        numbers = [float(v) for v in metrics.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return sum(numbers) / len(numbers) if numbers else None

    def on_train_begin(self, info: dict) -> None:
        self.offset = self.last

    def on_evaluate(self, step: int, epoch: int, metrics: dict, improved: bool) -> None:
        value = self.value_of(metrics)
        at = self.offset + (step if self.by == "step" else epoch)
        self.last = max(self.last, at)
        if value is None or math.isnan(value):
            return
        self.trial.report(value, at)
        self.reported.append((at, value))
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.trial.number} pruned at {self.by} {at}: value {value:.4f}")


# --- the search -------------------------------------------------------------------------------------

def _space_of(study: optuna.Study, space: dict | None) -> dict:
    if space is not None:
        return grid_space({"space": space})
    if study in _OPENED:
        return _OPENED[study].space
    if isinstance(study.sampler, ExclusiveGridSampler):
        return dict(study.sampler.space)
    if "search_space" in study.user_attrs:
        return grid_space({"space": study.user_attrs["search_space"]})
    raise ValueError("run_search: the study was not opened with open_study; pass space=")


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _grid_open(study: optuna.Study, n_grid: int) -> bool:
    """Is there grid work nobody has taken: a re-queued trial waiting, or a grid point not yet handed out."""
    _fail_stale(study)
    trials = study.get_trials(deepcopy=False)
    handed_out = sum(1 for t in trials if not _requeued(t.system_attrs))
    return any(t.state == TrialState.WAITING for t in trials) or handed_out < n_grid


def _running(study: optuna.Study) -> list[int]:
    """The numbers of the trials still running (in other workers, once this one's are done); a dead worker's
    trial is failed (and re-queued) first, once its heartbeat is older than the grace period."""
    _fail_stale(study)
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]


def _system_attrs(study: optuna.Study, trial: optuna.Trial) -> dict:
    """A running trial's system attributes (an optuna.Trial shows none), as the study's trials record them."""
    return next(t.system_attrs for t in study.get_trials(deepcopy=False) if t.number == trial.number)


def run_search(
    study: optuna.Study,
    run_trial: Callable[[dict, list[Callback], optuna.Trial], dict],
    n_trials: int | None = None,
    metric: str = "dev.score",
    *,
    space: dict | None = None,
    prune_metric: str | None = None,
    prune_by: str = "step",
    total_trials: int | None = None,
    catch: tuple[type[Exception], ...] = (),
    poll: float | None = None,
) -> optuna.Study:
    """Run trials of `study` in this process until the grid is exhausted (grid sampler, n_trials None),
    `n_trials` trials ran here, or the study holds `total_trials` finished trials; then wait until no trial
    of any worker is running, so that the study is complete when this returns.

    Each trial suggests every key of the space and calls `run_trial(point, [PruningCallback], trial) ->
    metrics`, where `point` is `{dotted.key: value}` (the caller turns it into its configuration, e.g.
    RunConfig.with_overrides(point)). The trial's value is `metric` of the flattened numeric metrics
    (components.common.numeric_metrics: `{"dev": {"score": x}}` -> `dev.score`), which also become the
    trial's user attributes. run_trial must let optuna.TrialPruned through; exceptions other than `catch`
    fail the trial and stop this worker (without waiting).

    Waiting polls every `poll` seconds (default: 5, or the heartbeat interval when shorter). A trial whose
    worker died is failed once its heartbeat is stale and, on the grid, re-queued: a waiting worker with
    trials left in its budget takes it over. Without heartbeats (heartbeat=None) a dead worker's trial is
    indistinguishable from a slow one, and is waited for until someone fails it."""
    space = _space_of(study, space)
    is_grid = isinstance(study.sampler, optuna.samplers.GridSampler)
    n_grid = grid_size(space)
    if not is_grid and n_trials is None and total_trials is None:
        raise ValueError(f"run_search: the {type(study.sampler).__name__} never runs out of points; give n_trials or total_trials")
    heartbeat = _OPENED[study].storage.get_heartbeat_interval() if study in _OPENED else None
    ran = {"trials": 0, "optimized": False}

    def finished_count() -> int:
        return sum(1 for t in study.get_trials(deepcopy=False)
                   if t.state.is_finished() and SKIPPED not in t.user_attrs)

    def objective(trial: optuna.Trial) -> float:
        ran["trials"] += 1
        if is_grid and _system_attrs(study, trial).get("grid_extra"):
            trial.set_user_attr(SKIPPED, "every grid point was already taken by another worker")
            study.stop()
            raise optuna.TrialPruned(f"trial {trial.number}: grid exhausted, skipped")
        retry_of = _system_attrs(study, trial).get("failed_trial")
        if retry_of is not None:
            trial.set_user_attr("retry_of", retry_of)
        point = {key: trial.suggest_categorical(key, values) for key, values in space.items()}
        log.info("trial %d of study %s: %s", trial.number, study.study_name, point)
        metrics = run_trial(point, [PruningCallback(trial, prune_metric, by=prune_by)], trial)
        numbers = numeric_metrics(metrics) if isinstance(metrics, dict) else {}
        if metric not in numbers:
            raise KeyError(f"run_search: run_trial returned no numeric {metric!r} (flattened keys: {sorted(numbers)})")
        for key, value in numbers.items():
            trial.set_user_attr(key, value)
        return numbers[metric]

    def after_trial(study: optuna.Study, trial) -> None:
        if is_grid and not _grid_open(study, n_grid):
            study.stop()
        if total_trials is not None and finished_count() >= total_trials:
            study.stop()

    def work_left() -> bool:
        if (n_trials is not None and ran["trials"] >= n_trials) or \
                (total_trials is not None and finished_count() >= total_trials):
            return False
        return _grid_open(study, n_grid) if is_grid else not ran["optimized"]

    waited_for = None
    while True:
        if work_left():
            ran["optimized"] = True
            left = None if n_trials is None else n_trials - ran["trials"]
            study.optimize(objective, n_trials=left, callbacks=[after_trial], catch=catch)
            continue
        running = _running(study)
        if not running:
            if work_left():  # failing a dead worker's stale trial just re-queued its point: take it
                continue
            break
        if running != waited_for:
            log.info("study %s: waiting for trial(s) %s of other workers%s", study.study_name, running,
                     "" if heartbeat else " (heartbeats are off: a dead worker's trial is waited for until failed)")
            waited_for = running
        time.sleep(poll or float(min(heartbeat or 5, 5)))
    log.info("study %s: no trial left to run or running", study.study_name)
    return study


def summary(study: optuna.Study) -> dict:
    """Counts and the best trial, leaving out trials skipped at the grid's end."""
    trials = [t for t in study.get_trials(deepcopy=False) if SKIPPED not in t.user_attrs]
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value if study.direction.name == "MAXIMIZE" else -t.value) if complete else None
    return {"study": study.study_name, "trials": len(trials), **counts,
            "best_value": best.value if best else None, "best_params": dict(best.params) if best else None,
            "best_trial": best.number if best else None}
