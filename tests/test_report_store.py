"""The report units (components/reports/store.py): what is reused, what is recomputed, what a unit may resume."""
import re

import pytest

from components.run_dir import RunDirBusy
from components.reports.store import Clock, UnitKey, UnitStore, mean_std, methods_and_seeds, pct, report_dir
from helpers.clock import FakeClock


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
    store = UnitStore(tmp_path / "a" / "smollm2-135m" / "units")
    (store.scratch("ptuning", "rte", 42, "settings-a") / "checkpoint").mkdir()
    assert (store.scratch("ptuning", "rte", 42, "settings-a") / "checkpoint").is_dir()  # the same unit: kept
    # a report folder of the same name elsewhere has a scratch dir of its own
    other = UnitStore(tmp_path / "b" / "smollm2-135m" / "units")
    assert not (other.scratch("ptuning", "rte", 42, "settings-a") / "checkpoint").exists()
    assert (store.scratch("ptuning", "rte", 42, "settings-a") / "checkpoint").is_dir()
    assert not (store.scratch("ptuning", "rte", 42, "settings-b") / "checkpoint").exists()  # other settings: emptied


def test_a_table_of_other_parameters_gets_a_folder_of_its_own(tmp_path):
    assert report_dir(tmp_path, "lama", "smollm2-135m", {}) == tmp_path / "reports" / "lama" / "smollm2-135m"
    variant = report_dir(tmp_path, "lama", "smollm2-135m", {"preset": "paper", "train.max_steps": 300})
    assert variant.name == "smollm2-135m-preset-paper-train.max_steps-300"


def test_timings_add_up_over_invocations_of_the_same_settings(tmp_path):
    clock = FakeClock()
    store = UnitStore(tmp_path, clock=clock)
    store.add_timing("manual", clock() - 10, "settings-a")
    assert store.timings["manual"] == {"seconds": 10.0, "settings": "settings-a"}
    store.add_timing("manual", clock() - 10, "settings-a", figures={"examples_per_s": 3.0})
    assert store.timings["manual"]["seconds"] == 20.0 and store.timings["manual"]["examples_per_s"] == 3.0
    store.add_timing("manual", clock() - 1, "settings-a")  # a tick without figures keeps the earlier ones
    assert store.timings["manual"] == {"seconds": 21.0, "settings": "settings-a", "examples_per_s": 3.0}
    store.add_timing("manual", clock() - 1, "settings-b")  # other settings recompute every unit: a new count
    assert store.timings["manual"] == {"seconds": 1.0, "settings": "settings-b"}


def test_a_clock_keeps_the_time_of_every_finished_unit_when_the_run_stops_before_its_end(tmp_path):
    time = FakeClock()
    store = UnitStore(tmp_path, clock=time)
    clock = Clock(store, "ptuning", "settings-a")
    time.advance(5)  # the first unit took 5 s
    clock.tick()  # ... and the run is then killed before its final tick
    assert store.timings["ptuning"]["seconds"] == 5.0
    time.advance(100)  # the run is down a while: that time is not the method's
    again = Clock(store, "ptuning", "settings-a")  # the resumed run adds to it
    time.advance(3)
    again.tick({"examples_per_s": 2.0})
    assert store.timings["ptuning"]["seconds"] == 8.0 and store.timings["ptuning"]["examples_per_s"] == 2.0
    time.advance(2)
    again.tick()  # each tick adds the time since the previous one, not since the start
    assert store.timings["ptuning"]["seconds"] == 10.0


@pytest.mark.parametrize("methods, seeds, message", [
    (["ptuning", "zero-shot"], None, "unknown report method(s) ['zero-shot']"),
    (None, [], "a report needs at least one seed"),
    (None, [34, 35, 34], "seeds repeated in the report's list: 34"),
])
def test_bad_methods_or_seeds(methods, seeds, message):
    settings = {"methods": ["ptuning"], "seeds": []}
    with pytest.raises(ValueError, match=re.escape(message)):
        methods_and_seeds(settings, methods, seeds, {"ptuning": "P-tuning"})
    assert methods_and_seeds(settings, None, [34], {"ptuning": "P-tuning"}) == (("ptuning",), (34,))


def test_a_units_key_does_not_depend_on_the_runs_first_seed(repo_dir, monkeypatch):
    """`--seeds 35,36` reuses the seed-35 and seed-36 units of a `--seeds 34,35,36` run; other settings do not."""
    from components.run_config import resolve

    config = lambda **given: resolve("lama", {"model": "tiny-gpt2", "method": "ptuning", "task": "P19", **given}, repo_dir)
    first_34, first_35 = UnitKey(config(**{"train.seed": 34})), UnitKey(config(**{"train.seed": 35}))
    assert first_34("P19", 35) == first_35("P19", 35) and first_34.settings == first_35.settings
    assert first_34("P19", 35) != first_34("P19", 36) != first_34("P36", 36)
    assert UnitKey(config(**{"train.lr": 0.002}))("P19", 35) != first_34("P19", 35)
    # a unit of one machine is not another's: the CPU (fp32), and per GPU what `precision: auto` resolves to on it
    keys = set()
    for gpu, name, bf16 in ((False, "", False), (True, "NVIDIA H200", True), (True, "NVIDIA V100", False),
                            (True, "NVIDIA H100", True)):
        monkeypatch.setattr("torch.cuda.is_available", lambda: gpu)
        monkeypatch.setattr("torch.cuda.get_device_name", lambda index=0: name)
        monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: bf16)
        key = UnitKey(config(**{"train.seed": 34}))
        keys.add(key("P19", 35))
        if not gpu:  # the committed CPU tables' units were keyed on exactly this
            assert key.fingerprint["device"] == "cpu"
    assert len(keys) == 4


