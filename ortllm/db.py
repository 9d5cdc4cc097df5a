"""The database behind sessions and stored responses: one SQLAlchemy Core schema, Alembic migrations.

SQLite under `$ORTLLM_HOME/sessions.db` is the embedded default; `database.url` (`ORTLLM_DATABASE_URL`)
set to `postgresql://…` shares sessions and responses between replicas. Both go through the same code:
writes are short transactions (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: the session's row locked `FOR UPDATE`),
migrations run at start-up under a lock so replicas starting together migrate once, and a database that cannot
be reached is a `SessionStoreUnavailable` (503 with Retry-After) rather than a hang or a 500.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from .errors import SessionStoreUnavailable
from .paths import ortllm_home

metadata = sa.MetaData()
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("owner", sa.Text, nullable=False, server_default=""),
    sa.Column("id", sa.Text, nullable=False),
    sa.Column("model", sa.Text),
    sa.Column("system_prompt", sa.Text),
    sa.Column("title", sa.Text),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("updated", sa.Double, nullable=False),
    sa.Column("origin", sa.Text, nullable=False, server_default="api"),
    sa.UniqueConstraint("owner", "id"),
    sa.Index("sessions_by_owner", "owner", "updated"),
    sqlite_autoincrement=True,
)
messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_pk", sa.Integer, sa.ForeignKey("sessions.pk", ondelete="CASCADE"), nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("answered", sa.Integer, nullable=False, server_default="1"),
    sa.Column("stopped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("instance", sa.Text),  # the process answering a pending question (revision 0002)
    sa.Index("messages_by_session", "session_pk", "id"),
    sqlite_autoincrement=True,
)
meta = sa.Table("meta", metadata, sa.Column("key", sa.Text, primary_key=True), sa.Column("value", sa.Text))
responses = sa.Table(
    "responses",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("owner", sa.Text, nullable=False, server_default=""),
    sa.Column("id", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("input_items", sa.Text, nullable=False),
    sa.Column("output_items", sa.Text, nullable=False),
    sa.Column("usage", sa.Text),
    sa.Column("previous_response_id", sa.Text),
    sa.UniqueConstraint("owner", "id"),
    sqlite_autoincrement=True,
)

MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK = 0x6F72746C6C6D  # PostgreSQL advisory lock key ("ortllm"): one replica migrates at a time
CONNECT_TIMEOUT_S = 5  # a database that does not answer fails the request in seconds, not minutes


def default_url(home: Path | None = None) -> str:
    """`ORTLLM_DATABASE_URL`, else the SQLite file under the ortllm home."""
    return os.environ.get("ORTLLM_DATABASE_URL") or f"sqlite:///{(home or ortllm_home()) / 'sessions.db'}"


def normalise_url(url: str) -> str:
    """`postgresql://` (what libpq users write) → SQLAlchemy's psycopg 3 dialect; other URLs unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid database URL>"


