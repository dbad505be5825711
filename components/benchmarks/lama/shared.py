"""Shared-batch P-tuning: the prompts of many LAMA relations (and seeds) trained over ONE frozen LM.

A *job* is one prompt to train: a relation's facts, a seed and its own PromptEncoder, optimizer, schedule,
batch order, early stopping and best state, exactly as `fit` keeps them for one relation. At every shared
step each active job draws its next batch (the order `length_batches` gives it alone); the rows of all jobs
go through the LM together, each row reading its own job's prompt vectors, and every job then takes its own
optimizer step. The jobs' parameters are disjoint and the LM is frozen, so a job's gradient is the one it
would get alone: with one job this is `run.run_relation`'s training, up to the float noise of other batch
shapes. A job that stops (patience on its dev P@1, or its last step) leaves the batch, its best state
restored and its test P@1 measured, and the next queued job takes its place (at most `pool` jobs at once).

Why: on a CPU the frozen LM's forward+backward costs 63 ms per example at batch 8 and 33 ms at batch 64
(SmolLM2-135M), so one relation's batch of 8 wastes half the machine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from components.benchmarks.lama.run import Candidates, Fact, RelationData, load_relation, new_encoder, precision_at_1
from components.method.model import PromptedLM
from components.method.templates import collate, pad_id
from components.training import (TrainConfig, improved, length_batches, make_accelerator, make_optimizer,
                                 make_schedule, seed_everything)


def load_relations(relations: list[str], lm, params: dict, method: str = "ptuning") -> tuple[list[RelationData], torch.Tensor]:
    """Every relation's facts encoded for `method`'s template, and the candidate ids (one vocabulary for all)."""
    candidates = Candidates.load(params, lm.tokenizer)
    return [load_relation(r, lm, params, candidates, method) for r in relations], candidates.ids


@dataclass(frozen=True)
class Job:
    """One prompt to train: a relation's facts, its training settings (the seed among them), its encoder kind."""
    key: str
    data: RelationData
    config: TrainConfig
    encoder: str = "lstm"


@dataclass
class JobResult:
    key: str
    relation: str
    seed: int
    dev_p1: float    # the best dev P@1: the state kept
    test_p1: float   # of that state
    steps: int
    best_step: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)  # {"step", "epoch", "dev.p1"} per evaluation
    seconds: float = 0.0  # from joining the batch to leaving it (shared with the jobs beside it)
    encoder_state: dict | None = None


