"""SuperGLUE / FewGLUE (paper Tables 3-5): the benchmark's registry row."""
from __future__ import annotations

import argparse
from pathlib import Path

from components.benchmarks.superglue import run as runner
from components.benchmarks.superglue.run import SETTINGS


class SuperGlue:
    name = "superglue"
    prepare_stage = "prepare_fewglue"
    selection_key = "dev.score"  # dev32 (fewshot) or the held-out dev (full)
    report_key = "val.score"     # SuperGLUE val: its test labels are not public

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--setting", choices=SETTINGS, help="SuperGLUE setting")

    def cli_overrides(self, args: argparse.Namespace) -> dict:
        return {"setting": args.setting} if getattr(args, "setting", None) else {}

    def plan(self, params: dict):
        return runner.plan(params)

    def prepare(self, raw: Path, out: Path, root: Path) -> dict:
        from components.config import load_params

        settings = load_params("superglue", root)["prepare"]
        return runner.prepare(raw=raw, out=out, seed=settings["seed"], dev_size=settings["dev_size"],
                              full_dev_fraction=settings["full_dev_fraction"])

    def run(self, config, output_dir: Path, callbacks) -> dict:
        return runner.run(config, output_dir, callbacks)


BENCHMARK = SuperGlue()
