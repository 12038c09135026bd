"""Database connections and the schema check that guards them.

Producer and worker call `open_database(url)`: it refuses a database whose schema is not the one
this code was written for, and says which command brings it up to date.
"""

from __future__ import annotations

import ast
import re
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models.errors import ConfigError, SchemaOutOfDate, ServiceUnavailable

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# `revision = '0004'` and `down_revision = '0003'` lines of a migration file, as Alembic writes them
# (with or without a type annotation).
_REVISION_LINE = re.compile(r"^(revision|down_revision)\s*(?::[^=\n]*)?=\s*(.+?)\s*$", re.MULTILINE)


# A client cut off in the middle of a transaction (its host's link down, its machine gone) keeps its
# row locks until PostgreSQL notices it is gone, which by default is TCP keepalive's two hours; until
# then every sweeper and every claim that touches one of those rows waits as well (tests/multihost.py
# saw a claim cut off this way stop the sweepers of every host). So the server drops a connection,
# rolling its transaction back, once it has been silent for about 30 s (the default lease): probed
# after 10 s, gone after 4 probes 5 s apart unanswered, or after data unacknowledged for 30 s. This
# end gives up alike on a server it cannot reach (and on a connect after 10 s): an outage, waited out.
_PG_SERVER_SILENCE = {"tcp_keepalives_idle": 10, "tcp_keepalives_interval": 5, "tcp_keepalives_count": 4,
                      "tcp_user_timeout": 30_000}
_PG_CLIENT_SILENCE = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 4,
                      "tcp_user_timeout": 30_000, "connect_timeout": 10}


def normalize_url(url: str) -> str:
    """postgresql:// means psycopg 3 here (the driver sdqueue installs), not psycopg2."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError and friends
        raise ConfigError(f"SDQUEUE_DATABASE_URL={url!r} is not a database URL: {exc}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """An engine for `url`. Its errors never quote a statement's parameters: they hold tokens'
    digests, webhook secrets and users' text, and an error message can reach a terminal or a log."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")  # readers beside the worker's writes
            cursor.close()

        return engine
    if parsed.get_backend_name() != "postgresql":
        return create_engine(url, pool_pre_ping=True, hide_parameters=True)
    given = set(parsed.query)  # what the URL itself sets wins
    engine = create_engine(url, hide_parameters=True,
                           connect_args={k: v for k, v in _PG_CLIENT_SILENCE.items() if k not in given})
    _ping_when_idle(engine)

    @event.listens_for(engine, "connect")
    def _server_gives_up(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        with dbapi_conn.cursor() as cursor:
            cursor.execute("; ".join(f"SET {name} = {value}" for name, value in _PG_SERVER_SILENCE.items()))
        dbapi_conn.commit()

    return engine


# A pooled connection idle for longer than this is pinged before `Database.statement` hands it out.
PING_AFTER_IDLE = 1.0
# Set while `Database.statement` checks a connection out.
_HOT_PATH: ContextVar[bool] = ContextVar("sdqueue_hot_path", default=False)


def _ping_when_idle(engine: Engine) -> None:
    """SQLAlchemy's pool_pre_ping, but a connection `Database.statement` takes (a worker's hot paths,
    three a job) is pinged only after PING_AFTER_IDLE seconds idle: a ping each time was a round trip
    more than the statement itself. One used a moment ago that turns out dead (the server restarted
    since) fails its statement as a disconnect: SQLAlchemy then drops it and every connection older,
    and those callers wait the outage out (models/outage.py), trying again on a new one. Every other
    checkout is pinged, as before: a one-off read must not fail once after a restart."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn, record):  # type: ignore[no-untyped-def]
        record.info["idle_from"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn, record, _proxy):  # type: ignore[no-untyped-def]
        if _HOT_PATH.get() and time.monotonic() - record.info.get("idle_from", float("-inf")) <= PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool drops it and checks out another (DisconnectionError's contract)
            raise DisconnectionError(f"a pooled connection is dead: {exc}") from exc


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def head_revision() -> str:
    """The revision of the newest migration (the one no other names as its down_revision), read from
    the migration files: the schema check that every start runs imports no Alembic, a tenth of a
    second of every `sdqueue status` (tests/test_layout.py checks this is Alembic's head)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        for name, value in _REVISION_LINE.findall(path.read_text(encoding="utf-8")):
            found = ast.literal_eval(value)  # a string, None, or a tuple of strings (a merge)
            if name == "revision":
                revisions.add(found)
            elif found is not None:
                parents.update((found,) if isinstance(found, str) else found)
    heads = revisions - parents
    if len(heads) != 1:
        raise ConfigError(f"the migrations in {MIGRATIONS / 'versions'} have {len(heads)} heads: {sorted(heads)}")
    return heads.pop()


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision, as Alembic records it (read with a plain SELECT); None before
    the first migration."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        versions = sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    return ",".join(versions) or None


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database to `revision` (the `sdqueue db upgrade` command)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def check_schema(engine: Engine) -> None:
    try:
        current = current_revision(engine)
    except OperationalError as exc:
        where = engine.url.render_as_string(hide_password=True)
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise ServiceUnavailable(f"database {where} cannot be reached: {reason}") from None
    head = head_revision()
    if current == head:
        return
    where = engine.url.render_as_string(hide_password=True)
    if current is None:
        raise SchemaOutOfDate(f"database {where} has no sdqueue tables yet: run `sdqueue db upgrade`")
    raise SchemaOutOfDate(
        f"database {where} is at schema revision {current}, this sdqueue needs {head}: run `sdqueue db upgrade`"
    )


def dialect_insert(session: Session, table: Any) -> Any:
    """An INSERT into `table` in the dialect of the session's database (PostgreSQL or SQLite), which
    both have `on_conflict_do_nothing`."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


class Database:
    """An engine with its session factory, checked against the schema this code expects."""

    def __init__(self, url: str, *, check: bool = True):
        self.engine = make_engine(url)
        if check:
            check_schema(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.postgres = self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def statement(self) -> Iterator[Connection]:
        """A connection on which each statement commits by itself: no BEGIN and COMMIT round trips,
        for the hot paths' single statements (models/jobs.py), whose callers wait an outage out
        (a connection used within the last second is handed out unpinged: `_ping_when_idle`)."""
        hot = _HOT_PATH.set(True)
        try:
            conn = self.engine.connect()
        finally:
            _HOT_PATH.reset(hot)
        with conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def dispose(self) -> None:
        """Close the pool's connections. One a thread still holds (a worker's thread finishing as
        its process stops) is closed when it comes back to the old pool, not left open for the
        garbage collector."""
        event.listen(self.engine.pool, "checkin", _close_on_checkin)
        self.engine.dispose()


def _close_on_checkin(dbapi_connection: Any, _record: Any) -> None:
    if dbapi_connection is not None:
        dbapi_connection.close()
