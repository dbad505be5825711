"""The command that trains one combination of a `ptuning` flow run again, recorded on its MLflow runs and its
registered versions: read back (`python -m flows.run` or `prefect deployment run`), it resolves to the same
combination, seeds, search and overrides."""
from __future__ import annotations

import json
import shlex

from components.common import redact_url


def _value(value) -> str:
    """A parameter value as `python -m flows.run` (YAML 1.2) and `prefect deployment run -p` (JSON) read it
    back: JSON, a store URL's password hidden."""
    if isinstance(value, str) and "://" in value:
        value = redact_url(value)
    return json.dumps(value)


def retrain_command(benchmark: str, combo: dict, seeds: list[int], overrides: dict, prepare: bool = True,
                    deployment: str | None = None) -> str:
    """The command that trains one combination again: `python -m flows.run <benchmark> --param tasks=[...]
    ... --set key=value ...` with its task, model and method, the seeds and every override resolved
    (params/flow.yaml's `<benchmark>.overrides` and the run's), or, for a run of the served deployment
    `deployment`, `prefect deployment run ptuning/<deployment> -p ...` with the same parameters."""
    params = {"tasks": [combo["task"]], "models": [combo["model"]], "methods": [combo["method"]], "seeds": list(seeds)}
    if not prepare:
        params["prepare"] = False
    if deployment:
        params["overrides"] = dict(overrides)
        return shlex.join(["prefect", "deployment", "run", f"ptuning/{deployment}",
                           *(item for name, value in params.items() for item in ("-p", f"{name}={_value(value)}"))])
    return shlex.join(["python", "-m", "flows.run", benchmark,
                       *(item for name, value in params.items() for item in ("--param", f"{name}={_value(value)}")),
                       *(item for key, value in overrides.items() for item in ("--set", f"{key}={_value(value)}"))])
