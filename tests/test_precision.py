"""Numerics of the training loop (components.training.fit): bf16 autocast against fp32, gradient accumulation
against one big batch, and a frozen LM that keeps no gradients. CPU, tiny models, a few seconds each.

Tolerances
- bf16 vs fp32. bf16 keeps 8 significant bits: unit roundoff u = 2**-8 ~ 3.9e-3 per rounding. Under autocast
  every matmul of the (2-layer) LM rounds its inputs to bf16 and accumulates in fp32, so a logit carries a
  relative error of about u, and the loss (cross-entropy in fp32 over those logits) at most the same order.
  Over 4 optimizer steps the runs also follow slightly different parameters. Allowed: a relative 1e-2 (~2.5 u)
  on every step's loss and on the final dev loss (observed on x86 CPU: <= 1.3e-3, i.e. 8x headroom); a loss
  scaled twice, or computed on the wrong positions, is off by far more. A random tiny LM's loss is flat, so the
  sharper check is on what training did: the change of the prompt vectors h in bf16 must point the same way as
  in fp32, cosine > 0.99 (observed >= 0.999; Adam normalises each gradient component, so bf16 noise in
  near-zero components shows up as a few per cent of the update's norm, not as a change of direction).
  That bf16 really ran is checked directly (a forward hook sees bf16 activations inside the LM) and
  indirectly (the losses are not bitwise equal to the fp32 run's).
- grad_accum=2 vs 1 (batch 8 both). Each micro-batch loss is weighted by its share of the batch, so the summed
  gradient is the batch gradient up to float32 summation order (and padding to each micro-batch's own width):
  relative differences ~1e-7. Adam turns a gradient g into ~lr * g / (|g| + eps), so parameter differences stay
  ~lr * 1e-6 per step; atol 1e-5 (lr 1e-3, 4 steps) is tight and still well above that (observed <= 3.2e-7).
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from components.models.catalog import load_lm
from components.method.model import PromptedLM, PromptEncoder
from components.method.templates import collate, encode, parse_template
from components.training import Callback, TrainConfig, fit

BF16_RTOL = 1e-2
BF16_MIN_COS = 0.99
ACCUM_ATOL = 1e-5

_WORDS = ("Paris", "London", "Berlin", "Rome", "Madrid", "Vienna", "Prague", "Dublin", "Oslo", "Athens",
          "Lisbon", "Warsaw", "Brussels", "Zurich", "Geneva", "Milan")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two that wait on each other
    yield
    torch.set_num_threads(threads)


def _task(lm, n_items: int = 32):
    """A toy LAMA relation: subject -> one of K candidate words, read at the [MASK] (masked) or the token
    before the target (causal); loss = cross-entropy over the candidates' logits, as components/benchmarks/lama/run.py."""
    causal = lm.causal
    template = parse_template("[P*3] {sub} [P*3] [Y]" if causal else "[P*3] {sub} [P*3] [Y] [P*3]")
    candidates = [lm.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in _WORDS[:8]]
    candidate_ids = torch.tensor(candidates)
    items = []
    for i in range(n_items):
        words = [_WORDS[(i * 7 + k) % len(_WORDS)] for k in range(1 + i % 3)]  # 1-3 words: varied lengths
        label = i % len(candidates)
        items.append({"encoded": encode(template, lm.tokenizer, {"sub": " ".join(words)}, causal,
                                        target_ids=[candidates[label]]), "label": label})
    pad = lm.tokenizer.pad_token_id

    def batch_of(chunk):
        return {**collate([c["encoded"] for c in chunk], pad), "labels": torch.tensor([c["label"] for c in chunk]),
                "candidate_ids": candidate_ids}

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(**batch)[:, 0].float(), batch["labels"])

    evaluations = itertools.count()

    def evaluate(model):
        batch = batch_of(items)
        # "evaluation" rises with every call: selecting on it keeps the last state, whatever the loss did
        return {"neg_loss": -loss_fn(model, batch).item(), "evaluation": float(next(evaluations))}

    lengths = [len(i["encoded"].input_ids) for i in items]
    return template, items, lengths, batch_of, loss_fn, evaluate


class _Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_step(self, step, loss, lr):
        self.losses.append(loss)


