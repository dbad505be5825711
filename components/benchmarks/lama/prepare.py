"""Stage `prepare_lama`: LAMA T-REx facts (41 relations) in the paper's two answer vocabularies.

- 34k: answers that are one bert-base-cased token (a whole word, not a `##` piece or special entry) and in the
  filter list `params/data.yaml: lama.vocab_filter` (default: the paper's own 34k list). The paper's LAMA-34k.
- 29k: the 34k answers that are also one GPT-2 token after a space (`Ġword`). The paper's LAMA-29k.

Both vocabularies are computed from the real tokenizers and compared with the lists the paper's code ships
(`lama/reference_vocab/`); stats.json records the comparison for every filter. Findings: the paper's 29k list is
exactly the BERT ∩ GPT-2 single-token words within its 34k list; its 34k list is LAMA's `common_vocab_cased.txt`
(model-vocabulary intersection minus spaCy stop words, punctuation and symbols) with 3 entries dropped and 20
added (single letters, digits 1-5, `ii`, `cliff`, `^`), which fits the paper's note that it rebuilt the vocabulary
"using the scripts from original LAMA" (presumably with other tool versions). Without a filter list the
intersection keeps stop words and punctuation (18,542 words against the paper's 18,154).

Outputs (all deterministic): `<out>/{34k,29k}/<Pxx>/{train,dev,test}.jsonl` (rows `uuid, sub_label, obj_label,
...`), `<out>/{34k,29k}/vocab.json` (sorted words that predictions are restricted to; GPT-2 and RoBERTa read
them after a space), `<out>/relations.jsonl` (manual prompts of the relations with facts), `<out>/stats.json`
(counts, vocabulary comparison, every data gap) and `<out>/metrics.json` (its headline figures: DVC metrics).
"""
from __future__ import annotations

import csv
import json
import logging
import random
import shutil
import uuid
from collections import Counter, defaultdict
from pathlib import Path

from components.config import shared_path
from components.data.sources import DataError, read_jsonl, write_jsonl

log = logging.getLogger(__name__)

VOCABS = ("34k", "29k")
SPLITS = ("train", "dev", "test")
FILTERS = ("paper_34k", "lama_common", "none")
PAPER_TEST_FACTS = {"34k": 34039, "29k": "about 29k (no exact figure in the paper)"}
REFERENCE = Path("lama/reference_vocab")
UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/THUDM/P-tuning/LAMA")
SHOW = 25  # words listed per vocabulary difference in stats.json


def relation_key(relation: str) -> int:
    return int(relation.lstrip("P"))


# --- vocabularies -------------------------------------------------------------------------------------------

def load_tokenizers(tokenizers_dir: str | Path):
    from transformers import AutoTokenizer
    tokenizers_dir = Path(tokenizers_dir)
    found = [tokenizers_dir / name for name in ("bert-base-cased", "gpt2")]
    if not all(path.is_dir() for path in found):
        raise DataError(f"{tokenizers_dir}: expected the tokenizer folders bert-base-cased/ and gpt2/ "
                        f"(--tokenizers, $PTUNING_TOKENIZERS)")
    return tuple(AutoTokenizer.from_pretrained(path) for path in found)


def bert_single_tokens(bert) -> set[str]:
    """bert-base-cased entries that tokenize to themselves: whole words, not `##` pieces, special or [unused]."""
    vocab = bert.get_vocab()
    words = sorted(w for w in vocab if not w.startswith("##") and w not in bert.all_special_tokens)
    ids = bert(words, add_special_tokens=False)["input_ids"]
    return {w for w, i in zip(words, ids) if i == [vocab[w]]}


