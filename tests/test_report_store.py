"""The report units (components/reports/store.py): what is reused, what is recomputed, what a unit may resume."""
import re
import time

import pytest

from components.reports.store import Clock, UnitStore, methods_and_seeds, report_dir, scratch_dir


def test_only_units_of_the_current_settings_count(tmp_path):
    store = UnitStore(tmp_path)
    key = lambda task, seed: f"new-{task}-{seed}"
    store.put("ptuning", "rte", 42, "new-rte-42", {"val": 0.5})
    store.put("ptuning", "rte", 43, "old-settings", {"val": 0.9})
    assert store.missing("ptuning", [("rte", 42), ("rte", 43), ("cb", 42)], key) == [("rte", 43), ("cb", 42)]
    assert store.load("ptuning", "rte", [42, 43], key) is None  # one seed of other settings: not aggregated
    store.put("ptuning", "rte", 43, "new-rte-43", {"val": 0.7})
    assert [u["val"] for u in store.load("ptuning", "rte", [42, 43], key)] == [0.5, 0.7]


def test_a_unit_resumes_only_its_own_scratch_dir(tmp_path):
    directory = scratch_dir(tmp_path / "rte-s42", "settings-a")
    (directory / "checkpoint").mkdir()
    assert (scratch_dir(tmp_path / "rte-s42", "settings-a") / "checkpoint").is_dir()  # the same unit: kept
    assert not (scratch_dir(tmp_path / "rte-s42", "settings-b") / "checkpoint").exists()  # other settings: emptied


def test_a_table_of_other_parameters_gets_a_folder_of_its_own(tmp_path):
    assert report_dir(tmp_path, "lama", "smollm2-135m", {}) == tmp_path / "reports" / "lama" / "smollm2-135m"
    variant = report_dir(tmp_path, "lama", "smollm2-135m", {"preset": "paper", "train.max_steps": 300})
    assert variant.name == "smollm2-135m-preset-paper-train.max_steps-300"


def test_timings_add_up_over_invocations_of_the_same_settings(tmp_path):
    store = UnitStore(tmp_path)
    started = time.time() - 10
    store.add_timing("manual", started, "settings-a")
    first = store.timings["manual"]["seconds"]
    store.add_timing("manual", started, "settings-a", figures={"examples_per_s": 3.0})
    assert store.timings["manual"]["seconds"] >= first + 10 and store.timings["manual"]["examples_per_s"] == 3.0
    store.add_timing("manual", time.time() - 1, "settings-a")  # a tick without figures keeps the earlier ones
    assert store.timings["manual"]["examples_per_s"] == 3.0
    store.add_timing("manual", time.time() - 1, "settings-b")  # other settings recompute every unit: a new count
    assert 1 <= store.timings["manual"]["seconds"] < 10 and "examples_per_s" not in store.timings["manual"]


def test_a_clock_keeps_the_time_of_every_finished_unit_when_the_run_stops_before_its_end(tmp_path):
    store = UnitStore(tmp_path)
    clock = Clock(store, "ptuning", "settings-a")
    clock.last -= 5  # the first unit took 5 s
    clock.tick()  # ... and the run is then killed before its final tick
    assert 5 <= store.timings["ptuning"]["seconds"] < 6
    again = Clock(store, "ptuning", "settings-a")  # the resumed run adds to it
    again.last -= 3
    again.tick({"examples_per_s": 2.0})
    assert 8 <= store.timings["ptuning"]["seconds"] < 9 and store.timings["ptuning"]["examples_per_s"] == 2.0


@pytest.mark.parametrize("methods, seeds, message", [
    (["ptuning", "zero-shot"], None, "unknown report method(s) ['zero-shot']"),
    (None, [], "a report needs at least one seed"),
])
def test_bad_methods_or_seeds(methods, seeds, message):
    settings = {"methods": ["ptuning"], "seeds": []}
    with pytest.raises(ValueError, match=re.escape(message)):
        methods_and_seeds(settings, methods, seeds, {"ptuning": "P-tuning"})
    assert methods_and_seeds(settings, None, [34], {"ptuning": "P-tuning"}) == (("ptuning",), (34,))
