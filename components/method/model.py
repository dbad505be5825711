"""The P-tuning model: a prompt encoder that produces continuous prompt vectors, and an LM that reads them.

PromptEncoder  h = MLP(BiLSTM(E))  (paper), or MLP(E), or E alone (ablations)
PromptedLM     puts h at the template's [P] positions of the LM's input embeddings and returns the LM's
               logits at the read positions only (masked LM: the [MASK]s; causal LM: one before each target).
FixedPrompt    the exported vectors h alone: at inference the encoder can be dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ENCODERS = ("lstm", "mlp", "none")


class PromptEncoder(nn.Module):
    """n_tokens trainable embeddings of width `dim` (the LM's *input embedding* width), re-parametrised.

    lstm: Embedding -> BiLSTM(2 layers, dim/2 per direction) -> Linear(dim, dim) -> ReLU -> Linear(dim, dim),
    as in the paper's LAMA code. mlp: Embedding -> Linear -> ReLU -> Linear. none: the embeddings themselves.
    `init` sets the embeddings (random otherwise); with `none` the prompt's vectors start exactly there.
    """

    def __init__(self, n_tokens: int, dim: int, kind: str = "lstm", hidden: int | None = None,
                 init: torch.Tensor | None = None):
        super().__init__()
        if kind not in ENCODERS:
            raise ValueError(f"unknown prompt encoder {kind!r}; choose one of {ENCODERS}")
        if n_tokens < 1:
            raise ValueError(f"a prompt encoder needs at least one prompt token, got {n_tokens}")
        self.n_tokens, self.dim, self.kind = n_tokens, dim, kind
        hidden = hidden or dim
        self.embedding = nn.Embedding(n_tokens, dim)
        if init is not None:  # e.g. the manual prompt's word embeddings (OptiPrompt); random otherwise
            if tuple(init.shape) != (n_tokens, dim):
                raise ValueError(f"prompt initialisation of shape {tuple(init.shape)}, expected {(n_tokens, dim)}")
            with torch.no_grad():
                self.embedding.weight.copy_(init)
        self.lstm = nn.LSTM(dim, max(hidden // 2, 1), num_layers=2, bidirectional=True, batch_first=True) if kind == "lstm" else None
        mlp_in = 2 * max(hidden // 2, 1) if kind == "lstm" else dim
        self.mlp = nn.Sequential(nn.Linear(mlp_in, hidden), nn.ReLU(), nn.Linear(hidden, dim)) if kind != "none" else None

    def forward(self) -> torch.Tensor:
        h = self.embedding.weight
        # n_tokens rows: fp32 costs nothing, keeps the one trained part of P-tuning exact, and keeps the LSTM out of
        # autocast (CPU bf16 autocast has no oneDNN LSTM without AVX512-BF16/AMX and fails).
        with torch.autocast(device_type=h.device.type, enabled=False):
            if self.lstm is not None:
                h = self.lstm(h.unsqueeze(0))[0].squeeze(0)
            return self.mlp(h) if self.mlp is not None else h

    def config(self) -> dict:
        return {"n_tokens": self.n_tokens, "dim": self.dim, "kind": self.kind,
                "hidden": self.mlp[0].out_features if self.mlp is not None else None}


class FixedPrompt(nn.Module):
    """Exported prompt vectors: what inference needs, without the encoder."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(vectors, requires_grad=False)

    def forward(self) -> torch.Tensor:
        return self.vectors


def _lm_body_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split an HF `*ForMaskedLM`/`*ForCausalLM` into its transformer and its vocabulary head, so that the
    head runs on the read positions only (the full [B, L, V] logits are the largest tensor of a step)."""
    for name in ("cls", "lm_head", "predictions"):  # BERT, RoBERTa/GPT-2/Llama, ALBERT
        if hasattr(lm, name):
            return lm.base_model, getattr(lm, name)
    raise ValueError(f"{type(lm).__name__} has no known LM head (expected .cls, .lm_head or .predictions)")


class PromptedLM(nn.Module):
    def __init__(self, lm: nn.Module, prompt: nn.Module | None, causal: bool, freeze_lm: bool):
        super().__init__()
        self.lm, self.prompt, self.causal, self.freeze_lm = lm, prompt, causal, freeze_lm
        self.body, self.head = _lm_body_and_head(lm)
        if freeze_lm:
            lm.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_lm:
            self.lm.eval()  # a frozen LM keeps its dropout off, as in the paper's LAMA code
        return self

    @property
    def embedding_dim(self) -> int:
        return self.lm.get_input_embeddings().embedding_dim

    def input_embeddings(self, input_ids: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        embeds = self.lm.get_input_embeddings()(input_ids)
        if self.prompt is None:
            return embeds
        vectors = self.prompt().to(embeds.dtype)
        is_prompt = (prompt_index >= 0).unsqueeze(-1)
        # an embedding lookup, not `vectors[index]`: that one's backward (index_put with accumulate) adds in a
        # thread-dependent order on a CPU, and the same seed gave other figures
        return torch.where(is_prompt, nn.functional.embedding(prompt_index.clamp(min=0), vectors), embeds)

    def forward(self, input_ids, prompt_index, attention_mask, read_positions, candidate_ids=None, **_):
        """Logits [B, T, V] (or [B, T, C] over `candidate_ids`) at each row's T read positions.
        Padded read positions (-1) give logits of position 0: callers mask them."""
        embeds = self.input_embeddings(input_ids, prompt_index)
        hidden = self.body(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
        picked = hidden[rows, read_positions.clamp(min=0)]  # [B, T, H]
        if candidate_ids is not None and isinstance(self.head, nn.Linear):
            # A plain linear head (causal LMs) can be restricted before the matmul.
            weight = self.head.weight[candidate_ids]
            bias = self.head.bias[candidate_ids] if self.head.bias is not None else None
            return nn.functional.linear(picked, weight, bias)
        logits = self.head(picked)
        return logits if candidate_ids is None else logits[..., candidate_ids]


    @torch.no_grad()
    def greedy_continue(self, input_ids: torch.Tensor, prompt_index: torch.Tensor, start: int, n: int) -> list[int]:
        """Causal LM, one row: the `n` tokens decoded greedily after position `start` (the first read position)
        through the KV cache: one pass over the row up to `start`, then one position per token, where feeding
        each token back into the whole row would cost a full pass per token."""
        if not self.causal:
            raise ValueError("greedy_continue decodes left to right: a causal LM only")
        embeds = self.input_embeddings(input_ids[None, :start + 1], prompt_index[None, :start + 1])
        out = self.body(inputs_embeds=embeds, use_cache=True)
        tokens = []
        for _ in range(n):
            token = self.head(out.last_hidden_state[:, -1]).argmax(-1)  # [1]
            tokens.append(int(token))
            if len(tokens) < n:
                out = self.body(inputs_embeds=self.lm.get_input_embeddings()(token[:, None]),
                                cache=out.cache, use_cache=True)
        return tokens


# --- export: the vectors alone (inference) and the encoder state (resume) ---------------------------

def export_prompt(prompt: nn.Module, directory: str | Path, template: str, base_model: str, extra: dict | None = None) -> Path:
    """Write `prompt.safetensors` (the vectors h), `encoder.safetensors` + config (to resume training)
    and `prompt.json` (template, base model) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        save_file({"prompt": prompt().detach().float().cpu().contiguous()}, str(directory / "prompt.safetensors"))
    meta = {"template": template, "base_model": base_model, **(extra or {})}
    if isinstance(prompt, PromptEncoder):
        save_file({k: v.detach().cpu().contiguous() for k, v in prompt.state_dict().items()}, str(directory / "encoder.safetensors"))
        meta["encoder"] = prompt.config()
    (directory / "prompt.json").write_text(json.dumps(meta, indent=2))
    return directory


LM_DIR = "lm"  # a prompt's jointly tuned LM, next to it


def export_lm(lm: nn.Module, tokenizer, directory: str | Path) -> Path:
    """Write an LM trained together with its prompt (an HF *ForMaskedLM/*ForCausalLM) and its tokenizer as
    safetensors under `<directory>/lm`: the prompt alone would not reproduce the run's figures."""
    import shutil

    target = Path(directory) / LM_DIR
    shutil.rmtree(target, ignore_errors=True)
    lm.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    return target


def load_prompt(directory: str | Path, with_encoder: bool = False) -> tuple[nn.Module, dict]:
    """FixedPrompt from `prompt.safetensors`, or (with_encoder) the trainable PromptEncoder."""
    directory = Path(directory)
    meta = json.loads((directory / "prompt.json").read_text())
    if with_encoder:
        encoder = PromptEncoder(**meta["encoder"])
        encoder.load_state_dict(load_file(str(directory / "encoder.safetensors")))
        return encoder, meta
    return FixedPrompt(load_file(str(directory / "prompt.safetensors"))["prompt"]), meta
