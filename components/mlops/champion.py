"""The champion policy of the model registry: which versions compare, and which one is the champion.

One registered model holds the prompts of one scope (benchmark, task, vocabulary or setting, base model:
`registered_name`). A new version takes the alias `champion` only when its dev selection score beats the current
champion's; otherwise it is the `challenger`. Test figures are recorded on the version, never used to decide."""
from __future__ import annotations

from dataclasses import dataclass

from components.common import safe_name

CHAMPION = "champion"
CHALLENGER = "challenger"
# what makes two versions comparable: one registered model holds one scope (registered_name)
SCOPE = ("benchmark", "task", "vocab", "setting", "base_model")


def registered_name(benchmark: str, task: str, model: str, variant: str | None = None) -> str:
    """`ptuning-<benchmark>-<task>[-<variant>]-<model>`, e.g. ptuning-lama-P19-29k-smollm2-135m: one registered
    model per benchmark, task, vocabulary (LAMA) or setting (SuperGLUE), and base model, so that its champion
    is the best of comparable versions. A hub id's `/` and any other character outside [A-Za-z0-9_.-] become `-`."""
    return safe_name("ptuning", benchmark, task, variant, model)


def prompt_scope(meta: dict) -> dict:
    """The scope of an exported prompt (prompt.json): benchmark, task, vocab or setting, base model."""
    return {k: str(meta[k]) for k in SCOPE if meta.get(k) is not None}


@dataclass(frozen=True)
class AliasDecision:
    alias: str  # CHAMPION or CHALLENGER
    reason: str  # e.g. `dev.score 0.5100 beats champion version 3's 0.4800`, shown on the version


def decide_alias(client, name: str, scope: dict, selection_key: str, score: float) -> AliasDecision:
    """The alias a new version of `name` with `score` on `selection_key` takes, against the current champion (an
    MlflowClient's view). Refuses (ValueError) a scope or selection key that differs from the champion's."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such model, or no champion yet
        champion = None
    if champion is not None:
        theirs = {k: champion.tags.get(k) for k in SCOPE if champion.tags.get(k) is not None}
        if theirs != scope:
            raise ValueError(f"{name}: this prompt's scope {scope} differs from its champion's {theirs} "
                             f"(version {champion.version}); register it under registered_name(...) of its own")
        if champion.tags.get("selection_key") != selection_key:
            raise ValueError(f"{name}: its champion was selected on {champion.tags.get('selection_key')!r}, "
                             f"not {selection_key!r}: the scores are not comparable")
    best = float(champion.tags[selection_key]) if champion is not None and selection_key in champion.tags else None
    wins = best is None or score > best
    reason = (f"{selection_key} {score:.4f} " + ("(first version)" if champion is None else
              f"{'beats' if wins else 'does not beat'} champion version {champion.version}'s {best:.4f}"))
    return AliasDecision(CHAMPION if wins else CHALLENGER, reason)
