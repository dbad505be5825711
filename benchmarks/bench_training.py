#!/usr/bin/env python
"""Training-step throughput of P-tuning: ours (PromptedLM + components.training.fit) against HF PEFT's P-tuning.

What one measured step is, on both sides: the real `components.training.fit` loop (accelerate, bf16 autocast
where the precision asks for it, collate + host-to-device copy, forward, loss, backward, optional grad clipping,
optimizer.step, zero_grad, scheduler.step), with the optimizer settings of params/lama.yaml (Adam, weight decay
5e-4, no clipping). Steps are timed by a `Callback.on_step` hook (after `torch.cuda.synchronize()` on a GPU):
`--warmup` steps are run first and not timed, then `--steps` timed steps.

  ours  PromptedLM(lm, PromptEncoder): continuous prompts at the template's [P] positions, the LM body over the
        sequence, the vocabulary head only at the read position ([MASK], or the token before the target);
        loss = cross-entropy over the full vocabulary at that position (components/benchmarks/lama/run.py's `loss`
        with every token a candidate: the candidate restriction LAMA uses is never more expensive).
  peft  peft.get_peft_model(lm, PromptEncoderConfig(...)): the same number of virtual tokens, prepended as a
        prefix; the standard forward with `labels` (-100 everywhere but the target), which computes the
        full-vocabulary logits at every position: its real cost. Causal LMs: task_type CAUSAL_LM. Masked LMs:
        PEFT has no masked-LM task type; TOKEN_CLS is the wrapper that prepends the prompts and passes
        per-token labels through to `*ForMaskedLM` (the -100 labels of the prefix are added here).
        Prompt encoder: encoder_reparameterization_type LSTM (hidden = dim/2 per direction, 2 layers, as ours)
        or MLP, matching --encoder. The base LM is in eval mode when frozen, as ours is (no dropout).

Data (the same for both): synthetic LAMA-like facts, subjects of 1-3 made-up name-like words (about 4 BERT
word pieces on average, as LAMA T-REx subjects), template `[P*3] {sub} [P*3] [Y] [P*3]` (masked LMs, 9 prompt
tokens) / `[P*3] {sub} [P*3] [Y]` (causal LMs, 6 prompt tokens).

Modes: `frozen` (P-tuning proper: only the prompt encoder learns; the LM keeps no gradients) and `joint`
(the LM is trained too).

Reported per row (rates from the median step time, robust to other processes on a shared machine; the mean
is in the JSON): examples/s, tokens/s (non-padding tokens including prompt tokens), peak memory
(CUDA: torch.cuda.max_memory_allocated over the training run, weights and optimizer state included;
CPU: peak RSS over the training run minus RSS before it, i.e. gradients + optimizer state + activations),
and on a GPU the model FLOPs utilisation (MFU) against the chip's bf16 dense peak:
    model FLOPs/s = k * N * tokens/s,  k = 6 (joint: forward 2N, backward 4N incl. weight gradients)
                                       k = 4 (frozen: forward 2N + backward through activations 2N, no weight grads)
    N = non-embedding parameters of the LM body actually applied per token (ALBERT's shared layer counted
        once per layer application); the vocabulary head and attention's O(L^2) term are not counted (prompts
        of ~20 tokens make the latter negligible), so both sides get the same model FLOPs for the same tokens
        and their MFU ratio is their throughput ratio.
The ratio column is ours/PEFT in examples/s for the same model, mode and batch.

Every case runs in a fresh subprocess by default (clean peak-memory figures; no allocator state carried over).
On a shared CPU machine, `--threads 1 --repeats 2` gives steadier figures; the CPU-time columns (process CPU
time per step) measure the work done whatever else runs; `--ab` goes further for a diagnosis: both sides
in one process, their steps alternating, per-phase minimum times. Both sides use fit()'s optimizer, fused
Adam (the same code on both sides).

    python benchmarks/bench_training.py --small                      # CPU, reduced-depth configs, a few minutes
    python benchmarks/bench_training.py --device cuda                # the paper-sized models, on a GPU
    python benchmarks/bench_training.py --device cuda --models random:gpt2-medium --batch-size 8 64
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("PTUNING_SHARED", REPO.parent / "shared")).resolve()

# --- models ------------------------------------------------------------------------------------------------

# `small:NAME`: the catalogue's configuration of NAME (random:NAME, or the real SmolLM2's), same widths and
# vocabulary, reduced depth, random weights: CPU runs of a few minutes. Everything else is components.models.catalog's.
SMALL_LAYERS = {"bert-base-cased": 2, "bert-large-cased": 4, "albert-xxlarge-v2": 1, "gpt2": 2, "gpt2-medium": 4,
                "smollm2-135m": 5}
FULL_MODELS = ["random:bert-base-cased", "random:bert-large-cased", "random:albert-xxlarge-v2", "random:gpt2",
               "random:gpt2-medium", "smollm2-135m"]
SMALL_MODELS = [f"small:{n}" for n in ("bert-base-cased", "bert-large-cased", "albert-xxlarge-v2", "gpt2",
                                        "gpt2-medium")] + ["smollm2-135m"]  # the real one: small enough for a CPU

# bf16 dense peak, FLOP/s, by device name (first match wins).
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12)]


def load_model(name: str):
    """(model, tokenizer, causal, source) for a catalogue name, or `small:NAME` (see SMALL_LAYERS)."""
    from components.models.catalog import CATALOGUE, load_lm, load_tokenizer, model_dir

    if not name.startswith("small:"):
        lm = load_lm(name)
        return lm.model, lm.tokenizer, lm.causal, "components.models.catalog.load_lm"
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    base = name.split(":", 1)[1]
    layers = SMALL_LAYERS[base]
    if f"random:{base}" in CATALOGUE:
        entry = CATALOGUE[f"random:{base}"]
        tokenizer, causal = load_tokenizer(f"random:{base}"), entry.causal
        config = AutoConfig.for_model(**{"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                                         **entry.config})
    else:  # a real catalogue model (smollm2-135m): its own config
        directory = model_dir(base)
        config, tokenizer, causal = AutoConfig.from_pretrained(directory), load_tokenizer(base), CATALOGUE[base].causal
    setattr(config, "n_layer" if config.model_type == "gpt2" else "num_hidden_layers", layers)
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = auto.from_config(config, dtype=torch.float32).eval()
    return model, tokenizer, causal, f"catalogue config of {base}, {layers} layers, random weights"


def compute_params(lm) -> int:
    """Non-embedding parameters of the LM body applied per token (see the module docstring)."""
    from torch import nn

    body = lm.base_model
    embedding = sum(p.numel() for m in body.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in body.parameters()) - embedding
    config = lm.config
    if config.model_type == "albert":  # one set of layer weights per group, applied num_hidden_layers times
        groups = body.encoder.albert_layer_groups
        shared = sum(p.numel() for p in groups.parameters())
        total += shared * (config.num_hidden_layers // config.num_hidden_groups - 1)
    return total


# --- synthetic LAMA-like data ------------------------------------------------------------------------------

_SYLLABLES = ("ka", "lo", "ber", "an", "tri", "mo", "sen", "vel", "dor", "is", "ran", "gu", "el", "pha", "nor",
              "sto", "wi", "ler", "cas", "tin", "ho", "mar", "ze", "quin", "ul", "fre", "da", "rick", "ost", "ya")


def synthetic_subjects(n: int, seed: int) -> list[str]:
    """Name-like subjects of 1-3 made-up words (2-3 syllables each): ~4 BERT word pieces, as T-REx subjects."""
    rng = random.Random(seed)
    subjects = []
    for _ in range(n):
        words = rng.choices((1, 2, 3), weights=(0.3, 0.55, 0.15))[0]
        subjects.append(" ".join("".join(rng.choices(_SYLLABLES, k=rng.randint(2, 3))).capitalize()
                                 for _ in range(words)))
    return subjects


def make_facts(tokenizer, vocab_size: int, n: int, seed: int) -> list[tuple[str, int]]:
    """(subject, single-token object id) pairs; objects are ids of ordinary word tokens of this vocabulary."""
    rng = random.Random(seed + 1)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    objects = [i for i in range(min(vocab_size, len(tokenizer)))
               if i not in special][1000:]  # skip the low ids: [unused], bytes, punctuation
    return [(s, rng.choice(objects)) for s in synthetic_subjects(n, seed)]


# --- the two sides ------------------------------------------------------------------------------------------

def build_ours(lm, tokenizer, causal: bool, facts, encoder: str, freeze: bool):
    import torch

    from components.benchmarks.lama.run import loss as loss_fn  # every vocabulary token a candidate: no candidate_ids
    from components.method.model import PromptedLM, PromptEncoder
    from components.method.templates import collate, encode, pad_id, parse_template

    template = parse_template("[P*3] {sub} [P*3] [Y]" if causal else "[P*3] {sub} [P*3] [Y] [P*3]", fields=("sub",))
    items = [(encode(template, tokenizer, {"sub": s}, causal, target_ids=[t]), t) for s, t in facts]
    pad = pad_id(tokenizer)
    prompt = PromptEncoder(template.n_prompt_tokens, lm.get_input_embeddings().embedding_dim, encoder)
    model = PromptedLM(lm, prompt, causal, freeze_lm=freeze)

    def collate_fn(chunk):
        batch = collate([e for e, _ in chunk], pad)
        return {**batch, "labels": torch.tensor([t for _, t in chunk])}

    lengths = [len(e.input_ids) for e, _ in items]
    return model, items, lengths, collate_fn, loss_fn, template.n_prompt_tokens


def build_peft(lm, tokenizer, causal: bool, facts, encoder: str, freeze: bool, n_virtual: int):
    import torch
    from peft import PromptEncoderConfig, TaskType, get_peft_model
    from torch import nn

    from components.method.templates import pad_id, piece_ids

    dim = lm.get_input_embeddings().embedding_dim
    config = PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM if causal else TaskType.TOKEN_CLS,
        num_virtual_tokens=n_virtual, token_dim=dim,
        encoder_reparameterization_type="LSTM" if encoder == "lstm" else "MLP",
        encoder_hidden_size=max(dim // 2, 1) if encoder == "lstm" else dim,
        encoder_num_layers=2, encoder_dropout=0.0)
    peft_model = get_peft_model(lm, config)
    if not freeze:
        peft_model.get_base_model().requires_grad_(True)

    class PeftLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.peft = peft_model

        def train(self, mode: bool = True):
            super().train(mode)
            if freeze:
                self.peft.get_base_model().eval()  # as PromptedLM: a frozen LM runs without dropout
            return self

        def forward(self, input_ids, attention_mask, labels):
            return self.peft(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    pad = pad_id(tokenizer)
    items = []
    for subject, target in facts:
        sub = piece_ids(tokenizer, subject)  # as ours: the subject follows prompts
        if causal:
            ids = sub + [target]
            labels = [-100] * len(sub) + [target]  # the model shifts: the last-but-one position predicts target
        else:
            ids = [tokenizer.cls_token_id] + sub + [tokenizer.mask_token_id] + [tokenizer.sep_token_id]
            labels = [-100] * n_virtual + [-100] * (1 + len(sub)) + [target, -100]  # TOKEN_CLS adds no prefix labels
        items.append((ids, labels))

    def collate_fn(chunk):
        width = max(len(ids) for ids, _ in chunk)
        label_width = max(len(lab) for _, lab in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), label_width), -100, dtype=torch.long)
        for row, (ids, lab) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
            labels[row, :len(lab)] = torch.tensor(lab)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def loss_fn(m, batch):
        return m(**batch)

    lengths = [len(ids) + n_virtual for ids, _ in items]
    return PeftLM(), items, lengths, collate_fn, loss_fn


# --- memory -------------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets the peak RSS to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _RssSampler:
    """Fallback where clear_refs is not writable: sample the RSS every 5 ms."""

    def __init__(self):
        import threading

        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


# --- one case -----------------------------------------------------------------------------------------------

def run_case(case: dict) -> dict:
    device = case["device"]
    if device == "cpu":  # fit() picks CUDA whenever it sees one (honoured in a fresh worker process)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from components.training import Callback, TrainConfig, fit

    cuda = device == "cuda"
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device")
    torch.manual_seed(0)
    lm, tokenizer, causal, source = load_model(case["model"])
    n_params = compute_params(lm)
    lm_params = sum(p.numel() for p in lm.parameters())
    vocab = lm.get_output_embeddings().weight.shape[0]
    steps, warmup, batch = case["steps"], case["warmup"], case["batch_size"]
    facts = make_facts(tokenizer, vocab, batch * (steps + warmup), seed=case["seed"])
    freeze = case["mode"] == "frozen"
    n_virtual = 6 if causal else 9
    torch.manual_seed(1)
    if case["impl"] == "ours":
        model, items, lengths, collate_fn, loss_fn, n_virtual = build_ours(lm, tokenizer, causal, facts,
                                                                           case["encoder"], freeze)
    else:
        model, items, lengths, collate_fn, loss_fn = build_peft(lm, tokenizer, causal, facts, case["encoder"],
                                                               freeze, n_virtual)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    counts = {"pending": [0, 0, 0], "per_step": []}  # examples, tokens (non-pad), padded tokens

    def counting_collate(chunk):
        batch_ = collate_fn(chunk)
        mask = batch_["attention_mask"]
        n_prefix = 0 if case["impl"] == "ours" else n_virtual  # PEFT adds its prefix inside the model
        counts["pending"][0] += len(chunk)
        counts["pending"][1] += int(mask.sum()) + n_prefix * len(chunk)
        counts["pending"][2] += mask.numel() + n_prefix * len(chunk)
        return batch_

    class Timer(Callback):
        def __init__(self):
            self.times, self.cpu_times, self.precision = [], [], None

        def on_train_begin(self, info):
            self.precision = info["precision"]  # what fit's accelerator really uses: "bf16" or "no"

        def on_step(self, step, loss, lr):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.cpu_times.append(time.process_time())
            counts["per_step"].append(tuple(counts["pending"]))
            counts["pending"] = [0, 0, 0]
            self.last_loss = loss

    from components.config import load_params

    train = load_params("lama", REPO)["train"]  # the library's own optimiser settings (Adam, weight decay)
    train.update(batch_size=batch, grad_accum=case["grad_accum"], epochs=1, max_steps=warmup + steps,
                 eval_every=None, patience=None, precision=case["precision"], schedule="constant",
                 length_bucketing=True, seed=case["seed"])
    config = TrainConfig.from_dict(train)
    timer = Timer()

    if cuda:
        lm.to("cuda")  # fit() would move it anyway; the baseline below then counts the weights
        model.to("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:  # weights loaded from safetensors are memory-mapped: page them in, so the baseline counts them
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.sum()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base_rss = _rss_bytes()
    use_hwm = not cuda and _reset_hwm() and _hwm_bytes() is not None
    sampler = _RssSampler() if not cuda and not use_hwm else contextlib.nullcontext()
    with sampler:
        result = fit(model, items, lengths, counting_collate, loss_fn, lambda m: {"score": 0.0}, config,
                     select=("score",), callbacks=[timer])
    if result.steps != warmup + steps:
        raise RuntimeError(f"fit ran {result.steps} steps, expected {warmup + steps}")

    # Rates from the median step time: robust to a busy machine (other processes stealing a core for a step).
    durations = [b - a for a, b in zip(timer.times[warmup - 1:], timer.times[warmup:])]
    median = statistics.median(durations)
    cpu = [b - a for a, b in zip(timer.cpu_times[warmup - 1:], timer.cpu_times[warmup:])]
    timed = counts["per_step"][warmup:]
    examples, tokens, padded = (sum(c[i] for c in timed) / len(timed) for i in range(3))  # per step
    out = {**case, "source": source, "causal": causal, "n_prompt_tokens": n_virtual, "lm_params": lm_params,
           "compute_params": n_params, "trainable_params": trainable, "step_seconds": durations,
           "examples_per_step": examples, "tokens_per_step": tokens, "padded_tokens_per_step": padded,
           "examples_per_s": examples / median, "tokens_per_s": tokens / median,
           "examples_per_s_mean": examples * len(durations) / sum(durations),
           "step_ms": 1000 * median, "cpu_ms_per_step": 1000 * statistics.median(cpu), "final_loss": timer.last_loss,
           "mixed_precision": timer.precision, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        name = torch.cuda.get_device_name()
        peak_flops = next((f for key, f in PEAK_BF16 if key in name), None)
        k = 4 if freeze else 6
        flops = k * n_params * out["tokens_per_s"]
        out.update(peak_mem_mib=peak / 2**20, peak_mem_delta_mib=(peak - base_mem) / 2**20,
                   mem_kind="cuda max_memory_allocated", gpu=name, model_tflops=flops / 1e12,
                   mfu=flops / peak_flops if peak_flops and timer.precision == "bf16" else None,
                   peak_tflops_bf16=peak_flops and peak_flops / 1e12, flops_formula=f"{k}*N*tokens")
    else:
        peak = _hwm_bytes() if use_hwm else sampler.peak
        out.update(peak_mem_mib=(peak - base_rss) / 2**20, mem_kind="cpu peak RSS delta"
                   + (" (VmHWM)" if use_hwm else " (sampled)"), gpu=None, mfu=None)
    return out


# --- A/B: both sides in one process, steps alternating --------------------------------------------------------

def run_ab(model_name: str, mode: str, args, device: str) -> dict:
    """Per-phase times of ours and PEFT with their steps interleaved (A B A B ...) in one process, so that both
    see the same machine: forward+loss, backward, optimizer.step, zero_grad, as fit runs them (same optimizer
    and parameter groups, bf16 autocast when fit would use it). CPU: process CPU time; GPU: synchronised wall
    time. Min (the table: a busy machine only ever slows a step down) and median over the steps after the
    first (warm-up) one."""
    import torch

    from components.training import TrainConfig, make_accelerator, make_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device == "cuda"
    freeze = mode == "frozen"
    from components.config import load_params

    train = load_params("lama", REPO)["train"]  # the library's own optimiser settings (Adam, weight decay)
    config = TrainConfig.from_dict({**train, "precision": args.precision})
    use_bf16 = make_accelerator(config.precision).mixed_precision == "bf16"
    batch, reps = (args.batch_size or [8])[0], (args.steps or 6) + 1
    sides = {}
    for impl in args.impls:
        torch.manual_seed(0)
        lm, tokenizer, causal, _ = load_model(model_name)
        facts = make_facts(tokenizer, lm.get_output_embeddings().weight.shape[0], batch * reps, seed=args.seed)
        torch.manual_seed(1)
        if impl == "ours":
            model, items, _, collate_fn, loss_fn, _ = build_ours(lm, tokenizer, causal, facts, args.encoder, freeze)
        else:
            model, items, _, collate_fn, loss_fn = build_peft(lm, tokenizer, causal, facts, args.encoder, freeze,
                                                              6 if causal else 9)
        model.to(device).train()
        sides[impl] = (model, items, collate_fn, loss_fn, make_optimizer(model, config))

    def now():
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    phases = {impl: [] for impl in sides}
    for r in range(reps):
        for impl, (model, items, collate_fn, loss_fn, optimizer) in sides.items():
            batch_ = {k: v.to(device) for k, v in collate_fn(items[r * batch:(r + 1) * batch]).items()}
            t0 = now()
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(model, batch_)
            t1 = now()
            loss.backward()
            t2 = now()
            optimizer.step()
            t3 = now()
            optimizer.zero_grad(set_to_none=True)
            t4 = now()
            phases[impl].append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))
    out = {"model": model_name, "mode": mode, "batch_size": batch, "device": device, "bf16": use_bf16,
           "clock": "cuda-synchronised wall" if cuda else "process CPU time", "steps": reps - 1}
    for impl, rows in phases.items():
        rows = rows[1:]
        for i, name in enumerate(("forward", "backward", "optimizer", "zero_grad", "step")):
            out[f"{impl}_{name}_ms_min"] = 1000 * min(r[i] for r in rows)
            out[f"{impl}_{name}_ms_median"] = 1000 * statistics.median(r[i] for r in rows)
    if "ours" in sides and "peft" in sides:
        out["ratio_by_min_step"] = out["peft_step_ms_min"] / out["ours_step_ms_min"]
        out["ratio_by_median_step"] = out["peft_step_ms_median"] / out["ours_step_ms_median"]
    return out


def format_ab(rows: list[dict]) -> str:
    """Minimum time per phase over the alternating steps (CPU: process CPU time; GPU: synchronised wall time)."""
    head = ["model", "mode", "impl", "forward ms", "backward ms", "optimizer ms", "step ms", "ours/PEFT (step)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for impl in ("ours", "peft"):
            if f"{impl}_step_ms_median" not in r:
                continue
            cells = [r["model"], r["mode"], impl] + [f"{r[f'{impl}_{p}_ms_min']:.0f}"
                                                     for p in ("forward", "backward", "optimizer", "step")]
            ratio = r.get("ratio_by_min_step")
            cells.append(f"**{ratio:.2f}x**" if impl == "ours" and ratio else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- driver -------------------------------------------------------------------------------------------------

def _run_isolated(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**case, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def format_table(rows: list[dict]) -> str:
    """Markdown table. On CPU it adds the process CPU time per step and the ours/PEFT ratio by it (the work
    done, insensitive to other processes on the machine); the main ratio is by wall-clock examples/s."""
    on_cpu = any(r.get("device") == "cpu" for r in rows)
    head = ["model", "mode", "batch", "impl", "ex/s", "tok/s", "step ms"] + (["CPU ms"] if on_cpu else []) \
        + ["peak MiB", "MFU", "ours/PEFT ex/s"] + (["ours/PEFT by CPU time"] if on_cpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key = {(r["model"], r["mode"], r["batch_size"], r["impl"]): r for r in rows}
    for r in rows:
        cells = [r["model"], r["mode"], str(r["batch_size"]), r["impl"]]
        if "error" in r:
            lines.append("| " + " | ".join(cells + [f"error: {r['error']}"] + [""] * (len(head) - 5)) + " |")
            continue
        other = by_key.get((r["model"], r["mode"], r["batch_size"], "peft"))
        paired = r["impl"] == "ours" and other is not None and "error" not in other
        cells += [f"{r['examples_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['step_ms']:.0f}"]
        if on_cpu:
            cells.append(f"{r['cpu_ms_per_step']:.0f}")
        cells += [f"{r['peak_mem_mib']:.0f}", f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
                  f"**{r['examples_per_s'] / other['examples_per_s']:.2f}x**" if paired else ""]
        if on_cpu:
            cells.append(f"{other['cpu_ms_per_step'] / r['cpu_ms_per_step']:.2f}x" if paired else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="CPU-sized run: reduced-depth paper configs, batch 8, 1 warmup + 3 timed steps")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--models", nargs="+", help=f"default: {' '.join(FULL_MODELS)} (--small: small:<same>)")
    parser.add_argument("--modes", nargs="+", choices=("frozen", "joint"), default=["frozen", "joint"])
    parser.add_argument("--impls", nargs="+", choices=("ours", "peft"), default=["ours", "peft"])
    parser.add_argument("--batch-size", type=int, nargs="+", help="default 32 (--small: 8); several allowed")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, help="timed steps (default 20; --small: 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; --small: 1)")
    parser.add_argument("--encoder", choices=("lstm", "mlp"), default="lstm")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="as TrainConfig.precision: auto = bf16 autocast on a CUDA device that has it")
    parser.add_argument("--seed", type=int, default=34)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every case this many times, ours and PEFT alternating, and keep each case's "
                             "fastest run (a shared machine's noise only ever slows a run down)")
    parser.add_argument("--no-isolate", action="store_true", help="run every case in this process")
    parser.add_argument("--ab", action="store_true",
                        help="diagnosis on a noisy machine: ours and PEFT in one process, steps alternating, "
                             "per-phase minimum times (--steps steps after one warm-up; default 6)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per isolated case")
    parser.add_argument("--output", default="outputs/benchmarks/bench_training.json",
                        help="JSON results (default under the git-ignored outputs/)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:  # worker
        result = run_case(json.loads(args.case))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    models = args.models or (SMALL_MODELS if args.small else FULL_MODELS)
    if args.ab:
        rows, started = [], time.time()
        for m in models:
            for mode in args.modes:
                rows.append(run_ab(m, mode, args, device))
                print("\n".join(format_ab(rows[-1:]).splitlines()[2:]), flush=True)
        table = format_ab(rows)
        print()
        print(table)
        output = Path(args.output)
        output = output if output.is_absolute() else REPO / output
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"meta": {"command": "python " + " ".join(
            [os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
            "load_average": os.getloadavg(), "wall_seconds": time.time() - started}, "rows": rows, "table": table},
            indent=2))
        print(f"\nwrote {output}")
        return 0
    batches = args.batch_size or [8 if args.small else 32]
    steps = args.steps or (3 if args.small else 20)
    warmup = max(1, args.warmup if args.warmup is not None else (1 if args.small else 5))
    cases = [dict(model=m, mode=mode, batch_size=b, impl=impl, device=device, steps=steps, warmup=warmup,
                  grad_accum=args.grad_accum, encoder=args.encoder, precision=args.precision, seed=args.seed,
                  threads=args.threads, repeat=r)
             for m in models for mode in args.modes for b in batches for r in range(args.repeats)
             for impl in args.impls]
    print(f"{len(cases)} cases on {device} ({'isolated' if not args.no_isolate else 'in-process'}), "
          f"{warmup} warmup + {steps} timed steps each", flush=True)
    rows, started = [], time.time()
    for case in cases:
        t0 = time.time()
        if args.no_isolate:
            try:
                row = run_case(case)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                row = {**case, "error": f"{type(exc).__name__}: {exc}"}
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        else:
            row = _run_isolated(case, args.timeout)
        rows.append(row)
        shown = row.get("error") or f"{row['examples_per_s']:.1f} ex/s, {row['peak_mem_mib']:.0f} MiB"
        print(f"  {case['model']:<28} {case['mode']:<6} b={case['batch_size']:<4} {case['impl']:<4} #{case['repeat']} {shown}"
              f"  ({time.time() - t0:.0f} s)", flush=True)

    runs, rows = rows, []
    for row in runs:  # the fastest repeat of every case
        key = (row["model"], row["mode"], row["batch_size"], row["impl"])
        same = next((i for i, r in enumerate(rows) if (r["model"], r["mode"], r["batch_size"], r["impl"]) == key), None)
        if same is None:
            rows.append(row)
        elif "error" in rows[same] or ("error" not in row and row["examples_per_s"] > rows[same]["examples_per_s"]):
            rows[same] = row
    table = format_table(rows)
    print()
    print(table)
    meta = {"command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
            "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "wall_seconds": time.time() - started,
            "load_average": os.getloadavg(),
            "flops_formula": "joint 6*N*tokens, frozen 4*N*tokens; N = non-embedding body params per token"}
    output = Path(args.output)
    if not output.is_absolute():
        output = REPO / output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs, "table": table}, indent=2))
    print(f"\nwrote {output}  ({meta['wall_seconds']:.0f} s)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
