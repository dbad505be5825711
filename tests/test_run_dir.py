"""A run directory knows its run (components/run_dir.py), proved through the real CLI (`python -m
components.cli train lama`, tiny-gpt2, a few steps): other settings are refused with one line naming the
difference and nothing written; the same settings read the result back; --restart starts afresh; a second
process on a busy directory refuses at once; the lock of a killed process does not block."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_resume import ENV, make_lama

pytestmark = pytest.mark.slow  # trains through the CLI in subprocesses: the full tier (make test)

STEPS = 3


def cli(data: Path, output_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "components.cli", "train", "lama", "--task", "P19", "--model", "tiny-gpt2",
            "--method", "ptuning", "--output-dir", str(output_dir), "--steps", str(steps), "--eval-every", "2",
            "--lr", "0.003", "--set", f"data_dir={data}", "--set", "train.batch_size=8", "--set", "train.precision=fp32",
            "--set", "train.patience=null", "--log-every", "1", *extra]


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


def test_the_same_settings_read_the_finished_result_back(finished, repo_dir):
    data, out, metrics = finished
    before = contents(out)
    again = run(cli(data, out), repo_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "read back" in again.stderr and "training" not in again.stderr.replace("components.training", "")
    assert json.loads(again.stdout.strip().splitlines()[-1]) == metrics
    assert contents(out) == before


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


def _start_and_wait_for_claim(cmd: list[str], out: Path, repo: Path) -> subprocess.Popen:
    """Start a run; return once it holds the directory (its fingerprint is written under the lock)."""
    first = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not (out / "fingerprint.json").exists():
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.time() < deadline, "the first run never claimed its directory"
        time.sleep(0.02)
    return first


def test_a_second_process_on_a_busy_directory_refuses_at_once(tmp_path, repo_dir):
    data = make_lama(tmp_path / "lama", n_train=24)
    out = tmp_path / "busy"
    first = _start_and_wait_for_claim(cli(data, out, steps=150), out, repo_dir)
    started = time.time()
    second = run(cli(data, out, steps=150), repo_dir)
    assert first.poll() is None, "the first run must still be running for this test to mean anything"
    assert second.returncode == 3, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "in use" in lines[0], lines
    assert time.time() - started < 60  # at once: no waiting for the lock
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["tasks"]["P19"]["steps"] == 150


def test_the_lock_of_a_killed_process_does_not_block(tmp_path, repo_dir):
    data = make_lama(tmp_path / "lama", n_train=24)
    out = tmp_path / "killed"
    victim = _start_and_wait_for_claim(cli(data, out, steps=150), out, repo_dir)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL and (out / ".run.lock").exists()
    after = run(cli(data, out, steps=150), repo_dir)
    assert after.returncode == 0, after.stderr[-3000:]
    assert json.loads(after.stdout.strip().splitlines()[-1])["tasks"]["P19"]["steps"] == 150
