"""A prompt bank: many frozen-LM prompts of one benchmark, scope (LAMA's vocabulary, SuperGLUE's setting) and base
model, served by one LM. A request's rows name their task and may mix tasks freely; they go through the LM
together, sorted by length and in chunks, each row reading its own prompt's vectors (one stack of every prompt's
vectors, as the LAMA pool trains them). A bank answers exactly as each prompt's own model does.

    <bank>/bank.json           benchmark, base model, scope, and per task: its folder and where it came from
    <bank>/prompts/<task>/     a prompt directory (prompt.safetensors, prompt.json, LAMA's vocab.json)

Logged as MLflow "models from code" (`bank_model.py`, no pickle) and registered as `ptuning-bank-<benchmark>-
<scope>-<model>`; the version's tags and description list the prompts it holds.

    ptuning bank register --report reports/lama/smollm2-135m     (per relation, the seed best on dev)
    mlflow models serve -m models:/ptuning-bank-lama-29k-smollm2-135m/1 --env-manager local -p 5002
    curl -d '{"inputs": [{"task": "P19", "sub": "Dante"}, {"task": "P36", "sub": "Italy"}]}' ...
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from components.common import safe_name
from components.config import in_root, project_root
from components.method.model import LM_DIR
from components.mlops.choice_serving import is_choice_prompt
from components.mlops.serving import (PROMPT_FILES, InvalidQuery, NotServable, ServedPrompt, answer_rows,
                                      check_servable, input_fields, read_meta, requirements)

BANK_FILE = "bank.json"
BANK_CODE = Path(__file__).with_name("bank_model.py")
SCOPE_KEYS = ("benchmark", "base_model", "vocab", "setting")  # what every prompt of a bank shares


def scope_of(meta: dict) -> dict:
    return {k: meta[k] for k in SCOPE_KEYS if meta.get(k) is not None}


def bank_name(scope: dict) -> str:
    """`ptuning-bank-<benchmark>-<vocab or setting>-<model>`, as a single prompt's registered name."""
    variant = scope.get("vocab") or scope.get("setting")
    return safe_name("ptuning-bank", scope["benchmark"], *([variant] if variant else []), scope["base_model"])


def build_bank(prompts: dict[str, tuple[Path, dict]], out: str | Path) -> Path:
    """A bank folder from `prompts` (task -> (prompt directory, where it came from)). Refused with a one-line
    reason (NotServable): a jointly tuned prompt (it has its own LM), a prompt its benchmark cannot serve, and
    prompts of different benchmarks, scopes or base models."""
    if not prompts:
        raise NotServable("a bank needs at least one prompt")
    scope, held = None, {}
    for task, (directory, source) in sorted(prompts.items()):
        directory = Path(directory)
        if read_meta(directory).get("lm_trained") or (directory / LM_DIR).exists():
            raise NotServable(f"{task} ({source}): trained together with its LM, it cannot join a bank of "
                              "frozen-LM prompts (it has its own LM)")
        meta = check_servable(directory)
        if is_choice_prompt(meta):
            raise NotServable(f"{task} ({source}): a choice prompt scores each of a row's choices whole; a bank reads "
                              "one answer position per row")
        if scope is None:
            scope = scope_of(meta)
        elif scope_of(meta) != scope:
            raise NotServable(f"{task} ({source}) is of {scope_of(meta)}, the bank's other prompts of {scope}")
        held[task] = {"dir": f"prompts/{safe_name(task)}", "source": source, "template": meta["template"]}
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    for task, (directory, _) in prompts.items():
        target = out / held[task]["dir"]
        target.mkdir(parents=True)
        for name in PROMPT_FILES:
            if name != "encoder.safetensors" and (Path(directory) / name).is_file():  # serving reads the vectors only
                shutil.copy2(Path(directory) / name, target / name)
    (out / BANK_FILE).write_text(json.dumps({**scope, "prompts": held}, indent=1))
    return out


