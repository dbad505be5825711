"""The paper's LAMA table (Table 2) on one model: `ptuning report lama --model M`.

Methods: the manual prompt (MP) and P-tuning over the relations (P-tuning: frozen LM, every seed, all
relations' prompts trained together by the shared-batch trainer); FT and MP+FT train the LM, one fresh LM per
relation: every relation on a GPU, on a CPU the subset that params/report.yaml declares (the report names it).
Every (method, relation, seed) is saved under `<out>/units/` as it finishes, so a killed report resumes; the
P-tuning pool also checkpoints its whole state (`shared.PoolCheckpoint`, in `<out>/.scratch/ptuning/pool`), so that
the prompts it was training when killed continue beside the same neighbours and end with the same figures as an
uninterrupted run. A method's time is counted as it is spent (at every unit and pool checkpoint), killed
invocations included; without a progress bar each phase logs a line at least every minute.

Writes `<out>/results.json` (every figure, P@1 as fractions), `<out>/metrics.json` (the macro figures alone: the
DVC metrics), `<out>/REPORT.md` and three PNG figures.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from components.benchmarks import TaskPlan
from components.benchmarks.lama import shared
from components.benchmarks.lama.run import Candidates, relations_of, run_relation
from components.common import remove_checkpoints
from components.data.sources import read_jsonl
from components.reports.figures import clear, curves, grouped_bars, section
from components.reports.store import (Clock, UnitKey, UnitStore, device_kind, mean_std, methods_and_seeds, overrides_line,
                                      own_option, pct, provenance, report_dir, std_line, subset_label, unique,
                                      versions_line, write_atomic)
from components.run_config import resolve, source_version
from components.training.callbacks import Callback

log = logging.getLogger(__name__)
OPTION = "vocab"
N_RELATIONS = len(relations_of("all"))  # the paper's rows average over all of them
MAJORITY = "majority answer"  # the no-LM baseline of `majority_answers`
METHOD_NAMES = {"manual": "MP", "finetune": "FT", "manual-finetune": "MP+FT", "ptuning": "P-tuning"}
LM_TRAINED = ("finetune", "manual-finetune")


@dataclass(frozen=True)
class Report:
    model: str
    vocab: str
    seeds: tuple[int, ...]
    relations: tuple[str, ...]
    methods: tuple[str, ...]
    output_dir: Path
    command: str
    params: tuple[tuple[str, object], ...] = ()  # params/lama.yaml overrides for every method (the command's --set)

    @classmethod
    def from_settings(cls, settings: dict, model: str, command: str, root: Path, option=None, seeds=None,
                      tasks=None, methods=None, output_dir=None, params: dict | None = None) -> "Report":
        """The report's settings (params/report.yaml `lama:`) with the command line's choices over them
        (`option`: the vocabulary, `tasks`: the relations); every bad value fails here, before anything runs."""
        methods, seeds = methods_and_seeds(settings, methods, seeds, METHOD_NAMES)
        relations = tuple(unique(relations_of(tasks or settings["relations"]), "relation"))
        if settings["cpu_lm_trained_relations"]:  # a typo there would quietly drop FT's table
            relations_of(",".join(settings["cpu_lm_trained_relations"]))
        vocab, params = own_option(OPTION, option, params, settings["vocab"])
        # another vocabulary is another table: a folder of its own, never the default table's units
        folder = {**({"vocab": vocab} if vocab != settings["vocab"] else {}), **params}
        out = Path(output_dir) if output_dir else report_dir(root, "lama", model, folder)
        report = cls(model, vocab, seeds, relations, methods, out, command, tuple(sorted(params.items())))
        for method in methods:  # params/lama.yaml + overrides, validated by the benchmark (model, vocab, training)
            report.config(settings, method, seeds[0], root)
        return report

    def config(self, settings: dict, method: str, seed: int, root: Path, relations=None):
        overrides = {"model": self.model, "vocab": self.vocab, "method": method, "train.seed": seed,
                     "task": ",".join(relations or self.relations), **(settings["overrides"].get(method) or {}),
                     **dict(self.params)}
        return resolve("lama", overrides, root)


def run_report(report: Report, settings: dict, root: Path, show_progress: bool = True,
               on_progress: Callable[[dict], None] | None = None) -> dict:
    """Run what is missing, then write results.json, REPORT.md and the figures; returns results.json's dict."""
    with UnitStore(report.output_dir / "units").lock() as store:
        return _run_locked(report, settings, root, store, show_progress, on_progress)


