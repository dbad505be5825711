#!/usr/bin/env python
"""What one few-shot SuperGLUE unit spends its time on: training steps against everything else (dev32
evaluations and checkpoint writes during training, then the val evaluation and the prompt's export).

One `superglue.run` of a task and method, as `ptuning report superglue` runs a unit, with a callback that stamps
the loop's events: a step's time runs from the previous event to its `on_step`, an evaluation's (with its checkpoint
write, if any) from the last step to its `on_evaluate`; after training, val and export. Prints one JSON line, wall
seconds and this process's CPU seconds (steadier on a shared machine). The issue's target: evaluations and writes
cost at most half the training steps.

    python benchmarks/bench_fewshot.py --task cb --method ptuning --steps 60 --eval-every 20

`--forward`: instead, the forward pass of one real training batch with the LM frozen (the prompt's gradient still
flows through it) and with the LM trained, each after a backward and an optimizer step as in training: wall and
CPU seconds, and minor page faults (new memory the kernel had to map).
"""
from __future__ import annotations

import argparse
import json
import resource
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
    p.add_argument("--forward", action="store_true", help="time the forward pass, LM frozen against LM trained")
    args = p.parse_args()
    from components.benchmarks.superglue.run import run
    from components.config import parse_pairs

    if args.forward:
        return forward(args)
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


def forward(args) -> None:
    from components.benchmarks.superglue.inputs import Inputs
    from components.benchmarks.superglue.methods import METHODS
    from components.benchmarks.superglue.run import load_splits
    from components.benchmarks.superglue.tasks import TASKS
    from components.models.catalog import load_lm
    from components.training import TrainConfig, make_optimizer, seed_everything

    spec, lm = TASKS[args.task], load_lm(args.model)
    config = resolve("superglue", {"model": args.model, "task": args.task, "method": "ptuning"})
    params = config.params
    templates = METHODS["ptuning"].templates(spec, params, lm.tokenizer)
    inputs = Inputs(spec, lm.tokenizer, lm.causal, args.model, templates, params["tasks"][args.task]["max_length"],
                    options=params.get(spec.kind.name) or {})
    head = spec.kind
    items = head.items(load_splits(spec, params)["train"][:args.batch_size], inputs, train=True)
    batch = head.collate(items, inputs)
    seed_everything(0)
    figures = {}
    for mode in ("lm_frozen", "lm_trained", "lm_frozen_again", "lm_trained_again"):
        lm.model.requires_grad_(True)
        model, _ = METHODS["ptuning"].build(spec, lm, templates, {**params, "freeze_lm": mode.startswith("lm_frozen")})
        model.train()
        optimizer = make_optimizer(model, TrainConfig(lr=1e-5, lm_lr=1e-5))
        wall = cpu = faults = 0.0
        for i in range(6):
            usage, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.time(), time.process_time()
            loss = head.loss(model, batch)
            t1, c1, after = time.time(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:  # the first is a warm-up
                wall, cpu, faults = wall + t1 - t0, cpu + c1 - c0, faults + after.ru_minflt - usage.ru_minflt
        figures[mode] = {"forward_wall_s": wall / 5, "forward_cpu_s": cpu / 5, "forward_page_faults": faults / 5}
    print(json.dumps({"task": args.task, "batch_size": args.batch_size,
                      "tokens": int(batch["attention_mask"].sum()), **figures}))


if __name__ == "__main__":
    main()
