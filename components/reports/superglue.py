"""The paper's few-shot SuperGLUE table (Table 5) on one model: `ptuning report superglue --model M`.

Methods: standard fine-tuning, the manual prompt zero-shot and fine-tuned (PET-style), and P-tuning, each over
the tasks and seeds (the zero-shot prompt trains nothing: one run, no seed). Trained runs select on dev32 and
report on SuperGLUE val. On a GPU the paper's budget (params/superglue.yaml); on a CPU the reduced budget that
params/report.yaml declares (`superglue.budget.cpu`), which REPORT.md names. Every (method, task, seed) is saved
under `<out>/units/` as it finishes, so a killed report resumes.

Writes `<out>/results.json` (scores as fractions), `<out>/REPORT.md` and three PNG figures.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from components.benchmarks.superglue.methods import METHODS
from components.benchmarks.superglue.metrics import primary_score, task_metrics
from components.benchmarks.superglue.run import SETTINGS, SPLITS, load_splits
from components.benchmarks.superglue.tasks import TASKS, read_examples
from components.reports.figures import clear, curves, grouped_bars, section
from components.reports.store import (UnitKey, UnitStore, device_kind, mean_std, methods_and_seeds, overrides_line,
                                      own_option, pct, report_dir, std_line, subset_label, unique, versions_line)
from components.reports.table import Table
from components.run_config import resolve

log = logging.getLogger(__name__)
OPTION = "setting"
METHOD_NAMES = {"finetune": "FT", "manual-zeroshot": "MP zero-shot", "manual-finetune": "MP FT", "ptuning": "P-tuning"}


@dataclass(frozen=True)
class Report:
    model: str
    setting: str
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    output_dir: Path
    command: str
    budget: str  # "gpu" (the paper's) or "cpu" (params/report.yaml superglue.budget.cpu)
    params: tuple[tuple[str, object], ...] = ()  # params/superglue.yaml overrides for every method (--set)

    @classmethod
    def from_settings(cls, settings: dict, model: str, command: str, root: Path, option=None, seeds=None,
                      tasks=None, methods=None, output_dir=None, params: dict | None = None) -> "Report":
        """params/report.yaml `superglue:` with the command line's choices over it (`option`: the setting);
        every bad value fails here, before anything runs."""
        methods, seeds = methods_and_seeds(settings, methods, seeds, METHOD_NAMES)
        setting, params = own_option(OPTION, option, params, settings["setting"])
        if setting not in SETTINGS:
            raise ValueError(f"unknown SuperGLUE setting {setting!r}; choose one of {', '.join(SETTINGS)}")
        names = tasks or settings["tasks"]
        names = list(TASKS) if names == "all" else [t.strip().lower() for t in str(names).split(",") if t.strip()]
        unique(names, "task")
        out = Path(output_dir) if output_dir else report_dir(root, "superglue", f"{model}-{setting}", params)
        report = cls(model, setting, seeds, tuple(names), methods, out, command,
                     "gpu" if torch.cuda.is_available() else "cpu", tuple(sorted(params.items())))
        for method in methods:  # params/superglue.yaml + budget + overrides, validated by the benchmark
            report.config(settings, method, seeds[0], root)
        return report

    def config(self, settings: dict, method: str, seed: int, root: Path, task: str | None = None):
        # a unit runs minutes and the table keeps its figures: no resume checkpoint, no exported prompt or LM
        overrides = {"model": self.model, "setting": self.setting, "method": method, "train.seed": seed,
                     "checkpoint": False, "export": False,
                     "task": task or ",".join(self.tasks), **recipe(settings, self.budget, method), **dict(self.params)}
        return resolve("superglue", overrides, root)


def recipe(settings: dict, budget: str, method: str) -> dict:
    """A method's settings over params/superglue.yaml: the device's budget, then the method's own (chosen on dev32:
    reports/superglue/<model>-fewshot/SWEEP.md). A method that trains nothing takes their evaluation keys only."""
    found = {**(settings["budget"][budget] or {}), **((settings.get("overrides") or {}).get(budget, {}).get(method) or {})}
    return {k: v for k, v in found.items() if METHODS[method].trains or not k.startswith("train.")}


def run_report(report: Report, settings: dict, root: Path, show_progress: bool = True,
               on_progress: Callable[[dict], None] | None = None) -> dict:
    """Run what is missing, then write results.json, REPORT.md and the figures; returns results.json's dict."""
    return SuperGlueTable(report, settings, root, show_progress, on_progress).run()


