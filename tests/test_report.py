"""`ptuning report lama|superglue` end to end on tiny models: results.json, REPORT.md, figures, resuming, bad input."""
import json
from collections import Counter

import pytest
import torch

from components.benchmarks.superglue.tasks import TASKS, read_examples
from components.cli import main
from components.config import load_params
from components.reports.superglue import flow_default_task
from components.reports.store import UnitStore

pytestmark = pytest.mark.slow  # trains through the CLI in subprocesses: the full tier (make test)


def _cli(benchmark, out, data_dir, *args):
    """`ptuning report BENCHMARK` on tiny-gpt2 over the given data, into `out`, without a progress bar."""
    return main(["report", benchmark, "--model", "tiny-gpt2", *args, "--set", f"data_dir={data_dir}",
                 "--output-dir", str(out), "--no-progress"])


def _report(out, data_dir, *extra):
    return _cli("lama", out, data_dir, "--relations", "P36,P1376", "--seeds", "34,35", "--methods", "manual,ptuning",
                "--set", "train.max_steps=4", "--set", "train.eval_every=2", *extra)


def test_report_writes_results_markdown_and_figures_and_resumes(small_lama, tmp_path, capsys):
    out = tmp_path / "report"
    assert _report(out, small_lama) == 0
    results = json.loads((out / "results.json").read_text())
    for method in ("manual", "ptuning"):
        entry = results["methods"][method]
        assert set(entry["relations"]) == {"P36", "P1376"} and entry["n_relations"] == 2
        for relation in entry["relations"].values():  # each seed's P@1 counts right answers; the cell is their mean
            by_seed = list(relation.get("test_p1_by_seed", {"": relation["test_p1"]}).values())
            assert all(p * relation["n_test"] == pytest.approx(round(p * relation["n_test"]), abs=1e-6) for p in by_seed)
            assert relation["test_p1"] == pytest.approx(sum(by_seed) / len(by_seed))
        mean = sum(r["test_p1"] for r in entry["relations"].values()) / 2
        assert entry["macro_test_p1"] == pytest.approx(mean)
    ptuning = results["methods"]["ptuning"]
    assert ptuning["seeds"] == [34, 35] and set(ptuning["relations"]["P36"]["test_p1_by_seed"]) == {"34", "35"}
    assert ptuning["relations"]["P36"]["steps"] == 4 and [s for s, _ in ptuning["relations"]["P36"]["dev_curve"]] == [0, 2, 4]
    assert ptuning["timing"]["train_examples"] == 2 * 2 * 4 * 8 and results["wall_s"] > 0
    report = (out / "REPORT.md").read_text()
    assert results["command"] in report and "ptuning report lama --model tiny-gpt2" in results["command"]
    assert "gpt2-medium (paper) | 20.3" in report and "| P1376 |" in report
    # two seeds have a sample std, the manual prompt's single run none; 2 relations are a subset of the paper's 41
    by_seed = ptuning["macro_test_p1_by_seed"]
    assert ptuning["macro_test_p1_std"] == pytest.approx(abs(by_seed[0] - by_seed[1]) / 2 ** 0.5)
    assert results["methods"]["manual"]["macro_test_p1_std"] is None
    assert "2 of the 41 relations (P36, P1376); mean ± sample std (n-1) over the 2 seeds" in report
    [ours] = [line for line in report.splitlines() if line.startswith("| **tiny-gpt2 (ours)**")]
    manual_cell, _, _, ptuning_cell = ours.split(" | ")[1:5]
    assert manual_cell.endswith(" (2 rel.)") and "±" not in manual_cell and " ± " in ptuning_cell
    # the no-LM floor: each relation's most frequent training answer, scored on the facts the LM was scored on
    for relation, top in results["majority"]["relations"].items():
        rows = lambda split: [json.loads(line)["obj_label"] for line in
                              (small_lama / "29k" / relation / f"{split}.jsonl").read_text().splitlines()]
        assert top["train_count"] == rows("train").count(top["answer"]) == max(Counter(rows("train")).values())
        assert top["n_test"] == ptuning["relations"][relation]["n_test"]
        assert top["test_p1"] * top["n_test"] == pytest.approx(rows("test").count(top["answer"]))
    p36 = results["majority"]["relations"]["P36"]
    assert "Majority answer (no LM" in report and f"({p36['answer']} ×{p36['train_count']})" in report
    # the recipe and the code the units were keyed on, as resolved
    recipe = results["provenance"]["ptuning"]
    assert recipe["params"]["train"]["max_steps"] == 4 and "task" not in recipe["params"]
    assert "lr 0.001, up to 4 steps at batch 8" in report and f"Library code version {recipe['code_version']}" in report
    for figure in ("relations.png", "learning_curves.png", "macro.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # killed after all but one unit: a second run trains only that one and ends with the same table
    units = sorted((out / "units").rglob("P*.json"))
    assert len(units) == 2 + 4
    kept = {p: p.stat().st_mtime_ns for p in units}
    (out / "units" / "ptuning" / "P1376-s35.json").unlink()
    assert _report(out, small_lama) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["methods"]["ptuning"]["macro_test_p1"] == pytest.approx(ptuning["macro_test_p1"], abs=1e-9)
    assert again["methods"]["ptuning"]["timing"]["train_examples"] == 4 * 8  # one prompt, 4 steps
    assert [p for p in units if p.exists() and p.stat().st_mtime_ns != kept[p]] == [out / "units" / "ptuning" / "P1376-s35.json"]
    # nothing missing: the folder is rewritten byte for byte (a DVC out that changed would make `dvc repro` rerun it)
    written = {name: (out / name).read_bytes() for name in ("results.json", "metrics.json", "REPORT.md")}
    assert _report(out, small_lama) == 0
    assert {name: (out / name).read_bytes() for name in written} == written

    # a prompt whose dev P@1 stayed at 0 is named with its seed, whichever seed it is
    for seed, dev in ((34, 0.5), (35, 0.0)):
        unit = out / "units" / "ptuning" / f"P36-s{seed}.json"
        saved = json.loads(unit.read_text())
        unit.write_text(json.dumps({**saved, "history": [{**h, "dev.p1": dev} for h in saved["history"]]}))
    assert _report(out, small_lama) == 0
    stuck = json.loads((out / "results.json").read_text())["methods"]["ptuning"]["relations"]["P36"]
    assert stuck["seeds_dev_always_0"] == [35] and "P36 (seed 35)" in (out / "REPORT.md").read_text()

    # a unit scored on other test facts than the majority answer's floor: an error, and the table is kept as it was
    unit, table = out / "units" / "ptuning" / "P36-s34.json", (out / "results.json").read_text()
    saved = unit.read_text()
    unit.write_text(json.dumps({**json.loads(saved), "n_test": 999}))
    capsys.readouterr()
    assert _report(out, small_lama) == 2 and "other test facts for P36" in capsys.readouterr().err
    assert (out / "results.json").read_text() == table
    unit.write_text(saved)

    # a run of fewer seeds reuses their units (a unit's key holds its own seed, not the run's first one) ...
    kept = {p: p.stat().st_mtime_ns for p in units}
    assert _report(out, small_lama, "--seeds", "35") == 0
    assert all(p.stat().st_mtime_ns == kept[p] for p in units)
    # ... and a run of one method leaves no stale figure of the others behind
    assert _report(out, small_lama, "--methods", "manual") == 0
    assert not (out / "learning_curves.png").exists() and "learning_curves.png" not in (out / "REPORT.md").read_text()
    assert "![macro](macro.png)" in (out / "REPORT.md").read_text()

    # other settings: the units are not reused
    assert _report(out, small_lama, "--set", "train.lr=0.002") == 0
    assert all(p.stat().st_mtime_ns != kept[p] for p in units if "ptuning" in p.parts)


@pytest.mark.parametrize("args, message", [
    (["--methods", "manual,zero-shot"], "unknown report method(s) ['zero-shot']"),
    (["--relations", "P999"], "unknown LAMA relation"),
    (["--set", "train.lr=-1"], "invalid training settings"),
    (["--preset", "nope"], "unknown preset 'nope'; known: paper"),
    (["--seeds", "34,35,34"], "seeds repeated in the report's list: 34"),
    (["--relations", "P19,P36,P19"], "relations repeated in the report's list: P19"),
])
def test_bad_report_input_fails_before_anything_runs(args, message, small_lama, tmp_path, capsys):
    out = tmp_path / "report"
    code = _cli("lama", out, small_lama, *args)
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_a_preset_table_goes_to_its_own_folder_with_the_presets_settings(repo_dir):
    from components.config import load_params
    from components.reports import get_report

    settings = load_params("report", repo_dir)["lama"]
    report = get_report("lama").Report.from_settings(settings, "tiny-gpt2", "ptuning report lama", repo_dir,
                                                     params={"preset": "paper"})
    assert report.output_dir == repo_dir / "reports" / "lama" / "tiny-gpt2-preset-paper"
    train = report.config(settings, "ptuning", 34, repo_dir).params["train"]
    assert (train["lr"], train["max_steps"], train["patience"]) == (1e-5, None, 20)


def test_the_other_vocabulary_is_a_table_of_its_own(repo_dir):
    """`--vocab 34k` never recomputes (and overwrites) the default LAMA-29k table's units."""
    from components.config import load_params
    from components.reports import get_report

    settings = load_params("report", repo_dir)["lama"]
    make = lambda vocab: get_report("lama").Report.from_settings(settings, "tiny-gpt2", "ptuning report lama", repo_dir,
                                                                 option=vocab)
    assert make(None).output_dir == make("29k").output_dir == repo_dir / "reports" / "lama" / "tiny-gpt2"
    assert make("34k").output_dir == repo_dir / "reports" / "lama" / "tiny-gpt2-vocab-34k"
    given = get_report("lama").Report.from_settings(settings, "tiny-gpt2", "ptuning report lama", repo_dir,
                                                    params={"vocab": "34k"})  # --set vocab=34k: the same table
    assert (given.output_dir, given.vocab, given.params) == (make("34k").output_dir, "34k", ())
    assert get_report("lama").Report.from_settings({**settings, "cpu_lm_trained_relations": []}, "tiny-gpt2",
                                                   "ptuning report lama", repo_dir).relations  # no CPU subset: fine
    with pytest.raises(ValueError, match="unknown LAMA relation"):  # the CPU subset is checked up front too
        get_report("lama").Report.from_settings({**settings, "cpu_lm_trained_relations": ["P1O3"]}, "tiny-gpt2",
                                                "ptuning report lama", repo_dir)


def _superglue(out, data_dir, *extra):
    return _cli("superglue", out, data_dir, "--tasks", "rte,cb,multirc", "--seeds", "42,43", "--set", "train.max_steps=2",
                "--set", "train.eval_every=1", "--set", "max_eval_examples=8", *extra)


def test_superglue_report_writes_the_fewshot_table_and_resumes(fewglue_dir, repo_dir, tmp_path):
    out = tmp_path / "superglue"
    assert _superglue(out, fewglue_dir) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["setting"] == "fewshot" and results["max_eval_examples"] == 8
    assert results["budget"] == ("gpu" if torch.cuda.is_available() else "cpu")  # the paper's step counts need a GPU
    for method in ("finetune", "manual-zeroshot", "manual-finetune", "ptuning"):
        entry = results["methods"][method]
        assert set(entry["tasks"]) == {"rte", "cb", "multirc"} and entry["n_tasks"] == 3
        seeds = [42, 43] if method != "manual-zeroshot" else []  # the zero-shot prompt trains nothing: one run
        assert entry["seeds"] == seeds and len(entry["macro_val_score_by_seed"]) == max(1, len(seeds))
        mean = sum(t["val"]["score"] for t in entry["tasks"].values()) / 3
        assert entry["macro_val_score"] == pytest.approx(mean)
        cb = entry["tasks"]["cb"]["val"]
        assert cb["score"] == pytest.approx((cb["acc"] + cb["f1_macro"]) / 2)
    assert results["methods"]["ptuning"]["tasks"]["rte"]["steps"] == 2
    assert [s for s, _ in results["methods"]["ptuning"]["tasks"]["rte"]["dev_curve"]] == [0, 1, 2]
    report = (out / "REPORT.md").read_text()
    assert results["command"] in report and "| **P-tuning (ours)** |" in report
    assert "P-tuning, albert-xxlarge-v2 (paper) | 76.5 | 92.9 / 92.3 | 36.1 / 75.0 |" in report
    assert "first val examples of RTE (8), CB (8), MultiRC (8 answers, whole questions)" in report
    # each method's recipe, the minutes of one run, and the sampling noise of every val score beside the table
    assert "Each method's recipe" in report and "| minutes per run |" in report
    noise = results["val_standard_error"]
    for task, entry in results["methods"]["ptuning"]["tasks"].items():
        p = sum(m["tasks"][task]["val"]["score"] for m in results["methods"].values()) / 4
        assert noise["tasks"][task] == pytest.approx((p * (1 - p) / entry["n_val"]) ** 0.5)
    [row] = [line for line in report.splitlines() if line.startswith("| ± 1 val standard error")]
    assert row.endswith(f" | ± {100 * noise['macro']:.1f} |")
    assert "| MP zero-shot, gpt2-base (paper) | 49.5 | 44.6 / 33.3 | 2.2 / 23.8 | – |" in report
    # the no-LM floor, on the val examples the table is scored on: MultiRC's "0" label gets no F1a, and its EM
    # counts the questions whose options are all false
    majority = results["majority"]["tasks"]
    assert {t: m["n_val"] for t, m in majority.items()} == {t: e["n_val"] for t, e in results["methods"]["ptuning"]["tasks"].items()}
    assert majority["multirc"]["label"] == "0" and majority["multirc"]["val"]["f1a"] == 0.0
    assert majority["cb"]["val"]["score"] == pytest.approx((majority["cb"]["val"]["acc"] + majority["cb"]["val"]["f1_macro"]) / 2)
    assert {t: m["label_from"] for t, m in majority.items()} == {t: "train" for t in majority}  # the full sets
    # the floor on dev32 too, and the flow's default task read from dev32 alone against the better of the floors
    examples = read_examples(TASKS["rte"], fewglue_dir / "RTE" / "dev32.jsonl")[:8]
    rte = majority["rte"]
    assert rte["dev"]["acc"] == pytest.approx(sum(ex.label == rte["label"] for ex in examples) / len(examples))
    rule = flow_default_task(results)
    methods = results["methods"]
    for task, gain in rule["gains"].items():
        floor = max(methods["manual-zeroshot"]["tasks"][task]["dev_score"], majority[task]["dev"]["score"])
        assert gain == pytest.approx(methods["ptuning"]["tasks"][task]["dev_score"] - floor)
    assert rule["gains"][rule["task"]] == max(rule["gains"].values())
    assert f"The largest, **{TASKS[rule['task']].folder}**" in report
    assert f"| RTE | most frequent training label | {100 * rte['val']['score']:.1f} | {100 * rte['dev']['score']:.1f} |" in report
    [row] = [line for line in report.splitlines() if line.startswith("| most frequent training label (no LM) |")]
    assert row.endswith(f" | {100 * results['majority']['macro_val_score']:.1f} (3 tasks) |") and "±" not in row
    # what the runs selected on, as their units record it, and the command's overrides of the budget
    assert "keep the state best on dev32 and are scored on SuperGLUE val" in report and "| dev32 score |" in report
    assert '"train.max_steps": 2' in report.split("## Val scores")[0]
    assert f"Library code version {results['provenance']['ptuning']['code_version']}" in report
    for figure in ("tasks.png", "learning_curves.png", "macro.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    work = out / ".scratch" / "ptuning"
    assert work.is_dir() and not any(work.iterdir())  # a unit's run (its trained LM) is gone once its figures are kept

    # one unit lost: only it runs again, and the table is the same
    units = sorted((out / "units").rglob("*.json"))
    kept = {p: p.stat().st_mtime_ns for p in units if p.name != "timing.json"}
    assert len(kept) == 3 * 2 * 3 + 3
    (out / "units" / "ptuning" / "cb-s43.json").unlink()
    assert _superglue(out, fewglue_dir) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["methods"]["ptuning"]["macro_val_score"] == pytest.approx(results["methods"]["ptuning"]["macro_val_score"])
    assert [p for p, t in kept.items() if p.stat().st_mtime_ns != t] == [out / "units" / "ptuning" / "cb-s43.json"]

    # REPORT.md names the split the runs selected on as their units record it, and a second run on the folder
    # stops at once (exit 3) while one holds it
    unit = out / "units" / "ptuning" / "cb-s42.json"
    unit.write_text(json.dumps({**json.loads(unit.read_text()), "selected_on": "val"}))
    with UnitStore(out / "units").lock():
        assert _superglue(out, fewglue_dir) == 3
    assert _superglue(out, fewglue_dir) == 0
    assert "keep the state best on dev32 / val and are scored" in (out / "REPORT.md").read_text()


def test_the_flow_runs_the_task_the_committed_table_picks_on_dev32(repo_dir):
    """params/flow.yaml's SuperGLUE task is the committed few-shot table's `flow_default_task`: changing either
    alone would leave the README's main job on a task no dev32 rule chose."""
    results = json.loads((repo_dir / "reports" / "superglue" / "smollm2-135m-fewshot" / "results.json").read_text())
    assert load_params("flow", repo_dir)["superglue"]["tasks"] == [flow_default_task(results)["task"]]


@pytest.mark.parametrize("args, message", [
    (["--methods", "ptuning,zero-shot"], "unknown report method(s) ['zero-shot']"),
    (["--tasks", "rte,squad"], "unknown SuperGLUE task 'squad'"),
    (["--set", "train.lr=-1"], "invalid training settings"),
    (["--preset", "paper"], "unknown preset 'paper'; known: none in this file"),
    (["--setting", "fewshot", "--set", "setting=full"], "two values of setting: --setting fewshot and --set setting=full"),
])
def test_bad_superglue_report_input_fails_before_anything_runs(args, message, fewglue_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = _cli("superglue", out, fewglue_dir, *args)
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()
