"""The skeleton every result table shares, as PET's PVP base holds what every pattern shares: under the report
folder's lock, run the units that are missing, then write results.json (every figure), metrics.json (the macro
figures: the DVC metrics), the figures and REPORT.md. A table supplies its units, its aggregation, its figures and
its markdown; nothing is written before the aggregation succeeds, so a failed check leaves the table as it was."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from components.reports.store import UnitKey, UnitStore, provenance, write_atomic

log = logging.getLogger(__name__)


class Table:
    macro_key: str  # the macro figure metrics.json (and the headline) carries

    def __init__(self, report, settings: dict, root: Path, show_progress: bool = True,
                 on_progress: Callable[[dict], None] | None = None):
        self.report, self.settings, self.root = report, settings, root
        self.show_progress, self.on_progress = show_progress, on_progress
        self.store = UnitStore(report.output_dir / "units")

    def run(self) -> dict:
        """Run what is missing, then write results.json, metrics.json, the figures and REPORT.md; returns the results."""
        with self.store.lock():
            started = time.time()
            keys = self.run_units()
            results = self.aggregate(keys)
            results["provenance"] = provenance(keys)  # no wall time: a run with nothing to do rewrites it as it was
            out = self.report.output_dir
            write_atomic(out / "results.json", json.dumps(results, indent=2))
            self.store.write_metrics(results, self.macro_key)
            self.figures(results)
            write_atomic(out / "REPORT.md", self.markdown(results))
            log.info("%s written in %.0f s", out, time.time() - started)
            return results

    def run_units(self) -> dict[str, UnitKey]:
        """Compute and save every missing unit; per method, the key its units are saved under."""
        raise NotImplementedError

    def aggregate(self, keys: dict[str, UnitKey]) -> dict:
        """results.json from the saved units of these keys (raises before anything is written)."""
        raise NotImplementedError

    def figures(self, results: dict) -> None:
        raise NotImplementedError

    def markdown(self, results: dict) -> str:
        raise NotImplementedError
