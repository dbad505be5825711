"""A run directory knows which run it holds. Before anything is written into it, `claim` takes its lock (a
second process refuses at once; the OS drops the lock of a killed one, so a stale lock never blocks) and
compares the fingerprint recorded there (resolved parameters, code version, data version) with this run's:

    the same        resume from its checkpoint, or read back its finished result
    none (empty)    a new run
    another         refuse with a one-line error naming what differs

`restart=True` empties the directory first, whatever it holds. So a checkpoint or a result can never be taken
for the result of other parameters, other code or other data. Every file of the run's own bookkeeping is
written atomically, and a full disk anywhere in the run surfaces as `DiskFull` naming the directory.

A run writes nothing until its configuration is valid: some checks need the model or the data (a template that
puts [Y] first for a causal LM, a `max_length` too small, a malformed data line), so they fail inside the run.
When a run fails before it wrote anything but its fingerprint, the claim is undone: the directory is as it was
(its previous fingerprint back, the lock file and the folders the claim created removed). `--restart` keeps
the previous run's files aside (`.restart-backup/`) until the new run has started training or written
something, and puts them back when it fails before that; a process killed in between leaves them there, and
the next claim of the directory decides by the same rule.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from filelock import FileLock, Timeout

from components.common import flatten, remove_checkpoints
from components.training.callbacks import Callback
from components.training.storage import DiskFull, atomic_write, disk_full_error

FINGERPRINT = "fingerprint.json"
LOCK = ".run.lock"
DONE = "done.json"  # written last: the run finished and its metrics.json is its result
BACKUP = ".restart-backup"  # --restart: the previous run's files until the new run's configuration proved valid
OWN = (LOCK, FINGERPRINT, BACKUP)  # the claim's bookkeeping, not the run's


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


def _remove(entry: Path) -> None:
    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _written(directory: Path) -> list[str]:
    """What a run wrote into `directory`: its entries other than the claim's own."""
    return sorted(e.name for e in directory.iterdir() if e.name not in OWN)


def _stash(directory: Path) -> None:
    """--restart: move everything (the fingerprint too) into BACKUP, to be dropped or put back."""
    backup = directory / BACKUP
    backup.mkdir()
    for entry in directory.iterdir():
        if entry.name not in (LOCK, BACKUP):
            entry.rename(backup / entry.name)


def _settle_backup(directory: Path, restore: bool) -> None:
    """Put the stashed files back (the new run wrote nothing: they are the directory's run) or drop them."""
    backup = directory / BACKUP
    if not backup.is_dir():
        return
    if restore:
        for entry in list(backup.iterdir()):
            target = directory / entry.name
            if target.exists() or target.is_symlink():
                _remove(target)
            entry.rename(target)
        backup.rmdir()
    else:
        shutil.rmtree(backup)


def _missing_top(directory: Path) -> Path | None:
    """The highest folder of `directory`'s path that does not exist yet (created by the claim), or None."""
    top = None
    for folder in (directory, *directory.parents):
        if folder.exists() or folder.is_symlink():
            break
        top = folder
    return top


def _remove_created(directory: Path, top: Path) -> None:
    """The folders from `directory` up to `top` that the claim created, where they are still empty."""
    for folder in (directory, *directory.parents):
        with contextlib.suppress(OSError):
            folder.rmdir()
        if folder == top:
            break


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


class Claim:
    """The directory a run holds (`path`); `started()` says its configuration proved valid (training began):
    from then on a failure keeps what the run wrote, and a --restart's previous files are dropped."""

    def __init__(self, path: Path):
        self.path, self.valid = path, False

    def started(self) -> None:
        if not self.valid:
            self.valid = True
            _settle_backup(self.path, restore=False)


@contextlib.contextmanager
def claim(directory: str | Path, fingerprint: dict, restart: bool = False):
    """Hold `directory` for a run with `fingerprint` (JSON-able) while the block runs, which gets a Claim; see the
    module doc. A block that fails before anything but the fingerprint was written leaves the directory as it was."""
    directory = Path(directory)
    created = _missing_top(directory.absolute())  # the folders this claim creates, if any
    had_lock = (directory / LOCK).exists()
    undone = False
    try:
        with hold(directory) as directory:
            state, wrote, before = Claim(directory), False, None
            try:
                _settle_backup(directory, restore=not _written(directory))  # a killed --restart's stash
                previous = (directory / FINGERPRINT).read_bytes() if (directory / FINGERPRINT).is_file() else None
                fingerprint = json.loads(json.dumps(fingerprint, default=str))
                recorded = recorded_fingerprint(directory)
                leftovers = _written(directory)
                if not leftovers:  # nothing was written under the recorded fingerprint: nothing to protect
                    recorded = None
                if restart:
                    if leftovers or previous is not None:
                        _stash(directory)
                elif recorded is not None and recorded != fingerprint or recorded is None and leftovers:
                    what = (f"a run with other settings ({differences(recorded, fingerprint)})" if recorded is not None
                            else f"files of no ptuning run ({', '.join(leftovers[:5])})")
                    raise RunDirMismatch(f"{directory} holds {what}: choose another --output-dir, or pass --restart "
                                         "to discard it")
                text = json.dumps(fingerprint, indent=2, sort_keys=True)
                wrote = previous != text.encode() or restart
                if wrote:
                    atomic_write(directory / FINGERPRINT, text)
                before = _written(directory)
                yield state
            except BaseException:
                if before is not None and (state.valid or _written(directory) != before):
                    _settle_backup(directory, restore=False)  # the run got under way: what it wrote resumes
                    raise
                # It failed before writing anything of its own: the directory as it was before the claim.
                if wrote:
                    if previous is not None:
                        atomic_write(directory / FINGERPRINT, previous)
                    else:
                        (directory / FINGERPRINT).unlink(missing_ok=True)
                _settle_backup(directory, restore=True)  # --restart: the previous run's files, back in place
                if not had_lock:
                    (directory / LOCK).unlink(missing_ok=True)  # still held: no other process takes it meanwhile
                undone = True
                raise
            _settle_backup(directory, restore=False)
    finally:
        if undone and created is not None:
            _remove_created(directory.absolute(), created)


class _Started(Callback):
    """Training began: the run's configuration (template, lengths, data) passed every check."""

    def __init__(self, held: Claim):
        self.held = held

    def on_train_begin(self, info: dict) -> None:
        self.held.started()


def mark_done(directory: Path) -> None:
    atomic_write(directory / DONE, json.dumps({"finished": True}))


def execute(config, output_dir: str | Path, callbacks: list = (), restart: bool = False) -> tuple[dict, bool]:
    """Run `config` (a RunConfig) in `output_dir` under `claim`: (metrics, reused). A finished run of the same
    fingerprint is read back; an interrupted one resumes from its checkpoint; its checkpoints go when it ends.
    Raises RunDirBusy, RunDirMismatch, or DiskFull (naming the directory) when any write of the run ran out of
    space (the last checkpoint stays, so the same command resumes once there is room)."""
    fingerprint = config.fingerprint()
    try:
        with claim(output_dir, fingerprint, restart=restart) as held:
            directory = held.path
            done = finished_result(directory, json.loads(json.dumps(fingerprint, default=str)))
            if done is not None:
                return done, True
            metrics = config.spec.run(config, directory, [_Started(held), *callbacks])
            remove_checkpoints(directory)
            mark_done(directory)
            return metrics, False
    except DiskFull:
        raise
    except Exception as error:  # a full disk met by a write that does not go through atomic_write
        if disk_full_error(error):
            raise DiskFull(output_dir) from None
        raise
