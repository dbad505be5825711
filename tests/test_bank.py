"""The prompt bank: a report's kept prompts over one frozen LM, answering mixed-task rows exactly as each
prompt's own model does, reproducing the report's figures, and refusing what it cannot hold or answer."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from components.cli import main
from components.data.sources import read_jsonl
from components.mlops.bank import BankPredictor, bank_from_report, build_bank, read_bank
from components.mlops.serving import InvalidQuery, NotServable, PromptPredictor
from services import free_port, service_env, start, stop, wait_http

pytestmark = pytest.mark.slow  # trains a small report first

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def report(small_lama, tmp_path_factory):
    """A LAMA report on tiny-gpt2: two relations, two seeds, P-tuning (units keep their prompts)."""
    out = tmp_path_factory.mktemp("bank") / "report"
    assert main(["report", "lama", "--model", "tiny-gpt2", "--relations", "P36,P1376", "--seeds", "34,35",
                 "--methods", "ptuning", "--set", f"data_dir={small_lama}", "--set", "train.max_steps=4",
                 "--set", "train.eval_every=2", "--set", "train.lr=0.05", "--output-dir", str(out), "--no-progress"]) == 0
    return out


def unit_prompt(report, relation, seed):
    """A unit's kept prompt as a servable prompt directory: the vocabulary it answers from beside it."""
    served = report.parent / "served" / f"{relation}-s{seed}"
    if not served.exists():
        shutil.copytree(report / "units" / "ptuning" / f"{relation}-s{seed}.prompt", served)
        data_dir = json.loads((report / "results.json").read_text())["provenance"]["ptuning"]["params"]["data_dir"]
        shutil.copy(f"{data_dir}/29k/vocab.json", served)
    return served


def test_a_report_keeps_each_units_prompt(report):
    for relation in ("P36", "P1376"):
        for seed in (34, 35):
            unit = json.loads((report / "units" / "ptuning" / f"{relation}-s{seed}.json").read_text())
            prompt = report / "units" / "ptuning" / f"{relation}-s{seed}.prompt"
            meta = json.loads((prompt / "prompt.json").read_text())
            assert {"prompt.safetensors", "encoder.safetensors", "prompt.json"} <= {p.name for p in prompt.iterdir()}
            assert (meta["task"], meta["seed"], meta["settings_hash"]) == (relation, seed, unit["settings_hash"])


def test_the_bank_answers_mixed_rows_as_each_prompts_own_model(report, small_lama, tmp_path):
    bank_dir = bank_from_report(report, tmp_path / "bank")
    results = json.loads((report / "results.json").read_text())
    held = read_bank(bank_dir)
    assert sorted(held["prompts"]) == ["P1376", "P36"] and held["vocab"] == "29k" and held["base_model"] == "tiny-gpt2"
    bank = BankPredictor(bank_dir)
    chosen = {}
    for relation, entry in held["prompts"].items():
        seed = int(entry["source"].split(f"{relation}-s")[1].split(" ")[0])
        units = {s: json.loads((report / "units" / "ptuning" / f"{relation}-s{s}.json").read_text()) for s in (34, 35)}
        assert units[seed]["dev_p1"] == max(u["dev_p1"] for u in units.values())  # the seed best on dev
        chosen[relation] = seed

    # mixed rows, interleaved: each row equals its own prompt's single-prompt model
    facts = {r: read_jsonl(small_lama / "29k" / r / "test.jsonl") for r in chosen}
    rows = [{"task": r, "sub": f["sub_label"]} for pair in zip(*facts.values()) for r, f in zip(chosen, pair)]
    answers = bank.predict(rows, top_k=3)
    for relation, seed in chosen.items():
        alone = PromptPredictor(unit_prompt(report, relation, seed))
        mine = [(row, a) for row, a in zip(rows, answers) if row["task"] == relation]
        expected = alone.predict([{"sub": row["sub"]} for row, _ in mine], top_k=3)
        assert [a["prediction"] for _, a in mine] == [e["prediction"] for e in expected]
        assert all(abs(a["score"] - e["score"]) < 1e-5 for (_, a), e in zip(mine, expected))
        # and it scores the report's test P@1 of that seed on the relation's test facts it can answer
        answerable = [f for f in facts[relation] if f["obj_label"] in bank.prompts[relation].answers]
        got = bank.predict([{"task": relation, "sub": f["sub_label"]} for f in answerable], top_k=1)
        p1 = sum(a["prediction"] == f["obj_label"] for a, f in zip(got, answerable)) / len(answerable)
        assert p1 == pytest.approx(results["methods"]["ptuning"]["relations"][relation]["test_p1_by_seed"][str(seed)])

    with pytest.raises(InvalidQuery, match=r"inputs\[1\]\.task='P19': not a task of this bank; it holds P1376, P36"):
        bank.predict([{"task": "P36", "sub": "Paris"}, {"task": "P19", "sub": "Dante"}])
    with pytest.raises(InvalidQuery, match=r"inputs\[1\]\.sub is empty"):
        bank.predict([{"task": "P36", "sub": "Paris"}, {"task": "P1376", "sub": " "}])


