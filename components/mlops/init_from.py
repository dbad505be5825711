"""`ptuning train ... --init-from SOURCE`: a run that starts from a learned prompt's encoder, a registered version
(`models:/NAME@champion`, `models:/NAME/3`) or a prompt directory, and trains on from there. The optimizer and
schedule start fresh. The source must be a frozen-LM prompt of the same benchmark, task, base model and template
text, with the run's encoder shape; anything else is a one-line error before training. The run's fingerprint names the
source (a registered version by its number), so a run from another start is never reused for this one."""
from __future__ import annotations

import json
from pathlib import Path

from components.method.model import LM_DIR, PromptEncoder
from components.training import Callback


def resolve_source(source: str) -> tuple[str, Path]:
    """(the source as the fingerprint names it: `models:/NAME/<version>` or the directory's absolute path, the
    local prompt directory). An alias is resolved to its version number; a version's files are downloaded."""
    if not source.startswith("models:/"):
        directory = Path(source).expanduser().resolve()
        if not directory.is_dir():
            raise ValueError(f"--init-from {source}: neither a prompt directory nor a models:/ URI")
        return str(directory), directory
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    path = source[len("models:/"):]
    try:
        if "@" in path:
            name, alias = path.split("@", 1)
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        else:
            name, _, version = path.rpartition("/")
        pinned = f"models:/{name}/{int(version)}"
        local = Path(mlflow.artifacts.download_artifacts(pinned))
    except (MlflowException, ValueError) as error:
        raise ValueError(f"--init-from {source}: {str(getattr(error, 'message', error)).splitlines()[0]}") from None
    return pinned, local / "artifacts" / "prompt"


def check_source(directory: Path, benchmark: str, params: dict) -> dict:
    """prompt.json of the source, when a run of `benchmark` with `params` can start from it; else ValueError."""
    meta_path = directory / "prompt.json"
    if not meta_path.is_file():
        raise ValueError(f"--init-from {directory}: no prompt.json (not an exported prompt)")
    meta = json.loads(meta_path.read_text())
    if not (directory / "encoder.safetensors").is_file() or "encoder" not in meta:
        raise ValueError(f"--init-from {directory}: it keeps its vectors only, no encoder to train on from")
    if meta.get("lm_trained") or (directory / LM_DIR).exists():
        raise ValueError(f"--init-from {directory}: trained together with its LM; only a frozen-LM prompt's encoder "
                         "starts a run")
    wanted = {"benchmark": benchmark, "task": params.get("task"), "base_model": params.get("model"),
              "encoder kind": params.get("encoder")}
    found = {"benchmark": meta.get("benchmark"), "task": meta.get("task"), "base_model": meta.get("base_model"),
             "encoder kind": meta["encoder"].get("kind")}
    differ = [f"{k} {found[k]!r} (this run: {wanted[k]!r})" for k in wanted if str(found[k]) != str(wanted[k])]
    if differ:
        raise ValueError(f"--init-from {directory}: another {', '.join(differ)}")
    # the same [P] count in another place, or other anchors, is another prompt: the encoder's shape cannot tell
    found, wanted = meta.get("patterns") or {"default": meta["template"]}, RUN_PATTERNS[benchmark](params, meta["causal"])
    if found != wanted:
        raise ValueError(f"--init-from {directory}: another template {_shown(found)} (this run: {_shown(wanted)})")
    return meta


def _lama_patterns(params: dict, causal: bool) -> dict[str, str]:
    from components.benchmarks.lama.run import relation_template
    from components.models.catalog import load_tokenizer

    template, _ = relation_template(params["method"], params["task"], load_tokenizer(params["model"]), causal, params)
    return {"default": template.text}


def _superglue_patterns(params: dict, causal: bool) -> dict[str, str]:
    from components.benchmarks.superglue.methods import METHODS
    from components.benchmarks.superglue.tasks import task_spec
    from components.models.catalog import load_tokenizer

    templates = METHODS[params["method"]].templates(task_spec(params["task"]), params, load_tokenizer(params["model"]))
    return {key: template.text for key, template in templates.items()}


# the template texts a run of these params trains, per pattern key, as its exported prompt.json records them
# (`causal`: the base model's, known from the source, whose base model is the run's)
RUN_PATTERNS = {"lama": _lama_patterns, "superglue": _superglue_patterns}


def _shown(patterns: dict[str, str]) -> str:
    return repr(patterns["default"]) if list(patterns) == ["default"] else repr(patterns)


class StartFromPrompt(Callback):
    """Loads the source's encoder into the run's prompt encoder before the first step (never into a resumed run:
    its checkpoint holds where it was). The encoder's shape must match: n_tokens, width, kind, hidden size."""

    def __init__(self, directory: Path, meta: dict):
        self.directory, self.meta = directory, meta

    def on_train_begin(self, info: dict) -> None:
        if info["resumed_at_step"]:
            return
        from components.method.model import load_prompt

        encoders = [m for m in info["model"].modules() if isinstance(m, PromptEncoder)]
        if len(encoders) != 1:
            raise ValueError(f"--init-from: this run trains {len(encoders)} prompt encoders, not one")
        source, _ = load_prompt(self.directory, with_encoder=True)
        if source.config() != encoders[0].config():
            raise ValueError(f"--init-from {self.directory}: its encoder is {source.config()}, this run's "
                             f"{encoders[0].config()} (another template or model)")
        encoders[0].load_state_dict(source.state_dict())
