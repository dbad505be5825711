"""LAMA knowledge probing (paper Table 2): per relation, predict the object of (subject, relation, ?).

Methods: `manual` (the relation's manual prompt, frozen LM, zero-shot), `ptuning` (continuous prompt,
frozen LM, only the prompt encoder learns), `finetune` (subject only, LM trained) and `manual-finetune`
(manual prompt, LM trained). P@1 is restricted to the benchmark vocabulary (29k or 34k) and averaged over
relations. Facts whose answer is not a single token of the probed model's vocabulary cannot be scored
by P@1; they are dropped and counted.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from components.benchmarks import TaskPlan
from components.data.sources import DataError, read_jsonl
from components.method.model import ENCODERS, PromptedLM, PromptEncoder, export_prompt
from components.method.templates import (Encoded, Template, collate, encode, lama_template, pad_id, parse_template,
                                         piece_ids, prompt_from_anchors)
from components.training import Callback, TrainConfig, atomic_write, fit, seed_everything

log = logging.getLogger(__name__)
METHODS = ("manual", "ptuning", "finetune", "manual-finetune")
VOCABS = ("29k", "34k")
INITS = ("random", "manual")  # P-tuning's prompt: the paper's shape, random; or the manual prompt's words (OptiPrompt)
TRAINED = ("ptuning", "finetune", "manual-finetune")  # the methods that train something
# The 41 LAMA T-REx relations (paper Table 2): known before any data is prepared, so a typo fails at once.
RELATIONS = ("P1001 P101 P103 P106 P108 P127 P1303 P131 P136 P1376 P138 P140 P1412 P159 P17 P176 P178 P19 P190 "
             "P20 P264 P27 P276 P279 P30 P31 P36 P361 P364 P37 P39 P407 P413 P449 P463 P47 P495 P527 P530 P740 "
             "P937").split()


@dataclass
class Fact:
    encoded: Encoded
    label: int  # index into the candidate ids


@dataclass
class RelationResult:
    relation: str
    test_p1: float
    dev_p1: float | None
    n_train: int
    n_test: int
    dropped: dict
    steps: int
    prompt_dir: Path | None = None
    history: list = field(default_factory=list)


def relation_ids(data_dir: str | Path, vocab: str) -> list[str]:
    root = Path(data_dir) / vocab
    if not root.is_dir():
        raise DataError(f"{root} does not exist: run `dvc repro prepare_lama` (or `ptuning prepare lama`) first")
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _manual_templates(data_dir: Path) -> dict[str, str]:
    rows = read_jsonl(data_dir / "relations.jsonl", required=("relation", "template"))
    return {r["relation"]: r["template"].replace("[X]", "{sub}") for r in rows}


def template_for(method: str, relation: str, causal: bool, params: dict, data_dir: Path) -> str:
    if params.get("template"):
        return params["template"]
    if method == "ptuning" and params["init"] == "random":
        return lama_template(params["prompt_shape"], causal)
    if method == "finetune":
        return "{sub} [Y]"
    manual = _manual_templates(data_dir)
    if relation not in manual:
        raise DataError(f"relation {relation} has no manual prompt in {data_dir / 'relations.jsonl'}")
    return manual[relation]


def candidate_vocabulary(words: list[str], tokenizer) -> tuple[list[str], list[int]]:
    """The benchmark words that are one token of this model (after a space, as they follow the prompt)."""
    kept_words, ids = [], []
    for word in words:
        pieces = piece_ids(tokenizer, word)
        if len(pieces) == 1:
            kept_words.append(word)
            ids.append(pieces[0])
    return kept_words, ids


def relations_of(task) -> list[str]:
    task = str(task).strip()
    relations = list(RELATIONS) if task == "all" else [t.strip() for t in task.split(",") if t.strip()]
    unknown = [r for r in relations if r not in RELATIONS]
    if unknown or not relations:
        raise ValueError(f"unknown LAMA relation(s) {unknown or [task]}; known: {', '.join(RELATIONS)} or all")
    return relations


def plan(params: dict) -> list[TaskPlan]:
    """Everything that can be checked before data or a model is loaded; one TaskPlan per relation."""
    from components.models.catalog import check_model

    if params["method"] not in METHODS:
        raise ValueError(f"unknown LAMA method {params['method']!r}; choose one of {', '.join(METHODS)}")
    if params["vocab"] not in VOCABS:
        raise ValueError(f"unknown LAMA vocabulary {params['vocab']!r}; choose one of {', '.join(VOCABS)}")
    if params["encoder"] not in ENCODERS:
        raise ValueError(f"unknown prompt encoder {params['encoder']!r}; choose one of {', '.join(ENCODERS)}")
    if params["init"] not in INITS:
        raise ValueError(f"unknown prompt init {params['init']!r}; choose one of {', '.join(INITS)}")
    if params.get("template"):
        if params["init"] == "manual":
            raise ValueError("init=manual derives the prompt from each relation's manual prompt: set template=null")
        parse_template(params["template"], fields=("sub",))
    relations = relations_of(params["task"])
    check_model(params["model"])
    train = TrainConfig.from_dict(params["train"]) if params["method"] in TRAINED else None
    return [TaskPlan(relation, train) for relation in relations]


def loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(**batch)[:, 0]  # [B, C]: one target token
    return nn.functional.cross_entropy(logits.float(), batch["labels"])


@torch.no_grad()
def precision_at_1(model: nn.Module, facts: list[Fact], candidate_ids: torch.Tensor, pad_id: int, batch_size: int) -> float:
    if not facts:
        return math.nan
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = 0
    for start in range(0, len(facts), batch_size):
        chunk = facts[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([f.encoded for f in chunk], pad_id).items()}
        predicted = model(**batch, candidate_ids=candidate_ids.to(device))[:, 0].argmax(-1).cpu()
        hits += (predicted == torch.tensor([f.label for f in chunk])).sum().item()
    model.train(was_training)
    return hits / len(facts)


@dataclass
class Candidates:
    """The benchmark words that are one token of the model, and their ids: what P@1 ranks."""
    words: list[str]
    ids: torch.Tensor

    @classmethod
    def load(cls, params: dict, tokenizer) -> "Candidates":
        vocab_words = json.loads((Path(params["data_dir"]) / params["vocab"] / "vocab.json").read_text())
        words, ids = candidate_vocabulary(vocab_words, tokenizer)
        return cls(words, torch.tensor(ids))


@dataclass
class RelationData:
    relation: str
    template: Template
    splits: dict[str, list[Fact]]  # train / dev / test facts whose answer is one token of the model
    dropped: dict[str, int]        # facts per split whose answer is not
    init_ids: list[int] | None = None  # the tokens whose embeddings the prompt starts from (init=manual)


def new_encoder(data: RelationData, lm, kind: str) -> PromptEncoder:
    """The relation's prompt encoder: random, or (init=manual) starting from its manual prompt's word embeddings."""
    embeddings = lm.model.get_input_embeddings().weight
    init = embeddings[data.init_ids].detach().float().cpu() if data.init_ids else None
    return PromptEncoder(data.template.n_prompt_tokens, embeddings.shape[1], kind, init=init)


def relation_template(method: str, relation: str, tokenizer, causal: bool, params: dict) -> tuple[Template, list[int] | None]:
    """The template `method` trains or scores for `relation`, and the token ids its [P] start from (None: random)."""
    template = parse_template(template_for(method, relation, causal, params, Path(params["data_dir"])), fields=("sub",))
    if method == "ptuning" and params["init"] == "manual":  # the manual prompt's words become continuous tokens
        text, init_ids = prompt_from_anchors(template, tokenizer, causal)
        return parse_template(text, fields=("sub",)), init_ids
    return template, None


def load_relation(relation: str, lm, params: dict, candidates: Candidates, method: str | None = None) -> RelationData:
    """One relation's facts encoded with `method`'s template (default: params' method)."""
    data_dir, method = Path(params["data_dir"]), method or params["method"]
    split_dir = data_dir / params["vocab"] / relation
    if not split_dir.is_dir():
        raise DataError(f"no prepared facts for {relation} in {split_dir.parent}: run `dvc repro prepare_lama`")
    template, init_ids = relation_template(method, relation, lm.tokenizer, lm.causal, params)
    index = {w: i for i, w in enumerate(candidates.words)}
    splits, dropped = {}, {}
    for split in ("train", "dev", "test"):
        path = split_dir / f"{split}.jsonl"
        rows = read_jsonl(path, required=("sub_label", "obj_label")) if path.exists() else []
        splits[split] = [Fact(encode(template, lm.tokenizer, {"sub": r["sub_label"]}, lm.causal,
                                     target_ids=[int(candidates.ids[index[r["obj_label"]]])],
                                     max_length=params["max_length"], truncate="sub"), index[r["obj_label"]])
                         for r in rows if r["obj_label"] in index]
        dropped[split] = len(rows) - len(splits[split])
    if not splits["test"]:
        raise DataError(f"relation {relation}: no test facts with a single-token answer for {params['model']}")
    if method in TRAINED and (not splits["train"] or not splits["dev"]):
        raise DataError(f"relation {relation}: training needs train and dev facts, found "
                        f"{len(splits['train'])} / {len(splits['dev'])}")
    return RelationData(relation, template, splits, dropped, init_ids)


def run_relation(task: TaskPlan, lm, params: dict, output_dir: Path, callbacks: list[Callback] = ()) -> RelationResult:
    """Train (unless `manual`) and evaluate one relation; export the prompt when there is one."""
    relation, config, method = task.task, task.train, params["method"]
    candidates = Candidates.load(params, lm.tokenizer)
    data = load_relation(relation, lm, params, candidates)
    template, splits, candidate_ids = data.template, data.splits, candidates.ids

    seed_everything(config.seed if config else params["train"]["seed"])
    prompt = new_encoder(data, lm, params["encoder"]) if template.n_prompt_tokens else None
    model = PromptedLM(lm.model, prompt, lm.causal, freeze_lm=method in ("manual", "ptuning"))
    pad, eval_bs = pad_id(lm.tokenizer), params["eval_batch_size"]
    evaluate = lambda m: {"dev.p1": precision_at_1(m, splits["dev"], candidate_ids, pad, eval_bs)}

    steps, history = 0, []
    if config is not None:
        items = [{"encoded": f.encoded, "label": f.label} for f in splits["train"]]

        def batch_of(chunk):
            batch = collate([c["encoded"] for c in chunk], pad)
            return {**batch, "labels": torch.tensor([c["label"] for c in chunk]), "candidate_ids": candidate_ids}

        result = fit(model, items, [len(i["encoded"].input_ids) for i in items], batch_of, loss, evaluate, config,
                     select=("dev.p1",), callbacks=callbacks, checkpoint_dir=output_dir / "checkpoint")
        steps, history = result.steps, result.history
    dev_p1 = evaluate(model)["dev.p1"] if splits["dev"] else None
    test_p1 = precision_at_1(model, splits["test"], candidate_ids, pad, eval_bs)
    prompt_dir = output_dir / "prompt" if prompt is not None else None
    if prompt is not None:
        export_prompt(prompt, prompt_dir, template.text, params["model"],
                      {"benchmark": "lama", "task": relation, "vocab": params["vocab"], "causal": lm.causal,
                       "max_length": params["max_length"], "truncate": "sub"})
        # the answers a served prompt may give: the benchmark vocabulary, as P@1 reads it
        (prompt_dir / "vocab.json").write_text((Path(params["data_dir"]) / params["vocab"] / "vocab.json").read_text())
    log.info("%s %s: test P@1 %.4f (dev %s) after %d steps", relation, method, test_p1, dev_p1, steps)
    return RelationResult(relation, test_p1, dev_p1, len(splits["train"]), len(splits["test"]), data.dropped, steps,
                          prompt_dir, history)


def run(config, output_dir: str | Path, callbacks: list[Callback] = ()) -> dict:
    """Probe every relation of `config` (a RunConfig). Writes `<output_dir>/metrics.json` and returns it:
    per-relation P@1 and their macro average, every key named by its split (`test.p1`, `dev.p1`)."""
    from components.models.catalog import load_lm

    params = config.params
    data_dir = Path(params["data_dir"])
    prepared = relation_ids(data_dir, params["vocab"])
    missing = [t.task for t in config.tasks if t.task not in prepared]
    if missing:
        raise DataError(f"no prepared facts for {', '.join(missing)} in {data_dir / params['vocab']}: "
                        "run `dvc repro prepare_lama` (or `ptuning prepare lama`)")
    lm = load_lm(params["model"])
    output_dir = Path(output_dir)
    results = []
    for i, task in enumerate(config.tasks):
        if i and params["method"].endswith("finetune"):  # every relation starts from the pretrained LM
            lm = load_lm(params["model"])
        task_dir = output_dir / task.task if len(config.tasks) > 1 else output_dir
        results.append(run_relation(task, lm, params, task_dir, callbacks))
    dev_p1 = sum(r.dev_p1 or 0.0 for r in results) / len(results)
    metrics = {
        "benchmark": "lama", "task": str(params["task"]), "model": params["model"], "method": params["method"],
        "vocab": params["vocab"],
        "test": {"p1": sum(r.test_p1 for r in results) / len(results)},
        # dev.score: the model-selection score (dev, never test) that search maximises
        "dev": {"p1": dev_p1, "score": dev_p1},
        "prompts": {r.relation: str(r.prompt_dir) for r in results if r.prompt_dir},
        # per relation, with the same keys as the run's (what a registered prompt of one relation reports)
        "tasks": {r.relation: {"test": {"p1": r.test_p1}, "dev": {"p1": r.dev_p1, "score": r.dev_p1},
                               "n_train": r.n_train, "n_test": r.n_test, "dropped": r.dropped, "steps": r.steps}
                  for r in results},
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / "history.json", json.dumps({r.relation: r.history for r in results}, indent=2))
    atomic_write(output_dir / "metrics.json", json.dumps(metrics, indent=2))  # all or nothing, even on a full disk
    return metrics