def _run_locked(report, settings, root, store, show_progress, on_progress) -> dict:
    started = time.time()
    on_gpu = torch.cuda.is_available()
    lm_subset = tuple(r for r in report.relations if on_gpu or r in settings["cpu_lm_trained_relations"])
    keys = {}
    for method in report.methods:
        relations = lm_subset if method in LM_TRAINED else report.relations
        seeds = (None,) if method == "manual" else report.seeds
        base = report.config(settings, method, report.seeds[0], root)
        # P-tuning's results come from the shared trainer: its code counts too, and so do the batch sizes (a killed
        # pool resumes from its checkpoint with the same neighbours; a run asked for other seeds or relations than
        # the killed one starts a pool of its own, which may pair the missing prompts otherwise)
        shared_batches = {"shared_trainer": source_version(Path(shared.__file__)), "pool": settings["pool"],
                          "lm_batch": settings["lm_batch"]}
        key = keys[method] = UnitKey(base, **(shared_batches if method == "ptuning" else {}))
        todo = store.missing(method, [(r, s) for s in seeds for r in relations], key)
        log.info("%s: %d of %d units to run", method, len(todo), len(relations) * len(seeds))
        if todo:
            runner = _run_ptuning if method == "ptuning" else _run_one_by_one
            clock = Clock(store, method, key.settings)
            clock.tick(runner(report, settings, base, method, todo, store, key, clock, show_progress, on_progress))
    results = _aggregate(report, settings, store, keys, lm_subset)
    params = report.config(settings, report.methods[0], report.seeds[0], root).params  # data_dir, vocab: the table's
    results["majority"] = majority_answers(report.model, report.relations, params)
    _check_same_facts(results)
    results["provenance"] = provenance(keys)
    results["wall_s_this_invocation"] = time.time() - started
    write_atomic(report.output_dir / "results.json", json.dumps(results, indent=2))
    store.write_metrics(results, "macro_test_p1")
    _figures(report, results, store)
    write_atomic(report.output_dir / "REPORT.md", _markdown(report, results, settings))
    return results


def headline(results: dict) -> dict[str, float]:
    """The figures a run logs (MLflow metrics) and the command line prints."""
    return {f"{m}.{name}": v[name] for m, v in results["methods"].items() if "macro_test_p1" in v
            for name in ("macro_test_p1", "n_relations")}


def _run_one_by_one(report, settings, base, method, todo, store, key, clock, show_progress, on_progress) -> dict:
    """MP (one LM for every relation) and FT / MP+FT (a fresh LM per relation and seed)."""
    from tqdm import tqdm

    from components.models.catalog import load_lm

    lm = load_lm(report.model) if method == "manual" else None
    bar = tqdm(todo, desc=METHOD_NAMES[method], unit="relation", disable=not show_progress, mininterval=2.0)
    heartbeat = shared.Heartbeat(logger=log)
    for i, (relation, seed) in enumerate(bar):
        t0 = time.time()
        plan, callbacks = TaskPlan(relation, None), []
        if method != "manual":
            lm = load_lm(report.model)  # every relation starts from the pretrained LM
            plan = base.with_overrides({"train.seed": seed, "task": relation}).tasks[0]
            if not show_progress:  # minutes of LM training per relation on a CPU: say where it is
                callbacks = [_StepHeartbeat(heartbeat, f"{METHOD_NAMES[method]} {relation} seed {seed}")]
        run_dir = store.scratch(method, relation, seed, key(relation, seed))
        result = run_relation(plan, lm, base.params, run_dir, callbacks)
        remove_checkpoints(run_dir)  # a finished unit keeps its figures, not an LM's resume state
        store.put(method, relation, seed, key(relation, seed), {
            "relation": relation, "test_p1": result.test_p1, "dev_p1": result.dev_p1, "steps": result.steps,
            "n_train": result.n_train, "n_test": result.n_test, "dropped": result.dropped,
            "history": result.history, "seconds": time.time() - t0})
        clock.tick()
        if not show_progress:
            heartbeat("%s: %d of %d units done", METHOD_NAMES[method], i + 1, len(todo))
        if on_progress is not None:
            on_progress({"method": method, "done": i + 1, "total": len(todo)})
    return {}


