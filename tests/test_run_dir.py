"""A run directory knows its run (components/run_dir.py), proved through the real CLI (`python -m
components.cli train lama`, tiny-gpt2, a few steps): other settings are refused with one line naming the
difference and nothing written; the same settings read the result back; --restart starts afresh. Its lock is
proved directly, without training: a second claim on a busy directory refuses at once, in this process or through
the CLI, and the lock of a killed process does not block."""
import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from components.run_dir import LOCK, RunDirBusy, execute, hold
from helpers.cli import ENV, MODULE, train_lama
from helpers.lama import make_lama

STEPS = 3


def cli(data: Path, output_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return train_lama(data, output_dir, steps, *extra, entry=MODULE)


def run(cmd: list[str], repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, env=ENV)


def contents(directory: Path) -> dict:
    """Every file under `directory` and its bytes, the lock file left out (taking it touches it)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".run.lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, repo_dir):
    """A finished run of P19 (lr 0.003) and the data it was trained on (P19 and P36)."""
    root = tmp_path_factory.mktemp("run_dir")
    data = make_lama(root / "lama", relations=("P19", "P36"), n_train=24)
    out = root / "run"
    done = run(cli(data, out), repo_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return data, out, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # trains through the CLI in subprocesses: the full tier (make test)
@pytest.mark.parametrize("change, named", [
    (["--task", "P36"], "params.task: 'P19' -> 'P36'"),
    (["--lr", "0.01"], "params.train.lr: 0.003 -> 0.01"),
])
def test_other_settings_are_refused_with_one_line_naming_the_difference(finished, repo_dir, change, named):
    data, out, _ = finished
    before = contents(out)
    refused = run(cli(data, out, *change), repo_dir)
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and str(out) in lines[0] and "--restart" in lines[0], lines
    assert refused.stdout == ""
    assert contents(out) == before  # nothing written, nothing removed


@pytest.mark.slow
def test_the_same_settings_read_the_finished_result_back(finished, repo_dir):
    data, out, metrics = finished
    before = contents(out)
    again = run(cli(data, out), repo_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "read back" in again.stderr and "training" not in again.stderr.replace("components.training", "")
    assert json.loads(again.stdout.strip().splitlines()[-1]) == metrics
    assert contents(out) == before


@pytest.mark.slow
def test_restart_discards_the_other_run_and_trains_afresh(finished, repo_dir, tmp_path):
    data, out, _ = finished
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(out), str(copy)], check=True)
    fresh = run(cli(data, copy, "--lr", "0.01", "--restart"), repo_dir)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert f"training {STEPS} steps" in fresh.stderr and "resumed" not in fresh.stderr
    assert json.loads((copy / "fingerprint.json").read_text())["params"]["train"]["lr"] == 0.01
    assert json.loads((copy / "metrics.json").read_text())["tasks"]["P19"]["steps"] == STEPS
    # The new fingerprint now guards the directory: the old settings are the other ones.
    assert run(cli(data, copy), repo_dir).returncode == 2


@pytest.mark.slow
@pytest.mark.parametrize("change, message, over_a_finished_run", [
    (["--set", "template=[Y] [P*3] {sub}"], "needs at least one token before the target [Y]", True),  # causal LM
    (["--set", "max_length=4"], "longer than max_length=4", False),
    ("malformed", "invalid JSON", False),
])
def test_a_run_that_fails_validation_writes_nothing(finished, repo_dir, tmp_path, change, message, over_a_finished_run):
    """Checks that need the model or the data fail inside the run, after the directory was claimed: the claim is
    undone (no fingerprint.json, no folder where there was none), and a --restart keeps the previous run's files
    (shown for one check: all three fail at the same point of the run)."""
    data, out, _ = finished
    if change == "malformed":  # a malformed line in data_dir
        bad = tmp_path / "bad"
        subprocess.run(["cp", "-a", str(data), str(bad)], check=True)
        with (bad / "29k" / "P19" / "train.jsonl").open("a") as f:
            f.write('{"sub_label": "Person0"\n')
        data, change = bad, []
    fresh = tmp_path / "new" / "run"
    failed = run(cli(data, fresh, *change), repo_dir)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and message in lines[-1] and lines[-1].startswith("ptuning: error: "), failed.stderr[-3000:]
    assert failed.stdout == "" and not (tmp_path / "new").exists()
    if not over_a_finished_run:
        return
    # over a finished run, with --restart: its files stay as they were
    before = contents(out)
    restarted = run(cli(data, out, "--restart", *change), repo_dir)
    assert restarted.returncode == 2 and message in restarted.stderr, restarted.stderr[-3000:]
    assert contents(out) == before and not (out / ".restart-backup").exists()


def test_a_claim_is_undone_only_while_nothing_was_written(tmp_path):
    """The claim's own rule, without a model: a block that fails before writing leaves the directory as it was;
    one that wrote something (a checkpoint to resume from) or started training keeps it, and a --restart's previous
    files go once the new run got under way."""
    from components.run_dir import claim

    class Invalid(ValueError):
        pass

    new = tmp_path / "a" / "b"
    with pytest.raises(Invalid), claim(new, {"run": 1}):
        raise Invalid
    assert not (tmp_path / "a").exists()
    with pytest.raises(Invalid), claim(new, {"run": 1}) as held:
        (held.path / "checkpoint").mkdir()
        raise Invalid
    assert json.loads((new / "fingerprint.json").read_text()) == {"run": 1} and (new / "checkpoint").is_dir()
    (new / "checkpoint").rmdir()
    (new / "metrics.json").write_text("{}")
    before = contents(new)
    with pytest.raises(Invalid), claim(new, {"run": 2}, restart=True):
        raise Invalid
    assert contents(new) == before and sorted(p.name for p in new.iterdir()) == [".run.lock", "fingerprint.json", "metrics.json"]
    with pytest.raises(Invalid), claim(new, {"run": 2}, restart=True) as held:
        held.started()  # training began: the configuration is valid
        raise Invalid
    assert contents(new) == {"fingerprint.json": b'{\n  "run": 2\n}'}
    # a --restart killed before its run wrote anything leaves the previous files aside: the next claim puts them back
    (new / ".restart-backup").mkdir()
    (new / ".restart-backup" / "metrics.json").write_text("{}")
    (new / ".restart-backup" / "fingerprint.json").write_text('{"run": 1}')
    with claim(new, {"run": 1}) as held:
        assert json.loads((held.path / "metrics.json").read_text()) == {}
    assert sorted(p.name for p in new.iterdir()) == [".run.lock", "fingerprint.json", "metrics.json"]


# Holds `directory` with run_dir.hold in a process of its own until its stdin closes (or it is killed).
HOLDER = "import sys\nfrom components.run_dir import hold\nwith hold(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n"


@contextlib.contextmanager
def held_elsewhere(directory: Path, repo: Path):
    """Another process that holds `directory`'s lock while the block runs (yielded, to be killed if need be)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], cwd=repo, env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "held\n", holder.communicate()[1][-3000:]
        yield holder
    finally:
        if holder.poll() is None:
            holder.stdin.close()  # it releases the lock and ends
            holder.wait(timeout=60)


def never_waits(monkeypatch):
    """Make any wait fail: filelock waits for a busy lock by sleeping between tries; a refusal must not."""
    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail(f"waited {seconds} s for the lock"))


