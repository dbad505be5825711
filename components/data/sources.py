"""The raw data source: copy the data mirror (or download the upstream files) into the DVC-tracked `data/raw`,
every file checked against `MANIFEST.tsv` (bytes and sha256). Also the JSONL reader every component uses.

The mirror is `params/data.yaml: mirror` (relative to the repository root), overridden by `$PTUNING_DATA_MIRROR`
or the `--mirror` flag. The manifest names each file's upstream repository, commit and path; with
`--from-upstream` (or when the mirror does not exist) those files are downloaded from raw.githubusercontent.com
instead. Files the mirror derived itself (manifest source `DERIVED`: the T-REx splits without evidences, the
gap fills) have no upstream address and always come from a mirror.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.tsv"
MANIFEST_COLUMNS = ("path", "source_repo", "commit", "source_path", "bytes", "sha256", "rows", "note")
# Shipped by the mirror without a manifest row (so without a checksum), and needed downstream:
# the manifest itself and the per-split provenance of the LAMA facts.
UNLISTED = (MANIFEST, "lama/coverage.tsv")
UPSTREAM = "https://raw.githubusercontent.com"
CHUNK = 1 << 20


class DataError(ValueError):
    """Input data that is missing, corrupt or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    source_repo: str
    commit: str
    source_path: str
    bytes: int
    sha256: str
    rows: int | None
    note: str

    def url(self, base: str = UPSTREAM) -> str | None:
        """The upstream address, or None for a file the mirror derived itself (commit and source path `-`)."""
        if self.commit in ("", "-") or self.source_path in ("", "-"):
            return None
        return f"{base.rstrip('/')}/{self.source_repo}/{self.commit}/{self.source_path}"


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    # newline="" lets csv handle the manifest's CRLF line ends
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = tuple(next(reader, ()))
        if header != MANIFEST_COLUMNS:
            raise DataError(f"{path}:1: expected columns {MANIFEST_COLUMNS}, got {header}")
        entries = []
        for line_no, fields in enumerate(reader, 2):
            if not fields:
                continue
            if len(fields) != len(MANIFEST_COLUMNS):
                raise DataError(f"{path}:{line_no}: expected {len(MANIFEST_COLUMNS)} tab-separated fields, "
                                f"got {len(fields)}")
            row = dict(zip(MANIFEST_COLUMNS, fields))
            relative = Path(row["path"])
            if relative.is_absolute() or ".." in relative.parts:
                raise DataError(f"{path}:{line_no}: file path {row['path']!r} must stay inside the data folder")
            try:
                size = int(row["bytes"])
                rows = int(row["rows"]) if row["rows"] else None
            except ValueError as error:
                raise DataError(f"{path}:{line_no}: {error}") from None
            entries.append(ManifestEntry(row["path"], row["source_repo"], row["commit"], row["source_path"],
                                         size, row["sha256"].lower(), rows, row["note"]))
    return entries


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _install(stream: BinaryIO, dest: Path, entry: ManifestEntry | None, origin: str) -> int:
    """Write `stream` to `dest` through a temporary file in the same folder, renamed into place only once
    its size and sha256 match `entry` (None: no checksum to check), so no partial file is ever left behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            while block := stream.read(CHUNK):
                digest.update(block)
                size += len(block)
                out.write(block)
        if entry is not None and size != entry.bytes:
            raise DataError(f"{entry.path}: {size} bytes from {origin}, the manifest says {entry.bytes}")
        if entry is not None and digest.hexdigest() != entry.sha256:
            raise DataError(f"{entry.path}: sha256 {digest.hexdigest()} of {origin} does not match "
                            f"the manifest's {entry.sha256}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


def _download(url: str, dest: Path, entry: ManifestEntry, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return _install(response, dest, entry, url)
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DataError(f"{entry.path}: download from {url} failed ({reason}); without network access "
                        f"use a data mirror (--mirror or $PTUNING_DATA_MIRROR)") from None


def materialise(mirror: str | Path | None, out: str | Path, manifest: str | Path | None = None,
                from_upstream: bool = False, base_url: str = UPSTREAM, timeout: float = 10.0) -> dict:
    """Copy (or, with `from_upstream`, download) every manifest file into `out`, verified, plus UNLISTED.

    `manifest` defaults to `<mirror>/MANIFEST.tsv`, else to the copy a previous run left in `out`.
    Derived files and UNLISTED come from the mirror even with `from_upstream`: nothing is written
    unless every file has a source."""
    mirror = Path(mirror) if mirror is not None else None
    out = Path(out)
    has_mirror = mirror is not None and mirror.is_dir()
    if manifest is None:
        manifest = mirror / MANIFEST if has_mirror else out / MANIFEST
        if not manifest.is_file():
            raise DataError(f"no {MANIFEST}: the data mirror {mirror} does not exist and {out} holds no copy "
                            f"from an earlier run; set --mirror or $PTUNING_DATA_MIRROR")
    entries = read_manifest(manifest)

    # Check everything that can be checked before downloading or copying anything.
    local = [e.path for e in entries if not (from_upstream and e.url(base_url))]
    local += [name for name in UNLISTED if name != MANIFEST]
    if not has_mirror:
        raise DataError(f"the data mirror {mirror} does not exist, yet {len(local)} files can only come from it "
                        f"(no upstream address, e.g. {local[0]}): set --mirror or $PTUNING_DATA_MIRROR")
    missing = [name for name in local if not (mirror / name).is_file()]
    if missing:
        raise DataError(f"missing from the mirror {mirror}: {', '.join(missing[:10])}"
                        + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))

    out.mkdir(parents=True, exist_ok=True)
    total = downloaded = 0
    for entry in entries:
        url = entry.url(base_url) if from_upstream else None
        if url:
            total += _download(url, out / entry.path, entry, timeout)
            downloaded += 1
        else:
            with open(mirror / entry.path, "rb") as src:
                total += _install(src, out / entry.path, entry, str(mirror / entry.path))
    for name, src_path in ((MANIFEST, Path(manifest)), *((n, mirror / n) for n in UNLISTED if n != MANIFEST)):
        dest = out / name
        if not (dest.exists() and dest.resolve() == src_path.resolve()):
            with open(src_path, "rb") as src:
                total += _install(src, dest, None, str(src_path))
    return {"out": str(out), "mirror": str(mirror) if has_mirror else None, "from_upstream": from_upstream,
            "files": len(entries) + len(UNLISTED), "verified": len(entries), "downloaded": downloaded,
            "unverified": list(UNLISTED), "bytes": total}


def main_materialise(mirror: str | None, out: str, from_upstream: bool = False) -> dict:
    """`ptuning prepare data`: materialise the raw data into `out` (the DVC stage `materialise`)."""
    from components.config import load_params, shared_path
    mirror_dir = shared_path("mirror", mirror)
    if not from_upstream and not mirror_dir.is_dir():
        log.warning("data mirror %s does not exist: downloading from the upstream sources", mirror_dir)
        from_upstream = True
    return materialise(mirror_dir, out, from_upstream=from_upstream,
                       timeout=float(load_params("data")["upstream_timeout_s"]))


def numbered_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_no}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no, row))
    return rows


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    """One JSON object per line; blank lines are skipped. Errors name the file and line."""
    rows = numbered_jsonl(path)
    for line_no, row in rows:
        missing = [name for name in required if name not in row]
        if missing:
            raise DataError(f"{path}:{line_no}: missing field(s) {', '.join(missing)}")
    return [row for _, row in rows]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Deterministic JSONL (fixed key order as given, UTF-8 kept readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