class _StepHeartbeat(Callback):
    """A line at most every minute (the heartbeat's interval) while one relation's LM trains."""

    def __init__(self, heartbeat: "shared.Heartbeat", label: str):
        self.heartbeat, self.label, self.total = heartbeat, label, None

    def on_train_begin(self, info):
        self.total = info["total_steps"]

    def on_step(self, step, loss, lr):
        self.heartbeat("%s: step %d/%s, loss %.4f", self.label, step, self.total, loss)


def _run_ptuning(report, settings, base, method, todo, store, key, clock, show_progress, on_progress) -> dict:
    """Every missing (relation, seed) prompt in one shared-batch training over one frozen LM; a pool that was
    killed continues from its checkpoint (`_pool_jobs`)."""
    from components.models.catalog import load_lm

    checkpoint = shared.PoolCheckpoint(store.scratch(method, "pool", None, key.settings))  # emptied for other settings
    todo = _pool_jobs(report, todo, checkpoint)
    lm = load_lm(report.model)
    relations = list(dict.fromkeys(r for r, _ in todo))
    loaded, candidate_ids = shared.load_relations(relations, lm, base.params, "ptuning")
    by_name = {d.relation: d for d in loaded}
    config = base.tasks[0].train
    jobs = [shared.Job(f"{r}-s{s}", by_name[r], replace(config, seed=s), base.params["encoder"]) for r, s in todo]

    def save(result: shared.JobResult):
        data = by_name[result.relation]
        store.put(method, result.relation, result.seed, key(result.relation, result.seed), {
            "relation": result.relation, "test_p1": result.test_p1, "dev_p1": result.dev_p1, "steps": result.steps,
            "best_step": result.best_step, "stopped_early": result.stopped_early,
            "n_train": len(data.splits["train"]), "n_test": len(data.splits["test"]), "dropped": data.dropped,
            "history": result.history, "seconds": result.seconds,
            "prompt_sha256": shared.state_digest(result.encoder_state)})  # the kept prompt, to the last bit
        log.info("P-tuning %s seed %d: test P@1 %.4f (dev %.4f) after %d steps", result.relation, result.seed,
                 result.test_p1, result.dev_p1, result.steps)
        clock.tick()

    progress = (lambda p: on_progress({"method": method, **p})) if on_progress else None
    _, timing = shared.train_shared(lm, jobs, candidate_ids, pool=settings["pool"], lm_batch=settings["lm_batch"],
                                    eval_batch_size=base.params["eval_batch_size"], on_job_end=save,
                                    on_progress=progress, show_progress=show_progress,
                                    checkpoint_dir=checkpoint.directory, on_checkpoint=clock.tick)
    return timing


def _pool_jobs(report, todo, checkpoint: "shared.PoolCheckpoint") -> list[tuple[str, int]]:
    """The (relation, seed) jobs to train: a checkpointed pool's pending jobs when it holds every missing unit and
    only units of this run (those finished after its checkpoint are trained again, beside the same neighbours,
    and end as they did); otherwise the missing units, in a new pool (the checkpoint is dropped)."""
    pending = checkpoint.pending()
    if pending is None:
        return todo
    saved = [(job["relation"], job["seed"]) for job in pending]
    wanted = {(r, s) for s in report.seeds for r in report.relations}
    if set(todo) <= set(saved) <= wanted:
        return saved
    log.info("P-tuning: the pool checkpoint in %s trained other units than this run's; starting a new pool",
             checkpoint.directory)
    checkpoint.clear()
    return todo