def gpt2_single_tokens(gpt2, words) -> set[str]:
    """The words GPT-2 encodes as one token after a space, as an answer follows the prompt."""
    words = sorted(words)
    ids = gpt2([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return {w for w, i in zip(words, ids) if len(i) == 1}


def reference_vocabs(raw: Path) -> dict[str, set[str]]:
    folder = raw / REFERENCE
    paper = {name: json.loads((folder / f"{name}-vocab.json").read_text(encoding="utf-8")) for name in VOCABS}
    common = (folder / "common_vocab_cased.txt").read_text(encoding="utf-8").splitlines()
    return {"34k": set(paper["34k"]["bert-base-cased"]), "29k": set(paper["29k"]["bert-base-cased"]),
            "29k_gpt2": set(paper["29k"]["gpt2-xl"]), "lama_common": {w for w in common if w}}


def answer_vocabs(bert_words: set[str], gpt2_words: set[str], filter_list: set[str] | None) -> dict[str, set[str]]:
    v34 = bert_words & filter_list if filter_list is not None else set(bert_words)
    return {"34k": v34, "29k": v34 & gpt2_words}


def compare(ours: set[str], reference: set[str]) -> dict:
    both = ours & reference
    only_ours, only_reference = sorted(ours - reference), sorted(reference - ours)
    return {"ours": len(ours), "reference": len(reference), "overlap": len(both),
            "jaccard": round(len(both) / max(1, len(ours | reference)), 5),
            "only_ours": len(only_ours), "only_reference": len(only_reference),
            "only_ours_examples": only_ours[:SHOW], "only_reference_examples": only_reference[:SHOW]}


def vocabularies(raw: Path, bert, gpt2, vocab_filter: str) -> tuple[dict[str, set[str]], dict]:
    """The answer vocabularies for `vocab_filter`, and the comparison of every filter with the paper's lists."""
    refs = reference_vocabs(raw)
    bert_words = bert_single_tokens(bert)
    gpt2_words = gpt2_single_tokens(gpt2, bert_words)
    candidates = {"paper_34k": refs["34k"], "lama_common": refs["lama_common"], "none": None}
    by_filter = {name: answer_vocabs(bert_words, gpt2_words, words) for name, words in candidates.items()}
    stats = {
        "filter": vocab_filter,
        "sizes": {"bert_single_token_words": len(bert_words), "gpt2_single_token_of_those": len(gpt2_words),
                  **{name: len(words) for name, words in by_filter[vocab_filter].items()}},
        "reference_sizes": {"29k-vocab.json[bert-base-cased]": len(refs["29k"]),
                            "34k-vocab.json[bert-base-cased]": len(refs["34k"]),
                            "common_vocab_cased.txt": len(refs["lama_common"])},
        "comparison_with_paper_lists": {name: {v: compare(words[v], refs[v]) for v in VOCABS}
                                        for name, words in by_filter.items()},
        "findings": {
            "paper_29k_is_bert_gpt2_intersection_within_paper_34k": by_filter["paper_34k"]["29k"] == refs["29k"],
            "paper_29k_gpt2_list_is_its_bert_list_after_a_space": refs["29k_gpt2"] == {"Ġ" + w for w in refs["29k"]},
            "paper_34k_all_bert_single_tokens": refs["34k"] <= bert_words,
            "paper_34k_vs_lama_common_vocab": compare(refs["34k"], refs["lama_common"]),
        },
    }
    return by_filter[vocab_filter], stats


# --- facts --------------------------------------------------------------------------------------------------

def _fact(row: dict) -> tuple[str, str]:
    return row["sub_label"], row["obj_label"]


def read_relation(raw: Path, relation: str) -> dict[str, list[dict]]:
    """The raw splits of one relation (a missing file is an empty split), every row with a `uuid` first:
    train/dev rows have none upstream, so they get a stable one (the same fact keeps it in 34k and 29k)."""
    splits = {}
    for split in SPLITS:
        path = raw / "lama" / "trex" / relation / f"{split}.jsonl"
        rows = read_jsonl(path, required=("sub_label", "obj_label")) if path.exists() else []
        splits[split] = []
        for i, row in enumerate(rows):
            name = f"{relation}/{split}/{i}/{row['sub_label']}/{row['obj_label']}"
            uid = row.get("uuid") or str(uuid.uuid5(UUID_NAMESPACE, name))
            splits[split].append({"uuid": uid, **{k: v for k, v in row.items() if k != "uuid"}})
    return splits


def read_coverage(path: Path) -> dict[tuple[str, str], list[tuple[str, int]]]:
    coverage = defaultdict(list)
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.DictReader(f, delimiter="\t"), 2):
            try:
                coverage[row["relation"], row["split"]].append((row["source"], int(row["rows"])))
            except (KeyError, TypeError, ValueError) as error:
                raise DataError(f"{path}:{line_no}: expected relation, split, source, rows ({error})") from None
    return coverage


def close_gaps(relation: str, splits: dict[str, list[dict]], coverage: dict, answers: set[str],
               dev_fraction: float, seed: int) -> list[dict]:
    """Handle this relation's data gaps in place and describe each one (`answers`: the 34k vocabulary)."""
    gaps = []
    substitutes = [s for s in SPLITS if any("_source" in row for row in splits[s])]
    for split in SPLITS:
        listed = coverage.get((relation, split), [])
        if sum(n for _, n in listed) != len(splits[split]):
            gaps.append({"relation": relation, "split": split, "kind": "coverage_mismatch",
                         "rows": len(splits[split]),
                         "detail": f"coverage.tsv lists {listed}, the file has {len(splits[split])} rows"})
        if split in substitutes:
            gaps.append({"relation": relation, "split": split, "kind": "substitute", "rows": len(splits[split]),
                         "sources": dict(sorted(Counter(r.get("_source", "original") for r in splits[split]).items())),
                         "coverage": [source for source, _ in listed]})
    # A substitute comes from another collection and may share facts with the relation's other splits, which
    # would carry test facts into training. Drop the shared facts from the substitute, train first (a substitute
    # test set keeps what it can). The paper's own splits stay as published (see stats: shared_facts).
    for split in sorted(substitutes, key=("train", "test", "dev").index):
        others = {_fact(row) for s in SPLITS if s != split for row in splits[s]}
        kept = [row for row in splits[split] if _fact(row) not in others]
        if len(kept) < len(splits[split]):
            gaps.append({"relation": relation, "split": split, "kind": "overlap_removed",
                         "rows": len(splits[split]) - len(kept),
                         "detail": "facts this substitute shares with the relation's other splits, dropped from it"})
            splits[split] = kept
    # No dev split (P47): a seeded share of train becomes dev, as AutoPrompt's own splits hold 20% for dev. It is
    # drawn from the train facts whose answer is in the 34k vocabulary (the others are filtered out anyway, and
    # 29k ⊆ 34k keeps holding per split), per fact, seeded per relation; both parts keep the file order.
    usable = [i for i, row in enumerate(splits["train"]) if row["obj_label"] in answers]
    if not splits["dev"] and usable:
        rng = random.Random(f"{seed}/{relation}")
        chosen = set(rng.sample(usable, max(1, round(dev_fraction * len(usable)))))
        splits["dev"] = [row for i, row in enumerate(splits["train"]) if i in chosen]
        splits["train"] = [row for i, row in enumerate(splits["train"]) if i not in chosen]
        gaps.append({"relation": relation, "split": "dev", "kind": "carved_from_train", "rows": len(chosen),
                     "detail": f"no dev split in the data: {dev_fraction:.0%} of the {len(usable)} train facts with a "
                               f"34k answer, drawn with seed {seed}"})
    for split in SPLITS:
        if not splits[split]:
            gaps.append({"relation": relation, "split": split, "kind": "missing", "rows": 0, "detail": "no facts"})
    return gaps


# --- the stage ----------------------------------------------------------------------------------------------

def prepare(raw: str | Path = "data/raw", out: str | Path = "data/lama", tokenizers: str | Path | None = None,
            params: dict | None = None) -> dict:
    """`ptuning prepare lama`: write the 34k and 29k benchmarks and stats.json; returns the stats.
    `params` is the content of params/data.yaml (default: read it)."""
    from components.config import load_params
    settings = (params or load_params("data"))["lama"]
    if settings["vocab_filter"] not in FILTERS:
        raise ValueError(f"lama.vocab_filter {settings['vocab_filter']!r}: choose one of {FILTERS}")
    if not 0 < settings["dev_fraction"] < 1:
        raise ValueError(f"lama.dev_fraction {settings['dev_fraction']} must lie strictly between 0 and 1")
    raw, out = Path(raw), Path(out)
    trex = raw / "lama" / "trex"
    if not trex.is_dir():
        raise DataError(f"{trex} does not exist: run `ptuning prepare data` (DVC stage materialise) first")

    bert, gpt2 = load_tokenizers(shared_path("tokenizers", tokenizers))
    vocabs, vocab_stats = vocabularies(raw, bert, gpt2, settings["vocab_filter"])

    prompt_rows = read_jsonl(raw / "lama" / "relations.jsonl", required=("relation", "template"))
    prompts = {row["relation"]: row for row in prompt_rows}
    relations = sorted((p.name for p in trex.iterdir() if p.is_dir()), key=relation_key)
    unprompted = [r for r in relations if r not in prompts]
    if unprompted:
        raise DataError(f"{raw / 'lama' / 'relations.jsonl'}: no manual prompt for {', '.join(unprompted)}")
    coverage = read_coverage(raw / "lama" / "coverage.tsv")

    for name in VOCABS:
        shutil.rmtree(out / name, ignore_errors=True)  # no stale relation from an earlier run
    per_relation, gaps, shared_facts = {}, [], {}
    for relation in relations:
        splits = read_relation(raw, relation)
        counts = {"raw": {s: len(rows) for s, rows in splits.items()}}
        relation_gaps = close_gaps(relation, splits, coverage, vocabs["34k"],
                                   settings["dev_fraction"], settings["seed"])
        shared = {f"{a}/{b}": len({_fact(r) for r in splits[a]} & {_fact(r) for r in splits[b]})
                  for a, b in (("train", "dev"), ("train", "test"), ("dev", "test"))}
        if any(shared.values()):
            shared_facts[relation] = shared
        for name in VOCABS:
            counts[name] = {}
            for split, rows in splits.items():
                kept = [row for row in rows if row["obj_label"] in vocabs[name]]
                write_jsonl(out / name / relation / f"{split}.jsonl", kept)
                counts[name][split] = len(kept)
        for gap in relation_gaps:  # what each gap leaves to train and evaluate on
            gap["kept"] = {name: counts[name][gap["split"]] for name in VOCABS}
        per_relation[relation] = counts
        gaps += relation_gaps
    for name in VOCABS:
        vocab_json = json.dumps(sorted(vocabs[name]), ensure_ascii=False) + "\n"
        (out / name / "vocab.json").write_text(vocab_json, encoding="utf-8")
    write_jsonl(out / "relations.jsonl", (prompts[r] for r in relations))

    totals = {name: {s: sum(c[name][s] for c in per_relation.values()) for s in SPLITS} for name in ("raw", *VOCABS)}
    for counts in totals.values():
        counts["all"] = sum(counts.values())
    stats = {
        "relations": len(relations),
        "skipped_relations": {r: "manual prompt but no facts in the data"
                              for r in sorted(set(prompts) - set(relations), key=relation_key)},
        "test_facts": {name: {"ours": totals[name]["test"], "paper": PAPER_TEST_FACTS[name]} for name in VOCABS},
        "totals": totals,
        "vocab": vocab_stats,
        "gaps": gaps,
        # (sub_label, obj_label) pairs two splits share, before the vocabulary filter: the paper's splits
        # share a few (same labels, different entities or duplicates); substitutes share none after close_gaps
        "shared_facts": shared_facts,
        "per_relation": per_relation,
        "params": settings,
    }
    # The few figures worth a `dvc metrics show/diff`; stats.json holds everything else.
    comparison = vocab_stats["comparison_with_paper_lists"][settings["vocab_filter"]]
    metrics = {"relations": len(relations), "gaps": len(gaps),
               "facts": {name: totals[name] for name in VOCABS},
               "vocab_size": {name: len(vocabs[name]) for name in VOCABS},
               "vocab_jaccard_vs_paper": {name: comparison[name]["jaccard"] for name in VOCABS}}
    for name, content in (("stats.json", stats), ("metrics.json", metrics)):
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("LAMA: %d relations; test facts 34k %d, 29k %d",
             len(relations), totals["34k"]["test"], totals["29k"]["test"])
    return stats
