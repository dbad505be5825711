"""The few-shot SuperGLUE recipe sweep: recipes (a method and its settings) trained on a few tasks, ranked by the
DEV32 score alone. Val is never scored (`score_val: false`). `python -m components.reports.superglue_sweep --help`;
writes a markdown table. Each (recipe, task, seed) is saved as it finishes, so a stopped sweep resumes.

A recipe is `method` or `method/key=value/key=value` over params/superglue.yaml and the budget given here, e.g.
`ptuning/encoder=mlp/train.lr=1e-3`. The dev32 curve (evaluated every --eval-every steps) gives the best score
reached by each evaluation: the figure a run stopped there would have kept, under this run's linear schedule.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from components.benchmarks.superglue.tasks import TASKS
from components.common import stable_hash
from components.config import parse_pairs
from components.reports.store import write_atomic
from components.run_config import resolve


def _recipe(text: str) -> tuple[str, dict]:
    method, *pairs = text.split("/")
    return method, parse_pairs(pairs, flag="--recipes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="cb,rte,wic")
    p.add_argument("--seeds", default="42")
    p.add_argument("--recipes", required=True, help="semicolon list of method[/key=value...]")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=16)
    p.add_argument("--out", default="outputs/superglue_sweep", help="folder of the units and SWEEP.md")
    args = p.parse_args(argv)
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    recipes = [_recipe(text) for text in args.recipes.split(";")]
    budget = {"model": args.model, "score_val": False, "train.max_steps": args.steps,
              "train.batch_size": args.batch_size, "train.eval_every": args.eval_every, "train.warmup_steps": 0,
              "train.patience": None}
    configs = {(i, task, seed): resolve("superglue", {**budget, "method": method, "task": task, "train.seed": seed,
                                                       **settings})
               for i, (method, settings) in enumerate(recipes) for task in tasks for seed in seeds}  # all checked first
    out = Path(args.out)
    units = {}
    for (i, task, seed), config in configs.items():
        from components.benchmarks.superglue.run import run

        key = stable_hash(config.fingerprint())
        path = out / "units" / f"{task}-{seed}-{key}.json"
        if not path.exists():
            started, scratch = time.time(), out / "scratch" / key
            metrics = run(config, scratch)
            history = json.loads((scratch / "history.json").read_text())[task]
            shutil.rmtree(scratch, ignore_errors=True)
            write_atomic(path, json.dumps({"dev": metrics["dev"], "history": history,
                                           "seconds": time.time() - started}))
        units[i, task, seed] = json.loads(path.read_text())
    write_atomic(out / "SWEEP.md", _markdown(args, argv, recipes, tasks, seeds, units))
    print((out / "SWEEP.md").read_text())
    return 0


def _best_until(unit: dict, metrics: tuple[str, ...], step: int) -> float:
    """The best dev score (mean of the task's metrics) reached by `step`; a run that trains nothing has its one."""
    if not unit["history"]:
        return unit["dev"]["score"]
    return max(sum(h[f"dev.{m}"] for m in metrics) / len(metrics) for h in unit["history"] if h["step"] <= step)


def _markdown(args, argv, recipes, tasks, seeds, units) -> str:
    evals = list(range(args.eval_every, args.steps + 1, args.eval_every))
    command = "python -m components.reports.superglue_sweep " + shlex.join(sys.argv[1:] if argv is None else argv)
    minutes = sum(u["seconds"] for u in units.values()) / 60
    lines = ["```", command, "```", "",
             f"{args.model}, batch {args.batch_size}, {args.steps} steps (linear decay, no warmup), dev32 every "
             f"{args.eval_every} steps, seeds {', '.join(map(str, seeds))}; other settings params/superglue.yaml. "
             f"Dev32 score (%: the mean of a task's metrics) of the kept state per task (mean over seeds), their "
             f"mean, and the mean best dev32 score reached by each evaluation. Val is never scored. {minutes:.0f} min "
             "of runs.", "",
             "| recipe | " + " | ".join(TASKS[t].folder for t in tasks) + " | mean dev32 | "
             + " | ".join(f"@{s}" for s in evals) + " | min per run |", "|---" * (len(tasks) + 3 + len(evals)) + "|"]
    for i, (method, settings) in enumerate(recipes):
        per_task = []
        for task in tasks:
            found = [units[i, task, s] for s in seeds]
            per_task.append(sum(_best_until(u, TASKS[task].metrics, args.steps) for u in found) / len(found))
        curve = [sum(_best_until(units[i, t, s], TASKS[t].metrics, step) for t in tasks for s in seeds)
                 / (len(tasks) * len(seeds)) for step in evals]
        seconds = sum(units[i, t, s]["seconds"] for t in tasks for s in seeds) / (len(tasks) * len(seeds))
        name = "/".join([method, *(f"{k}={v}" for k, v in settings.items())])
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in per_task)
                     + f" | **{100 * sum(per_task) / len(per_task):.1f}** | " + " | ".join(f"{100 * v:.1f}" for v in curve)
                     + f" | {seconds / 60:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
