"""The shared-batch trainer (components/benchmarks/lama/shared.py) against one-relation training on real facts."""
import logging
import re

from dataclasses import replace

import pytest
import torch

from components.benchmarks.lama.run import run_relation
from components.benchmarks.lama.pool_state import Heartbeat, PoolCheckpoint, state_digest
from components.benchmarks.lama.shared import Job, load_relations, train_shared
from components.method.model import load_prompt
from components.models.catalog import load_lm
from components.run_config import resolve

pytestmark = pytest.mark.slow  # trains through the CLI in subprocesses: the full tier (make test)


def _config(data_dir, task, encoder="lstm", init="random", **train):
    return resolve("lama", {"task": task, "model": "tiny-gpt2", "method": "ptuning", "data_dir": str(data_dir),
                            "encoder": encoder, "init": init, "train.lr": 1e-3,
                            **{f"train.{k}": v for k, v in train.items()}})


def _vectors(result, dim, kind="lstm"):
    from components.method.model import PromptEncoder

    encoder = PromptEncoder(result.encoder_state["embedding.weight"].shape[0], dim, kind)
    encoder.load_state_dict(result.encoder_state)
    return encoder().detach()


@pytest.mark.parametrize("encoder, init", [("lstm", "random"), ("none", "manual")])
def test_one_relation_trains_as_run_relation_does(small_lama, tmp_path, encoder, init):
    # dev at the start and at the last step, in both: the same kept state, so the vectors compare
    config = _config(small_lama, "P1376", encoder, init, max_steps=6, eval_every=6)
    lm = load_lm("tiny-gpt2")
    alone = run_relation(config.tasks[0], lm, config.params, tmp_path)
    data, candidates = load_relations(["P1376"], lm, config.params)
    [shared], timing = train_shared(lm, [Job("P1376", data[0], config.tasks[0].train, encoder)], candidates, pool=1,
                                    show_progress=False)
    expected = load_prompt(tmp_path / "prompt")[0]()
    assert torch.allclose(_vectors(shared, expected.shape[1], encoder), expected, atol=1e-6)
    assert (shared.test_p1, shared.dev_p1, shared.steps) == (alone.test_p1, alone.dev_p1, alone.steps)
    assert [h["step"] for h in shared.history] == [h["step"] for h in alone.history] == [0, 6]
    assert timing["train_examples"] == 6 * 8 and timing["shared_steps"] == 6


def test_relations_stop_independently_and_leave_the_batch(small_lama):
    config = _config(small_lama, "P36,P1376", epochs=1, eval_every=None)  # one epoch each: 2 and 5 steps
    lm = load_lm("tiny-gpt2")
    data, candidates = load_relations(["P36", "P1376"], lm, config.params)
    train = config.tasks[0].train
    finished, progress = [], []
    results, timing = train_shared(lm, [Job(d.relation, d, train) for d in data], candidates, pool=2,
                                   on_job_end=lambda r: finished.append((r.key, r.steps)),
                                   on_progress=progress.append, show_progress=False)
    assert finished == [("P36", 2), ("P1376", 5)]
    # 2 shared steps of 8 + 8 rows, then P1376 alone: 3 steps of 8
    assert timing["shared_steps"] == 5 and timing["train_examples"] == 2 * 16 + 3 * 8
    assert (progress[1]["done"], progress[1]["remaining"]) == (1, 1) and progress[-1]["remaining"] == 0
    # training beside P36 for 2 steps left P1376's prompt as training it alone does
    [alone], _ = train_shared(lm, [Job("P1376", data[1], train)], candidates, pool=1, show_progress=False)
    together = next(r for r in results if r.relation == "P1376")
    dim = lm.model.get_input_embeddings().embedding_dim
    assert torch.allclose(_vectors(together, dim), _vectors(alone, dim), atol=1e-6)
    assert together.history == alone.history


