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

What a prompt answers is its benchmark row's `answers` (the request's fields are the template's `{slots}`, a choice
task's its row's fields):
    LAMA                     a word of the benchmark vocabulary (vocab.json): top-k with their scores
    SuperGLUE classification its labels through the verbalizer (BoolQ, CB, RTE, WiC; MultiRC per answer option)
    COPA                     the label of the likelier choice ("0": choice1), each scored whole as evaluation scores it
                             (choice_serving.py); a row is COPA's: premise, choice1, choice2,
                             question (cause | effect)
    WSC                      refused at registration (the row's check_servable): span generation

What a request may hold (anything else is a 400 naming the field and the limit; the server stays up):
    fields       exactly the request's fields, each a string (a missing, unknown or non-string field is refused)
    a text field 1 token at least (not empty, not only spaces) and at most the room the template leaves in the
                 model's max input length (`max_length` of prompt.json, at most the LM's positions, minus the
                 template's prompt, anchor, target and special tokens): LAMA's `[P*3] {sub} [P*3] [Y]` at
                 max_length 64 leaves 57 tokens for `sub`. Fields that fit alone but not together are shortened
                 from the task's `truncate` slot, as in training (a SuperGLUE passage or premise); a template
                 without one refuses them.
    top_k        an integer from 1 to MAX_TOP_K (100); an answer lists min(top_k, its candidates) (RTE: 2 labels)
"""
from __future__ import annotations

import hashlib
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
    """The request's fields: the template's slots, in order (a choice task's: its row's fields)."""
    from components.mlops.choice_serving import is_choice_prompt, request_fields
    from components.method.templates import parse_template

    return request_fields(meta) if is_choice_prompt(meta) else list(dict.fromkeys(parse_template(meta["template"]).slots))


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
    from components.mlops.choice_serving import check_choice_prompt

    try:
        check_choice_prompt(meta)
    except ValueError as error:
        raise NotServable(f"{where}: {error}") from None
    return meta


def query_type(fields: list[str]) -> type[BaseModel]:
    """The request row: one required string per field and nothing else (MLflow's signature and validation; an
    unknown field is refused by name, not dropped)."""

    def only_the_fields(cls, data):
        unknown = sorted(set(data) - set(fields)) if isinstance(data, dict) else []
        if unknown and set(fields) <= set(data):  # else pydantic names the missing ones ("Field required") and these
            raise ValueError(f"unknown field(s) {unknown}: a row holds exactly the fields {fields}")
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


class ServedPrompt:
    """What one prompt answers and may be asked, over an LM loaded elsewhere (alone, or shared by a bank):
    its template and fields, its answers and their token ids, and the limits of a request."""

    def __init__(self, directory: Path, meta: dict, tokenizer, causal: bool, lm_config, answers_cache: dict | None = None):
        from components.benchmarks import get_benchmark
        from components.method.templates import parse_template

        self.directory, self.meta, self.tokenizer, self.causal = directory, meta, tokenizer, causal
        self.template = parse_template(meta["template"])
        self.fields = input_fields(meta)
        # a bank's LAMA prompts share one vocabulary: its answers are tokenised once (`answers_cache`)
        vocab = directory / "vocab.json"
        key = (meta["benchmark"], hashlib.sha256(vocab.read_bytes()).hexdigest()) if vocab.is_file() else None
        cache = answers_cache if answers_cache is not None and key else {}
        if key not in cache:
            cache[key] = get_benchmark(meta["benchmark"]).answers(meta, directory, tokenizer)
        self.answers, self.answer_ids = cache[key]
        self.truncate = meta.get("truncate")
        limit = getattr(lm_config, "max_position_embeddings", None) or getattr(lm_config, "n_positions", None) or 512
        self.max_length = min(int(meta.get("max_length") or limit), int(limit))
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

    def check_fields(self, rows: list[dict], top_k, numbers: list[int] | None = None, limit: str = "") -> None:
        """top_k from 1 to MAX_TOP_K; every field present, a string, not empty (InvalidQuery names what is not)."""
        if isinstance(top_k, bool) or not isinstance(top_k, Integral) or not 1 <= top_k <= MAX_TOP_K:
            raise InvalidQuery(f"params.top_k={top_k!r}: top_k must be an integer from 1 to {MAX_TOP_K} "
                               f"(answers per row; this prompt has {len(self.answers)} candidates)")
        missing = [f for f in self.fields if any(f not in row or row[f] is None for row in rows)]
        if missing:
            raise InvalidQuery(f"input lacks field(s) {missing}: a row holds {self.fields}")
        for n, row in zip(numbers or range(len(rows)), rows):
            for name in self.fields:
                if not isinstance(row[name], str):
                    raise InvalidQuery(f"inputs[{n}].{name}: a string is expected, got {type(row[name]).__name__}")
                if not row[name].strip():
                    raise InvalidQuery(f"inputs[{n}].{name} is empty: {limit or 'a text field holds 1 token at least'}")

    def check(self, rows: list[dict], top_k, numbers: list[int] | None = None) -> None:
        """Refuse what the model cannot answer as asked (InvalidQuery names the field and its limit): top_k out of
        1..MAX_TOP_K, a missing or non-string field, an empty text field, a field longer than the room the template
        leaves in the model's max input length, fields too long together unless the task's `truncate` slot absorbs
        it (as in training). `numbers`: the rows' places in the request (default 0, 1, ...)."""
        from components.method.templates import piece_ids

        limit = (f"a text field holds 1 to {self.room} tokens (the model reads at most {self.max_length}, "
                 f"the template takes {self.max_length - self.room})")
        self.check_fields(rows, top_k, numbers, limit)
        slots = [(i, part.value) for i, part in enumerate(self.template.parts) if part.kind == "slot"]
        for n, row in zip(numbers or range(len(rows)), rows):
            lengths: dict[str, list[int]] = {}
            for i, name in slots:
                lengths.setdefault(name, []).append(len(piece_ids(self.tokenizer, row[name], i == 0)))
            for name, counts in lengths.items():
                if sum(counts) > self.room:
                    raise InvalidQuery(f"inputs[{n}].{name} is {sum(counts)} tokens long ({len(row[name])} characters): {limit}")
            excess = sum(map(sum, lengths.values())) - self.room
            if excess > 0 and (self.truncate not in lengths or lengths[self.truncate][0] <= excess):
                absorb = (f"; {self.truncate!r} is shortened to make room, as in training, but it is {lengths[self.truncate][0]} "
                          f"tokens long" if self.truncate in lengths else "; this template shortens none of them")
                raise InvalidQuery(f"inputs[{n}]: the fields {sorted(lengths)} are {excess + self.room} tokens long together, "
                                   f"at most {self.room} fit{absorb}")

    def encode(self, row: dict, prompt_offset: int = 0):
        """The row as the LM reads it; `prompt_offset`: where this prompt's vectors start in a bank's stack."""
        from components.method.templates import encode

        encoded = encode(self.template, self.tokenizer, {f: row[f] for f in self.fields}, self.causal,
                         n_target_tokens=1, max_length=self.max_length, truncate=self.truncate)
        if prompt_offset:
            encoded.prompt_index = [i + prompt_offset if i >= 0 else i for i in encoded.prompt_index]
        return encoded

    def answer(self, logits, top_k: int) -> dict:
        """An Answer (as a dict) from one row's logits over this prompt's answers."""
        probs = logits.float().softmax(-1)
        best = int(logits.argmax(-1))  # the evaluation's argmax (LAMA precision_at_1, SuperGLUE predict)
        top_p, top_i = probs.topk(min(int(top_k), probs.shape[-1]))
        return {"prediction": self.answers[best], "score": float(probs[best]),
                "top_k": [self.answers[int(i)] for i in top_i], "top_k_scores": [float(p) for p in top_p]}

    def answer_all(self, model, rows: list[dict], top_k: int, pad: int, device, batch_size: int = 32) -> list[dict]:
        """The answers to checked rows: each read at [Y] over this prompt's answers."""
        return answer_rows(model, [self] * len(rows), [self.encode(row) for row in rows], top_k, pad, device, batch_size)


def served_prompt(directory: Path, meta: dict, tokenizer, causal: bool, lm_config) -> ServedPrompt:
    """A prompt as served: read at [Y] over its answers, or a choice task's (COPA), each choice scored whole."""
    from components.mlops.choice_serving import ServedChoices, is_choice_prompt

    return (ServedChoices if is_choice_prompt(meta) else ServedPrompt)(directory, meta, tokenizer, causal, lm_config)


def answer_rows(model, served: list[ServedPrompt], encoded: list, top_k: int, pad: int, device,
                batch_size: int = 32) -> list[dict]:
    """Answers to rows that may each read another prompt (`served[i]` answers row i) over one LM: sorted by length,
    in chunks, each row's logits taken over its own prompt's answers."""
    import torch

    from components.method.templates import collate

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    out: list[dict | None] = [None] * len(encoded)
    shared = len({id(s) for s in served}) == 1  # one prompt: the logits over its answers alone, as evaluation reads them
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in rows], pad).items()}
            ids = torch.tensor(served[rows[0]].answer_ids, device=device) if shared else None
            logits = model(**batch, candidate_ids=ids)[:, 0]
            for j, i in enumerate(rows):
                row_logits = logits[j] if shared else logits[j, torch.tensor(served[i].answer_ids, device=device)]
                out[i] = served[i].answer(row_logits, top_k)
    return out