class SuperGlueTable(Table):
    macro_key = "macro_val_score"

    def run_units(self) -> dict[str, UnitKey]:
        from tqdm import tqdm

        from components.benchmarks.superglue.run import run

        report, settings, root, store = self.report, self.settings, self.root, self.store
        keys, todo = {}, []
        for method in report.methods:
            keys[method] = UnitKey(report.config(settings, method, report.seeds[0], root))
            seeds = report.seeds if METHODS[method].trains else (None,)
            todo += [(method, t, s) for t, s in store.missing(method, [(t, s) for s in seeds for t in report.tasks], keys[method])]
        log.info("%d units to run", len(todo))
        bar = tqdm(todo, desc="SuperGLUE", unit="run", disable=not self.show_progress, mininterval=2.0)
        for i, (method, task, seed) in enumerate(bar):
            bar.set_postfix_str(f"{method} {task} seed {seed}", refresh=False)
            t0 = time.time()
            config = report.config(settings, method, seed if seed is not None else report.seeds[0], root, task)
            key = keys[method](task, seed)
            run_dir = store.scratch(method, task, seed, key)
            metrics = run(config, run_dir)
            figures = metrics["tasks"][task]
            history = json.loads((run_dir / "history.json").read_text())[task]
            store.put(method, task, seed, key, {
                "dev": figures["dev"], "val": figures["val"], "steps": figures["steps"], "best_step": figures["best_step"],
                "stopped_early": figures["stopped_early"], "n_train": figures["n_train"], "n_dev": figures["n_dev"],
                "n_val": figures["n_val"], "selected_on": figures["selected_on"], "history": history,
                "seconds": time.time() - t0})
            shutil.rmtree(run_dir, ignore_errors=True)  # a trained LM per unit: the table keeps figures, not weights
            store.add_timing(method, t0, keys[method].settings)
            if self.on_progress is not None:
                self.on_progress({"done": i + 1, "total": len(todo)})
        bar.close()
        return keys

    def aggregate(self, keys: dict[str, UnitKey]) -> dict:
        results = _aggregate(self.report, self.settings, self.store, keys, self.root)
        results["val_standard_error"] = val_noise(self.report, results)
        return results

    def figures(self, results: dict) -> None:
        _figures(self.report, results, self.settings)

    def markdown(self, results: dict) -> str:
        return _markdown(self.report, results, self.settings)


def headline(results: dict) -> dict[str, float]:
    """The figures a run logs (MLflow metrics) and the command line prints."""
    return {f"{m}.{name}": v[name] for m, v in results["methods"].items() if "macro_val_score" in v
            for name in ("macro_val_score", "n_tasks")}


def _aggregate(report: Report, settings: dict, store: UnitStore, keys: dict, root: Path) -> dict:
    """Per method and task: each val metric's mean and std over seeds; the macro score (the mean over tasks of
    each task's score) per seed, then its mean and std. Only tasks with every seed finished count."""
    methods, timings = {}, store.timings_of(keys)
    for method in report.methods:
        seeds = list(report.seeds) if METHODS[method].trains else [None]
        units = {t: found for t in report.tasks if (found := store.load(method, t, seeds, keys[method]))}
        tasks = {}
        for task, found in units.items():
            metrics = TASKS[task].metrics
            val = {name: mean_std([u["val"][name] for u in found]) for name in found[0]["val"]}
            tasks[task] = {"val": {name: mean for name, (mean, _) in val.items()},
                           "val_std": {name: std for name, (_, std) in val.items()},
                           "dev_score": mean_std([u["dev"]["score"] for u in found])[0],
                           "val_score_by_seed": {str(u["seed"]): u["val"]["score"] for u in found},
                           "steps": mean_std([u["steps"] for u in found])[0], "n_val": found[0]["n_val"],
                           "selected_on": found[0]["selected_on"],
                           "n_train": found[0]["n_train"], "seconds_per_run": sum(u["seconds"] for u in found) / len(found),
                           "dev_curve": [(h["step"], sum(h[f"dev.{m}"] for m in metrics) / len(metrics))
                                         for h in found[0]["history"]]}
        entry = {"n_tasks": len(tasks), "seeds": [s for s in seeds if s is not None], "tasks": tasks,
                 "timing": timings.get(method, {})}
        if tasks:
            per_seed = [sum(units[t][i]["val"]["score"] for t in tasks) / len(tasks) for i in range(len(seeds))]
            entry["macro_val_score"], entry["macro_val_score_std"] = mean_std(per_seed)
            entry["macro_dev_score"] = sum(v["dev_score"] for v in tasks.values()) / len(tasks)
            entry["macro_val_score_by_seed"] = per_seed
        methods[method] = entry
    evaluated = report.config(settings, report.methods[0], report.seeds[0], root)
    return {"benchmark": "superglue", "model": report.model, "setting": report.setting, "command": report.command,
            "device": device_kind(), "budget": report.budget,
            "budget_overrides": settings["budget"][report.budget] or {}, "seeds": list(report.seeds),
            "recipes": {m: recipe(settings, report.budget, m) for m in report.methods},
            "max_eval_examples": evaluated.params.get("max_eval_examples"),
            "tasks": list(report.tasks), "wall_s": sum(t.get("seconds", 0.0) for t in timings.values()),
            "methods": methods, "majority": majority_class(report.tasks, evaluated.params)}


