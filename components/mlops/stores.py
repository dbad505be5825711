"""The SQL databases that Optuna (study storage) and MLflow (tracking store) may share: one reachability check
for both, so that an unreachable store is reported before any training starts.

Both hand the URL to SQLAlchemy unchanged: `sqlite:///path.db`, or `postgresql://user@host:5432/db`, which
SQLAlchemy 2.1 opens with psycopg (v3, a dependency; `postgresql+psycopg2://` needs psycopg2 installed)."""
from __future__ import annotations

import math
from pathlib import Path


class DatabaseUnreachable(Exception):
    """The reason a database URL cannot be used; callers name the store it was meant for."""


def check_database(url: str, timeout: float) -> None:
    """Open (and close) one connection to the database at `url`, or raise DatabaseUnreachable saying why."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception as error:
        raise DatabaseUnreachable(f"not a database URL ({error})") from None
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if path and path != ":memory:" and not Path(path).expanduser().resolve().parent.is_dir():
            raise DatabaseUnreachable(f"directory {Path(path).expanduser().resolve().parent} does not exist")
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
