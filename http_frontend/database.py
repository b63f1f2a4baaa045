"""Where the frontend keeps what must outlive it: SQLite by default, PostgreSQL when shared.

One frontend keeps its job history in a SQLite file in its data directory; several frontends on
several hosts that share one history point ``--db`` at the same PostgreSQL database. Callers see
one interface and write one SQL text for both: ``?`` placeholders (translated to ``%s`` for
PostgreSQL), types both accept (TEXT, INTEGER, DOUBLE PRECISION), and ``RETURNING``, row values
and partial indexes, which both have (SQLite since 3.35). Only connection handling differs:

- SQLite: one connection guarded by a lock. SQLite serializes writers anyway, and one connection
  keeps ``:memory:`` one database across threads. Each transaction starts with
  ``BEGIN IMMEDIATE``, so it holds the write lock from its first statement and never fails half
  way through on a lock upgrade. ``secure_delete`` zeroes what a DELETE or UPDATE frees, so a
  scrubbed prompt is gone from the file, not merely marked free.
- PostgreSQL: a pool of connections (``psycopg_pool``); each transaction takes one.

Failures to reach the database become ``DatabaseError``, with a message for the operator; a
unique-constraint violation becomes ``Conflict`` in both dialects; any other SQL error
propagates as the driver raised it (a bug in the caller's SQL).

``migrate()`` versions a named schema in the table ``schema_info``; see ``Migration``.
"""

from __future__ import annotations

import abc
import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10  # seconds to reach PostgreSQL (libpq counts whole seconds)
POOL_WAIT = 30.0  # seconds a request thread waits for one of the pool's connections
POOL_SIZE = 8
BUSY_TIMEOUT_MS = 10_000  # how long SQLite waits for another process's write lock
SQLITE_MIN_VERSION = (3, 35, 0)  # RETURNING

# SQLite's primary result codes that mean the database cannot be used now (a full disk, a lock
# held too long, a read-only or broken file), as opposed to a mistake in the SQL.
_SQLITE_UNAVAILABLE = {
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CORRUPT,
    sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_PERM,
}


class DatabaseError(Exception):
    """The database cannot be used; the message says why, for an operator."""


class Conflict(DatabaseError):
    """A row with the same unique key exists already."""


class Transaction:
    """One open transaction: run statements with ``?`` placeholders and read their rows."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self._cursor = cursor
        self._dialect = dialect
        self.rowcount = 0  # rows the last statement changed (or returned)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; its rows, or [] for a statement that returns none."""
        if self._dialect == "postgresql":
            sql = _to_pyformat(sql)
        try:
            # Parameters always go with the statement (an empty tuple too): psycopg then reads
            # %% as %, which _to_pyformat relies on.
            self._cursor.execute(sql, tuple(params))
        except (sqlite3.IntegrityError, psycopg.errors.UniqueViolation) as exc:
            if isinstance(exc, psycopg.errors.UniqueViolation) or "UNIQUE" in str(exc):
                raise Conflict(str(exc)) from exc
            raise
        rows = [] if self._cursor.description is None else self._cursor.fetchall()
        self.rowcount = self._cursor.rowcount  # read after the rows: SQLite counts as it goes
        return [tuple(row) for row in rows]

    def lock(self, name: str) -> None:
        """Hold an exclusive lock named ``name`` until this transaction ends."""
        if self._dialect == "postgresql":
            self.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (name,))
        # SQLite: BEGIN IMMEDIATE took the database's one write lock already.