class Database:
    """An engine for one database URL, migrated to the current schema on first use."""

    _cache: dict[str, Database] = {}
    _cache_lock = threading.Lock()

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.shown = redact(self.url)
        self.sqlite = self.url.startswith("sqlite")
        if self.sqlite:
            self.shown = self.url.split(":///", 1)[-1]  # the file, as the messages always named it
        try:
            self.engine = self._engine()
        except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
            raise SessionStoreUnavailable(f"Cannot use the database {self.shown}: {exc}") from exc
        self._migrated = False
        self._migrate_lock = threading.Lock()

    @classmethod
    def open(cls, url: str) -> Database:
        """A Database for `url`: one shared connection pool per server URL in this process; an SQLite file
        gets its own (connections are opened per use there, so a replaced file is seen at once)."""
        if normalise_url(url).startswith("sqlite"):
            return cls(url)
        with cls._cache_lock:
            found = cls._cache.get(url)
            if found is None:
                found = cls._cache[url] = cls(url)
        return found

    @property
    def path(self) -> Path | None:
        """The SQLite file, or None for a server database."""
        return Path(self.engine.url.database or "") if self.sqlite else None

    def _engine(self) -> Engine:
        if self.sqlite:
            engine = sa.create_engine(
                self.url, poolclass=sa.pool.NullPool, connect_args={"timeout": 30, "check_same_thread": False}
            )

            @event.listens_for(engine, "connect")
            def _connect(dbapi: Any, _record: Any) -> None:
                dbapi.isolation_level = None  # SQLAlchemy's "begin" event decides, not pysqlite
                cursor = dbapi.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()

            @event.listens_for(engine, "begin")
            def _begin(conn: Connection) -> None:
                # a write takes the file's write lock up front: no deadlock between two readers upgrading
                if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                    conn.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        return sa.create_engine(
            self.url,
            pool_pre_ping=True,  # a restarted server's dead connections are replaced, not handed out
            pool_size=5,
            max_overflow=10,
            pool_timeout=CONNECT_TIMEOUT_S,
            connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
        )

    def unavailable(self, exc: BaseException) -> SessionStoreUnavailable:
        detail = getattr(exc, "orig", None) or exc
        cause = str(detail).strip().splitlines()[0] if str(detail).strip() else type(detail).__name__
        if not self.sqlite:
            todo = "check that the database server is up and reachable, and the URL's user and password"
        elif "not a database" in cause or "malformed" in cause:
            todo = "move it aside (an empty one is created at the next start) or restore a backup"
        elif "readonly" in cause or "read-only" in cause:
            todo = "make the file and its folder writable"
        else:
            todo = "check the file, its folder and the free disk space"
        return SessionStoreUnavailable(f"The sessions database {self.shown} cannot be used: {cause} — {todo}")

    def migrate(self) -> None:
        """Bring the schema to the newest revision (once per process; several replicas take turns)."""
        if self._migrated:
            return
        with self._migrate_lock:
            if self._migrated:
                return
            try:
                self._upgrade()
            except sa.exc.SQLAlchemyError as exc:
                raise self.unavailable(exc) from exc
            self._migrated = True

    def _upgrade(self) -> None:
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.connect() as conn:
            if self.sqlite:
                if self.path is not None and self.path.parent != Path():
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                conn.begin()  # BEGIN IMMEDIATE: another process migrating the same file waits here
                legacy_sqlite(conn)
            else:
                conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK})")
                conn.commit()
            try:
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
                conn.commit()
            finally:
                if not self.sqlite:
                    conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
                    conn.commit()

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Database errors of the block as SessionStoreUnavailable (503 with Retry-After)."""
        try:
            yield
        except sa.exc.SQLAlchemyError as exc:
            raise self.unavailable(exc) from exc

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads (autocommit: readers never hold the write lock)."""
        self.migrate()
        with self.errors(), self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One transaction, committed when the block ends and rolled back if it raises."""
        self.migrate()
        with self.errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def rolled_back(self) -> Iterator[Connection]:
        """A transaction that is always rolled back: proves the database takes writes (health checks)."""
        self.migrate()
        with self.errors(), self.engine.connect() as conn:
            try:
                yield conn
            finally:
                conn.rollback()


# PRAGMA user_version of sessions.db files written before the Alembic migrations
LEGACY_VERSION = 3
_LEGACY_1_TO_2 = (
    "ALTER TABLE sessions RENAME TO sessions_v1",
    "ALTER TABLE messages RENAME TO messages_v1",
    "DROP INDEX IF EXISTS messages_by_session",
)
# the tables as the last pre-Alembic version wrote them (the baseline revision's)
_LEGACY_TABLES = (
    "CREATE TABLE sessions (pk INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL DEFAULT '', "
    "id TEXT NOT NULL, model TEXT, system_prompt TEXT, title TEXT, created REAL NOT NULL, updated REAL NOT NULL, "
    "origin TEXT NOT NULL DEFAULT 'api', UNIQUE (owner, id))",
    "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "session_pk INTEGER NOT NULL REFERENCES sessions(pk) ON DELETE CASCADE, role TEXT NOT NULL, "
    "content TEXT NOT NULL, created REAL NOT NULL, answered INTEGER NOT NULL DEFAULT 1, "
    "stopped INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX messages_by_session ON messages(session_pk, id)",
    "CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions(owner, updated)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
)
_LEGACY_1_TO_2_COPY = (
    "INSERT INTO sessions(owner, id, model, system_prompt, title, created, updated) "
    "SELECT '', id, model, system_prompt, title, created, updated FROM sessions_v1",
    "INSERT INTO messages(session_pk, role, content, created) SELECT s.pk, m.role, m.content, m.created "
    "FROM messages_v1 m JOIN sessions s ON s.owner = '' AND s.id = m.session_id ORDER BY m.id",
    "DROP TABLE messages_v1",
    "DROP TABLE sessions_v1",
)


def legacy_sqlite(conn: Connection) -> None:
    """Bring a sessions.db from before the Alembic migrations to the baseline revision's tables."""
    has = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "alembic_version" in has or "sessions" not in has:
        return
    version = conn.exec_driver_sql("PRAGMA user_version").scalar() or 1
    if version < 2:  # no owners, `id` the primary key: every old session is kept, owned by nobody
        for statement in _LEGACY_1_TO_2:
            conn.exec_driver_sql(statement)
        for statement in _LEGACY_TABLES:
            conn.exec_driver_sql(statement)
        for statement in _LEGACY_1_TO_2_COPY:
            conn.exec_driver_sql(statement)
    if version < 3:  # where a session was made, and answers the user stopped (the UI titled its sessions)
        columns = {r[1] for r in conn.exec_driver_sql("PRAGMA table_info(sessions)")}
        if "origin" not in columns:
            conn.exec_driver_sql("ALTER TABLE sessions ADD COLUMN origin TEXT NOT NULL DEFAULT 'api'")
            conn.exec_driver_sql("UPDATE sessions SET origin = 'ui' WHERE title IS NOT NULL")
        columns = {r[1] for r in conn.exec_driver_sql("PRAGMA table_info(messages)")}
        if "stopped" not in columns:
            conn.exec_driver_sql("ALTER TABLE messages ADD COLUMN stopped INTEGER NOT NULL DEFAULT 0")
    conn.exec_driver_sql(f"PRAGMA user_version = {LEGACY_VERSION}")


