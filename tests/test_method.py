"""The P-tuning method itself: templates, prompt encoder, where each LM reads its target, freezing, export."""
import pytest
import torch
from torch import nn

from components.models.catalog import load_lm
from components.method.model import FixedPrompt, PromptedLM, PromptEncoder, export_prompt, load_prompt
from components.method.templates import (TemplateError, collate, encode, lama_template, parse_template, piece_ids,
                                         prompt_from_anchors)
from components.training import TrainConfig, fit


# --- templates ---------------------------------------------------------------------------------------

def test_template_parts_in_any_order():
    t = parse_template("[P*2] {premise} Question: {hypothesis} ? [P] Answer: [Y] .")
    assert [p.kind for p in t.parts] == ["prompt", "slot", "anchor", "slot", "anchor", "prompt", "anchor", "target", "anchor"]
    assert t.n_prompt_tokens == 3 and t.slots == ("premise", "hypothesis")
    assert t.without_prompts().text == "{premise} Question: {hypothesis} ? Answer: [Y] ."


def test_lama_shapes_follow_the_paper():
    assert lama_template([3, 3, 3], causal=False) == "[P*3] {sub} [P*3] [Y] [P*3]"
    assert lama_template([3, 3, 3], causal=True) == "[P*3] {sub} [P*3] [Y]"


def test_anchors_become_prompt_tokens_of_their_pieces():
    tokenizer = load_lm("tiny-gpt2").tokenizer
    manual = parse_template("The capital of {sub} is [Y] .")
    text, ids = prompt_from_anchors(manual, tokenizer, causal=True)
    first, second = piece_ids(tokenizer, "The capital of", first=True), piece_ids(tokenizer, "is")
    assert len(first) == 3 and len(second) == 1
    assert text == "[P*3] {sub} [P] [Y]" and ids == first + second
    text, ids = prompt_from_anchors(manual, tokenizer, causal=False)  # a masked LM reads the tokens after [Y] too
    assert text.endswith("[Y] [P]") and ids[-1] == piece_ids(tokenizer, ".")[0]
    with pytest.raises(TemplateError, match="no words to initialise a prompt from"):
        prompt_from_anchors(parse_template("[P*3] {sub} [Y]"), tokenizer, causal=True)


def test_an_encoder_can_start_from_given_vectors():
    start = torch.randn(4, 32)
    assert torch.equal(PromptEncoder(4, 32, "none", init=start)(), start)
    lstm = PromptEncoder(4, 32, "lstm", init=start)  # the LSTM's own initialisation is untouched
    assert torch.equal(lstm.embedding.weight.detach(), start)
    with pytest.raises(ValueError, match="expected \\(4, 32\\)"):
        PromptEncoder(4, 32, "none", init=torch.zeros(3, 32))


@pytest.mark.parametrize("text, message", [
    ("", "empty template"),
    ("   ", "empty template"),
    ("[P*3] {sub} [P*3]", "0 target slots"),
    ("{sub} [Y] [Y]", "2 target slots"),
    ("{subject} [Y]", "unknown slot {subject}"),
    ("[P*0] {sub} [Y]", "at least 1"),
])
def test_invalid_templates_fail_clearly(text, message):
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_template(text, fields=("sub",))


def test_truncation_cuts_only_the_named_slot():
    lm = load_lm("tiny-bert")
    t = parse_template("{passage} . [P] Question: {question} ? Answer: [Y] .")
    fields = {"passage": "word " * 200, "question": "is the sky blue"}
    e = encode(t, lm.tokenizer, fields, causal=False, max_length=40, truncate="passage")
    text = lm.tokenizer.decode([i for i, p in zip(e.input_ids, e.prompt_index) if p < 0])
    assert len(e.input_ids) == 40
    assert "Question : is the sky blue? Answer : [MASK]. [SEP]" in text.replace(" ?", "?")
    assert text.startswith("[CLS] word")  # the passage lost its end, nothing else was cut
    with pytest.raises(TemplateError, match="no slot may be truncated"):
        encode(t, lm.tokenizer, fields, causal=False, max_length=40)


# --- prompt encoder ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "mlp", "none"])
def test_prompt_encoder_variants(kind):
    enc = PromptEncoder(6, 32, kind)
    out = enc()
    assert out.shape == (6, 32)
    assert (enc.lstm is not None) == (kind == "lstm") and (enc.mlp is not None) == (kind != "none")