def bank_from_report(report_dir: str | Path, out: str | Path) -> Path:
    """A bank of a LAMA report's P-tuning prompts: per relation, the seed best on dev (the lowest seed on a tie),
    each unit's kept prompt (`units/ptuning/<relation>-s<seed>.prompt/`), checked against the unit it came from."""
    report_dir = Path(report_dir)
    results_path = report_dir / "results.json"
    if not results_path.is_file():
        raise NotServable(f"{report_dir} holds no results.json: not a report folder (reports/<benchmark>/<model>)")
    results = json.loads(results_path.read_text())
    relations = (results.get("methods", {}).get("ptuning") or {}).get("relations")
    if results.get("benchmark") != "lama" or not relations:
        raise NotServable(f"{report_dir}: a bank is built from a LAMA report's P-tuning units; this one has none")
    data_dir = Path(results["provenance"]["ptuning"]["params"]["data_dir"])
    vocab = in_root(data_dir, project_root()) / results["vocab"] / "vocab.json"
    prompts = {}
    with tempfile.TemporaryDirectory() as staging:
        for relation in sorted(relations):
            units = [json.loads(p.read_text()) for p in sorted((report_dir / "units" / "ptuning").glob(f"{relation}-s*.json"))]
            units = [u for u in units if str(u["seed"]) in relations[relation]["test_p1_by_seed"]
                     and u["test_p1"] == relations[relation]["test_p1_by_seed"][str(u["seed"])]]
            if not units:
                raise NotServable(f"{report_dir}: no unit of {relation} matches results.json (rerun the report)")
            best = max(units, key=lambda u: (u["dev_p1"], -u["seed"]))
            unit_prompt = report_dir / "units" / "ptuning" / f"{relation}-s{best['seed']}.prompt"
            meta = json.loads((unit_prompt / "prompt.json").read_text()) if (unit_prompt / "prompt.json").is_file() else {}
            if meta.get("settings_hash") != best["settings_hash"]:
                raise NotServable(f"{unit_prompt}: no kept prompt of this unit (a table run before reports kept "
                                  "prompts: rerun it with `ptuning report lama`)")
            staged = Path(staging) / relation
            shutil.copytree(unit_prompt, staged)
            shutil.copy2(vocab, staged / "vocab.json")  # the answers a served prompt may give, as P@1 reads them
            prompts[relation] = (staged, f"{report_dir}/units/ptuning/{relation}-s{best['seed']} "
                                         f"(dev P@1 {best['dev_p1']:.4f}, test P@1 {best['test_p1']:.4f})")
        return build_bank(prompts, out)


def read_bank(bank_dir: str | Path) -> dict:
    path = Path(bank_dir) / BANK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{bank_dir} holds no prompt bank ({BANK_FILE})")
    return json.loads(path.read_text())


