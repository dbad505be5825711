"""Killing a training run mid-way (SIGKILL) and running it again resumes from its last checkpoint and
ends with the same metrics (and the same prompt) as an uninterrupted run: `ptuning train lama` on
tiny-gpt2 and a small LAMA-shaped data set (tests/helpers/), on CPU with two threads, compared exactly."""
import json
import re
from pathlib import Path

import pytest

from components.training.storage import load_checkpoint
from helpers.cli import RESUMABLE, comparable, kill_once_written, run_to_end, same_prompts, train_lama
from helpers.lama import make_lama

pytestmark = pytest.mark.slow  # trains through the CLI in subprocesses: the full tier (make test)

STEPS = 40


def command(data: Path, output_dir: Path, steps: int = STEPS) -> list[str]:
    return train_lama(data, output_dir, steps, **RESUMABLE)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_lama(root / "lama")
    run_to_end(command(data, root / "straight"), root)
    return root, data


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(uninterrupted):
    root, data = uninterrupted
    out = root / "killed"
    checkpoint = out / "checkpoint" / "last.safetensors"
    kill_once_written(command(data, out), root, checkpoint, root / "killed.log", "checkpoint")
    killed_at = load_checkpoint(checkpoint)["state"]["step"]
    assert 0 < killed_at < STEPS, f"killed at step {killed_at}: there must be steps left to run"
    assert not (out / "metrics.json").exists()

    resumed = run_to_end(command(data, out), root)
    match = re.search(r"resumed at step (\d+)", resumed.stderr)
    assert match, resumed.stderr[-3000:]
    assert int(match.group(1)) == killed_at > 0

    assert comparable(out) == comparable(root / "straight")
    assert same_prompts(out, root / "straight")
    assert not (out / "checkpoint").exists()  # a finished run keeps only its results


def test_rerunning_a_finished_run_changes_nothing(uninterrupted):
    """Running the command of a finished run again reads its result back: it trains nothing."""
    root, data = uninterrupted
    before = comparable(root / "straight")
    again = run_to_end(command(data, root / "straight"), root)
    assert "holds the finished run of these settings: read back" in again.stderr
    assert not re.search(r"training \d+ steps", again.stderr)
    assert json.loads(again.stdout.strip().splitlines()[-1])["test"] == before["metrics"]["test"]
    assert comparable(root / "straight") == before
