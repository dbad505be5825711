"""The served prompt: what a registered prompt answers, in its task's terms, and how it is logged to MLflow.

A registered prompt is an MLflow "models from code" pyfunc: `prompt_model.py` (this package) is the model,
executed at load time, so no pickle is read (it loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false). Its
artifacts are the prompt directory's files: prompt.safetensors, encoder.safetensors, prompt.json, LAMA's
vocab.json and, for a prompt trained together with its LM (`lm_trained`), the LM itself under `lm/`
(safetensors, written by components.method.model.export_lm). The project's code travels with the model (`code/components`), and
its requirements pin the third-party packages serving imports, so any MLflow environment manager can
rebuild it:

    mlflow models serve -m models:/ptuning-lama-P19-29k-smollm2-135m@champion --env-manager local -p 5001
    curl -d '{"inputs": [{"sub": "Dante"}], "params": {"top_k": 3}}' -H 'Content-Type: application/json' \
         127.0.0.1:5001/invocations
    # {"predictions": [{"prediction": "Florence", "score": 0.41, "top_k": [...], "top_k_scores": [...]}]}

`--env-manager virtualenv|uv|conda` installs the pinned requirements from PyPI; the base LM of a frozen-LM
prompt must then be reachable by the model catalogue there (its cache, PTUNING_MODEL_CACHE, or the mirror).

What a prompt answers is its benchmark row's `answers` (the request's fields are the template's `{slots}`):
    LAMA                     a word of the benchmark vocabulary (vocab.json): top-k with their scores
    SuperGLUE classification its labels through the verbalizer (BoolQ, CB, RTE, WiC; MultiRC per answer option)
    COPA, WSC                refused at registration (the row's check_servable): choice scoring / span generation

What a request may hold (anything else is a 400 naming the field and the limit; the server stays up):
    fields       exactly the template's slots, each a string (a missing, unknown or non-string field is refused)
    a text field 1 token at least (not empty, not only spaces) and at most the room the template leaves in the
                 model's max input length (`max_length` of prompt.json, at most the LM's positions, minus the
                 template's prompt, anchor, target and special tokens): LAMA's `[P*3] {sub} [P*3] [Y]` at
                 max_length 64 leaves 57 tokens for `sub`. Fields that fit alone but not together are shortened
                 from the task's `truncate` slot, as in training (a SuperGLUE passage or premise); a template
                 without one refuses them.
    top_k        an integer from 1 to MAX_TOP_K (100); an answer lists min(top_k, its candidates) (RTE: 2 labels)
"""
from __future__ import annotations

import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from numbers import Integral

from pydantic import BaseModel, ConfigDict, create_model, model_validator

from components.method.model import LM_DIR

PROMPT_FILES = ("prompt.safetensors", "encoder.safetensors", "prompt.json", "vocab.json")
MODEL_CODE = Path(__file__).with_name("prompt_model.py")
# what `import components.mlops.prompt_model` pulls in at serving time, pinned to the versions that logged it
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pydantic", "numpy", "pandas",
                    "pyyaml", "filelock", "gguf")
MAX_TOP_K = 100  # answers per row at most (LAMA's vocabulary holds thousands of words)


class NotServable(ValueError):
    """A prompt the served model cannot answer for in its task's terms: registration refuses it."""


class InvalidQuery(ValueError):
    """A request the served model refuses: the message names the field and its limit (served: HTTP 400)."""


class Answer(BaseModel):
    """One answer: the top-1 (a vocabulary word or a label), its probability among the candidates, the top-k."""
    prediction: str
    score: float
    top_k: list[str]
    top_k_scores: list[float]


def read_meta(prompt_dir: str | Path) -> dict:
    prompt_dir = Path(prompt_dir)
    if not (prompt_dir / "prompt.json").is_file() or not (prompt_dir / "prompt.safetensors").is_file():
        raise FileNotFoundError(f"{prompt_dir} holds no exported prompt (prompt.json + prompt.safetensors)")
    return json.loads((prompt_dir / "prompt.json").read_text())


def input_fields(meta: dict) -> list[str]:
    """The request's fields: the template's slots, in order."""
    from components.method.templates import parse_template

    return list(dict.fromkeys(parse_template(meta["template"]).slots))


def check_servable(prompt_dir: str | Path) -> dict:
    """prompt.json, when the served model can answer for it in its task's terms (its benchmark's row decides);
    else NotServable says why."""
    from components.benchmarks import get_benchmark

    prompt_dir = Path(prompt_dir)
    meta = read_meta(prompt_dir)
    where = f"{prompt_dir}: {meta.get('benchmark')} {meta.get('task')}"
    try:
        get_benchmark(str(meta.get("benchmark"))).check_servable(meta, prompt_dir)
    except ValueError as error:
        raise NotServable(f"{where}: {error}") from None
    if meta.get("lm_trained") and not (prompt_dir / LM_DIR / "config.json").is_file():
        raise NotServable(f"{where}: the LM was trained with this prompt but {prompt_dir / LM_DIR} holds no LM "
                          "(the benchmark writes it with components.method.model.export_lm after training)")
    if not input_fields(meta):
        raise NotServable(f"{where}: the template {meta['template']!r} reads no input field")
    return meta


