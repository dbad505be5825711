"""What a registered prompt is, in the words the MLflow UI shows on its version and, for the champion, on its
registered model: the task and scope, the template, its dev and test figures, why it has its alias, what trained
it and what it answers."""
from __future__ import annotations

from components.mlops.serving import input_fields


def answers(meta: dict) -> str:
    """What the served prompt answers with (prompt.json's labels, or LAMA's vocabulary)."""
    if not meta.get("labels"):  # LAMA: no fixed labels, the benchmark vocabulary
        return f"words of the {meta.get('vocab', 'benchmark')} vocabulary, top-k with scores"
    if not meta.get("verbalizer"):  # a choice task (COPA): each of the row's choices scored whole
        return "labels " + ", ".join(meta["labels"]) + " (the likelier of the row's choices, in order), with scores"
    return "labels " + ", ".join(f"{label} ({meta['verbalizer'][label]!r})" for label in meta["labels"]) + ", with scores"


def describe(meta: dict, figures: dict, tags: dict, version: str, champion: bool = False) -> str:
    """The description of a version (or of its registered model, through its champion): `meta` is its prompt.json,
    `figures` its numeric metrics, `tags` the version's tags (selection_key, report_key, alias_decision, command,
    source_run_id)."""
    variant = f"vocab {meta['vocab']}" if meta.get("vocab") else f"setting {meta.get('setting')}"
    figure = lambda key: f"{key} = {figures[key]:.4f}"
    dev = [figure(k) for k in sorted(figures) if k.startswith("dev.")]
    test = [figure(k) for k in sorted(figures) if k.startswith(("test.", "val."))]
    lines = [f"P-tuning prompt: benchmark {meta.get('benchmark')}, task {meta.get('task')}, {variant}, "
             f"base model {meta.get('base_model')}" + (" (LM tuned with the prompt)" if meta.get("lm_trained") else "") + ".",
             "", f"- template: `{meta['template']}`",
             f"- dev figures (selection on {tags['selection_key']}): {', '.join(dev) or 'none'}",
             f"- test figures (reported: {tags['report_key'] or 'none'}; never used to select): {', '.join(test) or 'none'}",
             f"- alias: {tags['alias_decision']}",
             f"- trained by: `{tags['command'] or 'unknown'}` (run {tags['source_run_id']})",
             f"- answers: {answers(meta)}; request fields: {', '.join(input_fields(meta))}"]
    if champion:
        lines.insert(0, f"Champion: version {version}, the best {tags['selection_key']} of this model's versions.\n")
    return "\n".join(lines)
