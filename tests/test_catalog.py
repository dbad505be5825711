"""The model catalogue: tiny random models, paper-sized configurations, real SmolLM2 weights, unknown names."""
import json
import socket
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

import components.models.catalog as catalog
from components.cli import main as cli_main
from components.models.catalog import CATALOGUE, UnknownModelError, load_lm, load_tokenizer, model_dir
from components.method.model import PromptEncoder, PromptedLM
from components.method.templates import collate, encode, parse_template

TINY = {"tiny-bert": ("BertForMaskedLM", False), "tiny-roberta": ("RobertaForMaskedLM", False),
        "tiny-albert": ("AlbertForMaskedLM", False), "tiny-gpt2": ("GPT2LMHeadModel", True)}


@pytest.fixture(scope="session")
def smollm2():
    """Real SmolLM2 weights: the first run of a machine fetches and converts them (~40 s), later runs load the cache."""
    start = time.perf_counter()
    lm = load_lm("smollm2-135m")
    print(f"\nsmollm2-135m first load in this session: {time.perf_counter() - start:.1f} s")
    return lm


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_loads_and_runs(name):
    arch, causal = TINY[name]
    lm = load_lm(name)
    assert type(lm.model).__name__ == arch and lm.causal is causal and lm.name == name
    assert not lm.model.training and lm.model.dtype == torch.float32
    tok = lm.tokenizer
    needed = ["pad_token_id"] if causal else ["pad_token_id", "mask_token_id", "cls_token_id", "sep_token_id"]
    ids = [getattr(tok, t) for t in needed]
    assert None not in ids and len(set(ids)) == len(ids)
    if causal:
        assert tok.pad_token_id == tok.eos_token_id
    assert lm.model.get_input_embeddings().num_embeddings >= len(tok)
    batch = tok(["The capital of France is Paris.", "Hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = lm.model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], lm.model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # The cheap tokenizer path gives the same tokenizer as the loaded model's.
    text = "Dante was born in Florence."
    assert load_tokenizer(name)(text)["input_ids"] == tok(text)["input_ids"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_works_with_prompted_lm(name):
    lm = load_lm(name)
    template = parse_template("[P*2] {sub} [P] [Y]")
    target = lm.tokenizer.encode(" Paris", add_special_tokens=False)[:1]
    batch = collate([encode(template, lm.tokenizer, {"sub": s}, lm.causal, target_ids=target) for s in ("France", "the French Republic")],
                    lm.tokenizer.pad_token_id)
    prompt = PromptEncoder(template.n_prompt_tokens, lm.model.get_input_embeddings().embedding_dim)
    logits = PromptedLM(lm.model, prompt, lm.causal, freeze_lm=True)(**batch)
    assert logits.shape == (2, 1, lm.model.config.vocab_size)


def test_albert_prompt_width_follows_input_embeddings():
    model = load_lm("tiny-albert").model
    assert model.get_input_embeddings().embedding_dim == 16 != model.config.hidden_size == 32
    assert PromptedLM(model, None, causal=False, freeze_lm=True).embedding_dim == 16


def test_roberta_tokenizer_is_gpt2_bpe_with_roberta_specials():
    tok = load_tokenizer("tiny-roberta")
    gpt2 = load_tokenizer("tiny-gpt2")
    assert (tok.cls_token, tok.pad_token, tok.sep_token, tok.unk_token) == ("<s>", "<pad>", "</s>", "<unk>")
    assert (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id) == (0, 1, 2)  # positions start at pad + 1
    assert tok.mask_token_id == len(tok) - 1
    assert tok.encode(" Paris", add_special_tokens=False) == [i + 4 for i in gpt2.encode(" Paris", add_special_tokens=False)]
    assert tok("Paris is <mask>.")["input_ids"].count(tok.mask_token_id) == 1


def test_tiny_models_are_seeded_and_cached_where_asked(tmp_path):
    first, second = model_dir("tiny-gpt2", tmp_path / "a"), model_dir("tiny-gpt2", tmp_path / "b")
    assert first.parent == tmp_path / "a" and first.name.startswith("tiny-gpt2-")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert model_dir("tiny-gpt2", tmp_path / "a") == first  # reused, not rebuilt
    assert [p.name for p in (tmp_path / "a").iterdir()] == [first.name]  # no temporary left behind


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_model_dir_loads_as_sequence_classifier(name):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir(name), num_labels=3)
    tok = load_tokenizer(name)
    batch = tok(["a short one", "and a somewhat longer second input"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


def test_local_directory_is_a_name():
    for name, (arch, causal) in (("tiny-gpt2", TINY["tiny-gpt2"]), ("tiny-bert", TINY["tiny-bert"])):
        directory = str(model_dir(name))
        lm = load_lm(directory)
        assert type(lm.model).__name__ == arch and lm.causal is causal and lm.name == directory
        assert model_dir(directory) == model_dir(name)


@pytest.mark.parametrize("name", ["no-such-model", "random:no-such-model", "bert-base-cased", "/no/such/dir"])
def test_unknown_name_fails_fast_without_downloading(name, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PTUNING_MODEL_CACHE", str(cache))
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("this test allows no download")

    monkeypatch.setattr(socket.socket, "connect", refuse)  # the hub, or anything else on the network
    monkeypatch.setattr(catalog.subprocess, "run", refuse)  # pip
    for call in (load_lm, load_tokenizer, model_dir):
        with pytest.raises(UnknownModelError) as error:
            call(name)
        assert repr(name) in str(error.value) and "smollm2-135m" in str(error.value) and "tiny-bert" in str(error.value)
    assert cli_main(["models", "prepare", name]) == 2
    assert attempts == [] and not cache.exists()


def test_paper_sized_configs_match_published_sizes():
    # Parameter counts of the hub checkpoints (AutoModel, pooler included); built on the meta device: no memory.
    published = {"random:bert-base-cased": 108_310_272, "random:bert-large-cased": 333_579_264,
                 "random:albert-xxlarge-v2": 222_595_584, "random:gpt2": 124_439_808, "random:gpt2-medium": 354_823_168}
    assert {n for n in CATALOGUE if n.startswith("random:")} == set(published)
    for name, count in published.items():
        with torch.device("meta"):
            model = AutoModel.from_config(AutoConfig.for_model(**CATALOGUE[name].config))
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_paper_sized_model_is_built_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("PTUNING_MODEL_CACHE", str(tmp_path))
    lm = load_lm("random:gpt2")
    assert type(lm.model).__name__ == "GPT2LMHeadModel" and lm.causal and lm.model.config.n_layer == 12
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="built in memory"):
        model_dir("random:gpt2")


def test_prepare_prints_the_cache_location(capsys):
    assert cli_main(["models", "prepare", "tiny-albert"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["path"] == str(model_dir("tiny-albert"))


@pytest.mark.slow
def test_smollm2_real_weights(smollm2):
    assert smollm2.causal and type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert smollm2.model.config.hidden_size == 576 and smollm2.model.dtype == torch.float32
    tok = smollm2.tokenizer
    assert tok.pad_token_id is not None
    with torch.no_grad():
        logits = smollm2.model(**tok("The capital of France is", return_tensors="pt")).logits[0, -1]
    assert tok.decode(logits.argmax()) == " Paris"  # random weights could not know this


@pytest.mark.slow
def test_smollm2_loads_again_from_cache(smollm2):
    start = time.perf_counter()
    again = load_lm("smollm2-135m")
    seconds = time.perf_counter() - start
    print(f"\nsmollm2-135m load from cache: {seconds:.2f} s")  # a figure, not a target (benchmarks/ time)
    assert torch.equal(again.model.get_input_embeddings().weight, smollm2.model.get_input_embeddings().weight)
    assert (model_dir("smollm2-135m") / "model.safetensors").exists()