def test_a_jointly_tuned_prompt_or_another_scope_cannot_join(report, tmp_path):
    joint = tmp_path / "joint"
    shutil.copytree(unit_prompt(report, "P36", 34), joint)
    meta = json.loads((joint / "prompt.json").read_text())
    (joint / "prompt.json").write_text(json.dumps({**meta, "lm_trained": True}))
    with pytest.raises(NotServable, match="P36 .*trained together with its LM, it cannot join a bank"):
        build_bank({"P36": (joint, "joint"), "P1376": (unit_prompt(report, "P1376", 34), "unit")}, tmp_path / "b1")
    other = tmp_path / "other"
    shutil.copytree(unit_prompt(report, "P36", 34), other)
    (other / "prompt.json").write_text(json.dumps({**meta, "vocab": "34k"}))
    with pytest.raises(NotServable, match="P36 .*'vocab': '34k'.*the bank's other prompts of"):
        build_bank({"P36": (other, "other"), "P1376": (unit_prompt(report, "P1376", 34), "unit")}, tmp_path / "b2")
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()  # refused before anything is written


def test_a_registered_bank_is_served_over_http_and_by_predict(report, small_lama, mlflow_server, tmp_path):
    """`ptuning bank register --report`, then `mlflow models serve` of the version and `ptuning predict`: the same
    answers as the bank loaded here; an unknown task is a 400 that lists the tasks held."""
    env = service_env(MLFLOW_TRACKING_URI=mlflow_server.uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    done = subprocess.run([sys.executable, "-m", "components.cli", "bank", "register", "--report", str(report),
                           "--name", "bank-test"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    registered = json.loads(done.stdout.strip().splitlines()[-1])
    assert registered == {"name": "bank-test", "version": "1", "uri": "models:/bank-test/1", "prompts": ["P1376", "P36"]}
    version = MlflowClient(mlflow_server.uri).get_model_version("bank-test", "1")
    assert json.loads(version.tags["prompts"]).keys() == {"P1376", "P36"} and "| P36 |" in version.description

    rows = [{"task": r, "sub": f["sub_label"]} for r in ("P36", "P1376", "P36")
            for f in read_jsonl(small_lama / "29k" / r / "test.jsonl")[:4]]
    expected = BankPredictor(bank_from_report(report, tmp_path / "bank")).predict(rows, top_k=3)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    port = free_port()
    server = start([BIN / "mlflow", "models", "serve", "-m", "models:/bank-test/1", "--env-manager", "local", "-p", port,
                    "-h", "127.0.0.1"], env, tmp_path / "serve.log", cwd=tmp_path)
    try:
        done = subprocess.run([sys.executable, "-m", "components.cli", "predict", "--model", "models:/bank-test/1",
                               "--input", str(tmp_path / "rows.jsonl"), "--top-k", "3"], env=env, capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [json.loads(line) for line in done.stdout.strip().splitlines()[:-1]]
        assert [line["input"] for line in lines] == rows and [line["top_k"] for line in lines] == [e["top_k"] for e in expected]

        wait_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log", timeout=240)
        url = f"http://127.0.0.1:{port}/invocations"
        answer = httpx.post(url, json={"inputs": rows, "params": {"top_k": 3}}, timeout=60)
        assert answer.status_code == 200, answer.text
        served = answer.json()["predictions"]
        assert [a["prediction"] for a in served] == [e["prediction"] for e in expected]
        assert all(abs(a["score"] - e["score"]) < 1e-5 for a, e in zip(served, expected))
        unknown = httpx.post(url, json={"inputs": [{"task": "P19", "sub": "Dante"}]}, timeout=60)
        assert unknown.status_code == 400 and "task='P19': not a task of this bank; it holds P1376, P36" in unknown.json()["message"]
        assert httpx.post(url, json={"inputs": rows[:1]}, timeout=60).status_code == 200  # the server stays up
    finally:
        stop(server)
