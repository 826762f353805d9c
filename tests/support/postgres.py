"""A throwaway database on the machine's PostgreSQL (127.0.0.1:5432, user postgres, trust auth), for tests that
run the fleet store on PostgreSQL. Tests skip only when no server answers there (and say so)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new empty database, dropped afterwards; pytest.skip when no server is reachable."""
    import psycopg

    try:
        admin = psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server reachable at 127.0.0.1:5432 (user postgres): {exc}")
    name = f"edgeops_test_{secrets.token_hex(6)}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
