"""Running SuperGLUE / FewGLUE (paper Tables 3-5): seven tasks (tasks.py), four methods (methods.py), two settings.

    plan(params)                      everything checked before a model is loaded; one TaskPlan (with the task's
                                      TrainConfig) per task
    run(config, output_dir, callbacks)  train (unless manual-zeroshot), select on dev, evaluate on val, export the
                                      prompt; write metrics.json and history.json

Settings
    fewshot  train on train32, select on dev32 (built by prepare.py), report on val; the paper's step counts
             and encoder learning rates per task (params/superglue.yaml `tasks:`).
    full     train on the SuperGLUE train set minus a held-out dev carved from it (seeded, by prepare.py),
             select on that dev, report on val. The paper selects on val itself (`full.select_on: val`
             reproduces that: train on all of train, select on val); the default avoids selecting on the
             set that is reported. SuperGLUE's test labels are not public. A task without a full train set
             in the mirror cannot run `full`; `all` then means the tasks that have one.

Every metric names its split: the dev figures are `dev.<metric>` (what training selects on), the val figures
`val.<metric>`; `score` is the mean of a task's metrics (averaged over the tasks of a run).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from components.benchmarks import TaskPlan
from components.benchmarks.superglue.inputs import Inputs
from components.benchmarks.superglue.methods import INITS, METHODS, PromptMethod
from components.benchmarks.superglue.metrics import primary_score, task_metrics
from components.benchmarks.superglue.tasks import TASKS, Example, TaskError, TaskSpec, read_examples, task_spec, verbalizer_ids
from components.data.sources import DataError
from components.method.model import ENCODERS, export_lm, export_prompt
from components.training import Callback, TrainConfig, atomic_write, fit, seed_everything

log = logging.getLogger(__name__)

SETTINGS = ("fewshot", "full")
SPLITS = {"fewshot": ("train32", "dev32", "val"), "full": ("train", "dev", "val")}
SELECT_ON = ("heldout", "val")


# --- the plan: every check before a model is loaded -----------------------------------------------------

def _task_table(params: dict, spec: TaskSpec) -> dict:
    table = (params.get("tasks") or {}).get(spec.name)
    if not table:
        raise TaskError(f"params has no `tasks.{spec.name}` entry (max_steps, lr, max_length, warmup_steps)")
    return table


def train_config(params: dict, spec: TaskSpec) -> TrainConfig:
    """TrainConfig of one task: `train:` values, nulls filled from the setting and the task table. Few-shot
    runs take as many passes over train32 as the task's step count needs (epochs None)."""
    values = dict(params["train"])
    table, setting = _task_table(params, spec), params["setting"]
    defaults = params[setting]
    values["batch_size"] = values.get("batch_size") or defaults["batch_size"]
    if values.get("patience") is None:
        values["patience"] = defaults["patience"]
    if setting == "fewshot":
        values["lr"] = values.get("lr") or table["lr"]
        values["max_steps"] = values.get("max_steps") or table["max_steps"]
        values["eval_every"] = values.get("eval_every") or defaults["eval_every"]
        if values.get("warmup_steps") is None:
            values["warmup_steps"] = table.get("warmup_steps", 0)
    else:
        values["lr"] = values.get("lr") or defaults["lr"]
        values["epochs"] = values.get("epochs") or defaults["epochs"][spec.size]
        if values.get("warmup_steps") is None:
            values["warmup_steps"] = 0
    return TrainConfig.from_dict(values)


def _specs(params: dict) -> list[TaskSpec]:
    names = str(params["task"]).strip().lower()
    if names == "all":  # in the full setting: the tasks that have a full train set here
        return [s for s in TASKS.values() if params["setting"] == "fewshot" or s.full_train]
    specs = [task_spec(t) for t in names.split(",") if t.strip()]
    if not specs:
        raise TaskError("no SuperGLUE task given")
    return specs


def _check_eval_limit(limit) -> None:
    """max_eval_examples: null, a count for every task, or {task: count or null}."""
    counts = limit.items() if isinstance(limit, dict) else [("", limit)]
    for task, n in counts:
        if task and task not in TASKS:
            raise TaskError(f"max_eval_examples: unknown task {task!r}; known: {', '.join(TASKS)}")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise TaskError(f"max_eval_examples{'.' + task if task else ''} must be null or a count >= 1, got {n!r}")


