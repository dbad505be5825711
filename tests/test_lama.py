"""LAMA end to end through the CLI on real data: methods, metrics.json, the last JSON line, bad input."""
import json
import subprocess

import pytest
import torch

from components.benchmarks.lama.run import candidate_vocabulary, run
from components.cli import main
from components.common import flatten
from components.config import load_params
from components.models.catalog import load_lm
from components.run_config import resolve
from helpers.cli import MODULE


def _cli(*args, cwd=None):
    return subprocess.run([*MODULE, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_candidate_vocabulary_keeps_single_tokens_of_the_model():
    tokenizer = load_lm("tiny-gpt2").tokenizer
    words, ids = candidate_vocabulary(["Paris", "Quenstedt", "France"], tokenizer)
    assert words == ["Paris", "France"]
    assert ids == [tokenizer.encode(" Paris")[0], tokenizer.encode(" France")[0]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["manual", "ptuning", "finetune", "manual-finetune"])
def test_every_method_runs_on_real_facts(method, lama_data_dir, tmp_path):
    config = resolve("lama", {"task": "P36", "model": "tiny-gpt2", "method": method, "data_dir": str(lama_data_dir),
                              "train.max_steps": 4, "train.eval_every": 2, "train.lr": 1e-3})
    metrics = run(config, tmp_path)
    relation = metrics["tasks"]["P36"]
    assert relation["n_test"] > 300 and metrics["test"]["p1"] == relation["test"]["p1"]  # one relation: its figure
    hits = relation["test"]["p1"] * relation["n_test"]
    assert hits == pytest.approx(round(hits), abs=1e-6)  # P@1 is a count of right answers over the test facts
    assert metrics["dev"]["score"] == metrics["dev"]["p1"] == relation["dev"]["p1"]
    assert relation["steps"] == (0 if method == "manual" else 4)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    # only P-tuning has a prompt to export
    assert (tmp_path / "prompt" / "prompt.safetensors").exists() == (method == "ptuning")


@pytest.mark.slow
def test_cli_trains_ptuning_and_prints_metrics_last(lama_data_dir, tmp_path):
    out = tmp_path / "run"
    done = _cli("train", "lama", "--task", "P1376", "--model", "tiny-bert", "--method", "ptuning", "--vocab", "34k",
                "--steps", "3", "--seed", "7", "--output-dir", str(out), "--set", f"data_dir={lama_data_dir}")
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last == json.loads((out / "metrics.json").read_text())
    assert last["vocab"] == "34k" and last["tasks"]["P1376"]["steps"] == 3
    assert "step" in done.stderr  # progress is shown
    meta = json.loads((out / "prompt" / "prompt.json").read_text())
    assert meta["template"] == "[P*3] {sub} [P*3] [Y] [P*3]" and meta["base_model"] == "tiny-bert"


@pytest.mark.parametrize("args, message", [
    (["--task", "P999"], "unknown LAMA relation"),
    (["--method", "zero-shot"], "unknown LAMA method 'zero-shot'"),
    (["--lr", "-0.001"], "invalid training settings: lr=-0.001"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--set", "template=[P*3] {sub} [P*3]"], "0 target slots"),
    (["--set", "template={object} [Y]"], "unknown slot {object}"),
    (["--set", "train.batchsize=8"], "unknown parameter 'train.batchsize'"),
    (["--set", "nonsense=1"], "unknown parameter 'nonsense'"),
    (["--set", "train.lr=-1e-3"], "invalid training settings: lr=-0.001"),
    (["--set", "train.lr=abc"], "invalid training settings: lr='abc' (expected float)"),
    (["--set", "train.batch_size=2.5"], "invalid training settings: batch_size=2.5 (expected int)"),
    (["--set", "train.deterministic=maybe"], "invalid training settings: deterministic='maybe' (expected bool)"),
    (["--set", "encoder=gru"], "unknown prompt encoder 'gru'"),
    (["--vocab", "34k", "--set", "vocab=12k"], "unknown LAMA vocabulary '12k'"),
    (["--set", "init=vocab"], "unknown prompt init 'vocab'"),
    (["--set", "init=manual", "--set", "template=[P*3] {sub} [Y]"], "init=manual derives the prompt"),
    (["--preset", "papr"], "unknown preset 'papr'; known: paper"),
])
def test_bad_input_fails_clearly_before_any_training(args, message, lama_data_dir, tmp_path, capsys):
    code = main(["train", "lama", "--model", "tiny-gpt2", "--output-dir", str(tmp_path / "out"),
                 "--set", f"data_dir={lama_data_dir}", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing was trained or written


def test_a_params_file_that_is_not_yaml_text_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "params").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params" / "lama.yaml").write_bytes(b"train:\n  lr: 1e-3 \xe2\x80\n")  # a cut UTF-8 sequence
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PTUNING_ROOT", raising=False)
    assert main(["train", "lama", "--model", "tiny-gpt2", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "params" / "lama.yaml") in err and "not a YAML text file" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_missing_data_points_to_the_stage(tmp_path, capsys):
    assert main(["train", "lama", "--model", "tiny-gpt2", "--set", f"data_dir={tmp_path / 'nothing'}",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "dvc repro prepare_lama" in capsys.readouterr().err


def test_an_unwritable_output_directory_fails_before_any_model_loads(lama_data_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", "lama", "--model", "tiny-gpt2", "--set", f"data_dir={lama_data_dir}",
                 "--output-dir", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and str(blocker) in err and err.count("\n") == 1


@pytest.mark.slow
def test_exponent_floats_parse_as_numbers_everywhere(lama_data_dir, tmp_path):
    """`--set train.lr=1e-3` once crashed with a TypeError: YAML 1.1 reads 1e-3 as a string."""
    done = _cli("train", "lama", "--task", "P36", "--model", "tiny-gpt2", "--steps", "1", "--set", "train.lr=1e-3",
                "--set", "train.lm_lr=5E-6", "--set", f"data_dir={lama_data_dir}", "--output-dir", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    recorded = json.loads((tmp_path / "o" / "fingerprint.json").read_text())["params"]["train"]
    assert recorded["lr"] == 1e-3 and recorded["lm_lr"] == 5e-6


@pytest.mark.slow
def test_parameters_come_from_the_checkout_the_command_runs_in(lama_data_dir, tmp_path, repo_dir):
    """A second checkout (or a DVC experiment workspace) trains on its own params/, not the installed package's."""
    import shutil

    other = tmp_path / "checkout"
    (other / "params").mkdir(parents=True)
    shutil.copy(repo_dir / "dvc.yaml", other / "dvc.yaml")
    for name in ("lama", "data"):
        shutil.copy(repo_dir / "params" / f"{name}.yaml", other / "params" / f"{name}.yaml")
    lama = (other / "params" / "lama.yaml").read_text().replace("task: P19 ", "task: P1376 ")
    (other / "params" / "lama.yaml").write_text(lama.replace("data_dir: data/lama", f"data_dir: {lama_data_dir}"))
    done = _cli("train", "lama", "--model", "tiny-gpt2", "--method", "manual", "--output-dir", "out", cwd=other)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["task"] == "P1376"  # this checkout's value, not P19


@pytest.mark.slow
def test_smollm2_manual_prompt_knows_capitals(lama_data_dir, tmp_path):
    """Real weights: the manual prompt of P36 (capital) beats chance by far on LAMA-29k."""
    config = resolve("lama", {"task": "P36", "model": "smollm2-135m", "method": "manual", "data_dir": str(lama_data_dir)})
    metrics = run(config, tmp_path)
    assert metrics["test"]["p1"] > 0.3  # chance over ~18k candidate words is ~0.0001


def test_the_paper_preset_restores_the_paper_codes_defaults_under_the_commands_overrides():
    """The defaults are params/lama.yaml's, whatever recipe it holds today; `--preset paper` is its `presets.paper`
    table over them, and the command's own settings go over the preset."""
    loaded = load_params("lama")
    defaults = {k: v for k, v in flatten({k: v for k, v in loaded.items() if k != "presets"}).items() if k != "data_dir"}
    preset = loaded["presets"]["paper"]
    tuned, paper = resolve("lama"), resolve("lama", {"preset": "paper"})
    resolved = lambda config: {k: v for k, v in flatten(config.params).items() if k != "data_dir"}  # made absolute
    assert resolved(tuned) == defaults
    assert resolved(paper) == {**defaults, **preset, "preset": "paper"}  # a run records the preset it used ...
    assert "presets" not in paper.params  # ... not the others it could have
    # the paper's LAMA code (../shared/docs/paper-settings.md): 100 epochs at lr 1e-5, dev every epoch, patience 20
    paper_code = {"train.lr": 1e-5, "train.epochs": 100, "train.max_steps": None, "train.eval_every": None,
                  "train.patience": 20, "encoder": "lstm"}
    assert {k: resolved(paper)[k] for k in paper_code} == paper_code
    changed = {k for k, v in preset.items() if defaults.get(k) != v}
    assert changed and paper.fingerprint_hash() != tuned.fingerprint_hash()
    mine = preset["train.lr"] * 7
    assert resolve("lama", {"preset": "paper", "train.lr": mine}).params["train"]["lr"] == mine  # the command wins


def test_a_benchmark_without_presets_says_so():
    with pytest.raises(ValueError, match="unknown preset 'paper'; known: none in this file"):
        resolve("superglue", {"preset": "paper"})


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-bert"])
def test_manual_init_starts_exactly_at_the_manual_prompt(model, lama_data_dir):
    """init=manual with no encoder: before any step, the continuous prompt scores what the manual prompt does."""
    from components.benchmarks.lama.run import Candidates, load_relation, new_encoder
    from components.method.model import PromptedLM
    from components.method.templates import collate, pad_id

    lm = load_lm(model)
    params = resolve("lama", {"model": model, "task": "P19", "data_dir": str(lama_data_dir), "encoder": "none",
                              "init": "manual"}).params
    candidates = Candidates.load(params, lm.tokenizer)
    prompted = load_relation("P19", lm, params, candidates)
    manual = load_relation("P19", lm, params, candidates, method="manual")
    assert manual.template.text == "{sub} was born in [Y] ."
    # a causal LM reads nothing after its target; a masked LM keeps the full stop, as a prompt token
    assert prompted.template.text == ("{sub} [P*3] [Y]" if model == "tiny-gpt2" else "{sub} [P*3] [Y] [P]")
    logits = [PromptedLM(lm.model, prompt, lm.causal, freeze_lm=True).eval()(
                  **collate([f.encoded for f in data.splits["test"][:16]], pad_id(lm.tokenizer)),
                  candidate_ids=candidates.ids)
              for prompt, data in ((new_encoder(prompted, lm, "none"), prompted), (None, manual))]
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
