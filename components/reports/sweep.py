"""The LAMA P-tuning recipe sweep: a few recipes trained in shared batches on a few relations, ranked by DEV P@1
(test is never looked at). `python -m components.reports.sweep --help`; writes a markdown table."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from components.benchmarks.lama import shared
from components.config import parse_pairs
from components.reports.store import write_atomic
from components.run_config import resolve


def _recipe(text: str) -> tuple[str, str, float, tuple]:
    """"lstm/random/3e-4" -> ("lstm", "random", 0.0003, ()): encoder, init, learning rate, and any further
    params/lama.yaml settings as key=value ("lstm/random/3e-4/train.length_bucketing=false")."""
    try:
        encoder, init, lr, *more = text.split("/")
        return encoder, init, float(lr), tuple(parse_pairs(more, flag="--recipes").items())
    except ValueError:
        raise SystemExit(f"--recipes: {text!r} is not encoder/init/lr[/key=value...] (e.g. lstm/random/3e-4)") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--relations", default="P101,P19,P1001")
    p.add_argument("--recipes", default="lstm/random/3e-4,lstm/manual/3e-4,none/manual/1e-3,none/manual/3e-3",
                   help="comma list of encoder/init/lr (init random: the paper's shape; manual: the manual prompt's "
                        "words as continuous tokens, OptiPrompt's initialisation), then any params/lama.yaml "
                        "settings as /key=value")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--pool", type=int, default=18)
    p.add_argument("--out", default="outputs/lama_sweep.md",
                   help="the markdown table to write (reports/lama/<model>/SWEEP.md is assembled from such tables)")
    p.add_argument("--data-dir", help="prepared LAMA data (default: params/lama.yaml data_dir)")
    args = p.parse_args(argv)
    from components.models.catalog import load_lm

    relations = args.relations.split(",")
    recipes = [_recipe(text) for text in args.recipes.split(",")]
    configs = {recipe: resolve("lama", {"model": args.model, "method": "ptuning", "task": args.relations,
                                        "encoder": recipe[0], "init": recipe[1], "train.lr": recipe[2],
                                        "train.max_steps": args.steps, "train.eval_every": args.eval_every,
                                        "train.patience": args.patience,
                                        **({"data_dir": args.data_dir} if args.data_dir else {}), **dict(recipe[3])})
               for recipe in recipes}
    vocabs = sorted({config.params["vocab"] for config in configs.values()})
    if len(vocabs) > 1:  # one shared pool scores every prompt against one answer vocabulary
        raise SystemExit(f"--recipes: every recipe must use one vocabulary, got {', '.join(vocabs)}")
    batch = "/".join(sorted({str(config.params["train"]["batch_size"]) for config in configs.values()}))
    lm = load_lm(args.model)
    data = {recipe: shared.load_relations(relations, lm, config.params) for recipe, config in configs.items()}
    candidates = next(iter(data.values()))[1]
    jobs = [shared.Job(f"{recipe}/{d.relation}", d, configs[recipe].tasks[0].train, recipe[0])
            for recipe in recipes for d in data[recipe][0]]
    started = time.time()
    results, timing = shared.train_shared(lm, jobs, candidates, pool=args.pool,
                                          eval_batch_size=configs[recipes[0]].params["eval_batch_size"], test=False)
    by_key = {r.key: r for r in results}
    evals = range(args.eval_every, args.steps + 1, args.eval_every)
    lines = ["# LAMA P-tuning recipe sweep (dev P@1 only)", "", "```",
             "python -m components.reports.sweep " + shlex.join(sys.argv[1:] if argv is None else argv), "```", "",
             f"{args.model}, LAMA-{vocabs[0]}, frozen LM, batch {batch}, up to {args.steps} steps, dev every {args.eval_every} steps, "
             f"patience {args.patience}, other settings params/lama.yaml; {(time.time() - started) / 60:.1f} min, "
             "shared batches. Init `random`: the paper's shape `[P*3] {sub} [P*3] [Y]`; `manual`: each relation's manual "
             "prompt with its words as continuous tokens starting from their embeddings (OptiPrompt). Best dev P@1 (%) "
             "per relation (its step), the mean, and the mean dev P@1 at each evaluation (a relation that stopped "
             "early counts with its best). The recipe is the best mean.", "",
             "| encoder | init | lr | other settings | " + " | ".join(relations) + " | mean dev P@1 | " +
             " | ".join(f"@{s}" for s in evals) + " |", "|---" * (len(relations) + 5 + len(evals)) + "|"]
    rows = []
    for recipe in recipes:
        found = [by_key[f"{recipe}/{r}"] for r in relations]
        mean = sum(f.dev_p1 for f in found) / len(found)
        at_step = [sum(_best_until(f.history, s) for f in found) / len(found) for s in evals]
        other = ", ".join(f"{k}={v}" for k, v in recipe[3]) or "–"
        rows.append((mean, f"| {recipe[0]} | {recipe[1]} | {recipe[2]:g} | {other} | "
                     + " | ".join(f"{100 * f.dev_p1:.1f} ({f.best_step})" for f in found)
                     + f" | **{100 * mean:.1f}** | " + " | ".join(f"{100 * v:.1f}" for v in at_step) + " |"))
    lines += [row for _, row in sorted(rows, reverse=True)]
    lines += ["", f"Training {timing['examples_per_s']:.1f} examples/s; dev evaluation {timing['dev_eval_s']:.0f} s of "
                  f"{timing['train_s']:.0f} s training.", ""]
    write_atomic(Path(args.out), "\n".join(lines))
    print("\n".join(lines))
    return 0


def _best_until(history: list[dict], step: int) -> float:
    """The best dev P@1 a job had reached by `step`: what a run stopped there would keep."""
    return max((h["dev.p1"] for h in history if h["step"] <= step), default=0.0)


if __name__ == "__main__":
    raise SystemExit(main())
