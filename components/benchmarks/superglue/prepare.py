"""The DVC stage prepare_fewglue: `<out>/<Task>/{train32,dev32,val}.jsonl` (few-shot) and `{train,dev}.jsonl`
(full) from the materialised mirror, with every count and disjointness check in `<out>/stats.json`.

dev32 holds `dev_size` examples (never more than train32 has) drawn, seeded, from SuperGLUE training rows that
train32 does not use and that share no content with train32 or val; a raw row that holds several examples
(a passage with its questions) gives one of them, as FewGLUE's layout has one question per row. A task without
a full train set in the mirror takes the published dev32 and has no full split. The full setting's dev is a
seeded share of the train set's distinct contents (rows with the same content go to the same side).
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from components.benchmarks.superglue.tasks import TASKS, TaskSpec, read_examples, read_rows, task_spec
from components.data.sources import DataError, write_jsonl

log = logging.getLogger(__name__)


def _units(spec: TaskSpec, rows: list[dict]) -> int:
    return sum(spec.units.count(r) for r in rows)


def _load_raw(spec: TaskSpec, path: Path) -> list[dict]:
    read_examples(spec, path)  # validates every row (file:line errors)
    return [row for _, row in read_rows(path)]


def _sample_dev32(spec: TaskSpec, train: list[dict], train32: list[dict], val: list[dict], size: int, seed: int):
    used_idx = {r.get("idx") for r in train32}
    banned = {spec.key(r) for r in train32} | {spec.key(r) for r in val}
    pool, seen = [], set()
    for row in train:
        key = spec.key(row)
        if row.get("idx") in used_idx or key in banned or key in seen:
            continue
        seen.add(key)
        pool.append(row)
    n = min(size, _units(spec, train32))
    if len(pool) < n:
        raise DataError(f"{spec.folder}: only {len(pool)} unused training rows for a dev32 of {n}")
    rng = random.Random(f"{seed}-{spec.name}-dev32")
    picked = sorted(rng.sample(range(len(pool)), n))
    return [spec.units.pick_one(pool[i], rng) for i in picked], len(pool)


def _split_full(spec: TaskSpec, train: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    by_key: dict[str, list[dict]] = {}
    for row in train:
        by_key.setdefault(spec.key(row), []).append(row)
    keys = list(by_key)
    random.Random(f"{seed}-{spec.name}-full").shuffle(keys)
    dev_keys = set(keys[:max(1, round(fraction * len(keys)))])
    return [r for r in train if spec.key(r) not in dev_keys], [r for r in train if spec.key(r) in dev_keys]


def _disjoint(spec: TaskSpec, a: list[dict], b: list[dict]) -> bool:
    return not ({spec.key(r) for r in a} & {spec.key(r) for r in b})


def prepare(raw: str | Path = "data/raw", out: str | Path = "data/fewglue", seed: int = 42,
            dev_size: int | None = None, full_dev_fraction: float | None = None, tasks: list[str] | None = None) -> dict:
    """Write the prepared splits of `tasks` (default: all) and `<out>/stats.json`; return the stats.
    `dev_size` and `full_dev_fraction` default to params/superglue.yaml `prepare:`."""
    if dev_size is None or full_dev_fraction is None:
        from components.config import load_params
        defaults = load_params("superglue")["prepare"]
        dev_size = defaults["dev_size"] if dev_size is None else dev_size
        full_dev_fraction = defaults["full_dev_fraction"] if full_dev_fraction is None else full_dev_fraction
    if not 0 < full_dev_fraction < 1:
        raise ValueError(f"full_dev_fraction must lie in (0, 1), got {full_dev_fraction}")
    raw, out = Path(raw), Path(out)
    if not (raw / "superglue").is_dir():
        raise DataError(f"{raw / 'superglue'} does not exist: run `dvc repro materialise` (or `ptuning prepare data`) first")
    stats = {"seed": seed, "dev_size": dev_size, "full_dev_fraction": full_dev_fraction, "raw": str(raw), "tasks": {}}
    for spec in (task_spec(t) for t in (tasks or TASKS)):
        val = _load_raw(spec, raw / "superglue" / spec.folder / "val.jsonl")
        train32 = _load_raw(spec, raw / "fewglue" / spec.folder / "train.jsonl")
        full_path = raw / "superglue" / spec.folder / "train.jsonl"
        task_out = out / spec.folder
        record: dict = {"train32": _units(spec, train32), "val": _units(spec, val)}
        if spec.full_train:
            train = _load_raw(spec, full_path)
            dev32, pool = _sample_dev32(spec, train, train32, val, dev_size, seed)
            full_train, full_dev = _split_full(spec, train, full_dev_fraction, seed)
            train_idx = {r.get("idx") for r in train}
            record.update(dev32_source="sampled from unused SuperGLUE train examples", dev32_pool=pool,
                          train32_in_train=sum(r.get("idx") in train_idx for r in train32),
                          full={"train": _units(spec, full_train), "dev": _units(spec, full_dev),
                                "dev_disjoint_from_train": _disjoint(spec, full_train, full_dev),
                                "dev_disjoint_from_val": _disjoint(spec, full_dev, val)})
            if not (record["full"]["dev_disjoint_from_train"] and record["full"]["dev_disjoint_from_val"]):
                raise DataError(f"{spec.folder}: the full setting's dev overlaps its train or val: {record['full']}")
            write_jsonl(task_out / "train.jsonl", full_train)
            write_jsonl(task_out / "dev.jsonl", full_dev)
        else:
            published = raw / "fewglue_32dev_published" / spec.folder / "dev32.jsonl"
            if not published.exists():
                raise DataError(f"{published} is missing: {spec.folder} has no full train set here, so its dev32 is "
                                "the published one")
            dev32 = _load_raw(spec, published)[:min(dev_size, len(train32))]
            record.update(dev32_source=f"published dev32 ({published}): no full SuperGLUE train set for "
                                       f"{spec.folder} here, so dev32 cannot be drawn from unused training data",
                          full=f"unavailable: {full_path} is missing")
            for stale in ("train.jsonl", "dev.jsonl"):
                (task_out / stale).unlink(missing_ok=True)
        record.update(dev32=_units(spec, dev32),
                      dev32_disjoint_from_train32=_disjoint(spec, dev32, train32) and
                      not {r.get("idx") for r in dev32} & {r.get("idx") for r in train32},
                      dev32_disjoint_from_val=_disjoint(spec, dev32, val))
        if record["dev32"] > record["train32"]:
            raise DataError(f"{spec.folder}: dev32 ({record['dev32']}) is larger than train32 ({record['train32']})")
        if not (record["dev32_disjoint_from_train32"] and record["dev32_disjoint_from_val"]):
            raise DataError(f"{spec.folder}: dev32 overlaps train32 or val: {record}")
        write_jsonl(task_out / "train32.jsonl", train32)
        write_jsonl(task_out / "dev32.jsonl", dev32)
        write_jsonl(task_out / "val.jsonl", val)
        stats["tasks"][spec.name] = record
        log.info("%s: train32 %d, dev32 %d (%s), val %d", spec.folder, record["train32"], record["dev32"],
                 record["dev32_source"], record["val"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