class _DtypeProbe:
    """Records the dtype of the first projection's output inside the LM body on every forward
    (nn.Linear; GPT-2's transformers Conv1D, an addmm, which autocast covers as well)."""

    def __init__(self, lm: nn.Module):
        self.seen: list[torch.dtype] = []
        linear = next(m for m in lm.base_model.modules() if type(m).__name__ in ("Linear", "Conv1D"))
        self.handle = linear.register_forward_hook(lambda mod, inp, out: self.seen.append(out.dtype))


def _train(name: str, precision: str, freeze: bool = True, grad_accum: int = 1, steps: int = 4, lr: float = 1e-2,
           lm=None, no_dropout: bool = False, encoder_kind: str = "lstm"):
    """A fresh prompt encoder (seeded) on a copy of `name`'s LM, trained `steps` steps of batch 8 by fit."""
    lm = lm or load_lm(name)
    lm_model = copy.deepcopy(lm.model)
    if no_dropout:
        for module in lm_model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    template, items, lengths, batch_of, loss_fn, evaluate = _task(lm)
    torch.manual_seed(0)
    encoder = PromptEncoder(template.n_prompt_tokens, lm_model.get_input_embeddings().embedding_dim, encoder_kind)
    model = PromptedLM(lm_model, encoder, lm.causal, freeze_lm=freeze)
    with torch.no_grad():
        start_vectors = encoder().clone()
    probe = _DtypeProbe(lm_model)
    losses = _Losses()
    config = TrainConfig(lr=lr, lm_lr=1e-3, batch_size=8, grad_accum=grad_accum, epochs=1, max_steps=steps,
                         precision=precision, seed=3, max_grad_norm=1.0, length_bucketing=True)
    result = fit(model, items[:8 * steps], lengths[:8 * steps], batch_of, loss_fn, evaluate, config,
                 select=("evaluation",), callbacks=[losses])
    probe.handle.remove()
    # evaluated at the start and at the last step, whose state is kept (select="evaluation"): no rollback
    assert result.steps == steps and [h["step"] for h in result.history] == [0, steps] and result.best_step == steps
    with torch.no_grad():
        moved = encoder().float() - start_vectors.float()  # what training did to the prompt vectors h
    return model, losses.losses, -result.best_metrics["neg_loss"], probe.seen, moved


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# --- (a) bf16 autocast gives fp32's results ---------------------------------------------------------------

@pytest.mark.parametrize("name, encoder_kind", [
    ("tiny-bert", "mlp"), ("tiny-gpt2", "mlp"),
    ("tiny-bert", "lstm"), ("tiny-gpt2", "lstm")])
def test_bf16_matches_fp32_within_tolerance(name, encoder_kind):
    lm = load_lm(name)
    _, fp32_losses, fp32_dev, fp32_seen, fp32_moved = _train(name, "fp32", lm=lm, encoder_kind=encoder_kind)
    _, bf16_losses, bf16_dev, bf16_seen, bf16_moved = _train(name, "bf16", lm=lm, encoder_kind=encoder_kind)

    assert set(fp32_seen) == {torch.float32}
    assert bf16_seen and set(bf16_seen) == {torch.bfloat16}  # autocast really ran inside the LM (training and eval)
    assert bf16_losses != fp32_losses  # ... and changed the numbers

    assert fp32_moved.abs().max() > 1e-3  # training moved the prompt vectors (Adam, lr 1e-2, 4 steps)
    worst = max(_rel(b, f) for b, f in zip(bf16_losses, fp32_losses))
    assert worst < BF16_RTOL, f"bf16 step losses {bf16_losses} vs fp32 {fp32_losses}: relative {worst:.3g}"
    assert _rel(bf16_dev, fp32_dev) < BF16_RTOL, f"final dev loss bf16 {bf16_dev} vs fp32 {fp32_dev}"
    # the prompt vectors moved the same way (the loss of a random tiny LM is flat: this is the sharper check)
    cos = nn.functional.cosine_similarity(bf16_moved.flatten(), fp32_moved.flatten(), dim=0).item()
    assert cos > BF16_MIN_COS, f"bf16 and fp32 updates of the prompt vectors differ: cosine {cos:.4f}"