def majority_class(tasks, params: dict) -> dict:
    """Per task, the dev and val metrics of always predicting the most frequent label of its full training set (SuperGLUE's
    "most frequent class" baseline; the 32 few-shot examples where no full set is prepared, BoolQ here: they can
    be one-sided, FewGLUE's WSC examples are all "True"; the first label seen on a tie), on the val examples the
    table is scored on: no LM, the floor that a trained method's figure is read against."""
    found = {}
    for name in tasks:
        spec = TASKS[name]
        splits = load_splits(spec, params)
        full = Path(params["data_dir"]) / spec.folder / f"{SPLITS['full'][0]}.jsonl"
        prior, source = (read_examples(spec, full), SPLITS["full"][0]) if full.exists() else (splits["train"], "train32")
        label = Counter(ex.label for ex in prior).most_common(1)[0][0]
        scored = {}
        for split in ("dev", "val"):
            examples = splits[split]
            metrics = task_metrics(spec.metrics, [label] * len(examples), [ex.label for ex in examples],
                                   groups=spec.kind.groups(examples))
            scored[split] = {**metrics, "score": primary_score(metrics, spec.metrics)}
        found[name] = {"label": label, "label_from": source, "n_val": len(splits["val"]), **scored,
                       "val_std": {m: None for m in scored["val"]}}
    return {"macro_val_score": sum(t["val"]["score"] for t in found.values()) / len(found), "tasks": found}


def flow_default_task(results: dict) -> dict | None:
    """The few-shot task the flow runs by default, chosen on the selection split (dev32) alone: the one where
    P-tuning's dev score (mean over seeds) gains most over the better of two answers that learn nothing from the
    task's examples, the zero-shot manual prompt and the most frequent training label. Measured against the
    prompt alone, a dev32 whose labels lean as the training set's rewards learning that lean (RTE: 19 of 32
    `not_entailment` in both), which no other split need share. None without both methods' units."""
    methods = results["methods"]
    if not methods.get("ptuning", {}).get("tasks") or not methods.get("manual-zeroshot", {}).get("tasks"):
        return None
    gains = {}
    for task, entry in methods["ptuning"]["tasks"].items():
        if task in methods["manual-zeroshot"]["tasks"]:
            floor = max(methods["manual-zeroshot"]["tasks"][task]["dev_score"], results["majority"]["tasks"][task]["dev"]["score"])
            gains[task] = entry["dev_score"] - floor
    return {"task": max(gains, key=gains.get), "gains": gains}


FIGURES = {"tasks.png": "per task", "learning_curves.png": "dev learning curves", "macro.png": "macro"}


def _figures(report: Report, results: dict, settings: dict) -> None:
    out, methods = report.output_dir, results["methods"]
    clear(out, FIGURES)
    shown = [m for m in report.methods if methods[m]["tasks"]]
    if shown:
        tasks = [t for t in report.tasks if all(t in methods[m]["tasks"] for m in shown)]
        grouped_bars(out / "tasks.png", [TASKS[t].folder for t in tasks],
                     {METHOD_NAMES[m]: [100 * methods[m]["tasks"][t]["val"]["score"] for t in tasks] for m in shown},
                     "val score (%)", f"SuperGLUE {report.setting} per task, {report.model} (± std over seeds)",
                     errors={METHOD_NAMES[m]: [100 * (methods[m]["tasks"][t]["val_std"]["score"] or 0.0) for t in tasks]
                             for m in shown})
    lines = {TASKS[t].folder: [(s, 100 * v) for s, v in entry["dev_curve"]]
             for t, entry in methods.get("ptuning", {}).get("tasks", {}).items()}
    if any(lines.values()):
        curves(out / "learning_curves.png", lines, "step", "dev score (%)",
               f"P-tuning dev score per task (seed {report.seeds[0]}), {report.model}")
    done = [m for m in report.methods if "macro_val_score" in methods[m]]
    if done:
        # methods over every task first, those over fewer set apart; the paper's row of each method beside ours
        full = [m for m in done if methods[m]["n_tasks"] == len(report.tasks)]
        order = full + [m for m in done if m not in full]
        rows = {**(settings["paper_table5"] if report.setting == "fewshot" else {}), **settings["paper_table3_zeroshot"]}
        paper = {m: _paper_macro(rows[row]) for m, row in PAPER_ROW_OF_METHOD.items() if row in rows}
        grouped_bars(out / "macro.png",
                     [METHOD_NAMES[m] + subset_label(methods[m]["n_tasks"], len(TASKS), "tasks") for m in order],
                     {report.model: [100 * methods[m]["macro_val_score"] for m in order],
                      "paper (P-tuning, PET: ALBERT-xxlarge; MP zero-shot: GPT2-base)": [paper.get(m) for m in order]},
                     "mean val score over tasks (%)", f"SuperGLUE {report.setting}: macro score",
                     errors={report.model: [100 * (methods[m]["macro_val_score_std"] or 0.0) for m in order]},
                     apart_from=len(full) if len(full) < len(order) else None, apart_note="fewer tasks:\nnot comparable")


