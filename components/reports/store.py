"""Units of a report saved as they finish, and the means and deviations built from them."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from components.common import safe_name, stable_hash
from components.run_dir import hold


def unit_name(task: str, seed: int | None) -> str:
    return f"{task}-s{seed}" if seed is not None else task


class UnitStore:
    """`<root>/<method>/<task>-s<seed>.json`, each holding the hash of the settings that produced it: a unit of
    other settings is not reused (it is recomputed and overwritten). `clock` gives the time of timing.json's
    seconds (time.time; a test passes a fake one)."""

    def __init__(self, root: str | Path, clock: Callable[[], float] = time.time):
        self.root, self.clock = Path(root), clock

    def path(self, method: str, task: str, seed: int | None) -> Path:
        return self.root / method / f"{unit_name(task, seed)}.json"

    def put_prompt(self, method: str, task: str, seed: int | None, write: Callable[[Path], None]) -> Path:
        """The unit's kept prompt, `<root>/<method>/<task>-s<seed>.prompt/`, written by `write(directory)` whole
        or not at all; before the unit itself (`put`), so a saved unit always has its prompt. Its encoder is not
        committed (.gitignore: megabytes each), its vectors and prompt.json are (kilobytes)."""
        target = self.root / method / f"{unit_name(task, seed)}.prompt"
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        write(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        return target

    def scratch(self, method: str, task: str, seed: int | None, settings_hash: str) -> Path:
        """The unit's working directory, in its report folder (`.scratch/`, gitignored; held by `lock`), emptied
        unless a run of the same unit and settings left it: only that run's checkpoint may be resumed, never one
        trained with other settings or for another report folder."""
        directory = self.root.parent / ".scratch" / method / unit_name(task, seed)
        marker = directory / "unit_key.txt"
        if not (marker.exists() and marker.read_text() == settings_hash):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            marker.write_text(settings_hash)
        return directory

    def get(self, method: str, task: str, seed: int | None, settings_hash: str) -> dict | None:
        path = self.path(method, task, seed)
        if not path.exists():
            return None
        unit = json.loads(path.read_text())
        return unit if unit.get("settings_hash") == settings_hash else None

    def put(self, method: str, task: str, seed: int | None, settings_hash: str, unit: dict) -> None:
        path = self.path(method, task, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**unit, "method": method, "task": task, "seed": seed,
                                   "settings_hash": settings_hash}, indent=1))
        os.replace(tmp, path)  # a kill mid-write leaves no half unit

    def missing(self, method: str, units: list[tuple[str, int | None]], key: Callable) -> list[tuple[str, int | None]]:
        """The (task, seed) units of `method` that have no result of these settings yet."""
        return [(task, seed) for task, seed in units if self.get(method, task, seed, key(task, seed)) is None]

    def load(self, method: str, task: str, seeds: list[int | None], key: Callable) -> list[dict] | None:
        """The task's units over every seed, all of these settings; None while one is missing."""
        units = [self.get(method, task, seed, key(task, seed)) for seed in seeds]
        return None if None in units else units

    @contextmanager
    def lock(self):
        """Held while a report runs: a second run on the same folder (a DVC stage beside a flow, say) stops at once
        (RunDirBusy) instead of training the same units and racing on timing.json."""
        with hold(self.root.parent):
            yield self

    def write_metrics(self, results: dict, figure: str) -> Path:
        """The report folder's metrics.json (`write_metrics`), beside its results.json."""
        return write_metrics(self.root.parent, results, figure)

    def timings_of(self, keys: dict) -> dict:
        """`timings` of the report's methods whose time was taken under their current settings (`keys`: method ->
        UnitKey); a method run only under other settings has no time here."""
        return {m: t for m, t in self.timings.items() if m in keys and t.get("settings") == keys[m].settings}

    @property
    def timings(self) -> dict:
        """Per method: the seconds its runs of the current settings took over every invocation, and its last
        invocation's figures."""
        path = self.root / "timing.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def add_timing(self, method: str, started: float, settings: str, figures: dict | None = None) -> None:
        """Add the seconds since `started` to the method's time under `settings` (a `UnitKey.settings`), and
        `figures` over its earlier ones: a run of other settings recomputes every unit, so it starts afresh."""
        timings = self.timings
        before = timings.get(method, {}) if timings.get(method, {}).get("settings") == settings else {}
        seconds = before.get("seconds", 0.0) + self.clock() - started
        timings[method] = {**before, **(figures or {}), "seconds": seconds, "settings": settings}
        write_atomic(self.root / "timing.json", json.dumps(timings, indent=1))


class Clock:
    """A method's time in timing.json, added at every `tick` (each finished unit): a run stopped before its end
    keeps its time up to its last finished unit. `clock`: the store's unless given (both ends of an interval must
    come from one clock)."""

    def __init__(self, store: UnitStore, method: str, settings: str, clock: Callable[[], float] | None = None):
        self.clock = clock or store.clock
        self.store, self.method, self.settings, self.last = store, method, settings, self.clock()

    def tick(self, figures: dict | None = None) -> None:
        now = self.clock()
        self.store.add_timing(self.method, self.last, self.settings, figures)
        self.last = now


def report_dir(root: Path, benchmark: str, name: str, params: dict) -> Path:
    """`reports/<benchmark>/<name>`; a table of other parameters (the command's --preset / --set) gets a folder of
    its own (`<name>-preset-paper`), so that it never overwrites the default table's units."""
    return root / "reports" / benchmark / safe_name(name, *(f"{k}-{v}" for k, v in sorted(params.items())))