def plan(params: dict) -> list[TaskPlan]:
    """Method, setting, encoder, tasks, patterns, model and training settings, checked before any data or model
    is loaded; one TaskPlan per task, its TrainConfig built here once (None for manual-zeroshot)."""
    from components.models.catalog import check_model, load_tokenizer

    method = METHODS.get(params.get("method"))
    if method is None:
        raise TaskError(f"unknown SuperGLUE method {params.get('method')!r}; choose one of {', '.join(METHODS)}")
    if params.get("setting") not in SETTINGS:
        raise TaskError(f"unknown SuperGLUE setting {params.get('setting')!r}; choose one of {', '.join(SETTINGS)}")
    if params.get("encoder") not in ENCODERS:
        raise TaskError(f"unknown prompt encoder {params.get('encoder')!r}; choose one of {', '.join(ENCODERS)}")
    if params.get("init") not in INITS:
        raise TaskError(f"unknown prompt init {params.get('init')!r}; choose one of {', '.join(INITS)}")
    if params["full"].get("select_on") not in SELECT_ON:
        raise TaskError(f"full.select_on must be one of {', '.join(SELECT_ON)}, got {params['full'].get('select_on')!r}")
    specs = _specs(params)
    _check_eval_limit(params.get("max_eval_examples"))
    for spec in specs:
        if params["setting"] == "full" and not spec.full_train:
            raise TaskError(f"{spec.folder} has no full SuperGLUE train set in this data mirror "
                            f"(superglue/{spec.folder}/train.jsonl is missing), so the `full` setting cannot run for "
                            f"{spec.folder}; use --setting fewshot")
        method.templates(spec, params)
    plans = [TaskPlan(spec.name, train_config(params, spec) if method.trains else None) for spec in specs]
    check_model(params["model"])  # last: it may read a model's config
    if isinstance(method, PromptMethod):  # every verbalizer word must be one token of the model
        tokenizer = load_tokenizer(params["model"])
        for spec in specs:
            if spec.verbalizer:
                verbalizer_ids(spec, tokenizer, params["model"])
    return plans


# --- data ---------------------------------------------------------------------------------------------

def load_splits(spec: TaskSpec, params: dict) -> dict[str, list[Example]]:
    """{"train", "dev", "val"} examples of the setting, read from the prepared data."""
    data_dir = Path(params["data_dir"]) / spec.folder
    setting = params["setting"]
    paths = dict(zip(("train", "dev", "val"), (data_dir / f"{s}.jsonl" for s in SPLITS[setting])))
    for path in paths.values():
        if not path.exists():
            raise DataError(f"{path} does not exist: run `dvc repro prepare_fewglue` (or `ptuning prepare fewglue`) first")
    splits = {name: read_examples(spec, path) for name, path in paths.items()}
    if setting == "full" and params["full"]["select_on"] == "val":
        splits["train"] = splits["train"] + splits["dev"]  # the paper: all of train, select on val
        splits["dev"] = splits["val"]
    limit = params.get("max_eval_examples")
    limit = limit.get(spec.name) if isinstance(limit, dict) else limit
    splits["dev"], splits["val"] = spec.kind.limit(splits["dev"], limit), spec.kind.limit(splits["val"], limit)
    return splits


