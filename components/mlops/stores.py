"""The stores a run writes to: MLflow's tracking store (a server, a database, a folder) and Optuna's study storage
(a database). Which one a run uses (`tracking_store`, `study_storage`: an explicit override, the environment, the
params file, else the embedded SQLite default), and whether it answers, checked before any training starts: an
unreachable one is reported in one line, within a short timeout, by `check_reachable` (tracking) and
`check_storage` (Optuna). This module imports neither MLflow nor Optuna, so an entry point checks its stores
before loading them.

Both hand a database URL to SQLAlchemy unchanged: `sqlite:///path.db`, or `postgresql://user@host:5432/db`,
which SQLAlchemy 2.1 opens with psycopg (v3, a dependency; `postgresql+psycopg2://` needs psycopg2 installed)."""
from __future__ import annotations

import base64
import logging
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from components.common import redact_url
from components.config import in_root

log = logging.getLogger(__name__)

# The stores of a run that names none: SQLite files in the checkout, no server to run.
DEFAULT_TRACKING = "sqlite:///mlflow.db"
DEFAULT_STORAGE = "sqlite:///optuna.db"

# Seconds a reachability check waits for a store to answer: an unreachable store is reported at once, before
# any training, not after a client's own retries (MLflow's HTTP client retries for minutes).
CHECK_TIMEOUT = 3.0


class StoreUnreachable(RuntimeError):
    """A tracking store or study storage that cannot be used (TrackingUnreachable, StorageUnreachable): the
    entry points report its message as one line, exit 2, before any work."""


class TrackingUnreachable(StoreUnreachable):
    """The MLflow tracking store cannot be reached: raised before any training starts."""


class StorageUnreachable(StoreUnreachable):
    """The study's storage cannot be opened: raised before any training starts."""


# --- which store ------------------------------------------------------------------------------

def tracking_store(overrides: dict, tracking: dict, root: Path) -> str:
    """MLflow's store: the override `tracking.uri` > MLFLOW_TRACKING_URI > params/tracking.yaml `uri` (`tracking`)
    > DEFAULT_TRACKING."""
    return _chosen(overrides.get("tracking.uri"), "MLFLOW_TRACKING_URI", tracking.get("uri"), DEFAULT_TRACKING, root)


def study_storage(overrides: dict, search: dict, root: Path) -> str:
    """Optuna's storage: the override `search.storage` > OPTUNA_STORAGE > params/search.yaml `storage` (`search`)
    > DEFAULT_STORAGE."""
    return _chosen(overrides.get("search.storage"), "OPTUNA_STORAGE", search.get("storage"), DEFAULT_STORAGE, root)


def _chosen(explicit: str | None, env: str, configured: str | None, default: str, root: Path) -> str:
    return absolute_sqlite(str(explicit or os.environ.get(env) or configured or default), root)


def absolute_sqlite(url: str, root: Path) -> str:
    """`sqlite:///rel.db` relative to the checkout (a served or worker run has another cwd)."""
    if not url.startswith("sqlite:///") or url.startswith("sqlite:////") or url in ("sqlite:///", "sqlite:///:memory:"):
        return url
    return "sqlite:///" + str(in_root(url[len("sqlite:///"):], root).resolve())


# --- does it answer: a database --------------------------------------------------------------

class DatabaseUnreachable(Exception):
    """The reason a database URL cannot be used; callers name the store it was meant for."""


def check_database(url: str, timeout: float = CHECK_TIMEOUT) -> None:
    """Open (and close) one connection to the database at `url`, or raise DatabaseUnreachable saying why. A
    SQLite file that does not exist yet is not created: its directory must exist and be writable."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception as error:
        raise DatabaseUnreachable(f"not a database URL ({error})") from None
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if path and path != ":memory:" and not path.startswith("file:"):
            file = Path(path).expanduser().resolve()
            if not file.parent.is_dir():
                raise DatabaseUnreachable(f"directory {file.parent} does not exist")
            if not file.exists():  # a new store: connecting would create the file before the run is under way
                if not os.access(file.parent, os.W_OK | os.X_OK):
                    raise DatabaseUnreachable(f"directory {file.parent} is not writable")
                return
        connect_args = {"timeout": timeout}
    else:
        connect_args = {"connect_timeout": max(1, int(math.ceil(timeout)))}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()
        raise DatabaseUnreachable(reason[0] if reason else type(error).__name__) from None


# --- MLflow's tracking store -------------------------------------------------------------------

def _auth_headers() -> dict:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode()}
    return {}


def _unreachable(uri: str, reason: str) -> TrackingUnreachable:
    return TrackingUnreachable(
        f"MLflow tracking store {redact_url(uri)} is unreachable: {reason}. Start the server (mlflow server ...), "
        f"fix MLFLOW_TRACKING_URI / params/tracking.yaml `uri`, or leave both unset for the embedded {DEFAULT_TRACKING}.")


def check_reachable(uri: str, timeout: float = CHECK_TIMEOUT) -> None:
    """http(s): GET /health (or the experiments search API) with a short timeout; a database URI: open a
    connection; a local path: its directory must exist. Raises TrackingUnreachable naming the URI."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        base = uri.rstrip("/")
        last = None
        for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
            request = urllib.request.Request(base + path, headers=_auth_headers())
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status} from {path}"
            except urllib.error.HTTPError as error:
                if error.code in (401, 403):
                    raise TrackingUnreachable(
                        f"MLflow tracking server {redact_url(uri)} refused the request (HTTP {error.code}): set "
                        "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN") from None
                last = f"HTTP {error.code} from {path}"
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", error)
                raise _unreachable(uri, f"{type(reason).__name__}: {reason}") from None
        raise _unreachable(uri, f"it does not answer as an MLflow server ({last})")
    if scheme.startswith(("sqlite", "postgresql", "postgres", "mysql", "mssql")):
        try:
            check_database(uri, timeout)
        except DatabaseUnreachable as reason:
            raise _unreachable(uri, str(reason)) from None
        return
    if scheme in ("", "file"):
        path = Path(parsed.path if scheme == "file" else uri).expanduser().resolve()
        if not (path.exists() or path.parent.is_dir()):
            raise _unreachable(uri, f"neither {path} nor its directory exists")
        return
    log.info("tracking URI %s: no reachability check for scheme %r", redact_url(uri), scheme)


# --- Optuna's storage ----------------------------------------------------------------------------

def check_storage(url: str, timeout: float = CHECK_TIMEOUT) -> None:
    """Open (and close) one connection to the storage, or raise StorageUnreachable naming it."""
    try:
        check_database(url, timeout)
    except DatabaseUnreachable as reason:
        raise StorageUnreachable(f"Optuna storage {redact_url(url)} is unreachable: {reason} (is the database server "
                                 f"running, and does the database exist? e.g. {DEFAULT_STORAGE} or "
                                 "postgresql://user@host:5432/db)") from None


# --- both, before a flow's work ---------------------------------------------------------------

def check_stores(tracking_uri: str, storage: str) -> None:
    """MLflow's store and Optuna's storage answer, each within a short timeout; else TrackingUnreachable /
    StorageUnreachable (both StoreUnreachable), naming the URL and what to do."""
    check_reachable(tracking_uri)
    check_storage(storage)