def test_a_second_run_on_the_same_report_folder_stops_at_once(tmp_path):
    store = UnitStore(tmp_path / "units")
    with store.lock():
        with pytest.raises(RunDirBusy, match="is in use by another ptuning process"):
            with UnitStore(tmp_path / "units").lock():
                pass
    with UnitStore(tmp_path / "units").lock():  # released when the first run ends
        pass


def test_a_reports_time_counts_only_its_methods_under_their_current_settings(tmp_path):
    clock = FakeClock()
    store = UnitStore(tmp_path, clock=clock)
    for method, settings in (("manual", "a"), ("ptuning", "old"), ("finetune", "a")):
        store.add_timing(method, clock() - 10, settings)
    keys = {"manual": type("Key", (), {"settings": "a"}), "ptuning": type("Key", (), {"settings": "new"})}
    assert list(store.timings_of(keys)) == ["manual"]


def test_a_zero_spread_over_seeds_is_shown_and_a_single_run_has_none():
    # three seeds that agree are a figure (± 0.0); one run has no std, and must not read like that
    assert mean_std([0.5, 0.5, 0.5]) == (0.5, 0.0) and pct(*mean_std([0.5, 0.5, 0.5])) == "50.0 ± 0.0"
    assert mean_std([0.25]) == (0.25, None) and pct(*mean_std([0.25])) == "25.0"
    assert mean_std([0.2, 0.4])[1] == pytest.approx(0.2 / 2 ** 0.5)  # the sample std (n-1), as REPORT.md says
    assert pct(None) == "–"


def test_a_killed_pool_is_resumed_only_for_the_units_it_was_training(tmp_path):
    """components/reports/lama.py `_pool_jobs`: a P-tuning pool checkpoint is continued when it holds every missing
    unit and only units of this run; otherwise the missing units train in a new pool and the checkpoint goes."""
    import json
    from types import SimpleNamespace

    from components.benchmarks.lama.pool_state import PoolCheckpoint
    from components.reports.lama import _pool_jobs

    checkpoint = PoolCheckpoint(tmp_path)
    report = SimpleNamespace(relations=("P19", "P36"), seeds=(34, 35))
    assert _pool_jobs(report, [("P36", 34)], checkpoint) == [("P36", 34)]  # no checkpoint: the missing units
    pending = [("P36", 34), ("P19", 35), ("P36", 35)]

    def killed_pool():
        (tmp_path / "pool.json").write_text(json.dumps({"jobs": [{"key": f"{r}-s{s}", "relation": r, "seed": s}
                                                                 for r, s in pending]}))

    killed_pool()
    assert _pool_jobs(report, pending, checkpoint) == pending
    # P19-s35 finished and was saved after the last checkpoint: it trains again, so that its neighbours keep it
    assert _pool_jobs(report, [("P36", 34), ("P36", 35)], checkpoint) == pending
    # a missing unit that the pool was not training (its file deleted since): a new pool, the checkpoint dropped
    assert _pool_jobs(report, [("P19", 34), ("P36", 34)], checkpoint) == [("P19", 34), ("P36", 34)]
    assert checkpoint.read() is None
    killed_pool()  # a run of fewer seeds: the pool trains a unit this run does not ask for
    assert _pool_jobs(SimpleNamespace(relations=("P19", "P36"), seeds=(34,)), [("P36", 34)], checkpoint) == [("P36", 34)]


def test_lm_training_of_a_report_logs_a_line_every_interval(caplog):
    """FT and MP+FT train an LM for minutes per relation on a CPU: without a progress bar, a line at most every
    interval (a minute in the report) while it trains."""
    import logging

    from components.benchmarks.lama.pool_state import Heartbeat
    from components.reports.lama import _StepHeartbeat

    now = [0.0]
    beat = _StepHeartbeat(Heartbeat(every_s=60, logger=logging.getLogger("components.reports.lama"), clock=lambda: now[0]),
                          "FT P103 seed 34")
    beat.on_train_begin({"total_steps": 100})
    with caplog.at_level(logging.INFO, logger="components"):
        for step in range(1, 101):
            now[0] = 7.0 * step  # 7 s a step
            beat.on_step(step, 0.5, 1e-5)
    assert [r.getMessage() for r in caplog.records] == [f"FT P103 seed 34: step {s}/100, loss 0.5000" for s in (9, 18, 27, 36, 45, 54, 63, 72, 81, 90, 99)]
