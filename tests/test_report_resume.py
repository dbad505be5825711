"""A LAMA report killed (SIGKILL) while its P-tuning pool trains, then run again, ends with the figures of an
untouched run to the last digit, and counts the killed invocation's time. `ptuning report lama` on tiny-gpt2 and
tests/helpers/lama.py's LAMA-shaped data, on CPU with two threads.

The pool trains the prompts of several (relation, seed) units in one shared batch; a prompt's figures depend on
its neighbours in that batch (float noise of other batch shapes). The kill comes after some units have finished
and been saved while others still train: the run again must continue the pool as it was (its checkpoint), not
train the prompts left in a pool of their own. Each unit records the sha256 of its prompt, so "the same figures"
covers every bit of the prompts too, not only P@1 on a few facts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.cli import ENV, kill_once_written
from helpers.lama import make_lama

pytestmark = pytest.mark.slow  # trains through the CLI in subprocesses: the full tier (make test)

# `ptuning report` with the pool checkpointed at every evaluation (the default is at most once a minute, which a
# run of seconds would never reach): the CLI itself, in a process of its own that the test can kill.
CHILD = ("import sys\nfrom components.benchmarks.lama import shared\nshared.CHECKPOINT_EVERY_S = 0.0\n"
         "from components.cli import main\nsys.exit(main(sys.argv[1:]))")
UNITS = ("P19-s34", "P36-s34", "P19-s35", "P36-s35")


def _data(root: Path) -> Path:
    """P19 with 16 training facts (2 steps an epoch at batch 8), P36 with 96 (12): in a pool of two, P19-s34 is
    done while P36-s34 trains on with P19-s35, then P36-s35, beside it."""
    data = make_lama(root / "lama", ("P19", "P36"), n_train=96)
    train = data / "29k" / "P19" / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:16]))
    return data


def _command(data: Path, out: Path) -> list[str]:
    # LM batches of 12 rows: a shared step's 16 rows go through the LM in two chunks whose make-up depends on the
    # neighbours, so a prompt trained beside others than in the untouched run differs in its last bits
    return [sys.executable, "-c", CHILD, "report", "lama", "--model", "tiny-gpt2", "--relations", "P19,P36",
            "--seeds", "34,35", "--methods", "ptuning", "--pool", "2", "--lm-batch", "12", "--no-progress",
            "--output-dir", str(out), "--set", f"data_dir={data}", "--set", "train.max_steps=null",
            "--set", "train.epochs=10", "--set", "train.eval_every=5", "--set", "train.patience=null",
            "--set", "train.lr=0.01"]


def _run(cmd: list[str], cwd: Path, log: Path) -> str:
    with log.open("w") as stderr:
        done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr, timeout=420, env=ENV)
    assert done.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def _figures(out: Path) -> dict:
    """Every figure of the table and its units (and the prompts' digests), without times and paths."""
    results = json.loads((out / "results.json").read_text())
    ptuning = results["methods"]["ptuning"]
    untimed = lambda d: {k: v for k, v in d.items() if k != "seconds"}
    return {"macro": {k: v for k, v in ptuning.items() if k.startswith("macro_")},
            "relations": {r: untimed(v) for r, v in ptuning["relations"].items()},
            "units": {p.stem: untimed(json.loads(p.read_text())) for p in sorted((out / "units" / "ptuning").glob("*.json"))},
            "train_examples": ptuning["timing"]["train_examples"], "shared_steps": ptuning["timing"]["shared_steps"],
            "metrics.json": json.loads((out / "metrics.json").read_text())}


def test_a_killed_report_resumes_its_pool_to_the_same_figures_and_counts_the_killed_time(tmp_path):
    data = _data(tmp_path)
    straight = tmp_path / "straight"
    _run(_command(data, straight), tmp_path, tmp_path / "straight.log")
    expected = _figures(straight)
    assert set(expected["units"]) == set(UNITS) and all(u["prompt_sha256"] for u in expected["units"].values())
    steps = {u: expected["units"][u]["steps"] for u in UNITS}
    assert steps == {"P19-s34": 20, "P36-s34": 120, "P19-s35": 20, "P36-s35": 120}

    out = tmp_path / "killed"
    first = out / "units" / "ptuning" / "P19-s34.json"
    kill_once_written(_command(data, out), tmp_path, first, tmp_path / "killed.log", "unit", timeout=300)
    saved = sorted(p.stem for p in (out / "units" / "ptuning").glob("*.json"))
    assert "P19-s34" in saved and len(saved) < len(UNITS), f"killed too late: {saved}"
    pool = out / ".scratch" / "ptuning" / "pool" / "pool.json"
    checkpoint = json.loads(pool.read_text()) if pool.exists() else None
    timing = json.loads((out / "units" / "timing.json").read_text()) if (out / "units" / "timing.json").exists() else {}
    killed_s = timing.get("ptuning", {}).get("seconds", 0.0)

    resumed = _run(_command(data, out), tmp_path, tmp_path / "resumed.log")
    assert _figures(out) == expected  # to the last digit, and every prompt to the last bit

    # it continued the killed pool (from a checkpoint taken after it had started training), not a new one
    assert checkpoint is not None and checkpoint["shared_step"] > 0 and checkpoint["active"]
    assert f"resuming the pool checkpointed at shared step {checkpoint['shared_step']}" in resumed
    assert not list(pool.parent.glob("pool*")), "a finished pool leaves no checkpoint"
    assert not (out / "units" / "ptuning" / ".tmp").exists()
    # the time of the killed invocation counts: everything up to its last checkpoint was in timing.json when it
    # was killed, and the run again added its own time to it
    assert killed_s >= checkpoint["elapsed_s"] > 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["ptuning"]["timing"]["seconds"] > killed_s
    assert results["wall_s"] >= results["methods"]["ptuning"]["timing"]["seconds"]
