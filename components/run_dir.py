"""A run directory knows which run it holds. Before anything is written into it, `claim` takes its lock (a
second process refuses at once; the OS drops the lock of a killed one, so a stale lock never blocks) and
compares the fingerprint recorded there (resolved parameters, code version, data version) with this run's:

    the same        resume from its checkpoint, or read back its finished result
    none (empty)    a new run
    another         refuse with a one-line error naming what differs

`restart=True` empties the directory first, whatever it holds. So a checkpoint or a result can never be taken
for the result of other parameters, other code or other data. Every file of the run's own bookkeeping is
written atomically, and a full disk anywhere in the run surfaces as `DiskFull` naming the directory.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from filelock import FileLock, Timeout

from components.common import flatten, remove_checkpoints
from components.training.storage import DiskFull, atomic_write, disk_full_error

FINGERPRINT = "fingerprint.json"
LOCK = ".run.lock"
DONE = "done.json"  # written last: the run finished and its metrics.json is its result


class RunDirBusy(RuntimeError):
    """Another process is writing into the run directory."""


class RunDirMismatch(ValueError):
    """The run directory holds another run."""


def differences(old: dict, new: dict, limit: int = 6) -> str:
    """`key: old -> new` for the leaves that differ, the first `limit` of them."""
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    shown = ", ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def recorded_fingerprint(directory: Path) -> dict | None:
    path = directory / FINGERPRINT
    return json.loads(path.read_text()) if path.is_file() else None


def finished_result(directory: Path, fingerprint: dict) -> dict | None:
    """The metrics of a finished run of exactly this fingerprint in `directory`, else None."""
    if recorded_fingerprint(directory) == fingerprint and (directory / DONE).is_file() \
            and (directory / "metrics.json").is_file():
        return json.loads((directory / "metrics.json").read_text())
    return None


def _empty(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.name == LOCK:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


@contextlib.contextmanager
def hold(directory: str | Path):
    """`directory`'s lock while the block runs (a run's, a report's): a second process gets RunDirBusy at once."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirBusy(f"{directory} is in use by another ptuning process: wait for it, or choose another "
                         "--output-dir") from None
    try:
        yield directory
    finally:
        lock.release()


@contextlib.contextmanager
def claim(directory: str | Path, fingerprint: dict, restart: bool = False):
    """Hold `directory` for a run with `fingerprint` (JSON-able) while the block runs; see the module doc."""
    with hold(directory) as directory:
        fingerprint = json.loads(json.dumps(fingerprint, default=str))
        recorded = recorded_fingerprint(directory)
        leftovers = [e.name for e in directory.iterdir() if e.name not in (LOCK, FINGERPRINT)]
        if not leftovers:  # nothing was written under the recorded fingerprint: nothing to protect
            recorded = None
        if restart:
            _empty(directory)
        elif recorded is not None and recorded != fingerprint or recorded is None and leftovers:
            what = (f"a run with other settings ({differences(recorded, fingerprint)})" if recorded is not None
                    else f"files of no ptuning run ({', '.join(sorted(leftovers)[:5])})")
            raise RunDirMismatch(f"{directory} holds {what}: choose another --output-dir, or pass --restart "
                                 "to discard it")
        atomic_write(directory / FINGERPRINT, json.dumps(fingerprint, indent=2, sort_keys=True))
        yield directory


def mark_done(directory: Path) -> None:
    atomic_write(directory / DONE, json.dumps({"finished": True}))


def execute(config, output_dir: str | Path, callbacks: list = (), restart: bool = False) -> tuple[dict, bool]:
    """Run `config` (a RunConfig) in `output_dir` under `claim`: (metrics, reused). A finished run of the same
    fingerprint is read back; an interrupted one resumes from its checkpoint; its checkpoints go when it ends.
    Raises RunDirBusy, RunDirMismatch, or DiskFull (naming the directory) when any write of the run ran out of
    space (the last checkpoint stays, so the same command resumes once there is room)."""
    fingerprint = config.fingerprint()
    try:
        with claim(output_dir, fingerprint, restart=restart) as directory:
            done = finished_result(directory, json.loads(json.dumps(fingerprint, default=str)))
            if done is not None:
                return done, True
            metrics = config.spec.run(config, directory, list(callbacks))
            remove_checkpoints(directory)
            mark_done(directory)
            return metrics, False
    except DiskFull:
        raise
    except Exception as error:  # a full disk met by a write that does not go through atomic_write
        if disk_full_error(error):
            raise DiskFull(output_dir) from None
        raise
