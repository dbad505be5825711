"""The paper's LAMA table (Table 2) on one model: `ptuning report lama --model M`.

Methods: the manual prompt (MP) and P-tuning over the relations (P-tuning: frozen LM, every seed, all
relations' prompts trained together by the shared-batch trainer); FT and MP+FT train the LM, one fresh LM per
relation: every relation on a GPU, on a CPU the subset that params/report.yaml declares (the report names it).
Every (method, relation, seed) is saved under `<out>/units/` as it finishes, so a killed report resumes; the
P-tuning pool also checkpoints its whole state (`pool_state.PoolCheckpoint`, in `<out>/.scratch/ptuning/pool`), so that
the prompts it was training when killed continue beside the same neighbours and end with the same figures as an
uninterrupted run. A method's time is counted as it is spent (at every unit and pool checkpoint), killed
invocations included; without a progress bar each phase logs a line at least every minute.

Writes `<out>/results.json` (every figure, P@1 as fractions), `<out>/metrics.json` (the macro figures alone: the
DVC metrics), `<out>/REPORT.md` and three PNG figures.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from components.benchmarks import TaskPlan
from components.benchmarks.lama import pool_state, shared
from components.benchmarks.lama.pool_state import Heartbeat, PoolCheckpoint, state_digest
from components.benchmarks.lama.run import Candidates, relations_of, run_relation
from components.common import remove_checkpoints
from components.data.sources import read_jsonl
from components.method.model import PromptEncoder, export_prompt
from components.reports.store import (Clock, UnitKey, UnitStore, device_kind, mean_std, methods_and_seeds, own_option,
                                      report_dir, unique)
from components.reports import lama_writeup as writeup
from components.reports.lama_writeup import LM_TRAINED, METHOD_NAMES
from components.reports.table import Table
from components.run_config import resolve, source_version
from components.training.callbacks import Callback

log = logging.getLogger(__name__)
OPTION = "vocab"


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
    return LamaTable(report, settings, root, show_progress, on_progress).run()


class LamaTable(Table):
    macro_key = "macro_test_p1"

    def run_units(self) -> dict[str, UnitKey]:
        report, settings, store = self.report, self.settings, self.store
        on_gpu = torch.cuda.is_available()
        self.lm_subset = tuple(r for r in report.relations if on_gpu or r in settings["cpu_lm_trained_relations"])
        keys = {}
        for method in report.methods:
            relations = self.lm_subset if method in LM_TRAINED else report.relations
            seeds = (None,) if method == "manual" else report.seeds
            base = report.config(settings, method, report.seeds[0], self.root)
            # P-tuning's results come from the shared trainer: its code counts too, and so do the batch sizes (a
            # killed pool resumes from its checkpoint with the same neighbours; a run asked for other seeds or
            # relations than the killed one starts a pool of its own, which may pair the missing prompts otherwise)
            shared_batches = {"shared_trainer": source_version(Path(shared.__file__), Path(pool_state.__file__)),
                              "pool": settings["pool"], "lm_batch": settings["lm_batch"]}
            key = keys[method] = UnitKey(base, **(shared_batches if method == "ptuning" else {}))
            todo = store.missing(method, [(r, s) for s in seeds for r in relations], key)
            log.info("%s: %d of %d units to run", method, len(todo), len(relations) * len(seeds))
            if todo:
                runner = self._ptuning if method == "ptuning" else self._one_by_one
                clock = Clock(store, method, key.settings)
                clock.tick(runner(method, base, todo, key, clock))
        return keys

    def aggregate(self, keys: dict[str, UnitKey]) -> dict:
        results = _aggregate(self.report, self.settings, self.store, keys, self.lm_subset)
        params = self.report.config(self.settings, self.report.methods[0], self.report.seeds[0], self.root).params
        results["majority"] = majority_answers(self.report.model, self.report.relations, params)  # data_dir, vocab
        _check_same_facts(results)
        return results

    def figures(self, results: dict) -> None:
        writeup.figures(self.report, results, self.settings)

    def markdown(self, results: dict) -> str:
        return writeup.markdown(self.report, results, self.settings)

    def _one_by_one(self, method, base, todo, key, clock) -> dict:
        """MP (one LM for every relation) and FT / MP+FT (a fresh LM per relation and seed)."""
        from tqdm import tqdm

        from components.models.catalog import load_lm

        report, store, show_progress, on_progress = self.report, self.store, self.show_progress, self.on_progress
        lm = load_lm(report.model) if method == "manual" else None
        bar = tqdm(todo, desc=METHOD_NAMES[method], unit="relation", disable=not show_progress, mininterval=2.0)
        heartbeat = Heartbeat(shared.HEARTBEAT_S, logger=log)
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

    def _ptuning(self, method, base, todo, key, clock) -> dict:
        """Every missing (relation, seed) prompt in one shared-batch training over one frozen LM; a pool that was
        killed continues from its checkpoint (`_pool_jobs`)."""
        from components.models.catalog import load_lm

        report, settings, store, on_progress = self.report, self.settings, self.store, self.on_progress

        checkpoint = PoolCheckpoint(store.scratch(method, "pool", None, key.settings))  # emptied for other settings
        todo = _pool_jobs(report, todo, checkpoint)
        lm = load_lm(report.model)
        relations = list(dict.fromkeys(r for r, _ in todo))
        loaded, candidate_ids = shared.load_relations(relations, lm, base.params, "ptuning")
        by_name = {d.relation: d for d in loaded}
        config = base.tasks[0].train
        jobs = [shared.Job(f"{r}-s{s}", by_name[r], replace(config, seed=s), base.params["encoder"]) for r, s in todo]

        def keep_prompt(result: shared.JobResult, settings_hash: str):
            """The unit's prompt as `ptuning train` exports it, for a prompt bank (components/mlops/bank.py)."""
            data = by_name[result.relation]
            encoder = PromptEncoder(data.template.n_prompt_tokens, lm.model.get_input_embeddings().embedding_dim,
                                    base.params["encoder"])
            encoder.load_state_dict(result.encoder_state)
            store.put_prompt(method, result.relation, result.seed, lambda directory: export_prompt(
                encoder, directory, data.template.text, base.params["model"],
                {"benchmark": "lama", "task": result.relation, "vocab": base.params["vocab"], "causal": lm.causal,
                 "max_length": base.params["max_length"], "truncate": "sub", "seed": result.seed,
                 "settings_hash": settings_hash}))

        def save(result: shared.JobResult):
            data = by_name[result.relation]
            keep_prompt(result, key(result.relation, result.seed))
            store.put(method, result.relation, result.seed, key(result.relation, result.seed), {
                "relation": result.relation, "test_p1": result.test_p1, "dev_p1": result.dev_p1, "steps": result.steps,
                "best_step": result.best_step, "stopped_early": result.stopped_early,
                "n_train": len(data.splits["train"]), "n_test": len(data.splits["test"]), "dropped": data.dropped,
                "history": result.history, "seconds": result.seconds,
                "prompt_sha256": state_digest(result.encoder_state)})  # the kept prompt, to the last bit
            log.info("P-tuning %s seed %d: test P@1 %.4f (dev %.4f) after %d steps", result.relation, result.seed,
                     result.test_p1, result.dev_p1, result.steps)
            clock.tick()

        progress = (lambda p: on_progress({"method": method, **p})) if on_progress else None
        _, timing = shared.train_shared(lm, jobs, candidate_ids, pool=settings["pool"], lm_batch=settings["lm_batch"],
                                        eval_batch_size=base.params["eval_batch_size"], on_job_end=save,
                                        on_progress=progress, show_progress=self.show_progress,
                                        checkpoint_dir=checkpoint.directory, on_checkpoint=clock.tick)
        return timing


def headline(results: dict) -> dict[str, float]:
    """The figures a run logs (MLflow metrics) and the command line prints."""
    return {f"{m}.{name}": v[name] for m, v in results["methods"].items() if "macro_test_p1" in v
            for name in ("macro_test_p1", "n_relations")}


class _StepHeartbeat(Callback):
    """A line at most every minute (the heartbeat's interval) while one relation's LM trains."""

    def __init__(self, heartbeat: Heartbeat, label: str):
        self.heartbeat, self.label, self.total = heartbeat, label, None

    def on_train_begin(self, info):
        self.total = info["total_steps"]

    def on_step(self, step, loss, lr):
        self.heartbeat("%s: step %d/%s, loss %.4f", self.label, step, self.total, loss)


def _pool_jobs(report, todo, checkpoint: PoolCheckpoint) -> list[tuple[str, int]]:
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
