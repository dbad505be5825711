"""`ptuning train lama` on tiny-gpt2 and helpers.lama's data set, run in subprocesses: the command, the
environment, running it to its end or killing it mid-way, and comparing two runs' results."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services import REPO

PTUNING = (str(Path(sys.executable).parent / "ptuning"),)  # the installed entry point
MODULE = (sys.executable, "-m", "components.cli")  # the same CLI, from the checkout's package
# Two threads, as the default on a 2-core machine: the setting in which runs used to differ (issue 9). The
# commands run in temporary folders: PTUNING_ROOT names the checkout whose params/ they read.
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PTUNING_ROOT": str(REPO)}
# The settings of the runs that are killed and resumed (tests/test_resume.py) and run twice (tests/test_determinism.py):
# (24 + subject + 24 prompt tokens + answer) x batch 32 x tiny-gpt2's 32 dimensions: the prompt's gradient scatter
# has more elements than torch's parallel grain (32768), so its two threads really do run, as with a real LM; the
# patience off and 1000 epochs, so the run goes the full distance (its exponential schedule and Adam state resume).
RESUMABLE = {"eval_every": 3, "batch_size": 32, "sets": ("prompt_shape=[24,24]", "train.epochs=1000")}


def train_lama(data: Path, output_dir: Path, steps: int, *extra: str, eval_every: int = 2, batch_size: int = 8,
               sets: tuple[str, ...] = (), entry: tuple[str, ...] = PTUNING) -> list[str]:
    """`ptuning train lama` of P-tuning on relation P19 of `data` (helpers.lama.make_lama) into `output_dir`: lr
    0.003, fp32, no early stop, a log line every step; `sets` are more `--set key=value`, `extra` more flags."""
    return [*entry, "train", "lama", "--task", "P19", "--model", "tiny-gpt2", "--method", "ptuning",
            "--output-dir", str(output_dir), "--steps", str(steps), "--eval-every", str(eval_every), "--lr", "0.003",
            "--set", f"data_dir={data}", "--set", f"train.batch_size={batch_size}", "--set", "train.precision=fp32",
            "--set", "train.patience=null", *(a for s in sets for a in ("--set", s)), "--log-every", "1", *extra]


def kill_once_written(cmd: list[str], cwd: Path, path: Path, log: Path, what: str, timeout: float = 240) -> None:
    """Start `cmd` (stderr into `log`) and SIGKILL it the moment `path` exists."""
    with log.open("w") as stderr:
        victim = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr, env=ENV)
        deadline = time.monotonic() + timeout  # a bound on waiting, not an assertion on speed
        while not path.exists():
            assert victim.poll() is None, f"the run ended before its first {what}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} appeared"
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL


def run_to_end(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def comparable(output_dir: Path) -> dict:
    metrics = json.loads((output_dir / "metrics.json").read_text())
    metrics.pop("prompts")  # paths differ by output dir
    return {"metrics": metrics, "history": json.loads((output_dir / "history.json").read_text())}


def same_prompts(a: Path, b: Path) -> bool:
    """Bitwise the same prompt vectors and encoder weights."""
    import torch
    from safetensors.torch import load_file

    for name in ("prompt.safetensors", "encoder.safetensors"):
        mine, theirs = load_file(str(a / "prompt" / name)), load_file(str(b / "prompt" / name))
        if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
            return False
    return True
