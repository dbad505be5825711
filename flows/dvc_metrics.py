"""Turn one `ptuning train` output directory into what DVC shows: `dvc metrics show` and `dvc plots show`.

    python -m flows.dvc_metrics RUN_DIR OUT_DIR

reads RUN_DIR/metrics.json and RUN_DIR/history.json (written by `ptuning train ... --output-dir RUN_DIR`) and
writes
    OUT_DIR/metrics.json          the run's figures (local paths left out, so `dvc metrics diff` compares numbers)
    OUT_DIR/learning_curve.csv    one row per evaluation: step, epoch, task, the dev metrics, dev_score
The DVC stages `train_lama` / `train_superglue` call it after training (dvc.yaml); no Prefect flow uses it.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

NOT_METRICS = ("step", "epoch")


def learning_curve(history: dict | list, default_task: str = "task") -> list[dict]:
    """Rows `{step, epoch, task, <dev metrics>..., dev_score}` from a history.json's content.

    `history` is `{task: [{step, epoch, "dev.<metric>"...}, ...]}` (or one such list). `dev_score` is the mean of an
    evaluation's numeric metrics (LAMA: dev P@1; CB: mean of accuracy and F1), the score model selection uses."""
    per_task = history if isinstance(history, dict) else {default_task: history}
    rows = []
    for task, evaluations in per_task.items():
        for entry in evaluations or []:
            metrics = {k: v for k, v in entry.items()
                       if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
            score = sum(metrics.values()) / len(metrics) if metrics else None
            rows.append({"step": entry.get("step"), "epoch": entry.get("epoch"), "task": task, **metrics, "dev_score": score})
    rows.sort(key=lambda r: (str(r["task"]), r["step"] if r["step"] is not None else -1))
    return rows


def write_curve(rows: list[dict], path: Path) -> Path:
    columns = ["step", "epoch", "task"]
    for row in rows:
        columns += [k for k in row if k not in columns and k != "dev_score"]
    columns.append("dev_score")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def public_metrics(metrics: dict) -> dict:
    """The metrics without local paths (`prompts`): what `dvc metrics show/diff` should compare."""
    return {k: v for k, v in metrics.items() if k != "prompts"}


def report(run_dir: str | Path, out_dir: str | Path) -> dict:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    metrics_file, history_file = run_dir / "metrics.json", run_dir / "history.json"
    if not metrics_file.exists():
        raise FileNotFoundError(f"{metrics_file} does not exist: did `ptuning train ... --output-dir {run_dir}` finish?")
    metrics = json.loads(metrics_file.read_text())
    history = json.loads(history_file.read_text()) if history_file.exists() else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(public_metrics(metrics), indent=2) + "\n")
    rows = learning_curve(history, str(metrics.get("task", "task")))
    write_curve(rows, out_dir / "learning_curve.csv")
    return {"metrics": str(out_dir / "metrics.json"), "learning_curve": str(out_dir / "learning_curve.csv"),
            "evaluations": len(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.dvc_metrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the --output-dir of `ptuning train`")
    parser.add_argument("out_dir", help="where metrics.json and learning_curve.csv go")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(report(args.run_dir, args.out_dir)))
    except (FileNotFoundError, ValueError) as error:
        print(f"flows.dvc_metrics: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
