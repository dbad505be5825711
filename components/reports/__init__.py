"""Reports: a benchmark's result table run end to end and written up (`ptuning report <benchmark>`).

    store.py      one JSON file per finished unit (method, task, seed): a killed report resumes where it stopped
    figures.py    matplotlib PNGs
    lama.py       the paper's Table 2 on one model: reports/lama/<model>/{results.json, REPORT.md, *.png}
    superglue.py  the paper's Table 5 on one model: reports/superglue/<model>-<setting>/{results.json, REPORT.md, *.png}

Each report module has the same face: `Report.from_settings(settings, model, command, root, option=, seeds=,
tasks=, methods=, output_dir=, params=)` (every check, nothing run), `run_report(report, settings, root, ...)`,
`OPTION` (the benchmark's choice: LAMA's vocabulary, SuperGLUE's setting) and `headline(results)`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

REPORTS = {"lama": "components.reports.lama", "superglue": "components.reports.superglue"}


def get_report(benchmark: str) -> ModuleType:
    if benchmark not in REPORTS:
        raise ValueError(f"no result table for {benchmark!r}; reports exist for {', '.join(REPORTS)}")
    return importlib.import_module(REPORTS[benchmark])
