"""The LAMA table's write-up: REPORT.md and its figures, from results.json's figures (components/reports/lama.py
computes them)."""
from __future__ import annotations

import json

from components.benchmarks.lama.run import relations_of
from components.reports.figures import clear, curves, grouped_bars, horizontal_bars, section
from components.reports.store import overrides_line, pct, std_line, subset_label, versions_line

N_RELATIONS = len(relations_of("all"))  # the paper's rows average over all of them
MAJORITY = "majority answer"  # the no-LM baseline of `majority_answers`
METHOD_NAMES = {"manual": "MP", "finetune": "FT", "manual-finetune": "MP+FT", "ptuning": "P-tuning"}
LM_TRAINED = ("finetune", "manual-finetune")

FIGURES = {"relations.png": "per relation", "learning_curves.png": "dev learning curves", "macro.png": "macro"}


PAPER_FIGURE_ROW = "gpt2-medium"  # the paper's row beside ours in macro.png: its causal LM whose gain the README compares


def figures(report, results: dict, settings: dict) -> None:
    out, methods = report.output_dir, results["methods"]
    clear(out, FIGURES)
    shown = [m for m in ("manual", "ptuning") if methods.get(m, {}).get("relations")]
    if shown:
        rels = sorted(set.intersection(*(set(methods[m]["relations"]) for m in shown)))
        gain = lambda r: methods[shown[-1]]["relations"][r]["test_p1"] - methods[shown[0]]["relations"][r]["test_p1"]
        rels.sort(key=gain, reverse=True)
        horizontal_bars(out / "relations.png", rels,
                        {METHOD_NAMES[m]: [100 * methods[m]["relations"][r]["test_p1"] for r in rels] for m in shown},
                        "test P@1 (%)", f"LAMA-{report.vocab} per relation, {report.model}, by gain of "
                        f"{METHOD_NAMES[shown[-1]]} over {METHOD_NAMES[shown[0]]}",
                        marker=(MAJORITY, [100 * results["majority"]["relations"][r]["test_p1"] for r in rels]))
    if methods.get("ptuning", {}).get("relations"):
        lines = {r: [(s, 100 * p) for s, p in v["dev_curve"]] for r, v in methods["ptuning"]["relations"].items()}
        curves(out / "learning_curves.png", lines, "step", "dev P@1 (%)",
               f"P-tuning dev P@1 per relation (seed {report.seeds[0]}), {report.model}", mean_label="mean over relations")
    done = [m for m in report.methods if "macro_test_p1" in methods[m]]
    if done:
        # the methods over every relation of the table first, then those over a subset (FT on a CPU), set apart
        full = [m for m in done if methods[m]["n_relations"] == len(report.relations)]
        subset = [m for m in done if m not in full]
        paper = settings["paper_table2"].get(report.vocab, {}).get(PAPER_FIGURE_ROW, {})
        labels = ([METHOD_NAMES[m] for m in full] + [MAJORITY]
                  + [METHOD_NAMES[m] + subset_label(methods[m]["n_relations"], N_RELATIONS, "rel.") for m in subset])
        ours = [100 * methods[m]["macro_test_p1"] for m in full] + [100 * results["majority"]["macro_test_p1"]] \
            + [100 * methods[m]["macro_test_p1"] for m in subset]
        theirs = [paper.get(m) for m in full] + [None] + [paper.get(m) for m in subset]
        errors = [100 * (methods[m]["macro_test_p1_std"] or 0.0) for m in full] + [0.0] \
            + [100 * (methods[m]["macro_test_p1_std"] or 0.0) for m in subset]
        grouped_bars(out / "macro.png", labels, {report.model: ours, f"paper, {PAPER_FIGURE_ROW}": theirs},
                     "macro test P@1 (%)", f"LAMA-{report.vocab}: macro P@1 over {_over(report.relations)}",
                     errors={report.model: errors},
                     apart_from=len(full) + 1 if subset else None,
                     apart_note="fewer relations:\nnot comparable" if subset else "")


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


def markdown(report, results: dict, settings: dict) -> str:
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
