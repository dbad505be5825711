"""Shared-batch P-tuning: the prompts of many LAMA relations (and seeds) trained over ONE frozen LM.

A *job* is one prompt to train: a relation's facts, a seed and its own PromptEncoder, optimizer, schedule,
batch order, early stopping and best state, exactly as `fit` keeps them for one relation. At every shared
step each active job draws its next batch (the order `length_batches` gives it alone); the rows of all jobs
go through the LM together, each row reading its own job's prompt vectors, and every job then takes its own
optimizer step. The jobs' parameters are disjoint and the LM is frozen, so a job's gradient is the one it
would get alone: with one job this is `run.run_relation`'s training, up to the float noise of other batch
shapes. A job that stops (patience on its dev P@1, or its last step) leaves the batch, its best state
restored and its test P@1 measured, and the next queued job takes its place (at most `pool` jobs at once).

A job's figures depend on its neighbours in the batch (float noise), so a killed pool continues as it was: with
`checkpoint_dir`, its whole state is saved (pool_state.PoolCheckpoint) and the same call resumes it exactly.

Why: on a CPU the frozen LM's forward+backward costs 63 ms per example at batch 8 and 33 ms at batch 64
(SmolLM2-135M), so one relation's batch of 8 wastes half the machine.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from components.benchmarks.lama.run import Candidates, Fact, RelationData, load_relation, new_encoder, precision_at_1
from components.method.model import PromptedLM
from components.method.templates import collate, pad_id
from components.training import (TrainConfig, improved, length_batches, make_accelerator, make_optimizer,
                                 make_schedule, seed_everything)
from components.benchmarks.lama.pool_state import Heartbeat, PoolCheckpoint, job_record, restore_rng, rng_state

log = logging.getLogger(__name__)
# Defaults of `train_shared` (read when it is called, so that a test can lower them in a subprocess).
CHECKPOINT_EVERY_S = 60.0  # the pool's state at most this often (at an evaluation); a checkpoint of 14 prompts
                           # with their optimizer states is about 150 MB for SmolLM2-135M's MLP encoder
HEARTBEAT_S = 60.0         # without a progress bar, one progress line on the `components` logger this often


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
        self.job, self.key, self.data, self.config = job, key, data, config
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

    def snapshot(self, prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """Everything a resumed job needs, as JSON and CPU tensors named `<prefix>...`. The best state is stored
        only when it differs from the encoder's (it was kept at an earlier step)."""
        cpu = lambda t: t.detach().to("cpu", copy=True).contiguous()
        tensors = {f"{prefix}encoder.{k}": cpu(v) for k, v in self.encoder.state_dict().items()}
        best_is_current = self.best_step == self.step
        if not best_is_current:
            tensors.update({f"{prefix}best.{k}": cpu(v) for k, v in self.best_state.items()})
        optimizer = self.optimizer.state_dict()
        for pid, values in optimizer["state"].items():
            tensors.update({f"{prefix}optimizer.{pid}.{name}": cpu(v) for name, v in values.items()})
        meta = {"step": self.step, "epoch": self.epoch, "position": self.position, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "batches": self.batches, "best": self.best, "history": self.history,
                "best_is_current": best_is_current, "elapsed_s": time.time() - self.started,
                "optimizer": {"param_groups": optimizer["param_groups"],
                              "state": {str(pid): sorted(values) for pid, values in optimizer["state"].items()}},
                "scheduler": self.scheduler.state_dict()}
        return meta, tensors

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """The state `snapshot` saved, onto this freshly built job."""
        device = next(self.encoder.parameters()).device
        named = lambda part: {k[len(prefix) + len(part) + 1:]: v for k, v in tensors.items() if k.startswith(f"{prefix}{part}.")}
        self.encoder.load_state_dict(named("encoder"))
        self.best_state = self._state() if meta["best_is_current"] else {k: v.to(device) for k, v in named("best").items()}
        self.optimizer.load_state_dict({
            "param_groups": meta["optimizer"]["param_groups"],
            "state": {int(pid): {name: tensors[f"{prefix}optimizer.{pid}.{name}"] for name in names}
                      for pid, names in meta["optimizer"]["state"].items()}})
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.epoch, self.position = meta["step"], meta["epoch"], meta["position"]
        self.best_step, self.bad_evals, self.best = meta["best_step"], meta["bad_evals"], meta["best"]
        self.batches, self.history = meta["batches"], meta["history"]
        self.started = time.time() - meta["elapsed_s"]

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
    checkpoint_dir: str | Path | None = None,
    on_checkpoint: Callable[[], None] | None = None,
    checkpoint_every_s: float | None = None,
    log_every_s: float | None = None,
) -> tuple[list[JobResult], dict]:
    """Train every job; at most `pool` jobs share a step, whose rows go through the LM `lm_batch` at a time
    (precision: the first job's setting). Calls `on_job_end`
    as each job finishes (to save it: a killed run keeps what finished) and `on_progress` after every shared
    step. Returns the results and timing figures (seconds training, evaluating dev and test; examples).
    test=False: no test P@1 (nan), for choosing a recipe on dev alone.

    checkpoint_dir: the pool's state is saved there (PoolCheckpoint) when it starts and after an evaluation at
    most every `checkpoint_every_s` (default CHECKPOINT_EVERY_S), `on_checkpoint` called just before each save
    (to count the time spent so far); a finished pool removes it. When it holds a checkpoint, `jobs` must be
    the jobs it had pending (`PoolCheckpoint.pending`, in that order) and the pool continues from there: every
    figure is then the one the pool would have given without the interruption, the returned results hold the
    jobs finished after it, the timing counts the work before it too. Without a progress bar, one line
    every `log_every_s` (default HEARTBEAT_S) says how far it is."""
    from tqdm import tqdm

    if pool < 1 or lm_batch < 1:
        raise ValueError(f"pool and lm_batch must be >= 1, got {pool} and {lm_batch}")
    checkpoint_every_s = CHECKPOINT_EVERY_S if checkpoint_every_s is None else checkpoint_every_s
    heartbeat = Heartbeat(HEARTBEAT_S if log_every_s is None else log_every_s)
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
    settings = {"pool": pool, "lm_batch": lm_batch, "eval_batch_size": eval_batch_size, "test": test}
    store = PoolCheckpoint(checkpoint_dir) if checkpoint_dir is not None and jobs else None
    finished_before, steps_before, elapsed_before = 0, 0, 0.0

    def admit():
        admitted = []
        while queue and len(active) + len(admitted) < pool:
            admitted.append(_Job(queue.pop(0), lm, device))
        # each prompt's start is evaluated as `fit` does: a candidate, and its learning curve's first point
        t0 = time.time()
        for job, p1 in zip(admitted, _dev_p1(admitted, model, pad, device, candidates, eval_batch_size, accelerator)):
            job.record({"dev.p1": p1})
        timing["dev_eval_s"] += time.time() - t0
        active.extend(admitted)

    if store is not None and store.read() is not None:
        meta, tensors = store.load()
        given = [job_record(job) for job in jobs]
        if given != meta["jobs"] or meta["settings"] != settings:
            raise ValueError(f"the pool checkpoint in {store.directory} holds other jobs or settings than this call's "
                             "(pass PoolCheckpoint.pending's jobs, or clear it to start afresh)")
        by_key = {job.key: job for job in jobs}
        for i, key in enumerate(meta["active"]):
            restored = _Job(by_key[key], lm, device)
            restored.restore(meta["job_state"][key], tensors, f"job{i}.")
            active.append(restored)
        queue = [by_key[key] for key in meta["queue"]]
        timing.update(meta["timing"])
        finished_before, steps_before, elapsed_before = meta["finished"], meta["progress_steps"], meta["elapsed_s"]
        restore_rng(meta["rng"], tensors)
        log.info("P-tuning: resuming the pool checkpointed at shared step %d (%d prompts active, %d queued, %d done "
                 "before)", meta["shared_step"], len(active), len(queue), finished_before)
    else:
        admit()
    # prompt steps done and planned (a shared step is one per active job), counted here: a disabled bar counts none
    n_steps = steps_before
    total = n_steps + sum(j.total_steps - j.step for j in active) + sum(map(_planned_steps, queue))
    bar = tqdm(total=total, initial=n_steps, unit="step", desc="P-tuning", disable=not show_progress, mininterval=2.0,
               dynamic_ncols=True)
    started = time.time()

    def save_checkpoint():
        if on_checkpoint is not None:
            on_checkpoint()  # first: the time counted then covers at least the checkpoint's
        order = [*active, *queue]
        meta = {"format": 1, "settings": settings, "shared_step": timing["shared_steps"],
                "jobs": [job_record(j if isinstance(j, Job) else j.job) for j in order],
                "active": [j.key for j in active], "queue": [j.key for j in queue],
                "finished": finished_before + len(results), "progress_steps": n_steps,
                "elapsed_s": elapsed_before + time.time() - started,
                "timing": {**timing, "seconds": elapsed_before + time.time() - started}, "job_state": {}}
        tensors = {}
        for i, job in enumerate(active):
            meta["job_state"][job.key], job_tensors = job.snapshot(f"job{i}.")
            tensors.update(job_tensors)
        meta["rng"] = rng_state(tensors)
        store.save(meta, tensors)

    last_checkpoint = time.monotonic()
    if store is not None and store.read() is None and active:
        save_checkpoint()  # the pool's jobs and starting state: a kill at any later moment resumes this pool
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
        n_steps += len(active)
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
            n_steps += job.total_steps - job.step  # steps it will not take: the ETA counts only what is left
            bar.update(job.total_steps - job.step)
            if on_job_end is not None:
                on_job_end(result)
        admit()
        if not queue:
            total = bar.total = n_steps + sum(j.total_steps - j.step for j in active)
        done, remaining = finished_before + len(results), len(active) + len(queue)
        bar.set_postfix_str(f"prompts done {done}/{done + remaining}", refresh=False)
        rate = (n_steps - steps_before) / max(time.time() - started, 1e-9)
        eta = (total - n_steps) / rate if rate else None
        if on_progress is not None:
            on_progress({"steps": n_steps, "total_steps": total, "done": done, "remaining": remaining, "eta_s": eta})
        if not show_progress:
            heartbeat("P-tuning: shared step %d, prompt steps %d/%d, prompts done %d/%d, about %.1f min left",
                      timing["shared_steps"], n_steps, total, done, done + remaining, (eta or 0.0) / 60)
        if store is not None and due and active and time.monotonic() - last_checkpoint >= checkpoint_every_s:
            save_checkpoint()
            last_checkpoint = time.monotonic()
    bar.close()
    if store is not None:
        store.clear()
    timing["seconds"] = elapsed_before + time.time() - started
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