def _aggregate(report: Report, settings: dict, store: UnitStore, keys: dict, lm_subset) -> dict:
    """Per method: per relation the mean (and std) over seeds; the macro average per seed, then its mean and
    std over seeds. Only relations with every seed finished count (`n_relations` says how many)."""
    methods, timings = {}, store.timings_of(keys)
    for method in report.methods:
        seeds = [None] if method == "manual" else list(report.seeds)
        wanted = lm_subset if method in LM_TRAINED else report.relations
        units = {r: found for r in wanted if (found := store.load(method, r, seeds, keys[method]))}
        relations = {}
        for relation, found in units.items():
            test_mean, test_std = mean_std([u["test_p1"] for u in found])
            relations[relation] = {
                "test_p1": test_mean, "test_p1_std": test_std,
                "dev_p1": mean_std([u["dev_p1"] for u in found])[0] if found[0]["dev_p1"] is not None else None,
                "steps": mean_std([u["steps"] for u in found])[0], "seconds": sum(u["seconds"] for u in found),
                "n_test": found[0]["n_test"], "test_p1_by_seed": {str(u["seed"]): u["test_p1"] for u in found},
                "dev_curve": [(h["step"], h["dev.p1"]) for h in found[0]["history"]],
                **({"prompt_sha256_by_seed": {str(u["seed"]): u["prompt_sha256"] for u in found}}
                   if all("prompt_sha256" in u for u in found) else {}),
                # seeds whose prompt never got one dev fact right: a failed training, not a small gain
                "seeds_dev_always_0": [u["seed"] for u in found
                                       if u["history"] and not any(h["dev.p1"] for h in u["history"])]}
        entry = {"n_relations": len(relations), "relations_run": list(wanted), "seeds": seeds if seeds != [None] else [],
                 "relations": relations, "timing": timings.get(method, {})}
        if relations:
            per_seed = [sum(units[r][i]["test_p1"] for r in relations) / len(relations) for i in range(len(seeds))]
            entry["macro_test_p1"], entry["macro_test_p1_std"] = mean_std(per_seed)
            devs = [v["dev_p1"] for v in relations.values() if v["dev_p1"] is not None]
            entry["macro_dev_p1"] = sum(devs) / len(devs) if devs else None
            entry["macro_test_p1_by_seed"] = per_seed
        methods[method] = entry
    return {"benchmark": "lama", "model": report.model, "vocab": report.vocab, "command": report.command,
            "device": device_kind(), "seeds": list(report.seeds),
            "relations": list(report.relations), "lm_trained_relations": list(lm_subset),
            "settings": {"overrides": settings["overrides"], "pool": settings["pool"], "lm_batch": settings["lm_batch"]},
            "wall_s": sum(t.get("seconds", 0.0) for t in timings.values()), "methods": methods}


def majority_answers(model: str, relations, params: dict) -> dict:
    """Per relation, the test P@1 of always giving its most frequent training answer (the first one seen on a tie;
    `train_count` says how often it occurs), over the facts the LM is scored on (answers that are one token of it,
    as `load_relation` keeps them): no LM, only the class prior that a prompt can learn without knowing any fact
    (P136's "jazz" is right for 70% of its test facts). The floor a gain is read against."""
    from components.models.catalog import load_tokenizer

    words = set(Candidates.load(params, load_tokenizer(model)).words)

    def answers(relation: str, split: str) -> list[str]:
        path = Path(params["data_dir"]) / params["vocab"] / relation / f"{split}.jsonl"
        rows = read_jsonl(path, required=("sub_label", "obj_label")) if path.exists() else []
        return [r["obj_label"] for r in rows if r["obj_label"] in words]

    found = {}
    for relation in relations:
        train, test = answers(relation, "train"), answers(relation, "test")
        answer, count = Counter(train).most_common(1)[0] if train else (None, 0)  # no training facts: no prior
        found[relation] = {"answer": answer, "train_count": count, "n_train": len(train),
                           "test_p1": sum(a == answer for a in test) / len(test), "n_test": len(test)}
    return {"macro_test_p1": sum(r["test_p1"] for r in found.values()) / len(found), "relations": found}


def _check_same_facts(results: dict) -> None:
    """The floor is scored on the facts every method was: a relation whose test count differs is an error."""
    floor = results["majority"]["relations"]
    differ = sorted({r for m in results["methods"].values() for r, v in m["relations"].items()
                     if v["n_test"] != floor[r]["n_test"]})
    if differ:
        raise ValueError(f"the majority answer and the units count other test facts for {', '.join(differ)}")


FIGURES = {"relations.png": "per relation", "learning_curves.png": "dev learning curves", "macro.png": "macro"}


