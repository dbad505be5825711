"""The plan of a `ptuning` flow run: the whole run resolved and validated before any side effect (every
combination's RunConfig through components.run_config.resolve, the search space, sampler and pruner, the budget,
the stores), so that a bad task, model, value or space key fails before `dvc repro`, before any Optuna study and
before any MLflow run; and the `Job` of each (task, model, method) combination, which its tasks share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.benchmarks import REGISTRY, get_benchmark
from components.common import safe_name, stable_hash
from components.config import ConfigError, apply_overrides, in_root, load_params, project_root

SECTIONS = ("search", "tracking", "flow")  # override prefixes that address the flow's own settings


@dataclass(frozen=True)
class Job:
    """One combination of a plan, as the flow's tasks (search, final_train, evaluate, ...) see it."""
    benchmark: str
    root: Path
    task: str
    model: str
    method: str
    overrides: dict  # the combination's keys of params/<benchmark>.yaml (the flow's and the run's overrides too)
    study: str
    params_hash: str  # what names the study besides the combination: fingerprint, space, sampler, seed
    search: dict  # params/search.yaml with overrides; `space` validated
    grid_size: int
    tracking_uri: str
    storage: str
    experiment: str
    log_every: int  # training progress in the flow's log, every N steps (params/flow.yaml)
    tracking_log_every: int  # training curves in MLflow, every N steps (params/tracking.yaml)
    register: bool
    outputs_dir: Path
    report_key: str
    selection_key: str
    command: str  # what trains this combination again (flows.retrain), recorded on its runs and versions

    @property
    def tags(self) -> dict:
        """The MLflow tags of the combination's search run."""
        return {"benchmark": self.benchmark, "task": self.task, "model": self.model, "method": self.method,
                "study": self.study, "params_hash": self.params_hash, "command": self.command}

    def config(self, point: dict | None = None):
        """The combination's RunConfig, with `point` (a search point, a seed, another method) on top."""
        from components.run_config import resolve

        return resolve(self.benchmark, {**self.overrides, **(point or {})}, self.root)

    def run_dir(self, config) -> Path:
        """Where a configuration trains: named by its fingerprint, so a rerun finds it again."""
        return self.outputs_dir / "runs" / config.fingerprint_hash()

    def tracker(self):
        from components.mlops.tracking import Tracker

        return Tracker(self.tracking_uri, self.experiment, log_every=self.tracking_log_every, project_dir=self.root)


@dataclass(frozen=True)
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
    grid_size: int
    overrides: dict  # params/flow.yaml's `<benchmark>.overrides`, then the run's

    def study(self, combo: dict) -> tuple[str, str]:
        """(study name, settings hash) of a combination: its fingerprint (data version included, so call it once
        the data is prepared) and the search's space, sampler and seed. The same inputs, the same study."""
        from components.run_config import resolve

        config = resolve(self.benchmark, combo["overrides"], self.root)
        key = stable_hash({"fingerprint": config.fingerprint(), "space": self.search["space"],
                           "sampler": self.search["sampler"], "seed": self.search["seed"]}, 8)
        return self.search.get("study") or safe_name(self.benchmark, combo["task"], combo["model"], combo["method"], key), key

    def job(self, combo: dict, command: str) -> Job:
        """The job of a combination (once the data is prepared: its study is named by the data it trains on);
        `command` trains it again."""
        study, key = self.study(combo)
        return Job(benchmark=self.benchmark, root=self.root, task=combo["task"], model=combo["model"],
                   method=combo["method"], overrides=combo["overrides"], study=study, params_hash=key,
                   search=self.search, grid_size=self.grid_size, tracking_uri=self.tracking_uri, storage=self.storage,
                   experiment=self.tracking["experiment"], log_every=int(self.settings["log_every"]),
                   tracking_log_every=int(self.tracking["log_every"]), register=bool(self.tracking["register"]),
                   outputs_dir=self.outputs_dir, report_key=self.report_key, selection_key=self.selection_key,
                   command=command)


def plan(benchmark: str, tasks: list[str] | None = None, models: list[str] | None = None,
         methods: list[str] | None = None, seeds: list[int] | None = None, overrides: dict | None = None,
         root: str | Path | None = None) -> Plan:
    """Resolve the flow's parameters against the checkout's params/ (flow.yaml `<benchmark>:` gives the sweep and
    the main job's overrides; `overrides` come last). Keys `search.*`, `tracking.*`, `flow.*` address
    params/search.yaml, params/tracking.yaml and params/flow.yaml; every other key params/<benchmark>.yaml."""
    from components.mlops.search import make_pruner, make_sampler
    from components.mlops.search_space import grid_size, grid_space
    from components.mlops.stores import study_storage, tracking_store
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
                # Two points of the space are resolved too: every key's first value, then every key's last value.
                # Not every point: a bad value inside a list fails when its trial runs.
                first = {k: v[0] for k, v in space.items()}
                last = {k: v[-1] for k, v in space.items()}
                for point in (first, last):
                    config.with_overrides(point)
                combos.append({"task": str(task_name), "model": model, "method": method, "overrides": combo})
    return Plan(benchmark=spec.name, root=checkout, combos=combos, seeds=seeds, search={**search, "space": space},
                tracking=tracking, settings=settings["flow"],
                tracking_uri=tracking_store(own, tracking, checkout), storage=study_storage(own, search, checkout),
                outputs_dir=outputs_dir, report_key=spec.report_key, selection_key=spec.selection_key,
                grid_size=grid_size(space), overrides=given)