def test_lstm_encoder_matches_the_paper():
    enc = PromptEncoder(9, 64, "lstm")
    assert enc.lstm.bidirectional and enc.lstm.num_layers == 2 and enc.lstm.hidden_size == 32
    assert [type(m) for m in enc.mlp] == [nn.Linear, nn.ReLU, nn.Linear]


def test_prompt_width_follows_input_embedding_not_hidden():
    lm = load_lm("tiny-albert")
    emb, hidden = lm.model.get_input_embeddings().embedding_dim, lm.model.config.hidden_size
    assert emb != hidden
    model = PromptedLM(lm.model, PromptEncoder(3, emb), causal=False, freeze_lm=True)
    t = parse_template("[P*3] {sub} [Y]")
    batch = collate([encode(t, lm.tokenizer, {"sub": "Paris"}, causal=False)], lm.tokenizer.pad_token_id)
    assert model(**batch).shape == (1, 1, lm.model.config.vocab_size)


# --- where the target is read ------------------------------------------------------------------------

def _one(lm, template, target_word, causal):
    target = lm.tokenizer.encode(" " + target_word, add_special_tokens=False)
    e = encode(parse_template(template), lm.tokenizer, {"sub": "Dante"}, causal=causal, target_ids=target)
    return e, collate([e], lm.tokenizer.pad_token_id), target


def test_causal_lm_reads_the_position_before_the_target():
    lm = load_lm("tiny-gpt2")
    model = PromptedLM(lm.model, PromptEncoder(6, lm.model.get_input_embeddings().embedding_dim), causal=True, freeze_lm=True)
    e, batch, target = _one(lm, "[P*3] {sub} was born in [P*3] [Y]", "Florence", causal=True)
    assert e.read_positions == [e.target_positions[0] - 1]
    assert e.input_ids[e.target_positions[0]] == target[0]  # teacher forcing: the answer sits at [Y]

    ours = model(**batch)[0, 0]
    # The full LM, run on the same embeddings, predicts token t+1 at position t.
    full = lm.model(inputs_embeds=model.input_embeddings(batch["input_ids"], batch["prompt_index"]),
                    attention_mask=batch["attention_mask"]).logits[0]
    torch.testing.assert_close(ours, full[e.target_positions[0] - 1])
    assert not torch.allclose(ours, full[e.target_positions[0]])

    # Loss reads the same position as P@1: our CE equals HF's own shifted causal-LM loss.
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, e.target_positions[0]] = target[0]
    hf_loss = lm.model(inputs_embeds=model.input_embeddings(batch["input_ids"], batch["prompt_index"]),
                       attention_mask=batch["attention_mask"], labels=labels).loss
    torch.testing.assert_close(nn.functional.cross_entropy(ours[None], torch.tensor(target[:1])), hf_loss)

    # No leak: the prediction cannot depend on the answer placed at [Y].
    _, other_batch, _ = _one(lm, "[P*3] {sub} was born in [P*3] [Y]", "Rome", causal=True)
    torch.testing.assert_close(model(**other_batch)[0, 0], ours)


def test_masked_lm_reads_the_mask():
    lm = load_lm("tiny-bert")
    model = PromptedLM(lm.model, PromptEncoder(6, lm.model.get_input_embeddings().embedding_dim), causal=False, freeze_lm=True)
    e, batch, _ = _one(lm, "[P*3] {sub} [P*3] [Y] .", "Florence", causal=False)
    assert e.read_positions == e.target_positions
    assert e.input_ids[e.target_positions[0]] == lm.tokenizer.mask_token_id
    full = lm.model(inputs_embeds=model.input_embeddings(batch["input_ids"], batch["prompt_index"]),
                    attention_mask=batch["attention_mask"]).logits[0]
    torch.testing.assert_close(model(**batch)[0, 0], full[e.target_positions[0]])


def test_prompt_vectors_replace_placeholder_embeddings():
    lm = load_lm("tiny-bert")
    enc = PromptEncoder(3, lm.model.get_input_embeddings().embedding_dim)
    model = PromptedLM(lm.model, enc, causal=False, freeze_lm=True)
    e = encode(parse_template("{sub} [P*3] [Y]"), lm.tokenizer, {"sub": "Dante"}, causal=False)
    batch = collate([e], lm.tokenizer.pad_token_id)
    embeds = model.input_embeddings(batch["input_ids"], batch["prompt_index"])[0]
    positions = [i for i, k in enumerate(e.prompt_index) if k >= 0]
    torch.testing.assert_close(embeds[positions], enc())
    word = lm.model.get_input_embeddings()(batch["input_ids"])[0]
    others = [i for i, k in enumerate(e.prompt_index) if k < 0]
    torch.testing.assert_close(embeds[others], word[others])


