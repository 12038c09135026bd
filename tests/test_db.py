"""Migrations and the schema guard, on PostgreSQL and SQLite."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import text

from models import db
from models.errors import SchemaOutOfDate
from tests.conftest import POSTGRES_ADMIN_URL
from tests.servers import postgres_database


def sdqueue(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_upgrade_then_check(backend, tmp_path):
    def run(url: str) -> None:
        engine = db.make_engine(url)
        with pytest.raises(SchemaOutOfDate, match="has no sdqueue tables yet: run `sdqueue db upgrade`"):
            db.check_schema(engine)
        result = sdqueue("db", "upgrade", env={"SDQUEUE_DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
        assert f"schema revision: {db.head_revision()}" in result.stdout
        db.check_schema(engine)  # passes now
        with engine.begin() as conn:
            tables = set(conn.execute(text(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
                if backend == "postgresql" else "SELECT name FROM sqlite_master WHERE type = 'table'"
            )).scalars())
            assert {"jobs", "images", "batches", "alembic_version"} <= tables
            # an older schema: refused with both revisions named
            conn.execute(text("UPDATE alembic_version SET version_num = '0000'"))
        with pytest.raises(SchemaOutOfDate, match=f"at schema revision 0000, this sdqueue needs {db.head_revision()}"):
            db.check_schema(engine)
        engine.dispose()

    if backend == "postgresql":
        with postgres_database(POSTGRES_ADMIN_URL) as url:
            run(url)
    else:
        run(f"sqlite:///{tmp_path / 'jobs.db'}")


def test_submit_and_worker_refuse_an_unmigrated_database(settings_env, tmp_path):
    from models.settings import load_settings
    from worker.main import run_worker

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    result = sdqueue("submit", "--prompt", "a cat", env={"SDQUEUE_DATABASE_URL": url})
    assert result.returncode == 1
    assert "no sdqueue tables yet: run `sdqueue db upgrade`" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(SchemaOutOfDate):
        run_worker(load_settings(database_url=url))


def test_postgres_drops_a_silent_connection_after_about_30_s():
    """A client cut off mid-transaction must not keep its row locks for TCP keepalive's two hours
    (tests/multihost.py cuts a host's link with a claim in flight)."""
    engine = db.make_engine(POSTGRES_ADMIN_URL + "?connect_timeout=7")
    try:
        with engine.connect() as conn:
            shown = {name: conn.execute(text(f"SHOW {name}")).scalar() for name in
                     ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")}
            assert shown == {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "4",
                             "tcp_user_timeout": "30000"}
            assert conn.connection.dbapi_connection.info.get_parameters()["connect_timeout"] == "7"  # the URL's wins
    finally:
        engine.dispose()


def test_postgres_url_without_driver_means_psycopg3():
    assert db.normalize_url("postgresql://u@h:5432/d") == "postgresql+psycopg://u@h:5432/d"
    assert db.normalize_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_migrations_build_exactly_the_tables_of_models_tables(backend, tmp_path):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from models.tables import Base

    def compare(url: str) -> None:
        db.upgrade(url)
        engine = db.make_engine(url)
        try:
            with engine.connect() as conn:
                assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        finally:
            engine.dispose()
        command.downgrade(db.alembic_config(url), "-1")  # the newest migration goes down and up again
        db.upgrade(url)

    if backend == "postgresql":
        with postgres_database(POSTGRES_ADMIN_URL) as url:
            compare(url)
    else:
        compare(f"sqlite:///{tmp_path / 'jobs.db'}")