# --- evaluation ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(head, model: torch.nn.Module, items: list[dict], inputs: Inputs, batch_size: int) -> dict[str, float]:
    """The task's metrics of `model` on `items` (keys without their split: `acc`, `f1_macro`, ...)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # chunks of similar length pad little (unsorted chunks of 32 padded 1.5x to 3x); predictions return in item order
    order = sorted(range(len(items)), key=lambda i: head.length(items[i]))
    predictions: list[str | None] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        chunk = [items[i] for i in indices]
        batch = {k: v.to(device) for k, v in head.collate(chunk, inputs).items()}
        for i, prediction in zip(indices, head.predict(model, batch, chunk, inputs)):
            predictions[i] = prediction
    model.train(was_training)
    examples = [item["ex"] for item in items]
    spec = inputs.spec
    # macro-F1 over the classes seen in labels or predictions, as scikit-learn (and so PET) computes it
    return task_metrics(spec.metrics, predictions, [ex.label for ex in examples], groups=spec.kind.groups(examples))


def _named(split: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{split}.{name}": value for name, value in metrics.items()}


# --- running ------------------------------------------------------------------------------------------

def run_task(task: TaskPlan, lm, params: dict, output_dir: Path, callbacks: list[Callback] = ()) -> dict:
    """Train (unless nothing is trained), select on dev, evaluate on val; export the prompt if there is one."""
    spec, train = TASKS[task.task], task.train
    method, setting = METHODS[params["method"]], params["setting"]
    splits = load_splits(spec, params)
    seed = train.seed if train else params["train"]["seed"]
    seed_everything(seed)
    templates = method.templates(spec, params, lm.tokenizer)
    inputs = Inputs(spec, lm.tokenizer, lm.causal, params["model"], templates,
                    params.get("max_length") or _task_table(params, spec)["max_length"],
                    options=params.get(spec.kind.name) or {}, sep_fallback=params.get("sep_fallback"), seed=seed)
    head = method.head(spec)
    head.check(inputs)
    model, prompt = method.build(spec, lm, templates, params)
    items = {name: head.items(examples, inputs, train=name == "train") for name, examples in splits.items()}
    batch_size = params["eval_batch_size"]

    output_dir.mkdir(parents=True, exist_ok=True)
    result = None
    if train is not None:
        if not items["train"]:
            raise DataError(f"{spec.folder}: no training items")
        result = fit(model, items["train"], [head.length(i) for i in items["train"]], lambda c: head.collate(c, inputs),
                     head.loss, lambda m: _named("dev", evaluate(head, m, items["dev"], inputs, batch_size)), train,
                     select=tuple(f"dev.{name}" for name in spec.metrics), callbacks=callbacks,
                     checkpoint_dir=output_dir / "checkpoint" if params["checkpoint"] else None)
    # the kept state's dev figures are known from its selection; only a run without training evaluates dev here
    dev = ({k.removeprefix("dev."): v for k, v in result.best_metrics.items()} if result
           else evaluate(head, model, items["dev"], inputs, batch_size))
    val = evaluate(head, model, items["val"], inputs, batch_size) if params["score_val"] else None

    patterns = {key: t.text for key, t in templates.items()} or None
    prompt_dir = None
    if prompt is not None and params["export"]:
        prompt_dir = export_prompt(prompt, output_dir / "prompt", next(iter(templates.values())).text, params["model"], {
            # what serving needs to answer in the task's terms
            "benchmark": "superglue", "task": spec.name, "kind": spec.kind.name, "labels": list(spec.labels),
            "verbalizer": spec.verbalizer, "patterns": patterns, "lm_trained": not model.freeze_lm,
            "causal": lm.causal, "setting": setting, "max_length": inputs.max_length, "truncate": spec.truncate})
        if not model.freeze_lm:  # the version must reproduce the run's figures: the LM is part of the result
            export_lm(lm.model, lm.tokenizer, prompt_dir)
    out = {
        "task": spec.name,
        "dev": {**dev, "score": primary_score(dev, spec.metrics)},
        "val": {**val, "score": primary_score(val, spec.metrics)} if val is not None else {},
        "n_train": len(items["train"]), "n_dev": len(items["dev"]), "n_val": len(items["val"]),
        "steps": result.steps if result else 0, "best_step": result.best_step if result else 0,
        "stopped_early": result.stopped_early if result else False,
        "selected_on": "val" if setting == "full" and params["full"]["select_on"] == "val" else SPLITS[setting][1],
        "patterns": patterns, "prompt_dir": str(prompt_dir) if prompt_dir else None,
        "history": result.history if result else [],
    }
    stats = Path(params["data_dir"]) / "stats.json"
    if stats.exists():
        out["dev32_source"] = json.loads(stats.read_text()).get("tasks", {}).get(spec.name, {}).get("dev32_source")
    log.info("%s %s %s: val %s, dev %s after %d steps", spec.name, method.name, setting, val, dev, out["steps"])
    return out


def run(config, output_dir: str | Path, callbacks: list[Callback] = ()) -> dict:
    """Run every task of `config` (a RunConfig). Writes `<output_dir>/metrics.json` (and history.json) and
    returns the metrics: `dev` and `val` (each task's metrics and `score`; several tasks: the mean score),
    `tasks` (per task), `prompts` (per task: its exported prompt)."""
    from components.models.catalog import load_lm

    params = config.params
    method = METHODS[params["method"]]
    output_dir = Path(output_dir)
    results, lm = [], None
    for task in config.tasks:
        if lm is None or method.trains:  # a trained LM is never reused
            lm = load_lm(params["model"])
        task_dir = output_dir / task.task if len(config.tasks) > 1 else output_dir
        results.append(run_task(task, lm, params, task_dir, callbacks))
    metrics = {"benchmark": "superglue", "task": str(params["task"]).lower(), "model": params["model"],
               "method": params["method"], "setting": params["setting"]}
    if len(results) == 1:
        metrics["dev"], metrics["val"] = results[0]["dev"], results[0]["val"]
    else:
        metrics["dev"] = {"score": sum(r["dev"]["score"] for r in results) / len(results)}
        metrics["val"] = ({"score": sum(r["val"]["score"] for r in results) / len(results)} if params["score_val"]
                          else {})
    skipped = [name for name in TASKS if name not in {t.task for t in config.tasks}]
    if metrics["task"] == "all" and skipped:
        metrics["skipped"] = {name: "no full SuperGLUE train set in the data mirror" for name in skipped}
    metrics["tasks"] = {r["task"]: {k: v for k, v in r.items() if k not in ("task", "history", "prompt_dir")}
                        for r in results}
    metrics["prompts"] = {r["task"]: r["prompt_dir"] for r in results if r["prompt_dir"]}
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / "history.json", json.dumps({r["task"]: r["history"] for r in results}, indent=2))
    atomic_write(output_dir / "metrics.json", json.dumps(metrics, indent=2))  # all or nothing, even on a full disk
    return metrics