def query_type(fields: list[str]) -> type[BaseModel]:
    """The request row: one required string per template slot and nothing else (MLflow's signature and
    validation; an unknown field is refused by name, not dropped)."""

    def only_the_fields(cls, data):
        unknown = sorted(set(data) - set(fields)) if isinstance(data, dict) else []
        if unknown and set(fields) <= set(data):  # else pydantic names the missing ones ("Field required") and these
            raise ValueError(f"unknown field(s) {unknown}: a row holds exactly the template's fields {fields}")
        return data

    return create_model("Query", __config__=ConfigDict(extra="forbid"),
                        __validators__={"only_the_fields": model_validator(mode="before")(only_the_fields)},
                        **{name: (str, ...) for name in fields})


def requirements() -> list[str]:
    """The serving packages pinned to the versions installed here (no inference: it imports the model)."""
    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


class PromptPredictor:
    """A prompt directory (or a model's `prompt` artifact) loaded with its LM: answers rows of input fields."""

    def __init__(self, prompt_dir: str | Path):
        import torch

        from components.benchmarks import get_benchmark
        from components.method.model import PromptedLM, load_prompt
        from components.method.templates import parse_template
        from components.models.catalog import load_lm

        directory = Path(prompt_dir)
        self.meta = check_servable(directory)
        prompt, _ = load_prompt(directory)
        lm = load_lm(str(directory / LM_DIR) if (directory / LM_DIR).is_dir() else self.meta["base_model"])
        self.tokenizer, self.causal = lm.tokenizer, lm.causal
        self.template = parse_template(self.meta["template"])
        self.fields = input_fields(self.meta)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = PromptedLM(lm.model, prompt, lm.causal, freeze_lm=True).eval().to(self.device)
        self.answers, ids = get_benchmark(self.meta["benchmark"]).answers(self.meta, directory, self.tokenizer)
        self.truncate = self.meta.get("truncate")
        self.candidate_ids = torch.tensor(ids, device=self.device)
        config = lm.model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
        self.max_length = min(int(self.meta.get("max_length") or limit), int(limit))
        self.room = self.max_length - self._fixed_tokens()  # tokens the template leaves for its input fields

    def _fixed_tokens(self) -> int:
        """Tokens of the encoded input that are not a field's: prompt, anchors, one target, special tokens (as
        components.method.templates.encode lays them out)."""
        from components.method.templates import piece_ids

        fixed = 0 if self.causal else (self.tokenizer.cls_token_id is not None) + (self.tokenizer.sep_token_id is not None)
        for i, part in enumerate(self.template.parts):
            if part.kind == "anchor":
                fixed += len(piece_ids(self.tokenizer, part.value, i == 0))
            elif part.kind == "prompt":
                fixed += part.count
            elif part.kind == "target":
                fixed += 1
        return fixed

    def missing(self, rows: list[dict]) -> list[str]:
        return [f for f in self.fields if any(f not in row or row[f] is None for row in rows)]

    def check(self, rows: list[dict], top_k) -> None:
        """Refuse what the model cannot answer as asked (InvalidQuery names the field and its limit): top_k out of
        1..MAX_TOP_K, an empty text field, a field longer than the room the template leaves in the model's max
        input length, fields too long together unless the task's `truncate` slot absorbs it (as in training)."""
        from components.method.templates import piece_ids

        if isinstance(top_k, bool) or not isinstance(top_k, Integral) or not 1 <= top_k <= MAX_TOP_K:
            raise InvalidQuery(f"params.top_k={top_k!r}: top_k must be an integer from 1 to {MAX_TOP_K} "
                               f"(answers per row; this prompt has {len(self.answers)} candidates)")
        missing = self.missing(rows)
        if missing:
            raise InvalidQuery(f"input lacks field(s) {missing}: the template {self.meta['template']!r} reads {self.fields}")
        limit = (f"a text field holds 1 to {self.room} tokens (the model reads at most {self.max_length}, "
                 f"the template takes {self.max_length - self.room})")
        slots = [(i, part.value) for i, part in enumerate(self.template.parts) if part.kind == "slot"]
        for n, row in enumerate(rows):
            lengths: dict[str, list[int]] = {}
            for i, name in slots:
                value = row[name]
                if not isinstance(value, str):
                    raise InvalidQuery(f"inputs[{n}].{name}: a string is expected, got {type(value).__name__}")
                if not value.strip():
                    raise InvalidQuery(f"inputs[{n}].{name} is empty: {limit}")
                lengths.setdefault(name, []).append(len(piece_ids(self.tokenizer, value, i == 0)))
            for name, counts in lengths.items():
                if sum(counts) > self.room:
                    raise InvalidQuery(f"inputs[{n}].{name} is {sum(counts)} tokens long ({len(row[name])} characters): {limit}")
            excess = sum(map(sum, lengths.values())) - self.room
            if excess > 0 and (self.truncate not in lengths or lengths[self.truncate][0] <= excess):
                absorb = (f"; {self.truncate!r} is shortened to make room, as in training, but it is {lengths[self.truncate][0]} "
                          f"tokens long" if self.truncate in lengths else "; this template shortens none of them")
                raise InvalidQuery(f"inputs[{n}]: the fields {sorted(lengths)} are {excess + self.room} tokens long together, "
                                   f"at most {self.room} fit{absorb}")

    def predict(self, rows: list[dict], top_k: int = 5, batch_size: int = 32) -> list[dict]:
        """One Answer (as a dict) per row; a request outside the limits (`check`) fails with InvalidQuery, a
        ValueError naming the field and its limit."""
        import torch

        from components.method.templates import collate, encode, pad_id

        self.check(rows, top_k)
        encoded = [encode(self.template, self.tokenizer, {f: row[f] for f in self.fields}, self.causal,
                          n_target_tokens=1, max_length=self.max_length, truncate=self.truncate) for row in rows]
        out = []
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = {k: v.to(self.device) for k, v in collate(encoded[start:start + batch_size], pad_id(self.tokenizer)).items()}
                logits = self.model(**batch, candidate_ids=self.candidate_ids)[:, 0].float()
                probs = logits.softmax(-1)
                best = logits.argmax(-1)  # the evaluation's argmax (LAMA precision_at_1, SuperGLUE predict)
                top_p, top_i = probs.topk(min(int(top_k), probs.shape[-1]), dim=-1)
                for row in range(len(best)):
                    out.append({"prediction": self.answers[int(best[row])], "score": float(probs[row, best[row]]),
                                "top_k": [self.answers[int(i)] for i in top_i[row]],
                                "top_k_scores": [float(p) for p in top_p[row]]})
        return out