def device_kind() -> str:
    """What a unit's figures depend on of the machine: "cpu" (fp32), or the GPU's name and what `precision: auto`
    resolves to on it (components/training/loop.py), so that a unit is never reused on a GPU that computes in
    another precision or with other kernels."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda {torch.cuda.get_device_name(0)} {'bf16' if torch.cuda.is_bf16_supported() else 'fp32'}"


class UnitKey:
    """The settings hash of a report's (task, seed) unit, `key(task, seed)`: the run configuration's fingerprint
    (params, code and data versions) without its task list and run seed (a unit's own seed is in its key, so
    `--seeds 35,36` reuses the units of a `--seeds 34,35,36` run), the device it runs on (`device_kind`), plus
    `extra`. A unit computed otherwise is never reused. `settings`: the
    hash of the method's settings alone."""

    def __init__(self, config, **extra):
        self.fingerprint = config.fingerprint()
        params = {k: v for k, v in self.fingerprint["params"].items() if k != "task"}
        params["train"] = {k: v for k, v in params["train"].items() if k != "seed"}
        self.fingerprint.update(params=params, device=device_kind(), **extra)
        self.settings = stable_hash(self.fingerprint)

    def __call__(self, task: str, seed: int | None) -> str:
        # "relation": the field name the committed LAMA units were hashed with, for every benchmark's task
        return stable_hash({**self.fingerprint, "relation": task, "seed": seed})


def provenance(keys: dict[str, UnitKey]) -> dict:
    """Per method, what its units are keyed on (its UnitKey's fingerprint): the resolved parameters (without the
    task list), the code and data versions (components/run_config.py) and any extra the method is keyed on. Units
    of other values are recomputed, never reused."""
    return {method: dict(key.fingerprint) for method, key in keys.items()}


def versions_line(provenance: dict) -> str:
    """REPORT.md's sentence on the code and data its figures come from."""
    code = ", ".join(sorted({str(p["code_version"]) for p in provenance.values()}))
    data = ", ".join(sorted({str(p["data_version"]) for p in provenance.values()}))
    return (f"Library code version {code}, data version {data}: units computed with other code, data or parameters "
            "are recomputed, never reused (results.json `provenance` holds every method's resolved parameters).")


def subset_label(n: int, total: int, what: str) -> str:
    """" (2 rel.)" beside a method averaged over fewer relations or tasks than the benchmark has (`total`: all of
    them, as in the paper's rows beside it): not comparable with them."""
    return f" ({n} {what})" if n != total else ""


def overrides_line(params) -> str:
    """REPORT.md's sentence on the command's --preset / --set (`params`: (key, value) pairs), which override
    params/ for every method; empty without them."""
    return f" Overrides for every method (--preset / --set): `{json.dumps(dict(params))}`." if params else ""


def own_option(name: str, option, params: dict | None, default) -> tuple[object, dict]:
    """The report's own choice (LAMA's vocabulary, SuperGLUE's setting), from its flag or from `--set name=...`
    (one value, whichever way it is given), and the other params: the folder, the title and the runs then agree."""
    params = dict(params or {})
    given = params.pop(name, None)
    if option is not None and given is not None and option != given:
        raise ValueError(f"two values of {name}: --{name} {option} and --set {name}={given}")
    return option or given or default, params


def methods_and_seeds(settings: dict, methods, seeds, known: dict) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """A report's methods and seeds: the command line's, else params/report.yaml's; an unknown method or no seed
    fails here, before anything runs."""
    methods = tuple(methods or settings["methods"])
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown report method(s) {unknown}; choose from {', '.join(known)}")
    seeds = tuple(int(s) for s in (seeds or settings["seeds"]))
    if not seeds:
        raise ValueError("a report needs at least one seed")
    for name, values in (("method", methods), ("seed", seeds)):
        unique(values, name)
    return methods, seeds


def unique(values, name: str):
    """`values`, or a one-line error naming the repeated ones: a seed or task counted twice would fake its mean
    and std."""
    repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
    if repeated:
        raise ValueError(f"{name}s repeated in the report's list: {', '.join(repeated)}")
    return values


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n-1); None for a single value, which has no spread to show (a real 0
    over three seeds is a figure, and must not read like the manual prompt's single run)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def pct(value: float | None, std: float | None = None) -> str:
    """A table cell in %: `35.7 ± 2.6`, `14.8` for a single run, `–` for none."""
    if value is None:
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def std_line(seeds) -> str:
    """REPORT.md's words on its ± figures."""
    return f"mean ± sample std (n-1) over the {len(seeds)} seeds" if len(seeds) > 1 else f"one seed ({seeds[0]}): no std"


METRICS = "metrics.json"  # a report's DVC metrics, beside its results.json


def headline_metrics(results: dict, figure: str) -> dict[str, float]:
    """A report's headline: per method its macro `figure` (results.json's `methods.<method>.<figure>`: LAMA's
    `macro_test_p1`, SuperGLUE's `macro_val_score`), and the no-LM floor's as `majority`; methods without the
    figure yet are left out. Fractions, as in results.json."""
    found = {m: v[figure] for m, v in results["methods"].items() if v.get(figure) is not None}
    floor = (results.get("majority") or {}).get(figure)
    return {**found, **({"majority": floor} if floor is not None else {})}


def write_metrics(out_dir: Path, results: dict, figure: str) -> Path:
    """`<out_dir>/metrics.json`: the headline figures alone (`headline_metrics`), the file dvc.yaml declares as
    the report stage's metrics. One flat row, so that `dvc metrics show` prints the tables in a terminal;
    results.json keeps every per-relation and per-task figure (as a DVC metric its thousands of keys made rows of
    72,000 characters)."""
    path = Path(out_dir) / METRICS
    write_atomic(path, json.dumps(headline_metrics(results, figure), indent=1) + "\n")
    return path


def write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path