class _Job:
    """One prompt's training state; the same bookkeeping as `fit` for a single relation."""

    def __init__(self, job: Job, lm, device):
        key, data, config, encoder_kind = job.key, job.data, job.config, job.encoder
        self.key, self.data, self.config = key, data, config
        seed_everything(config.seed)  # as run_relation: the encoder's initialisation depends on the seed only
        self.encoder = new_encoder(data, lm, encoder_kind).to(device)
        self.optimizer = make_optimizer(self.encoder, config)
        self.lengths = [len(f.encoded.input_ids) for f in data.splits["train"]]
        self.steps_per_epoch = math.ceil(len(self.lengths) / config.batch_size)
        self.total_steps = _planned_steps(job)
        self.scheduler = make_schedule(self.optimizer, config, self.total_steps, self.steps_per_epoch)
        self.step = self.epoch = self.position = self.best_step = self.bad_evals = 0
        self.batches: list[list[int]] | None = None
        self.best: dict | None = None
        self.best_state = self._state()
        self.history: list[dict] = []
        self.started = time.time()

    def _state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    def next_batch(self) -> list[Fact]:
        if self.batches is None:
            self.batches = length_batches(self.lengths, self.config.batch_size, self.config.seed, self.epoch,
                                          self.config.length_bucketing)
        facts = [self.data.splits["train"][i] for i in self.batches[self.position]]
        self.position += 1
        return facts

    def finish_step(self) -> bool:
        """After the optimizer step: True when an evaluation is due."""
        if self.config.max_grad_norm:
            nn.utils.clip_grad_norm_(self.encoder.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        epoch_end = self.position == len(self.batches)
        if epoch_end:
            self.epoch, self.position, self.batches = self.epoch + 1, 0, None
        every = self.config.eval_every
        return (every is not None and self.step % every == 0) or (every is None and epoch_end) or self.done_training

    @property
    def done_training(self) -> bool:
        return self.step >= self.total_steps

    def record(self, metrics: dict) -> bool:
        """An evaluation's figures; True when the job stops (patience spent or last step)."""
        better = improved(metrics, self.best, ("dev.p1",))
        if better:
            self.best, self.best_step, self.bad_evals = metrics, self.step, 0
            self.best_state = self._state()
        else:
            self.bad_evals += 1
        self.history.append({"step": self.step, "epoch": self.epoch, **metrics})
        return self.stopped_early or self.done_training

    @property
    def stopped_early(self) -> bool:
        return self.config.patience is not None and self.bad_evals >= self.config.patience


class _StackedPrompt(nn.Module):
    """The prompt vectors of several jobs, one after another: row r of a mixed batch reads its job's block
    through prompt_index + that block's offset."""

    def __init__(self, encoders: list[nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)

    def forward(self) -> torch.Tensor:
        return torch.cat([e() for e in self.encoders])


def _mixed_batch(rows: list[tuple[_Job, Fact]], model: PromptedLM, pad: int, device) -> dict:
    """Collate rows of several jobs; the model's prompt becomes the stack of their encoders."""
    jobs = list(dict.fromkeys(job for job, _ in rows))
    offsets, total = {}, 0
    for job in jobs:
        offsets[job], total = total, total + job.encoder.n_tokens
    model.prompt = _StackedPrompt([job.encoder for job in jobs])
    batch = collate([fact.encoded for _, fact in rows], pad)
    shift = torch.tensor([offsets[job] for job, _ in rows]).unsqueeze(1)
    batch["prompt_index"] = torch.where(batch["prompt_index"] >= 0, batch["prompt_index"] + shift, batch["prompt_index"])
    return {k: v.to(device) for k, v in batch.items()}


def _chunks(rows: list[tuple[_Job, Fact]], size: int):
    rows = sorted(rows, key=lambda r: len(r[1].encoded.input_ids))  # similar lengths pad little
    return [rows[s:s + size] for s in range(0, len(rows), size)]


def train_shared(
    lm,
    jobs: list[Job],
    candidate_ids: torch.Tensor,
    pool: int = 8,
    lm_batch: int = 64,
    eval_batch_size: int = 64,
    on_job_end: Callable[[JobResult], None] | None = None,
    on_progress: Callable[[dict], None] | None = None,
    show_progress: bool = True,
    test: bool = True,
) -> tuple[list[JobResult], dict]:
    """Train every job; at most `pool` jobs share a step, whose rows go through the LM `lm_batch` at a time
    (precision: the first job's setting). Calls `on_job_end`
    as each job finishes (to save it: a killed run keeps what finished) and `on_progress` after every shared
    step. Returns the results and timing figures (seconds training, evaluating dev and test; examples).
    test=False: no test P@1 (nan), for choosing a recipe on dev alone."""
    from tqdm import tqdm

    if pool < 1 or lm_batch < 1:
        raise ValueError(f"pool and lm_batch must be >= 1, got {pool} and {lm_batch}")
    accelerator = make_accelerator(jobs[0].config.precision if jobs else "auto")
    device = accelerator.device
    lm.model.to(device)
    model = PromptedLM(lm.model, None, lm.causal, freeze_lm=True)
    model.train()  # the frozen LM stays in eval mode (no dropout); only the encoders train
    pad, candidates = pad_id(lm.tokenizer), candidate_ids.to(device)
    queue = list(jobs)
    active: list[_Job] = []
    results: list[JobResult] = []
    # train_cpu_s: this process's CPU time in training steps (steadier than wall time on a shared machine)
    timing = {"train_s": 0.0, "train_cpu_s": 0.0, "dev_eval_s": 0.0, "test_eval_s": 0.0, "train_examples": 0,
              "shared_steps": 0}

    def admit():
        while queue and len(active) < pool:
            active.append(_Job(queue.pop(0), lm, device))

    admit()
    bar = tqdm(total=sum(j.total_steps for j in active) + sum(map(_planned_steps, queue)), unit="step",
               desc="P-tuning", disable=not show_progress, mininterval=2.0, dynamic_ncols=True)
    started = time.time()
    while active:
        t0, cpu0 = time.time(), time.process_time()
        rows = [(job, fact) for job in active for fact in job.next_batch()]
        weight = {job: 1.0 / sum(1 for j, _ in rows if j is job) for job in active}  # each job's loss: a mean
        for chunk in _chunks(rows, lm_batch):
            batch = _mixed_batch(chunk, model, pad, device)
            labels = torch.tensor([fact.label for _, fact in chunk], device=device)
            weights = torch.tensor([weight[job] for job, _ in chunk], device=device)
            with accelerator.autocast():
                logits = model(**batch, candidate_ids=candidates)[:, 0]
            losses = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
            (losses * weights).sum().backward()
        due = [job for job in active if job.finish_step()]
        timing["train_s"] += time.time() - t0
        timing["train_cpu_s"] += time.process_time() - cpu0
        timing["train_examples"] += len(rows)
        timing["shared_steps"] += 1
        bar.update(len(active))

        t0 = time.time()
        finished = [job for job, p1 in zip(due, _dev_p1(due, model, pad, device, candidates, eval_batch_size, accelerator))
                    if job.record({"dev.p1": p1})]
        timing["dev_eval_s"] += time.time() - t0
        for job in finished:
            active.remove(job)
            t0 = time.time()
            result = _finish(job, model, lm, candidates, pad, eval_batch_size, accelerator, test)
            timing["test_eval_s"] += time.time() - t0
            results.append(result)
            bar.update(job.total_steps - job.step)  # steps it will not take: the ETA counts only what is left
            if on_job_end is not None:
                on_job_end(result)
        admit()
        if not queue:
            bar.total = bar.n + sum(j.total_steps - j.step for j in active)
        done, remaining = len(results), len(active) + len(queue)
        bar.set_postfix_str(f"prompts done {done}/{done + remaining}", refresh=False)
        if on_progress is not None:
            rate = bar.n / max(time.time() - started, 1e-9)
            on_progress({"steps": bar.n, "total_steps": bar.total, "done": done, "remaining": remaining,
                         "eta_s": (bar.total - bar.n) / rate if rate else None})
    bar.close()
    timing["seconds"] = time.time() - started
    timing["examples_per_s"] = timing["train_examples"] / max(timing["train_s"], 1e-9)
    return results, timing


def _planned_steps(job: Job) -> int:
    """The steps a queued job will take at most (the progress bar's total)."""
    config = job.config
    per_epoch = math.ceil(len(job.data.splits["train"]) / config.batch_size)
    return min(config.max_steps or math.inf, (config.epochs or math.ceil(config.max_steps / per_epoch)) * per_epoch)


@torch.no_grad()
def _dev_p1(jobs: list[_Job], model: PromptedLM, pad: int, device, candidates, batch_size: int, accelerator) -> list[float]:
    """Dev P@1 of several jobs at once, their facts in mixed batches."""
    if not jobs:
        return []
    hits = {job: 0 for job in jobs}
    for chunk in _chunks([(job, fact) for job in jobs for fact in job.data.splits["dev"]], batch_size):
        batch = _mixed_batch(chunk, model, pad, device)
        with accelerator.autocast():
            predicted = model(**batch, candidate_ids=candidates)[:, 0].argmax(-1).cpu()
        for (job, fact), guess in zip(chunk, predicted.tolist()):
            hits[job] += guess == fact.label
    return [hits[job] / len(job.data.splits["dev"]) for job in jobs]


def _finish(job: _Job, model: PromptedLM, lm, candidates, pad: int, batch_size: int, accelerator, test: bool) -> JobResult:
    job.encoder.load_state_dict(job.best_state)
    alone = PromptedLM(lm.model, job.encoder, lm.causal, freeze_lm=True)
    with accelerator.autocast():
        test_p1 = precision_at_1(alone, job.data.splits["test"], candidates, pad, batch_size) if test else math.nan
    return JobResult(job.key, job.data.relation, job.config.seed, job.best["dev.p1"], test_p1, job.step,
                     job.best_step, job.stopped_early, job.history, time.time() - job.started,
                     {k: v.cpu() for k, v in job.best_state.items()})