# the paper's row beside each method in macro.png (P-tuning and PET: ALBERT-xxlarge, Table 5; MP zero-shot:
# GPT2-base, Table 3, the one row of our model's size)
PAPER_ROW_OF_METHOD = {"ptuning": "P-tuning, albert-xxlarge-v2", "manual-finetune": "PET, albert-xxlarge-v2",
                       "manual-zeroshot": "MP zero-shot, gpt2-base"}


def _paper_macro(row: dict) -> float:
    """A paper row's mean over tasks of each task's score (the mean of its metrics), as ours is computed."""
    scores = [sum(v) / len(v) if isinstance(v, list) else v for v in row.values()]
    return sum(scores) / len(scores)


def val_noise(report: Report, results: dict) -> dict:
    """One binomial standard error of each task's val score, sqrt(p(1-p)/n) at the mean score p of the methods
    that have the task, and of the macro score (tasks' errors combined, over the number of tasks)."""
    tasks = {}
    for task in report.tasks:
        entries = [m["tasks"][task] for m in results["methods"].values() if task in m["tasks"]]
        if entries:
            p = sum(e["val"]["score"] for e in entries) / len(entries)
            tasks[task] = (p * (1 - p) / entries[0]["n_val"]) ** 0.5
    macro = (sum(v * v for v in tasks.values()) ** 0.5 / len(tasks)) if len(tasks) == len(report.tasks) else None
    return {"tasks": tasks, "macro": macro}


def _cell(entry: dict | None, metrics: tuple[str, ...]) -> str:
    """`acc ± std` (or `a ± s / b ± s` for a task of two metrics), in %."""
    if not entry:
        return "–"
    return " / ".join(pct(entry["val"][m], entry["val_std"][m]) for m in metrics)