class PromptPredictor:
    """A prompt directory (or a model's `prompt` artifact) loaded with its LM: answers rows of input fields."""

    def __init__(self, prompt_dir: str | Path):
        import torch

        from components.method.model import PromptedLM, load_prompt
        from components.method.templates import pad_id
        from components.models.catalog import load_lm

        directory = Path(prompt_dir)
        self.meta = check_servable(directory)
        prompt, _ = load_prompt(directory)
        lm = load_lm(str(directory / LM_DIR) if (directory / LM_DIR).is_dir() else self.meta["base_model"])
        self.served = served_prompt(directory, self.meta, lm.tokenizer, lm.causal, lm.model.config)
        self.fields, self.tokenizer, self.pad = self.served.fields, lm.tokenizer, pad_id(lm.tokenizer)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = PromptedLM(lm.model, prompt, lm.causal, freeze_lm=True).eval().to(self.device)

    def predict(self, rows: list[dict], top_k: int = 5, batch_size: int = 32) -> list[dict]:
        """One Answer (as a dict) per row; a request outside the limits (`ServedPrompt.check`) fails with
        InvalidQuery, a ValueError naming the field and its limit."""
        self.served.check(rows, top_k)
        return self.served.answer_all(self.model, rows, top_k, self.pad, self.device, batch_size)