def _to_pyformat(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s``, with literal ``%`` doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


class Database(abc.ABC):
    """A database the frontend records into; ``transaction()`` is the only way in."""

    dialect: str  # "sqlite" | "postgresql"
    location: str  # where it is, for logs: never a password

    @abc.abstractmethod
    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A transaction committed when the block ends, rolled back if it raises."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the database's connections."""


def open_database(url: str, *, connect_timeout: int = CONNECT_TIMEOUT) -> Database:
    """Open a ``postgresql://`` URL, or SQLite: ``sqlite:///abs/path.db``, a path, ``:memory:``."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresDatabase(url, connect_timeout=connect_timeout)
    if scheme == "sqlite":
        return SQLiteDatabase(url[len("sqlite://"):])
    if scheme:
        raise DatabaseError(f"unsupported database URL scheme {scheme!r}: use postgresql:// "
                            "or sqlite:///path (or a plain file path)")
    return SQLiteDatabase(url)


class SQLiteDatabase(Database):
    """One SQLite connection shared by every thread, one transaction at a time."""

    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        if sqlite3.sqlite_version_info < SQLITE_MIN_VERSION:
            raise DatabaseError(f"SQLite {sqlite3.sqlite_version} is too old: job records "
                                "need 3.35 or newer")
        self.location = path
        self._lock = threading.Lock()
        if path != ":memory:":
            _create_private_file(Path(path))
        try:
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._configure(path)
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open the SQLite database {path}: {exc}") from exc

    def _configure(self, path: str) -> None:
        # SQLite's own LOWER folds ASCII only; Python's folds every script, as PostgreSQL's
        # does in a UTF-8 locale, so a search ignores case alike in both.
        self._conn.create_function("LOWER", 1, _lower, deterministic=True)
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA secure_delete = ON")
        if path != ":memory:":
            # WAL: readers never wait for the writer; synchronous FULL makes each commit
            # durable before the job it records is acknowledged.
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                log.warning("SQLite at %s keeps journal mode %s (WAL refused)", path, mode)
            self._conn.execute("PRAGMA synchronous = FULL")

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._lock:
            cursor = self._conn.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE")
                yield Transaction(cursor, self.dialect)
                cursor.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:  # SQLite ends some transactions itself on error
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and _sqlite_unavailable(exc):
                    raise DatabaseError(f"SQLite database {self.location}: {exc}") from exc
                raise
            finally:
                cursor.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _sqlite_unavailable(exc: sqlite3.OperationalError) -> bool:
    """Whether ``exc`` says the database cannot be used now, rather than the SQL is wrong."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_UNAVAILABLE


def _create_private_file(path: Path) -> None:
    """Create the database file readable by this user only (prompts are private)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            # SQLite creates its -wal and -shm files with the database file's permissions.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise DatabaseError(f"cannot create the SQLite database {path}: {exc}") from exc


class PostgresDatabase(Database):
    """A pool of PostgreSQL connections; each transaction borrows one."""

    dialect = "postgresql"

    def __init__(self, url: str, *, connect_timeout: int = CONNECT_TIMEOUT) -> None:
        self.location = mask_password(url)
        # One plain connection first: its error says what is wrong (refused, unknown host,
        # authentication), where the pool would only say that it timed out.
        try:
            psycopg.connect(url, connect_timeout=connect_timeout).close()
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL at {self.location}: "
                                f"{str(exc).strip()}") from exc
        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=POOL_SIZE, open=False, timeout=POOL_WAIT,
            kwargs={"connect_timeout": connect_timeout, "autocommit": False},
            # A connection that died while idle (a server restart) is replaced, not handed out.
            check=psycopg_pool.ConnectionPool.check_connection,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except psycopg_pool.PoolTimeout as exc:
            self._pool.close()
            raise DatabaseError(f"cannot connect to PostgreSQL at {self.location}: "
                                f"no connection within {connect_timeout} s") from exc

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        try:
            # The pool's connection block commits on success and rolls back on an exception.
            with self._pool.connection() as conn:
                yield Transaction(conn.cursor(), self.dialect)
        except psycopg_pool.PoolTimeout as exc:
            raise DatabaseError(f"PostgreSQL at {self.location}: no connection free or "
                                f"reachable within {POOL_WAIT:g} s") from exc
        except psycopg.OperationalError as exc:
            raise DatabaseError(f"PostgreSQL at {self.location}: {str(exc).strip()}") from exc

    def close(self) -> None:
        self._pool.close()


def mask_password(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for a log."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(key, "***" if key == "password" else value) for key, value in query]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc,
                                                  query=urllib.parse.urlencode(query, safe="*")))


@dataclass(frozen=True)
class Migration:
    """One step of a schema: the statements that produce ``version`` from the one before.

    ``compatible_from`` is the oldest schema version whose code can still use the database
    after this step. An additive step (new tables, columns with defaults, indexes) keeps the
    previous release working, so it says the previous version and a rolling upgrade can run
    both releases at once; a step that breaks old code says its own version.
    """

    version: int
    statements: tuple[str, ...]
    compatible_from: int


def migrate(db: Database, migrations: Sequence[Migration], *, name: str) -> int:
    """Bring the schema ``name`` up to the newest migration; the version now in the database.

    Runs under a lock in one transaction, so frontends starting together migrate once. A
    database that a newer release migrated already is used as it is when that release says
    this one's code still fits it, and refused (untouched) when not.
    """
    _check_order(migrations)
    newest = migrations[-1]
    with db.transaction() as tx:
        tx.lock("schema_info")
        tx.execute("CREATE TABLE IF NOT EXISTS schema_info (name TEXT PRIMARY KEY, "
                   "version INTEGER NOT NULL, compatible_from INTEGER NOT NULL)")
        rows = tx.execute("SELECT version, compatible_from FROM schema_info WHERE name = ?",
                          (name,))
        current, compatible_from = rows[0] if rows else (0, 0)
        if current > newest.version:
            return _accept_newer(db, name, current, compatible_from, newest.version)
        missing = [m for m in migrations if m.version > current]
        for migration in missing:
            for statement in migration.statements:
                tx.execute(statement)
        if missing:
            _record_version(tx, name, newest, known=bool(rows))
            log.info("schema %s in %s: version %d -> %d", name, db.location, current,
                     newest.version)
        return newest.version


def _check_order(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if not versions or versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be versions 1, 2, ... in order, not {versions}")


def _accept_newer(db: Database, name: str, current: int, compatible_from: int,
                  understood: int) -> int:
    if compatible_from > understood:
        raise DatabaseError(
            f"the database schema {name} is version {current}, made by a newer release; this "
            f"release understands up to {understood} and the database needs at least version "
            f"{compatible_from}'s code: upgrade this frontend")
    log.info("schema %s in %s is version %d, from a newer release; it still works with this "
             "release's version %d", name, db.location, current, understood)
    return current


def _record_version(tx: Transaction, name: str, newest: Migration, *, known: bool) -> None:
    if known:
        tx.execute("UPDATE schema_info SET version = ?, compatible_from = ? WHERE name = ?",
                   (newest.version, newest.compatible_from, name))
    else:
        tx.execute("INSERT INTO schema_info (name, version, compatible_from) VALUES (?, ?, ?)",
                   (name, newest.version, newest.compatible_from))


def _lower(text: Any) -> Any:
    return text.lower() if isinstance(text, str) else text