class BankPredictor:
    """A bank folder loaded over one frozen LM: answers rows `{"task": ..., <that task's fields>}`."""

    def __init__(self, bank_dir: str | Path):
        import torch

        from components.method.model import FixedPrompt, PromptedLM, load_prompt
        from components.method.templates import pad_id
        from components.models.catalog import load_lm

        bank_dir = Path(bank_dir)
        self.bank = read_bank(bank_dir)
        lm = load_lm(self.bank["base_model"])
        self.prompts: dict[str, ServedPrompt] = {}
        self.offsets: dict[str, int] = {}
        vectors, answers = [], {}
        for task, entry in self.bank["prompts"].items():
            directory = bank_dir / entry["dir"]
            prompt, meta = load_prompt(directory)
            served = ServedPrompt(directory, meta, lm.tokenizer, lm.causal, lm.model.config, answers)
            self.offsets[task] = sum(v.shape[0] for v in vectors)
            vectors.append(prompt.vectors)
            self.prompts[task] = served
        self.tasks = sorted(self.prompts)
        self.fields = sorted({f for p in self.prompts.values() for f in p.fields})
        self.pad = pad_id(lm.tokenizer)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        stacked = FixedPrompt(torch.cat(vectors))
        self.model = PromptedLM(lm.model, stacked, lm.causal, freeze_lm=True).eval().to(self.device)

    def predict(self, rows: list[dict], top_k: int = 5, batch_size: int = 32) -> list[dict]:
        """One Answer (as a dict) per row, whatever its task; an unknown task or a row outside its prompt's
        limits fails with InvalidQuery naming it."""
        for n, row in enumerate(rows):
            if row.get("task") not in self.prompts:
                raise InvalidQuery(f"inputs[{n}].task={row.get('task')!r}: not a task of this bank; it holds "
                                   f"{', '.join(self.tasks)}")
        by_task: dict[str, list[int]] = {}
        for n, row in enumerate(rows):
            by_task.setdefault(row["task"], []).append(n)
        for task, numbers in by_task.items():
            self.prompts[task].check([rows[n] for n in numbers], top_k, numbers)
        served = [self.prompts[row["task"]] for row in rows]
        encoded = [s.encode(row, self.offsets[row["task"]]) for s, row in zip(served, rows)]
        return answer_rows(self.model, served, encoded, top_k, self.pad, self.device, batch_size)


def describe(bank: dict) -> str:
    """The registered version's description: the prompts it holds, as the MLflow UI shows it (markdown)."""
    scope = ", ".join(f"{k} `{bank[k]}`" for k in SCOPE_KEYS if k in bank)
    rows = "\n".join(f"| {task} | `{entry['template']}` | {entry['source']} |" for task, entry in sorted(bank["prompts"].items()))
    return (f"Prompt bank of {len(bank['prompts'])} frozen-LM prompts over one LM ({scope}). A request's rows name "
            f"their task: `{{\"task\": \"<task>\", <fields>}}`.\n\n| task | template | source |\n|---|---|---|\n{rows}\n")


def log_bank_model(bank_dir: str | Path, *, run_id: str, registered_model_name: str | None = None):
    """Log a bank folder as a models-from-code pyfunc of run `run_id` and, with a name, register it; the
    version's `prompts` tag and description list what it holds. Returns (MLflow's ModelInfo, the version)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model

    import components

    bank = read_bank(bank_dir)
    first = bank["prompts"][min(bank["prompts"])]
    example = ([{"task": min(bank["prompts"]), **{f: "Dante" if f == "sub" else "The cat sat on the mat"
                                                    for f in input_fields({"template": first["template"]})}}], {"top_k": 5})
    fields = sorted({f for e in bank["prompts"].values() for f in input_fields({"template": e["template"]})})
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "components"  # the project's code, without caches
        shutil.copytree(Path(components.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        info = Model.log(artifact_path=None, name="bank", flavor=mlflow.pyfunc, run_id=run_id, python_model=str(BANK_CODE),
                         artifacts={"bank": str(bank_dir)}, model_config={"fields": fields}, input_example=example,
                         code_paths=[str(code)], pip_requirements=requirements(), registered_model_name=registered_model_name,
                         model_type="ptuning-prompt-bank", metadata={"ptuning_bank": {k: v for k, v in bank.items() if k != "prompts"},
                                                                     "tasks": sorted(bank["prompts"]), "fields": fields})
    version = None
    if registered_model_name:
        client = MlflowClient()
        version = info.registered_model_version
        tags = {"prompts": json.dumps({t: e["source"] for t, e in sorted(bank["prompts"].items())})[:5000],
                "n_prompts": str(len(bank["prompts"])), "bank_sha256": bank_digest(bank_dir)}
        for key, value in tags.items():
            client.set_model_version_tag(registered_model_name, version, key, value)
        client.update_model_version(registered_model_name, version, description=describe(bank))
    return info, version


def bank_digest(bank_dir: str | Path) -> str:
    """sha256 of every file of the bank (names and contents): what a version holds, to the last bit."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(bank_dir).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(bank_dir)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
