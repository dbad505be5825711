"""The real services tests talk to, started once on 127.0.0.1 with their state under a tmp dir: an MLflow
server, a Prefect server, a fresh PostgreSQL database, headless Chromium. tests/conftest.py loads this module
as a plugin; a test that uses one of SERVICE_FIXTURES is marked `services` (pyproject's marker; `make test-fast`
leaves them out)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
SERVICE_FIXTURES = {"mlflow_server", "prefect_server", "pg_database", "chromium"}
# a service's environment: no telemetry, no stray store or API from the caller's shell
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
         "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
         "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


# --- processes -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(**extra: str) -> dict:
    """os.environ without MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI (which mlflow.set_registry_uri exports) / PREFECT_API_URL, quiet, the venv's bin first on PATH, and `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL")}
    return {**env, **QUIET, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def start(args: list[str], env: dict, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """A process group of its own: stop() ends its children too (uvicorn workers, flow-run subprocesses)."""
    return subprocess.Popen([str(a) for a in args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=cwd,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until `url` answers 200; fails with the log's tail when the process exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


@dataclass
class Server:
    uri: str   # http://127.0.0.1:<port> (Prefect: its /api)
    root: Path  # its state and log
    log: Path
    process: subprocess.Popen
    env: dict  # the environment it runs in (Prefect: set PREFECT_API_URL for clients)


def start_mlflow(root: Path) -> Server:
    """`mlflow server` on a sqlite store under `root` (one worker, no job runner: up in about 7 s)."""
    root.mkdir(parents=True, exist_ok=True)
    port, env, log = free_port(), service_env(), root / "mlflow.log"
    process = start([BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", port, "--workers", "1",
                     "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                     root / "mlartifacts"], env, log)
    return Server(f"http://127.0.0.1:{port}", root, log, process, env)


def start_prefect(root: Path) -> Server:
    """`prefect server start` on a sqlite database under `root`, UI off."""
    root.mkdir(parents=True, exist_ok=True)
    env = service_env(PREFECT_HOME=str(root / "home"), PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect.db'}",
                      PREFECT_UI_ENABLED="false")
    port, log = free_port(), root / "prefect.log"
    process = start([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", port], env, log)
    api = f"http://127.0.0.1:{port}/api"
    return Server(api, root, log, process, {**env, "PREFECT_API_URL": api})


def running(server: Server):
    """Yield `server` once its /health answers; stop it afterwards."""
    try:
        wait_http(f"{server.uri}/health", server.process, server.log)
        yield server
    finally:
        stop(server.process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One MLflow server for the session (tests use names of their own): a Server, up."""
    yield from running(start_mlflow(tmp_path_factory.mktemp("mlflow-server")))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One Prefect server for the session: a Server whose `env` points clients at it."""
    yield from running(start_prefect(tmp_path_factory.mktemp("prefect-server")))


@pytest.fixture
def pg_database():
    """A fresh database on the local PostgreSQL (trust auth), dropped afterwards: its URL."""
    import psycopg

    name = f"ptuning_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3,
                                autocommit=True)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {error}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{POSTGRES}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the browser ---------------------------------------------------------------------------------

@dataclass
class Chromium:
    """Debian's headless `chromium`: the MLflow UI is a React app, so pages are read after their scripts ran
    (`--virtual-time-budget` lets them fetch and render)."""
    path: str
    profiles: Path

    def _run(self, url: str, *flags: str, budget_ms: int = 15000) -> subprocess.CompletedProcess:
        profile = self.profiles / uuid.uuid4().hex[:8]
        result = subprocess.run(
            [self.path, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *flags, url],
            capture_output=True, text=True, timeout=120)
        shutil.rmtree(profile, ignore_errors=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    def text(self, url: str) -> str:
        """The page's visible text after its scripts ran (script and style bodies left out)."""
        dom = self._run(url, "--dump-dom").stdout
        text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))

    def screenshot(self, url: str, path: Path, size: str = "1600,2400") -> Path:
        self._run(url, f"--screenshot={path}", f"--window-size={size}", "--hide-scrollbars")
        assert path.is_file() and path.stat().st_size > 0, f"no screenshot of {url}"
        return path


@pytest.fixture(scope="session")
def chromium(tmp_path_factory) -> Chromium:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it: apt-get install -y chromium)")
    return Chromium(path, tmp_path_factory.mktemp("chromium"))
