"""The results of a `ptuning` flow run as a markdown table artifact, shown in the Prefect UI: per study, the best
parameters and dev score, the report figure over the seeds, the zero-shot manual prompt's, what was registered."""
from __future__ import annotations

import contextlib

from flows.plan import Plan


def summary_artifact(run: Plan, results: list[dict]) -> None:
    """Publish the table (key `ptuning-<benchmark>`); never fail the flow for it."""
    from prefect.artifacts import create_markdown_artifact

    lines = [f"# ptuning/{run.benchmark}", "", f"MLflow: `{run.tracking_uri}` (experiment `{run.tracking['experiment']}`), "
             f"Optuna: `{run.storage}`", "",
             f"| study | best params | best {run.selection_key} | {run.report_key} (mean ± std) | zero-shot manual prompt | registered |",
             "|---|---|---|---|---|---|"]
    for r in results:
        reg = ", ".join(f"{x['name']} v{x['version']} ({', '.join(x['aliases']) or '-'})" for x in r["registered"]) or "-"
        test = "-" if r["mean"] is None else f"{r['mean']:.4f}" + ("" if r["std"] is None else f" ± {r['std']:.4f}")
        zero = "-" if not r["zero_shot"] or r["zero_shot"]["value"] is None else f"{r['zero_shot']['value']:.4f}"
        lines.append(f"| {r['study']} | {r['best_params']} | {r['best_dev_score']:.4f} | {test} | {zero} | {reg} |")
    with contextlib.suppress(Exception):
        create_markdown_artifact("\n".join(lines), key=f"ptuning-{run.benchmark}", description="ptuning results")
