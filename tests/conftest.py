"""Test environment: offline, no telemetry, shared data from ../shared (or $PTUNING_SHARED); the real services
(MLflow and Prefect servers, PostgreSQL, Chromium) come from tests/services.py, loaded here as a plugin. What test
modules share besides fixtures is in tests/helpers/: a test module never imports another."""
import os
from pathlib import Path

import pytest

pytest_plugins = ("services",)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest.register_assert_rewrite("services", "helpers")  # services: imported here, before pytest loads it as a plugin
from services import REPO  # noqa: E402  (the checkout: one definition for every test)
SHARED = Path(os.environ.get("PTUNING_SHARED", REPO.parent / "shared")).resolve()
os.environ.setdefault("PTUNING_TOKENIZERS", str(SHARED / "tokenizers"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data" / "MANIFEST.tsv").exists():
        pytest.fail(f"shared data not found at {SHARED}: set PTUNING_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def raw_data_dir(tmp_path_factory, shared_dir) -> Path:
    """The mirror materialised as the `materialise` stage does it (checksums verified)."""
    from components.data.sources import materialise

    out = tmp_path_factory.mktemp("data") / "raw"
    materialise(shared_dir / "data", out)
    return out


@pytest.fixture(scope="session")
def lama_data_dir(raw_data_dir, shared_dir) -> Path:
    """data/lama as the `prepare_lama` stage writes it; `.stats` holds its stats."""
    from components.benchmarks.lama.prepare import prepare
    from components.config import load_params

    out = raw_data_dir.parent / "lama"
    prepare(raw_data_dir, out, tokenizers=shared_dir / "tokenizers", params=load_params("data"))
    return out


@pytest.fixture(scope="session")
def small_lama(lama_data_dir, tmp_path_factory) -> Path:
    """data/lama with two relations cut short, so that a run takes seconds: P36 16 training facts (2 steps an
    epoch at batch 8), P1376 40 (5); 12 dev and 20 test facts each."""
    import shutil

    out = tmp_path_factory.mktemp("small_lama")
    shutil.copy(lama_data_dir / "relations.jsonl", out)
    for relation, n_train in (("P36", 16), ("P1376", 40)):
        target = out / "29k" / relation
        target.mkdir(parents=True)
        for split, n in (("train", n_train), ("dev", 12), ("test", 20)):
            lines = (lama_data_dir / "29k" / relation / f"{split}.jsonl").read_text().splitlines()[:n]
            (target / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(lama_data_dir / "29k" / "vocab.json", out / "29k")
    return out


@pytest.fixture(scope="session")
def fewglue_dir(shared_dir, tmp_path_factory) -> Path:
    """data/fewglue as the `prepare_fewglue` stage writes it (read from the mirror, which has data/raw's layout)."""
    from components.benchmarks.superglue.prepare import prepare

    out = tmp_path_factory.mktemp("fewglue")
    prepare(shared_dir / "data", out, seed=42)
    return out


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables and nothing else, created once: MLflow's schema migrations take
    seconds per new store, and what the tests prove starts after them."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "mlruns")).engine.dispose()
    return path


@pytest.fixture
def new_mlflow_db(_empty_mlflow_db):
    """new_mlflow_db(path) -> path: a new, empty MLflow SQLite store at `path` (a copy of a migrated one), for a test
    of what a store holds, not of how MLflow creates one (test_tracking.py's embedded-store test does that)."""
    import shutil

    def new(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_mlflow_db, path)
        return path

    return new
