"""`dvc repro` from a flow run, in the checkout: one repro at a time across the flow runs of this machine, DVC's
output in the run's log, and a failure that says whether trying again can help."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from filelock import FileLock


def executable(name: str) -> str:
    """An executable of this environment (the venv's bin is not always on PATH in a served run)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def repro(stages: list[str], root: str | Path, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """`dvc repro STAGES` in the checkout `root` (their upstream stages too): DVC reruns only what changed. Raises
    RuntimeError when another DVC process holds the repository (worth a retry), ValueError when a stage failed."""
    # Flow runs served side by side (lama and superglue) take turns: DVC's --wait-for-lock waits for the repository
    # lock only, and a second `dvc repro` still fails on the first one's lock of shared outputs ("'data/raw' is busy").
    lock = Path(root) / ".dvc" / "tmp" / "ptuning-repro.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with FileLock(str(lock)):
        logger.info("data preparation: dvc repro %s (in %s)", " ".join(stages), root)
        process = subprocess.Popen([executable("dvc"), "--wait-for-lock", "repro", *stages], cwd=root, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in process.stdout:
            if line := line.rstrip():
                tail = (tail + [line])[-40:]
                if len(line) < 400:  # the prepare stages print a long JSON summary as their last line
                    logger.info("dvc: %s", line)
        returncode = process.wait()
    if returncode != 0:
        message = "\n".join(tail)
        if "unable to acquire lock" in message.lower() or "is busy" in message:  # a DVC process outside the flow
            raise RuntimeError(f"dvc repro {' '.join(stages)}: another DVC process holds the repository (retried)\n{message}")
        raise ValueError(f"dvc repro {' '.join(stages)} failed (exit {returncode}):\n{message}")