def _markdown(report: Report, results: dict, settings: dict) -> str:
    methods = results["methods"]
    specs = [TASKS[t] for t in report.tasks]
    header = "| | " + " | ".join(f"{s.folder} ({'/'.join(s.metrics)})" for s in specs) + " | macro score |"
    # the split each trained run kept its best state on, as the units record it (dev32 few-shot; val if told so)
    selected = sorted({t["selected_on"] for m in report.methods if METHODS[m].trains
                       for t in methods[m]["tasks"].values()})
    lines = [f"# SuperGLUE {report.setting} on {report.model}" + (" (paper Table 5)" if report.setting == "fewshot" else ""), "",
             "Produced by", "```", report.command, "```",
             f"Device: {results['device']}. Budget: **{report.budget}**"
             + (f" (params/report.yaml `superglue.budget.cpu` over params/superglue.yaml: "
                f"`{json.dumps(results['budget_overrides'])}`; the paper's step counts need a GPU)"
                if report.budget == "cpu" else " (the paper's step counts, params/superglue.yaml)")
             + ". Each method's recipe (params/report.yaml `superglue.overrides` over the budget; chosen on dev32, "
             "SWEEP.md): " + "; ".join(f"{METHOD_NAMES[m]} `{json.dumps(results['recipes'][m])}`" for m in report.methods)
             + ". Wall time of the runs that computed this folder's units (every invocation and seed, current "
             f"settings): {results['wall_s'] / 60:.1f} min. Seeds {', '.join(map(str, report.seeds))} "
             "(the zero-shot prompt trains nothing: one run). Trained runs keep the state best on "
             f"{' / '.join(selected) or 'their selection split'} and are scored on SuperGLUE val; figures in %, {std_line(report.seeds)}; the macro score is the mean over tasks of each "
             "task's mean metric." + overrides_line(report.params), "", versions_line(results["provenance"]), "", "## Val scores", "", header, "|---" * (len(specs) + 2) + "|"]
    for method in report.methods:
        entry = methods[method]
        macro = (pct(entry["macro_val_score"], entry["macro_val_score_std"])
                 + subset_label(entry["n_tasks"], len(TASKS), "tasks")) if "macro_val_score" in entry else "–"
        lines.append(f"| **{METHOD_NAMES[method]} (ours)** | "
                     + " | ".join(_cell(entry["tasks"].get(s.name), s.metrics) for s in specs) + f" | {macro} |")
    majority = results["majority"]
    few = [TASKS[t].folder for t, m in majority["tasks"].items() if m["label_from"] == "train32"]
    lines.append(f"| most frequent training label (no LM{'; train32 only: ' + ', '.join(few) if few else ''}) | "
                 + " | ".join(_cell(majority["tasks"].get(s.name), s.metrics) for s in specs)
                 + f" | {pct(majority['macro_val_score'])}{subset_label(len(specs), len(TASKS), 'tasks')} |")
    noise = results["val_standard_error"]
    lines.append("| ± 1 val standard error (sampling; at the methods' mean score) | "
                 + " | ".join(f"± {100 * noise['tasks'][s.name]:.1f}" if s.name in noise["tasks"] else "–" for s in specs)
                 + (f" | ± {100 * noise['macro']:.1f} |" if noise["macro"] is not None else " | – |"))
    paper_rows = {**(settings["paper_table5"] if report.setting == "fewshot" else {}), **settings["paper_table3_zeroshot"]}
    for name, row in paper_rows.items():
        cells = [" / ".join(str(v) for v in (row[s.name] if isinstance(row.get(s.name), list) else [row.get(s.name, "–")]))
                 for s in specs]
        lines.append(f"| {name} (paper) | " + " | ".join(cells) + " | – |")
    limit = results["max_eval_examples"]
    if limit:
        limited = {t: n for t, n in (limit.items() if isinstance(limit, dict) else ((t, limit) for t in report.tasks)) if n}
        lines += ["", "Val figures are on the first val examples of " + ", ".join(
            f"{TASKS[t].folder} ({n}{' answers, whole questions' if t == 'multirc' else ''})" for t, n in limited.items())
            + "; every other task on its whole val set (`max_eval_examples`)."]
    lines += ["", "The standard error row is the sampling noise of a val score alone, sqrt(p(1-p)/n) at the methods' "
                  "mean score p over the n val examples (MultiRC: answers), and for the macro score the root of their "
                  "summed squares over the number of tasks: two cells closer than about two of them are not told "
                  "apart by this val set. The ± beside a figure is the spread over seeds."]
    lines += ["", "## Per task", "", f"| task | method | val score | {' / '.join(selected) or 'selection'} score | steps | n train | n val | minutes per run |",
              "|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        for method in report.methods:
            entry = methods[method]["tasks"].get(spec.name)
            if entry:
                lines.append(f"| {spec.folder} | {METHOD_NAMES[method]} | {100 * entry['val']['score']:.1f} | "
                             f"{100 * entry['dev_score']:.1f} | {entry['steps']:.0f} | {entry['n_train']} | "
                             f"{entry['n_val']} | {entry['seconds_per_run'] / 60:.1f} |")
        if floor := results["majority"]["tasks"].get(spec.name):
            lines.append(f"| {spec.folder} | most frequent training label | {100 * floor['val']['score']:.1f} | "
                         f"{100 * floor['dev']['score']:.1f} | 0 | – | {floor['n_val']} | – |")
    if report.setting == "fewshot" and (rule := flow_default_task(results)):
        lines += ["", "## The flow's default task (dev32 only)", "",
                  "P-tuning's dev32 score minus the better of the zero-shot manual prompt's and the most frequent "
                  "training label's (`flow_default_task`): " + ", ".join(
                      f"{TASKS[t].folder} {100 * g:+.1f}" for t, g in sorted(rule["gains"].items(), key=lambda i: -i[1]))
                  + f". The largest, **{TASKS[rule['task']].folder}**, is the flow's default (`params/flow.yaml` `superglue.tasks`, "
                  "tests/test_report.py holds them together)."]
    lines += ["", *section(report.output_dir, FIGURES)]
    return "\n".join(lines)