# --- training: frozen vs joint, export ---------------------------------------------------------------

def _toy_task(lm, causal, n=16):
    template = parse_template("[P*2] {sub} [P] [Y]" if causal else "[P*2] {sub} [P] [Y] [P]")
    words = ["Paris", "London", "Rome", "Berlin"]
    candidates = torch.tensor([lm.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words])
    items = []
    for i in range(n):
        e = encode(template, lm.tokenizer, {"sub": f"city {i}"}, causal, target_ids=[candidates[i % 4].item()])
        items.append({"encoded": e, "label": i % 4})

    def batch_of(chunk):
        return {**collate([c["encoded"] for c in chunk], lm.tokenizer.pad_token_id),
                "labels": torch.tensor([c["label"] for c in chunk]), "candidate_ids": candidates}

    def loss(model, batch):
        return nn.functional.cross_entropy(model(**batch)[:, 0], batch["labels"])

    def evaluate(model):
        with torch.no_grad():
            batch = batch_of(items)
            return {"acc": (model(**batch)[:, 0].argmax(-1) == batch["labels"]).float().mean().item(),
                    "loss": -loss(model, batch).item()}

    return template, items, batch_of, loss, evaluate


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_frozen_lm_learns_only_the_prompt(name):
    lm = load_lm(name)
    template, items, batch_of, loss, evaluate = _toy_task(lm, lm.causal)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    enc = PromptEncoder(template.n_prompt_tokens, lm.model.get_input_embeddings().embedding_dim)
    model = PromptedLM(lm.model, enc, lm.causal, freeze_lm=True)
    start = evaluate(model)["loss"]
    fit(model, items, [len(i["encoded"].input_ids) for i in items], batch_of, loss, evaluate,
        TrainConfig(lr=1e-2, batch_size=8, epochs=10, seed=1), select=("loss",))
    assert evaluate(model)["loss"] > start  # the prompt alone moved the loss
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())


def test_joint_tuning_trains_lm_with_its_own_learning_rate():
    lm = load_lm("tiny-gpt2")
    template, items, batch_of, loss, evaluate = _toy_task(lm, True)
    before = {k: v.clone() for k, v in lm.model.named_parameters()}
    model = PromptedLM(lm.model, PromptEncoder(template.n_prompt_tokens, lm.model.get_input_embeddings().embedding_dim),
                       causal=True, freeze_lm=False)
    fit(model, items, [len(i["encoded"].input_ids) for i in items], batch_of, loss, evaluate,
        TrainConfig(lr=1e-3, lm_lr=1e-3, batch_size=8, epochs=2, seed=1), select=("loss",))
    assert any(not torch.equal(before[k], v) for k, v in lm.model.named_parameters())


def test_exported_prompt_reproduces_predictions(tmp_path):
    lm = load_lm("tiny-bert")
    template, items, batch_of, loss, evaluate = _toy_task(lm, False)
    enc = PromptEncoder(template.n_prompt_tokens, lm.model.get_input_embeddings().embedding_dim)
    model = PromptedLM(lm.model, enc, False, freeze_lm=True)
    fit(model, items, [len(i["encoded"].input_ids) for i in items], batch_of, loss, evaluate,
        TrainConfig(lr=1e-2, batch_size=8, epochs=3, seed=1), select=("loss",))
    export_prompt(enc, tmp_path, template.text, "tiny-bert")
    batch = batch_of(items)
    with torch.no_grad():
        expected = model(**batch)
        vectors, meta = load_prompt(tmp_path)
        assert isinstance(vectors, FixedPrompt) and meta["template"] == template.text and meta["base_model"] == "tiny-bert"
        torch.testing.assert_close(PromptedLM(lm.model, vectors, False, True)(**batch), expected)
        encoder, _ = load_prompt(tmp_path, with_encoder=True)
        torch.testing.assert_close(PromptedLM(lm.model, encoder, False, True)(**batch), expected)
    assert (tmp_path / "prompt.safetensors").stat().st_size < 10_000  # the vectors alone are small


@pytest.mark.parametrize("bad", [{"lr": -1e-5}, {"lm_lr": 0}, {"batch_size": 0}, {"grad_accum": 3, "batch_size": 8},
                                 {"schedule": "cosine"}, {"precision": "fp8"}])
def test_bad_training_settings_fail_before_training(bad):
    with pytest.raises(ValueError, match="invalid training settings: " + next(iter(bad))):
        TrainConfig(**bad)
