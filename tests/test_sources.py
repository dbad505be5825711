"""The raw data source: manifest checks, clean failures, upstream addresses, and the JSONL reader."""
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from components.data.sources import (DataError, UNLISTED, main_materialise, materialise, read_jsonl, read_manifest,
                                sha256_file)

# a few small files: one with an upstream address per source kind, one the mirror derived
SMALL = ("fewglue/CB/train.jsonl", "lama/relations.jsonl", "lama/trex/P1376/dev.jsonl")


@pytest.fixture
def small_mirror(tmp_path, shared_dir) -> Path:
    """A copy of part of the real mirror, its manifest cut to SMALL (kept byte for byte: CRLF line ends)."""
    data = shared_dir / "data"
    mirror = tmp_path / "mirror"
    lines = (data / "MANIFEST.tsv").read_bytes().splitlines(keepends=True)
    kept = [lines[0]] + [line for line in lines[1:] if line.split(b"\t")[0].decode() in SMALL]
    assert len(kept) == len(SMALL) + 1
    for name in (*SMALL, *UNLISTED[1:]):
        (mirror / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / name, mirror / name)
    (mirror / "MANIFEST.tsv").write_bytes(b"".join(kept))
    return mirror


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_materialise_copies_verified_files_and_the_unlisted_ones(small_mirror, tmp_path):
    out = tmp_path / "raw"
    result = materialise(small_mirror, out)
    assert result["verified"] == len(SMALL) and result["downloaded"] == 0
    assert _files(out) == sorted((*SMALL, *UNLISTED))
    for name in _files(out):
        assert sha256_file(out / name) == sha256_file(small_mirror / name)


def test_a_tampered_file_is_named_and_nothing_partial_is_left(small_mirror, tmp_path):
    target = small_mirror / SMALL[1]
    content = bytearray(target.read_bytes())
    content[100] ^= 1  # same size, different bytes: only the checksum can tell
    target.write_bytes(bytes(content))
    out = tmp_path / "raw"
    with pytest.raises(DataError, match=rf"{SMALL[1]}: sha256 .* does not match"):
        materialise(small_mirror, out)
    assert not (out / SMALL[1]).exists()
    assert not [p for p in out.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


def test_a_wrong_size_is_named(small_mirror, tmp_path):
    with open(small_mirror / SMALL[0], "ab") as f:
        f.write(b"\n")
    with pytest.raises(DataError, match=rf"{SMALL[0]}: .* bytes .* the manifest says"):
        materialise(small_mirror, tmp_path / "raw")


def test_a_missing_file_is_named_before_anything_is_written(small_mirror, tmp_path):
    (small_mirror / SMALL[2]).unlink()
    out = tmp_path / "raw"
    with pytest.raises(DataError, match=rf"missing from the mirror .*{SMALL[2]}"):
        materialise(small_mirror, out)
    assert not out.exists()


def test_upstream_addresses_come_from_the_manifest(shared_dir):
    entries = {e.path: e for e in read_manifest(shared_dir / "data" / "MANIFEST.tsv")}
    assert entries["lama/relations.jsonl"].url() == ("https://raw.githubusercontent.com/programmer-ming/P-turning-main/"
                                                     "530cd15f500711d01ea71698c3dd47b0301beacd/data/LAMA/relations.jsonl")
    assert entries["lama/trex/P1376/dev.jsonl"].url() is None  # derived by the mirror: no upstream


def test_an_unreachable_upstream_fails_fast_and_clearly(small_mirror, tmp_path, monkeypatch):
    """Fast by construction, whatever the machine's speed: one download attempt, bounded by the given timeout, and
    the first failure ends the run (no retry, no other file tried)."""
    attempts = []
    urlopen = urllib.request.urlopen

    def spy_urlopen(url, timeout):
        attempts.append((url, timeout))
        return urlopen(url, timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", spy_urlopen)
    # port 9 (discard) on the loopback: refused at once, no network needed to test the failure path
    with pytest.raises(DataError, match=r"fewglue/CB/train.jsonl: download from http://127\.0\.0\.1:9/.* failed"):
        materialise(small_mirror, tmp_path / "raw", from_upstream=True, base_url="http://127.0.0.1:9", timeout=2)
    assert len(attempts) == 1 and attempts[0][0].startswith("http://127.0.0.1:9/") and attempts[0][1] == 2
    assert not (tmp_path / "raw" / SMALL[0]).exists()


def test_without_a_mirror_derived_files_cannot_be_had(small_mirror, tmp_path):
    with pytest.raises(DataError, match=r"mirror .* does not exist.*lama/trex/P1376/dev.jsonl"):
        materialise(tmp_path / "nowhere", tmp_path / "raw", manifest=small_mirror / "MANIFEST.tsv", from_upstream=True)


def test_without_a_mirror_or_an_earlier_copy_there_is_no_manifest(tmp_path):
    with pytest.raises(DataError, match=r"no MANIFEST.tsv: the data mirror .*nowhere does not exist"):
        main_materialise(str(tmp_path / "nowhere"), str(tmp_path / "raw"))


def test_the_mirror_comes_from_the_environment(small_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("PTUNING_DATA_MIRROR", str(small_mirror))
    result = main_materialise(None, str(tmp_path / "raw"))
    assert Path(result["mirror"]) == small_mirror and result["verified"] == len(SMALL)


@pytest.mark.parametrize("line, message", [
    ('{"sub_label": "Paris", ', r"invalid JSON"),
    ('["Paris", "France"]', r"expected a JSON object, got list"),
    ('{"sub_label": "Paris"}', r"missing field\(s\) obj_label"),
])
def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "facts.jsonl"
    path.write_text('{"sub_label": "Rome", "obj_label": "Italy"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + message):
        read_jsonl(path, required=("sub_label", "obj_label"))


def test_read_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
