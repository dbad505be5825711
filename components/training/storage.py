"""Writes that a full disk cannot corrupt, and checkpoints that load without pickle. `atomic_write` writes a temporary file beside the target and
renames it over the target only once every byte is on disk, so a failed (or killed) write leaves the
previous version intact and no partial file behind; a full disk becomes `DiskFull`, one line naming the
directory, where torch would print an `inline_container.cc` traceback.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

import torch

# Room kept on top of the payload's own size: zip headers, pickled structure, filesystem blocks.
SPACE_MARGIN = 1 << 20
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """No space left in the directory a run writes into (the CLI exits with code 4)."""

    def __init__(self, directory: str | Path, detail: str = ""):
        self.directory = Path(directory)
        super().__init__(errno.ENOSPC, f"disk full: no space left in {self.directory}{detail}: free some space "
                                       "or choose another --output-dir")

    def __str__(self) -> str:
        return self.strerror


def disk_full_error(error: BaseException | None) -> bool:
    """Is `error`, or an error it was raised from or during, ENOSPC/EDQUOT? torch.save reports a failed write
    as a RuntimeError whose context holds the OSError of the file object it was given; safetensors (Rust) has
    only the OS's message in its SafetensorError."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL:
            return True
        if any(os.strerror(code) in str(error) for code in _FULL):
            return True
        error = error.__cause__ or error.__context__
    return False


def payload_bytes(value) -> int:
    """The bytes of the tensors inside `value` (nested dicts, lists, tuples): what torch.save writes at least."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    return 0


def ensure_space(directory: str | Path, needed: int) -> None:
    """Raise DiskFull before writing when `directory` has less than `needed` bytes (plus a margin) free."""
    free = shutil.disk_usage(directory).free
    if free < needed + SPACE_MARGIN:
        raise DiskFull(directory, f" ({free / 2**20:.1f} MiB free, about {(needed + SPACE_MARGIN) / 2**20:.1f} MiB "
                                  "needed)")


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], None], needed: int = 0) -> Path:
    """Write `data` (bytes, text as UTF-8, or a function that writes into the open binary file) to `path`:
    all of it or, on any error, nothing (the previous file stays). `needed`: bytes to check for first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if needed:
        ensure_space(path.parent, needed)
    tmp = path.with_name(path.name + ".tmp")
    try:
        # Our own file object, not a path: torch's C++ writer would hide the errno (an iostream error).
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # some filesystems report a full disk only here
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if disk_full_error(error):
            raise DiskFull(path.parent) from None
        raise
    return path


def _split(value, tensors: dict, path: str):
    """`value` with each tensor replaced by {"__tensor__": name} (the tensor goes into `tensors`) and each dict
    whose keys are not all strings by {"__items__": [[key, value], ...]} (an optimizer's state is keyed by int)."""
    if torch.is_tensor(value):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _split(v, tensors, f"{path}/{k}") for k, v in value.items()}
        return {"__items__": [[k, _split(v, tensors, f"{path}/{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    return value


def _join(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {k: _join(v, tensors) for k, v in value["__items__"]}
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` (nested dicts and lists of tensors, numbers, strings) to `path` as one safetensors file whose
    metadata holds the structure as JSON: no pickle, so loading it runs no code. All or nothing (`atomic_write`),
    checking for its size in free space first."""
    from safetensors.torch import save

    tensors: dict = {}
    structure = json.dumps(_split(state, tensors, "state"))
    return atomic_write(path, lambda f: f.write(save(tensors, metadata={"structure": structure})),
                        needed=payload_bytes(tensors))


def load_checkpoint(path: str | Path) -> dict:
    """The state `save_checkpoint` wrote to `path`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        structure = json.loads(f.metadata()["structure"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return _join(structure, tensors)
