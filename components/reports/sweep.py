"""The LAMA P-tuning recipe sweep: a small grid trained in shared batches on a few relations, ranked by DEV P@1
(test is never looked at). `python -m components.reports.sweep --help`; writes a markdown table."""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from components.benchmarks.lama import shared
from components.reports.store import write_atomic
from components.run_config import resolve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--relations", default="P101,P19,P1001")
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    p.add_argument("--encoders", default="lstm,mlp")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--pool", type=int, default=18)
    p.add_argument("--out", default="reports/lama/smollm2-135m/SWEEP.md")
    args = p.parse_args(argv)
    from components.models.catalog import load_lm

    relations = args.relations.split(",")
    grid = list(itertools.product([float(x) for x in args.lrs.split(",")], args.encoders.split(",")))
    configs = {(lr, enc): resolve("lama", {"model": args.model, "method": "ptuning", "task": args.relations, "encoder": enc,
                                           "train.lr": lr, "train.max_steps": args.steps, "train.eval_every": args.eval_every,
                                           "train.patience": args.patience}) for lr, enc in grid}
    lm = load_lm(args.model)
    first = next(iter(configs.values()))
    data, candidates = shared.load_relations(relations, lm, first.params)
    jobs = [shared.Job(f"{lr:g}/{enc}/{d.relation}", d, configs[(lr, enc)].tasks[0].train, enc) for lr, enc in grid for d in data]
    started = time.time()
    results, timing = shared.train_shared(lm, jobs, candidates, pool=args.pool, eval_batch_size=first.params["eval_batch_size"])
    by_key = {r.key: r for r in results}
    command = "python -m components.reports.sweep " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    lines = ["# LAMA P-tuning recipe sweep (dev P@1 only)", "", "```", command, "```", "",
             f"{args.model}, LAMA-29k, frozen LM, template `{data[0].template.text}`, batch 8, up to {args.steps} steps, "
             f"dev every {args.eval_every} steps, patience {args.patience}, other settings params/lama.yaml; "
             f"{(time.time() - started) / 60:.1f} min, shared batches. Best dev P@1 (%) per relation (its step), and "
             "the mean; the recipe is the best mean.", "",
             "| lr | encoder | " + " | ".join(relations) + " | mean dev P@1 |", "|---" * (len(relations) + 3) + "|"]
    rows = []
    for lr, enc in grid:
        found = [by_key[f"{lr:g}/{enc}/{r}"] for r in relations]
        mean = sum(f.dev_p1 for f in found) / len(found)
        rows.append((mean, f"| {lr:g} | {enc} | " + " | ".join(f"{100 * f.dev_p1:.1f} ({f.best_step})" for f in found)
                     + f" | **{100 * mean:.1f}** |"))
    lines += [row for _, row in sorted(rows, reverse=True)]
    lines += ["", f"Training {timing['examples_per_s']:.1f} examples/s; dev evaluation {timing['dev_eval_s']:.0f} s of "
                  f"{timing['train_s']:.0f} s training.", ""]
    write_atomic(Path(args.out), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