def insert_ignore(conn: Connection, table: sa.Table, keys: list[str], **values: Any) -> bool:
    """INSERT unless a row with the same `keys` exists (both dialects); whether a row was inserted."""
    statement = _dialect_insert(conn, table).values(**values).on_conflict_do_nothing(index_elements=keys)
    # the inserted row's key comes back, none when skipped (rowcount is -1 where RETURNING is implicit)
    return conn.execute(statement.returning(*table.primary_key.columns)).first() is not None


def upsert(conn: Connection, table: sa.Table, keys: list[str], **values: Any) -> None:
    """INSERT, or UPDATE the row with the same `keys` (both dialects)."""
    statement = _dialect_insert(conn, table).values(**values)
    changed = {k: statement.excluded[k] for k in values if k not in keys}
    conn.execute(statement.on_conflict_do_update(index_elements=keys, set_=changed))


def _dialect_insert(conn: Connection, table: sa.Table) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)


def copy_database(source: Database, target: Database) -> dict[str, int]:
    """Copy every session (all owners, with their messages) and stored response from `source` into an
    empty `target` (SQLite → PostgreSQL when replicas start sharing one); the rows copied per table."""
    source.migrate()
    target.migrate()
    copied = {"sessions": 0, "messages": 0, "responses": 0}
    with target.errors(), source.engine.connect() as src, target.engine.begin() as dst:
        for table in (sessions, responses):
            if dst.execute(sa.select(sa.func.count()).select_from(table)).scalar():
                raise SessionStoreUnavailable(
                    f"The database {target.shown} already holds {table.name}: copy into an empty one"
                )
        for row in src.execute(sa.select(sessions).order_by(sessions.c.pk)).mappings():
            values = {k: v for k, v in row.items() if k != "pk"}
            pk = dst.execute(sessions.insert().values(**values).returning(sessions.c.pk)).scalar_one()
            query = sa.select(messages).where(messages.c.session_pk == row["pk"]).order_by(messages.c.id)
            rows = [
                {k: v for k, v in m.items() if k != "id"} | {"session_pk": pk}
                for m in src.execute(query).mappings()
            ]
            if rows:
                dst.execute(messages.insert(), rows)
            copied["sessions"] += 1
            copied["messages"] += len(rows)
        rows = [
            {k: v for k, v in r.items() if k != "pk"}
            for r in src.execute(sa.select(responses).order_by(responses.c.pk)).mappings()
        ]
        if rows:
            dst.execute(responses.insert(), rows)
        copied["responses"] = len(rows)
    return copied
