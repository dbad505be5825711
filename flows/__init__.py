"""Prefect wiring of the library (components/ never imports Prefect): the flows `ptuning` (pipeline.py) and
`ptuning-report` (paper_tables.py), and the ways to run them (run.py, serve.py, deploy.py)."""
import os

# Library progress (components.training's LogProgress, components.mlops.search) goes to Prefect's handlers: the
# terminal and the run's logs in the UI. Prefect reads this when it is imported, so it is set here, before any
# module of this package imports Prefect (flows.tasks.bridge_logs covers a process that imported Prefect first).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "components")
