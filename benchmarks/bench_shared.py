#!/usr/bin/env python
"""Shared-batch P-tuning (components/benchmarks/lama/shared.py) against relation-by-relation training.

The same jobs (one prompt per relation, the same steps) are trained twice over one frozen LM: with `--pool`
prompts per shared step (their batches of 8 go through the LM together, `--lm-batch` rows a forward) and with
a pool of 1 (one relation's batch of 8 at a time: what `run_relation` / `fit` compute, step for step). Only
training steps are timed (no evaluation until the last step). Reports examples/s (wall) and CPU ms per
example (this process's CPU time: steadier on a shared machine).

    python benchmarks/bench_shared.py --model smollm2-135m --relations P19,P36,P101,P103,P1376,P27,P413,P176 --steps 6
"""
from __future__ import annotations

import argparse
import json

from components.benchmarks.lama.shared import Job, load_relations, train_shared
from components.models.catalog import load_lm
from components.run_config import resolve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--relations", default="P19,P36,P101,P103,P1376,P27,P413,P176")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--pool", type=int, default=8)
    p.add_argument("--lm-batch", type=int, default=64)
    args = p.parse_args()
    config = resolve("lama", {"model": args.model, "method": "ptuning", "task": args.relations, "train.lr": 1e-4,
                              "train.max_steps": args.steps, "train.eval_every": args.steps})
    lm = load_lm(args.model)
    data, candidates = load_relations(args.relations.split(","), lm, config.params)
    jobs = [Job(d.relation, d, config.tasks[0].train) for d in data]
    rows = {}
    for name, pool in (("shared", args.pool), ("one by one", 1)):
        _, timing = train_shared(lm, jobs, candidates, pool=pool, lm_batch=args.lm_batch, show_progress=False)
        rows[name] = {"pool": pool, "examples": timing["train_examples"], "examples_per_s": timing["examples_per_s"],
                      "cpu_ms_per_example": 1000 * timing["train_cpu_s"] / timing["train_examples"]}
        print(name, json.dumps(rows[name]), flush=True)
    print(json.dumps({"speedup_wall": rows["shared"]["examples_per_s"] / rows["one by one"]["examples_per_s"],
                      "speedup_cpu": rows["one by one"]["cpu_ms_per_example"] / rows["shared"]["cpu_ms_per_example"]}))


if __name__ == "__main__":
    main()