def test_precision_can_change_in_one_process():
    """An Optuna worker or a notebook that runs fit(precision='fp32') and then fit(precision='bf16')."""
    lm = load_lm("tiny-bert")
    _train("tiny-bert", "fp32", lm=lm, steps=1, encoder_kind="mlp")
    _train("tiny-bert", "bf16", lm=lm, steps=1, encoder_kind="mlp")  # fit must cope with the process-wide accelerate state


# --- (b) gradient accumulation is one big batch ------------------------------------------------------------

@pytest.mark.parametrize("name, freeze", [("tiny-bert", True), ("tiny-gpt2", True), ("tiny-bert", False)])
def test_grad_accum_matches_one_batch(name, freeze):
    lm = load_lm(name)
    # Joint tuning trains the LM with dropout on; switch it off so both runs see the same function.
    one, one_losses, *_ = _train(name, "fp32", freeze=freeze, grad_accum=1, lr=1e-3, lm=lm, no_dropout=True)
    two, two_losses, *_ = _train(name, "fp32", freeze=freeze, grad_accum=2, lr=1e-3, lm=lm, no_dropout=True)

    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=1e-6)
    params_one, params_two = dict(one.named_parameters()), dict(two.named_parameters())
    moved = 0
    for key, p in params_one.items():
        torch.testing.assert_close(params_two[key], p, atol=ACCUM_ATOL, rtol=0, msg=lambda m: f"{key}: {m}")
        moved += p.requires_grad
    assert moved == sum(p.requires_grad for p in one.parameters()) > 0
    if not freeze:  # the LM itself was trained, identically
        assert any(n.startswith("lm.") and p.requires_grad for n, p in one.named_parameters())


# --- (c) a frozen LM keeps no gradients and does not change --------------------------------------------------

@pytest.mark.parametrize("precision, encoder_kind", [("fp32", "lstm"), ("bf16", "mlp"), ("bf16", "lstm")])
def test_frozen_lm_keeps_no_gradients(precision, encoder_kind):
    lm = load_lm("tiny-bert")
    template, items, lengths, batch_of, loss_fn, evaluate = _task(lm)
    torch.manual_seed(0)
    encoder = PromptEncoder(template.n_prompt_tokens, lm.model.get_input_embeddings().embedding_dim, encoder_kind)
    model = PromptedLM(lm.model, encoder, causal=False, freeze_lm=True)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    prompt_before = {k: v.clone() for k, v in model.prompt.state_dict().items()}
    lm_modes = []

    def watch(batch_model, batch):  # the LM stays in eval mode (no dropout) while the model trains
        lm_modes.append((batch_model.training, lm.model.training))
        return loss_fn(batch_model, batch)

    fit(model, items, lengths, batch_of, watch, evaluate,
        TrainConfig(lr=1e-2, batch_size=8, epochs=1, max_steps=3, precision=precision, seed=3), select=("evaluation",))

    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert any(not torch.equal(prompt_before[k], v) for k, v in model.prompt.state_dict().items())  # the prompt learnt
    assert lm_modes and all(trains and not lm_trains for trains, lm_trains in lm_modes)


# --- GPU ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(),
                    reason="needs a CUDA device with bf16")
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("encoder_kind", ["lstm", "mlp"])
def test_bf16_on_cuda_matches_fp32(name, encoder_kind):
    lm = load_lm(name)
    _, fp32_losses, fp32_dev, fp32_seen, fp32_moved = _train(name, "fp32", lm=lm, encoder_kind=encoder_kind)
    # auto: bf16 autocast on a CUDA device that has it (fit moves the model there)
    _, bf16_losses, bf16_dev, bf16_seen, bf16_moved = _train(name, "auto", lm=lm, encoder_kind=encoder_kind)
    assert set(fp32_seen) == {torch.float32} and set(bf16_seen) == {torch.bfloat16}
    worst = max(_rel(b, f) for b, f in zip(bf16_losses, fp32_losses))
    assert worst < BF16_RTOL, f"bf16 step losses {bf16_losses} vs fp32 {fp32_losses}: relative {worst:.3g}"
    assert _rel(bf16_dev, fp32_dev) < BF16_RTOL
    cos = nn.functional.cosine_similarity(bf16_moved.flatten(), fp32_moved.flatten(), dim=0).item()
    assert cos > BF16_MIN_COS, f"bf16 and fp32 updates of the prompt vectors differ: cosine {cos:.4f}"