NOT_TO_RUN = SimpleNamespace(fingerprint=lambda: {"params": {"task": "P19"}},
                             spec=SimpleNamespace(run=lambda *args: pytest.fail("a busy directory's run trained")))


def test_a_busy_directory_refuses_a_second_claim_at_once_and_writes_nothing(tmp_path, monkeypatch):
    """run_dir.hold's lock, within one process: a second `hold` or `execute` raises RunDirBusy naming the directory,
    without waiting and without writing; the lock is free again when the first holder is done."""
    busy = tmp_path / "busy"
    with hold(busy):
        with monkeypatch.context() as patched:
            never_waits(patched)
            with pytest.raises(RunDirBusy, match=f"{busy} is in use by another ptuning process"):
                with hold(busy):
                    pytest.fail("two holders at once")
            with pytest.raises(RunDirBusy, match=f"{busy} is in use"):
                execute(NOT_TO_RUN, busy)
        assert sorted(p.name for p in busy.iterdir()) == [LOCK]  # no fingerprint, nothing of a run
    with hold(busy):  # released
        pass


def test_the_lock_is_held_per_process_and_a_killed_holder_does_not_block(tmp_path, repo_dir, monkeypatch):
    """Another process holds the directory: this one is refused at once; once that process is killed (SIGKILL: no
    cleanup of its own), its lock file stays but the OS dropped its lock, and the directory can be held."""
    busy = tmp_path / "busy"
    with held_elsewhere(busy, repo_dir) as holder:
        with monkeypatch.context() as patched:
            never_waits(patched)
            with pytest.raises(RunDirBusy, match=f"{busy} is in use"):
                execute(NOT_TO_RUN, busy)
        assert holder.poll() is None  # it held the lock throughout
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL and (busy / LOCK).exists()
    with hold(busy):
        pass


@pytest.mark.slow  # `ptuning train lama` in subprocesses
def test_a_second_process_on_a_busy_directory_refuses_at_once(tmp_path, repo_dir):
    """Through the CLI: exit 3, one line naming the directory, nothing written, while another process holds it;
    the same command trains once the holder is gone."""
    data = make_lama(tmp_path / "lama", n_train=24)
    out = tmp_path / "busy"
    with held_elsewhere(out, repo_dir) as holder:
        second = run(cli(data, out), repo_dir)
        assert holder.poll() is None, "the holder must still hold the directory for this test to mean anything"
    assert second.returncode == 3, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "in use" in lines[0], lines
    assert second.stdout == "" and sorted(p.name for p in out.iterdir()) == [LOCK]
    after = run(cli(data, out), repo_dir)
    assert after.returncode == 0, after.stderr[-3000:]
    assert json.loads(after.stdout.strip().splitlines()[-1])["tasks"]["P19"]["steps"] == STEPS


@pytest.mark.slow  # `ptuning train lama` in a subprocess
def test_the_lock_of_a_killed_process_does_not_block(tmp_path, repo_dir):
    data = make_lama(tmp_path / "lama", n_train=24)
    out = tmp_path / "killed"
    with held_elsewhere(out, repo_dir) as victim:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL and (out / LOCK).exists()
    after = run(cli(data, out), repo_dir)
    assert after.returncode == 0, after.stderr[-3000:]
    assert json.loads(after.stdout.strip().splitlines()[-1])["tasks"]["P19"]["steps"] == STEPS