def _figures(report: Report, results: dict, store: UnitStore) -> None:
    out, methods = report.output_dir, results["methods"]
    clear(out, FIGURES)
    shown = [m for m in ("manual", "ptuning") if methods.get(m, {}).get("relations")]
    if shown:
        rels = sorted(set.intersection(*(set(methods[m]["relations"]) for m in shown)))
        gain = lambda r: methods[shown[-1]]["relations"][r]["test_p1"] - methods[shown[0]]["relations"][r]["test_p1"]
        rels.sort(key=gain, reverse=True)
        grouped_bars(out / "relations.png", rels,
                     {**{METHOD_NAMES[m]: [100 * methods[m]["relations"][r]["test_p1"] for r in rels] for m in shown},
                      MAJORITY: [100 * results["majority"]["relations"][r]["test_p1"] for r in rels]},
                     "test P@1 (%)", f"LAMA-{report.vocab} per relation, {report.model}")
    if methods.get("ptuning", {}).get("relations"):
        lines = {r: [(s, 100 * p) for s, p in v["dev_curve"]] for r, v in methods["ptuning"]["relations"].items()}
        curves(out / "learning_curves.png", lines, "step", "dev P@1 (%)",
               f"P-tuning dev P@1 per relation (seed {report.seeds[0]}), {report.model}", mean_label="mean over relations")
    done = [m for m in report.methods if "macro_test_p1" in methods[m]]
    if done:
        grouped_bars(out / "macro.png",
                     [METHOD_NAMES[m] + subset_label(methods[m]["n_relations"], N_RELATIONS, "rel.") for m in done]
                     + [MAJORITY + subset_label(len(report.relations), N_RELATIONS, "rel.")],
                     {report.model: [100 * methods[m]["macro_test_p1"] for m in done]
                                    + [100 * results["majority"]["macro_test_p1"]]},
                     "macro test P@1 (%)", f"LAMA-{report.vocab}: macro P@1 over relations",
                     errors={report.model: [100 * (methods[m]["macro_test_p1_std"] or 0.0) for m in done] + [0.0]})


def _recipe(results: dict) -> str:
    """P-tuning's recipe as the units were keyed on it (params/lama.yaml, its preset, the report's overrides)."""
    if "ptuning" not in results["provenance"]:
        return ""
    params = results["provenance"]["ptuning"]["params"]
    train = params["train"]
    shape = params["template"] or ("the manual prompt's words" if params["init"] == "manual" else
                                   f"shape {params['prompt_shape']} (a causal LM drops the group after [Y])")
    return (f" P-tuning's recipe (params/lama.yaml, preset {params.get('preset') or 'none'}): lr {train['lr']:g}, up "
            f"to {train['max_steps']} steps at batch {train['batch_size']}, dev every {train['eval_every']} steps, "
            f"patience {train['patience']}, encoder {params['encoder']}, init {params['init']}, {shape}.")


def _over(relations) -> str:
    """"the 41 relations", or "2 of the 41 relations (P19, P36)": a subset is not the paper's table."""
    if len(relations) == N_RELATIONS:
        return f"the {N_RELATIONS} relations"
    return f"{len(relations)} of the {N_RELATIONS} relations ({', '.join(relations)})"


