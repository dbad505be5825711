#!/usr/bin/env python
"""What one few-shot SuperGLUE unit spends its time on: training steps against everything else (dev32
evaluations and checkpoint writes during training, then the val evaluation and the prompt's export).

One `superglue.run` of a task and method, as `ptuning report superglue` runs a unit, with a callback that stamps
the loop's events: a step's time runs from the previous event to its `on_step`, an evaluation's (with its checkpoint
write, if any) from the last step to its `on_evaluate`; after training, val and export. Prints one JSON line, wall
seconds and this process's CPU seconds (steadier on a shared machine). The issue's target: evaluations and writes
cost at most half the training steps.

    python benchmarks/bench_fewshot.py --task cb --method ptuning --steps 60 --eval-every 20
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from components.run_config import resolve
from components.training import Callback


class Stamps(Callback):
    def __init__(self):
        self.last = self.started = time.time()
        self.cpu_last = time.process_time()
        self.phases = {"train": [0.0, 0.0], "evaluate_and_write": [0.0, 0.0]}

    def _add(self, phase: str) -> None:
        now, cpu = time.time(), time.process_time()
        self.phases[phase][0] += now - self.last
        self.phases[phase][1] += cpu - self.cpu_last
        self.last, self.cpu_last = now, cpu

    def on_train_begin(self, info):
        self.last, self.cpu_last = time.time(), time.process_time()

    def on_step(self, step, loss, lr):
        self._add("train")

    def on_evaluate(self, step, epoch, metrics, improved):
        self._add("evaluate_and_write")

    def on_train_end(self, result):
        self.ended, self.cpu_ended = time.time(), time.process_time()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="cb")
    p.add_argument("--method", default="ptuning")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--set", action="append", default=[], help="further params/superglue.yaml key=value")
    args = p.parse_args()
    from components.benchmarks.superglue.run import run
    from components.config import parse_pairs

    config = resolve("superglue", {"model": args.model, "task": args.task, "method": args.method,
                                   "train.max_steps": args.steps, "train.batch_size": args.batch_size,
                                   "train.eval_every": args.eval_every, "train.warmup_steps": 0, "train.patience": None,
                                   **parse_pairs(args.set)})
    stamps = Stamps()
    with tempfile.TemporaryDirectory() as out:
        started, cpu_started = time.time(), time.process_time()
        metrics = run(config, out, [stamps])
        ended, cpu_ended = time.time(), time.process_time()
    train, evaluate = stamps.phases["train"], stamps.phases["evaluate_and_write"]
    after = [ended - stamps.ended, cpu_ended - stamps.cpu_ended]
    print(json.dumps({
        "task": args.task, "method": args.method, "steps": args.steps, "batch_size": args.batch_size,
        "eval_every": args.eval_every, "val_score": metrics["val"]["score"], "dev_score": metrics["dev"]["score"],
        "wall_s": {"total": ended - started, "train_steps": train[0], "evaluations_and_writes": evaluate[0],
                   "val_and_export": after[0]},
        "cpu_s": {"total": cpu_ended - cpu_started, "train_steps": train[1], "evaluations_and_writes": evaluate[1],
                  "val_and_export": after[1]},
        "overhead_over_train_wall": (evaluate[0] + after[0]) / train[0]}))


if __name__ == "__main__":
    main()