def test_a_full_queue_waits_for_a_free_place_in_the_pool(small_lama):
    config = _config(small_lama, "P36", max_steps=2, eval_every=1, patience=None)
    lm = load_lm("tiny-gpt2")
    data, candidates = load_relations(["P36"], lm, config.params)
    jobs = [Job(f"P36-{i}", data[0], config.tasks[0].train) for i in range(3)]
    results, timing = train_shared(lm, jobs, candidates, pool=2, show_progress=False)
    assert [r.key for r in results] == ["P36-0", "P36-1", "P36-2"]
    assert timing["shared_steps"] == 4  # two jobs together for 2 steps, then the third alone
    # same facts, same seed: the same prompt, whether trained beside another job or alone
    dim = lm.model.get_input_embeddings().embedding_dim
    assert torch.allclose(_vectors(results[0], dim), _vectors(results[2], dim), atol=1e-6)


def test_the_recipe_sweep_ranks_recipes_on_dev_and_never_scores_test(small_lama, tmp_path, monkeypatch):
    from components.benchmarks.lama import run as lama_run
    from components.reports import sweep

    scored = []  # the facts every P@1 was computed on
    real = lama_run.precision_at_1
    monkeypatch.setattr("components.benchmarks.lama.shared.precision_at_1",
                        lambda model, facts, *a: scored.append(facts) or real(model, facts, *a))
    out = tmp_path / "SWEEP.md"
    assert sweep.main(["--model", "tiny-gpt2", "--relations", "P36,P1376", "--recipes", "lstm/random/1e-3,none/manual/3e-3/train.length_bucketing=false",
                       "--steps", "4", "--eval-every", "2", "--out", str(out), "--data-dir", str(small_lama)]) == 0
    assert scored == []  # the sweep's jobs are never scored on test
    rows = [line for line in out.read_text().splitlines() if line.startswith("| lstm") or line.startswith("| none")]
    means = [float(re.search(r"\*\*([\d.]+)\*\*", row).group(1)) for row in rows]
    assert len(rows) == 2 and means == sorted(means, reverse=True)  # best mean dev P@1 first
    assert "--recipes lstm/random/1e-3,none/manual/3e-3/train.length_bucketing=false" in out.read_text()  # the exact command
    assert sum("| train.length_bucketing=False |" in row for row in rows) == 1  # a recipe's further settings, shown
    with pytest.raises(SystemExit, match="is not encoder/init/lr"):
        sweep.main(["--recipes", "lstm/3e-4"])
    with pytest.raises(SystemExit, match="is not encoder/init/lr"):
        sweep.main(["--recipes", "lstm/random/3e-4/length_bucketing"])


def _beats(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "components.benchmarks.lama.shared"
            and "P-tuning: shared step" in r.getMessage()]


def test_without_a_progress_bar_the_pool_logs_a_line_every_interval(small_lama, caplog):
    """`--no-progress`: a line on the `components` logger at most every `log_every_s` (a minute by default), so
    that a long pool is never silent; none with a progress bar."""
    config = _config(small_lama, "P36", max_steps=3, eval_every=3, patience=None)
    lm = load_lm("tiny-gpt2")
    data, candidates = load_relations(["P36"], lm, config.params)
    job = Job("P36", data[0], config.tasks[0].train)
    with caplog.at_level(logging.INFO, logger="components"):
        train_shared(lm, [job], candidates, pool=1, show_progress=False, log_every_s=0)
        beats = _beats(caplog)
        assert [int(re.search(r"shared step (\d+)", b).group(1)) for b in beats] == [1, 2, 3]
        assert "prompt steps 1/3, prompts done 0/1" in beats[0] and "prompt steps 3/3, prompts done 1/1" in beats[-1]
        caplog.clear()
        train_shared(lm, [job], candidates, pool=1, show_progress=False, log_every_s=3600)
        train_shared(lm, [job], candidates, pool=1, show_progress=True, log_every_s=0)
        assert _beats(caplog) == []