def _markdown(report: Report, results: dict, settings: dict) -> str:
    methods = results["methods"]
    paper = settings["paper_table2"].get(report.vocab, {})
    phases = ", ".join(f"{METHOD_NAMES[m]} {methods[m]['timing'].get('seconds', 0) / 60:.1f} min" for m in report.methods)
    lines = [f"# LAMA-{report.vocab} on {report.model} (paper Table 2)", "",
             "Produced by", "```", report.command, "```",
             f"Device: {results['device']}. Wall time of the runs that computed this folder's units (every "
             f"invocation and seed, current settings): {results['wall_s'] / 60:.1f} min "
             f"({phases}). "
             f"Seeds {', '.join(map(str, report.seeds))} (the manual prompt has none). P@1 in %, restricted to the "
             f"LAMA-{report.vocab} answer vocabulary, macro-averaged over {_over(report.relations)}; {std_line(report.seeds)}."
             + _recipe(results) + overrides_line(report.params), "", versions_line(results["provenance"]), "",
             "## Macro P@1", "",
             "| | " + " | ".join(METHOD_NAMES[m] for m in METHOD_NAMES) + " |", "|---" * (len(METHOD_NAMES) + 1) + "|"]
    ours = [pct(methods[m].get("macro_test_p1"), methods[m].get("macro_test_p1_std"))
            + subset_label(methods[m]["n_relations"], N_RELATIONS, "rel.")
            if m in methods else "not run" for m in METHOD_NAMES]
    lines.append(f"| **{report.model} (ours)** | " + " | ".join(ours) + " |")
    for model, row in paper.items():
        lines.append(f"| {model} (paper) | " + " | ".join(str(row.get(m, "–")) for m in METHOD_NAMES) + " |")
    majority = results["majority"]
    lines += ["", f"Majority answer (no LM: each relation's most frequent training answer, scored on the same test "
                  f"facts): {pct(majority['macro_test_p1'])}{subset_label(len(majority['relations']), N_RELATIONS, 'rel.')} "
                  "macro P@1, the class prior a prompt can learn without "
                  "knowing a fact."]
    lm_trained = [m for m in LM_TRAINED if m in methods]
    if lm_trained and results["lm_trained_relations"] != results["relations"]:
        lines += ["", f"FT and MP+FT train the whole LM per relation: on this CPU only the relations "
                      f"{', '.join(results['lm_trained_relations'])} (params/report.yaml `cpu_lm_trained_relations`), "
                      f"so their macro figures are over that subset, not comparable with the {len(report.relations)}-relation columns."]
    if "manual" in methods and "ptuning" in methods:
        both = sorted(set(methods["manual"]["relations"]) & set(methods["ptuning"]["relations"]))
        gains = sorted(((methods["ptuning"]["relations"][r]["test_p1"] - methods["manual"]["relations"][r]["test_p1"], r)
                        for r in both), reverse=True)
        if gains:
            fmt = lambda items: ", ".join(f"{r} ({100 * g:+.1f}; majority answer {pct(majority['relations'][r]['test_p1'])})"
                                          for g, r in items)
            lines += ["", "## Where P-tuning gains", "", f"Most: {fmt(gains[:5])}.", "",
                      f"Least: {fmt(gains[::-1][:5])}.", "",
                      f"P-tuning beats the manual prompt on {sum(g > 0 for g, _ in gains)} of {len(gains)} relations, "
                      f"and the majority answer on {sum(methods['ptuning']['relations'][r]['test_p1'] > majority['relations'][r]['test_p1'] for r in both)}."]
        stuck = [f"{r} (seed {s})" for r in both for s in methods["ptuning"]["relations"][r]["seeds_dev_always_0"]]
        if stuck:
            lines += ["", f"P-tuning's dev P@1 stayed at 0 at every evaluation, a failed training rather than a small "
                          f"gain, for {len(stuck)} of {len(both) * len(report.seeds)} prompts: {', '.join(stuck)}."]
    lines += ["", "## Per relation", "", "| relation | n test | " + " | ".join(METHOD_NAMES[m] for m in report.methods)
              + " | majority answer | P-tuning dev | P-tuning steps |", "|---" * (len(report.methods) + 5) + "|"]
    for relation in report.relations:
        cells = [pct(methods[m]["relations"][relation]["test_p1"], methods[m]["relations"][relation]["test_p1_std"])
                 if relation in methods[m]["relations"] else "–" for m in report.methods]
        pt = methods.get("ptuning", {}).get("relations", {}).get(relation, {})
        n_test = next((methods[m]["relations"][relation]["n_test"] for m in report.methods
                       if relation in methods[m]["relations"]), "–")
        top = majority["relations"][relation]
        lines.append(f"| {relation} | {n_test} | " + " | ".join(cells) + f" | {pct(top['test_p1'])} ({top['answer']} ×{top['train_count']})"
                     + f" | {pct(pt.get('dev_p1'))} | {pt.get('steps', '–') if pt else '–'} |")
    timing = methods.get("ptuning", {}).get("timing", {})
    if timing.get("train_s"):
        evaluation = timing["dev_eval_s"] + timing["test_eval_s"]
        lines += ["", f"P-tuning, shared batches (pool {settings['pool']} prompts, LM batch {settings['lm_batch']}): "
                      f"{timing['examples_per_s']:.1f} training examples/s; evaluation (dev {timing['dev_eval_s']:.0f} s, "
                      f"test {timing['test_eval_s']:.0f} s) = {100 * evaluation / timing['train_s']:.1f}% of the training time "
                      "(figures of the last pool, over every invocation that resumed it)."]
    lines += ["", *section(report.output_dir, FIGURES), "Settings (params/report.yaml over params/lama.yaml): `"
              + json.dumps(settings["overrides"]) + "`", ""]
    return "\n".join(lines)
