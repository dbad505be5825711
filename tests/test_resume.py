"""Killing a training run mid-way (SIGKILL) and running it again resumes from its last checkpoint and
ends with the same metrics (and the same prompt) as an uninterrupted run: `ptuning train lama` on
tiny-gpt2 and a small LAMA-shaped data set, on CPU, compared exactly."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CITIES = ("Paris London Berlin Rome Madrid Tokyo Vienna Moscow Prague Dublin Athens Lisbon Warsaw Cairo Delhi "
          "Chicago Boston Toronto Sydney Oslo").split()
PTUNING = str(Path(sys.executable).parent / "ptuning")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: one thread is fastest, and the same in every run
STEPS, EVAL_EVERY = 40, 4


def make_lama(root: Path) -> Path:
    relation = root / "29k" / "P19"
    relation.mkdir(parents=True)
    (root / "29k" / "vocab.json").write_text(json.dumps(sorted(CITIES)))
    (root / "relations.jsonl").write_text(json.dumps({"relation": "P19", "template": "[X] was born in [Y] ."}) + "\n")
    facts = [{"sub_label": f"Person{i}", "obj_label": CITIES[i % 5]} for i in range(40)]
    for split, rows in (("train", facts[:24]), ("dev", facts[24:32]), ("test", facts[32:])):
        (relation / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def command(data: Path, output_dir: Path) -> list[str]:
    # patience off so the run goes the full distance; exponential schedule and Adam state must resume too
    return [PTUNING, "train", "lama", "--task", "P19", "--model", "tiny-gpt2", "--method", "ptuning",
            "--output-dir", str(output_dir), "--steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--lr", "0.003",
            "--set", f"data_dir={data}", "--set", "train.batch_size=4", "--set", "train.precision=fp32",
            "--set", "train.patience=null", "--set", "train.epochs=1000", "--log-every", "1"]


def run_to_end(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def comparable(output_dir: Path) -> dict:
    metrics = json.loads((output_dir / "metrics.json").read_text())
    metrics.pop("prompts")  # paths differ by output dir
    return {"metrics": metrics, "history": json.loads((output_dir / "history.json").read_text())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_lama(root / "lama")
    run_to_end(command(data, root / "straight"), root)
    return root, data


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(uninterrupted):
    root, data = uninterrupted
    out = root / "killed"
    checkpoint = out / "checkpoint" / "last.pt"
    victim = subprocess.Popen(command(data, out), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=ENV)
    deadline = time.time() + 240
    while not checkpoint.exists():
        assert victim.poll() is None, f"the run ended before its first checkpoint: {victim.stderr.read()[-2000:]}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]["step"]
    assert 0 < killed_at < STEPS, f"killed at step {killed_at}: there must be steps left to run"
    assert not (out / "metrics.json").exists()

    resumed = run_to_end(command(data, out), root)
    match = re.search(r"resumed at step (\d+)", resumed.stderr)
    assert match, resumed.stderr[-3000:]
    assert int(match.group(1)) == killed_at > 0

    assert comparable(out) == comparable(root / "straight")
    for name in ("prompt.safetensors", "encoder.safetensors"):
        mine, theirs = load_file(str(out / "prompt" / name)), load_file(str(root / "straight" / "prompt" / name))
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name


def test_rerunning_a_finished_run_changes_nothing(uninterrupted):
    """A kill after the last checkpoint (or simply running the command again) resumes at the final step:
    it must not train past max_steps."""
    root, data = uninterrupted
    before = comparable(root / "straight")
    again = run_to_end(command(data, root / "straight"), root)
    assert f"resumed at step {STEPS}" in again.stderr
    assert comparable(root / "straight") == before