def test_heartbeat_logs_at_most_once_per_interval(caplog):
    now = [100.0]
    beat = Heartbeat(every_s=60, clock=lambda: now[0])
    said = []
    with caplog.at_level(logging.INFO, logger="components"):
        for t in (110.0, 159.9, 160.0, 200.0, 220.5):
            now[0] = t
            said.append(beat("at %s", t))
    assert said == [False, False, True, False, True]
    assert [r.getMessage() for r in caplog.records] == ["at 160.0", "at 220.5"]


def test_a_pool_resumed_from_any_checkpoint_ends_as_an_uninterrupted_one(small_lama, tmp_path):
    """In process: a pool stopped right after its n-th job finished (its unit saved, the others still training)
    resumes from its last checkpoint with the jobs that checkpoint had pending, and every job ends with the prompt,
    history and figures of the uninterrupted pool, and the same training counts."""
    config = _config(small_lama, "P36,P1376", encoder="mlp", epochs=3, eval_every=2, patience=None)
    lm = load_lm("tiny-gpt2")
    data, candidates = load_relations(["P36", "P1376"], lm, config.params)
    by_name, train = {d.relation: d for d in data}, config.tasks[0].train
    jobs = lambda keys: [Job(f"{r}-{s}", by_name[r], replace(train, seed=s), "mlp") for r, s in keys]
    keys = [("P36", 34), ("P1376", 34), ("P36", 35), ("P1376", 35)]
    straight, straight_timing = train_shared(lm, jobs(keys), candidates, pool=2, lm_batch=6, show_progress=False,
                                             checkpoint_dir=tmp_path / "straight", checkpoint_every_s=0)
    expected = {r.key: (state_digest(r.encoder_state), r.history, r.test_p1, r.dev_p1, r.steps) for r in straight}
    assert not list((tmp_path / "straight").glob("pool*"))  # a finished pool removes its checkpoint

    class Stop(Exception):
        pass

    def stop(result):
        raise Stop

    for stop_after in (1, 2, 3):
        directory, finished = tmp_path / f"stopped-{stop_after}", []

        def on_job_end(result):
            finished.append(result.key)
            if len(finished) == stop_after:
                raise Stop

        with pytest.raises(Stop):
            train_shared(lm, jobs(keys), candidates, pool=2, lm_batch=6, show_progress=False,
                         checkpoint_dir=directory, checkpoint_every_s=0, on_job_end=on_job_end)
        pending = [(j["relation"], j["seed"]) for j in PoolCheckpoint(directory).pending()]
        assert set(pending) <= set(keys)
        resumed, timing = train_shared(lm, jobs(pending), candidates, pool=2, lm_batch=6, show_progress=False,
                                       checkpoint_dir=directory, checkpoint_every_s=0)
        got = {r.key: (state_digest(r.encoder_state), r.history, r.test_p1, r.dev_p1, r.steps) for r in resumed}
        assert set(got) == {f"{r}-{s}" for r, s in pending} and set(got) | set(finished[:-1]) == set(expected)
        assert got == {k: expected[k] for k in got}
        assert (timing["train_examples"], timing["shared_steps"]) == (straight_timing["train_examples"],
                                                                     straight_timing["shared_steps"])
        assert not list(directory.glob("pool*"))
    # a checkpoint resumes only the pool it holds: other jobs are an error, not a silently different pool
    with pytest.raises(Stop):
        train_shared(lm, jobs(keys), candidates, pool=2, lm_batch=6, show_progress=False,
                     checkpoint_dir=tmp_path / "other", on_job_end=stop)
    assert PoolCheckpoint(tmp_path / "other").read()["shared_step"] == 0  # the one written at the start
    with pytest.raises(ValueError, match="holds other jobs or settings"):
        train_shared(lm, jobs(keys[:2]), candidates, pool=2, lm_batch=6, show_progress=False,
                     checkpoint_dir=tmp_path / "other")