def log_prompt_model(prompt_dir: str | Path, *, run_id: str, registered_model_name: str | None = None,
                     tags: dict | None = None):
    """Log `prompt_dir` as a models-from-code pyfunc of run `run_id` (signature from prompt_model.py's type
    hints, an input example of the template's fields) and, with a name, register it. Returns MLflow's ModelInfo."""
    import tempfile

    import mlflow
    from mlflow.models import Model

    import components

    prompt_dir = Path(prompt_dir)
    meta = check_servable(prompt_dir)
    fields = input_fields(meta)
    example = ([{f: _example_value(f) for f in fields}], {"top_k": 5})
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "prompt"
        staged.mkdir()
        for name in PROMPT_FILES:
            if (prompt_dir / name).is_file():
                shutil.copy2(prompt_dir / name, staged / name)
        if (prompt_dir / LM_DIR).is_dir():
            shutil.copytree(prompt_dir / LM_DIR, staged / LM_DIR)
        code = Path(tmp) / "components"  # the project's code, without caches
        shutil.copytree(Path(components.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return Model.log(artifact_path=None, name="prompt", flavor=mlflow.pyfunc, run_id=run_id, python_model=str(MODEL_CODE),
                         artifacts={"prompt": str(staged)}, model_config={"fields": fields}, input_example=example,
                         code_paths=[str(code)], pip_requirements=requirements(), registered_model_name=registered_model_name,
                         model_type="ptuning-prompt", tags=tags,
                         metadata={"ptuning": {k: v for k, v in meta.items() if k != "encoder"}})


def _example_value(field: str) -> str:
    """An input example value: LAMA subjects are names; other fields a short sentence."""
    return "Dante" if field == "sub" else "The cat sat on the mat"


def load(model: str):
    """`ptuning predict --model`: a local prompt directory directly, or a `models:/...` URI (any MLflow model
    URI) through pyfunc. Returns (the request fields, predict(rows, top_k) -> a list of answer dicts)."""
    if Path(model).expanduser().is_dir():
        predictor = PromptPredictor(Path(model).expanduser())
        return predictor.fields, lambda rows, top_k=5: predictor.predict(rows, top_k=top_k)
    import mlflow

    from mlflow.exceptions import MlflowException

    loaded = mlflow.pyfunc.load_model(model)
    fields = input_fields(loaded.metadata.metadata["ptuning"])

    def predict(rows: list[dict], top_k: int = 5) -> list[dict]:
        try:  # the rows' other keys (an input file's extra columns) are not the request's
            return [dict(a) for a in loaded.predict([{f: row.get(f) for f in fields} for row in rows], params={"top_k": top_k})]
        except MlflowException as error:
            raise InvalidQuery(error.message) from None

    return fields, predict
