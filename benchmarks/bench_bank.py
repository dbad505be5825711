#!/usr/bin/env python
"""One prompt bank against one single-prompt model per relation, on the same stream of mixed requests.

41 LAMA prompts for SmolLM2-135M (the 41 T-REx relations' templates, encoders of the table's recipe; their
weights do not change the cost), exported as `ptuning train` exports them. Requests of 64 rows, each row a
relation drawn at random and one of its test subjects. The bank answers a request in one call; the single-prompt
deployment splits it by relation, one call per relation's model (its server), as a client of 41 servers must.
Throughput and per-request latency are measured in this process with the 41 predictors sharing one LM (the
computation is the same as with 41 copies); memory is each deployment's resident set: the bank's process, and a
single-prompt model's process times 41 (each server holds its own LM). Prints one JSON line.

    python benchmarks/bench_bank.py --requests 20
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from components.config import load_params, project_root


def export_prompts(out: Path, model: str) -> dict[str, Path]:
    """Every relation's prompt, as `ptuning train lama` exports it, with its vocabulary beside it."""
    import torch

    from components.benchmarks.lama.run import relations_of
    from components.method.model import PromptEncoder, export_prompt
    from components.method.templates import lama_template, parse_template
    from components.models.catalog import load_lm

    params = load_params("lama", project_root())
    data = project_root() / params["data_dir"]
    lm = load_lm(model)
    dim = lm.model.get_input_embeddings().embedding_dim
    template = lama_template(params["prompt_shape"], causal=lm.causal)
    prompts = {}
    for i, relation in enumerate(relations_of("all")):
        torch.manual_seed(i)
        encoder = PromptEncoder(parse_template(template).n_prompt_tokens, dim, params["encoder"])
        prompts[relation] = export_prompt(encoder, out / relation, template, model, {
            "benchmark": "lama", "task": relation, "vocab": params["vocab"], "causal": lm.causal,
            "max_length": params["max_length"], "truncate": "sub"})
        (prompts[relation] / "vocab.json").write_text((data / params["vocab"] / "vocab.json").read_text())
    return prompts


def requests(prompts: dict[str, Path], n: int, rows: int, seed: int = 0) -> list[list[dict]]:
    from components.data.sources import read_jsonl

    params = load_params("lama", project_root())
    data = project_root() / params["data_dir"] / params["vocab"]
    subjects = {r: [f["sub_label"] for f in read_jsonl(data / r / "test.jsonl")] for r in prompts}
    rng = random.Random(seed)
    return [[{"task": (r := rng.choice(sorted(prompts))), "sub": rng.choice(subjects[r])} for _ in range(rows)]
            for _ in range(n)]


def timed(stream, answer) -> dict:
    answer(stream[0])  # warm-up
    latencies, started = [], time.perf_counter()
    for request in stream:
        t0 = time.perf_counter()
        answer(request)
        latencies.append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=20)
    return {"rows_per_s": round(sum(map(len, stream)) / total, 1), "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p95_ms": round(1000 * cuts[18], 1)}


def resident_mib(code: str) -> float:
    """Peak resident memory of a fresh process that runs `code` (loads a deployment, answers one row)."""
    done = subprocess.run([sys.executable, "-c", code + "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def single_prompt_model(directory: Path, bank):
    """What PromptPredictor(directory).predict computes, over the bank's LM object: 41 servers would hold 41 copies
    of it (memory is measured apart), the arithmetic is the same."""
    from components.method.model import PromptedLM, load_prompt
    from components.mlops.serving import answer_rows

    prompt, _ = load_prompt(directory)
    served = bank.prompts[directory.name]
    model = PromptedLM(bank.model.lm, prompt, bank.model.causal, freeze_lm=True).eval()

    def predict(rows, top_k=5):
        served.check(rows, top_k)
        return answer_rows(model, [served] * len(rows), [served.encode(r) for r in rows], top_k, bank.pad, bank.device)
    return predict


def main() -> None:
    import torch

    from components.mlops.bank import BankPredictor, build_bank

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--rows", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prompts = export_prompts(Path(tmp) / "prompts", args.model)
        bank_dir = build_bank({r: (d, "bench") for r, d in prompts.items()}, Path(tmp) / "bank")
        stream = requests(prompts, args.requests, args.rows)
        bank = BankPredictor(bank_dir)
        singles = {r: single_prompt_model(d, bank) for r, d in prompts.items()}

        def split(request):
            by_relation: dict[str, list[dict]] = {}
            for row in request:
                by_relation.setdefault(row["task"], []).append({"sub": row["sub"]})
            return [singles[r](rows) for r, rows in by_relation.items()]

        result = {"model": args.model, "prompts": len(prompts), "requests": args.requests, "rows_per_request": args.rows,
                  "threads": torch.get_num_threads(),
                  "bank": timed(stream, bank.predict), "single_prompt_models": timed(stream, split)}
        row = json.dumps([{"task": stream[0][0]["task"], "sub": stream[0][0]["sub"]}])
        one = min(prompts)
        result["bank"]["resident_mib"] = round(resident_mib(
            f"from components.mlops.bank import BankPredictor; BankPredictor({str(bank_dir)!r}).predict({row})"))
        single_mib = resident_mib(f"from components.mlops.serving import PromptPredictor; "
                                  f"PromptPredictor({str(prompts[one])!r}).predict([{{'sub': 'Dante'}}])")
        result["single_prompt_models"]["resident_mib"] = round(single_mib * len(prompts))
        result["single_prompt_models"]["resident_mib_each"] = round(single_mib)
        result["speedup"] = round(result["bank"]["rows_per_s"] / result["single_prompt_models"]["rows_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