def answer_request(predictor, model_input: list, params: dict | None) -> list[dict]:
    """A served model's `predict` (prompt_model.py, bank_model.py): the request's rows answered; a row outside the
    limits is an INVALID_PARAMETER_VALUE, which `mlflow models serve` answers with a 400 and its message."""
    from mlflow.exceptions import MlflowException

    rows = [row.model_dump() if isinstance(row, BaseModel) else dict(row) for row in model_input]
    try:
        return predictor.predict(rows, top_k=(params or {}).get("top_k", 5))
    except InvalidQuery as error:
        raise MlflowException.invalid_parameter_value(str(error)) from None


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
    example = ([example_row(meta)], {"top_k": 5})
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


def example_row(meta: dict) -> dict:
    """An input example: LAMA subjects are names, other fields a short sentence, a choice task's a row of its own."""
    from components.mlops.choice_serving import EXAMPLES, is_choice_prompt

    if is_choice_prompt(meta):
        return dict(EXAMPLES[meta["task"]])
    return {f: "Dante" if f == "sub" else "The cat sat on the mat" for f in input_fields(meta)}


def load(model: str):
    """`ptuning predict --model`: a local prompt or bank directory directly, or a `models:/...` URI (any MLflow
    model URI) through pyfunc. Returns (the fields a row may hold, those every row must hold, predict(rows, top_k)
    -> a list of answer dicts). A bank's rows name their task (components/mlops/bank.py)."""
    path = Path(model).expanduser()
    if path.is_dir():
        from components.mlops.bank import BANK_FILE, BankPredictor

        if (path / BANK_FILE).is_file():
            bank = BankPredictor(path)
            return ["task", *bank.fields], ["task"], lambda rows, top_k=5: bank.predict(rows, top_k=top_k)
        predictor = PromptPredictor(path)
        return predictor.fields, predictor.fields, lambda rows, top_k=5: predictor.predict(rows, top_k=top_k)
    import mlflow

    from mlflow.exceptions import MlflowException

    loaded = mlflow.pyfunc.load_model(model)
    meta = loaded.metadata.metadata
    if "ptuning_bank" in meta:
        fields, required = ["task", *meta["fields"]], ["task"]
    else:
        fields = required = input_fields(meta["ptuning"])

    def predict(rows: list[dict], top_k: int = 5) -> list[dict]:
        try:  # the rows' other keys (an input file's extra columns) are not the request's
            return [dict(a) for a in loaded.predict([{f: row.get(f) for f in fields} for row in rows], params={"top_k": top_k})]
        except MlflowException as error:
            raise InvalidQuery(error.message) from None

    return fields, required, predict
