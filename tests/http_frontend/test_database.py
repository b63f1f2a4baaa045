"""The database layer on both dialects: SQLite in a temporary directory, a real PostgreSQL."""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from http_frontend.database import (
    Conflict,
    Database,
    DatabaseError,
    Migration,
    mask_password,
    migrate,
    open_database,
)
from tests.postgres import PostgresServer

DIALECTS = ["sqlite", "postgresql"]

V1 = Migration(1, ("CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",),
               compatible_from=1)
V2 = Migration(2, ("CREATE INDEX things_name ON things (name)",), compatible_from=1)


def database_url(dialect: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A new, empty database of ``dialect``: a file under ``tmp_path``, or a PostgreSQL one."""
    if dialect == "sqlite":
        return str(tmp_path / "data" / "jobs.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.make_database()


def schema_info(db: Database, name: str) -> list[tuple[object, ...]]:
    with db.transaction() as tx:
        return tx.execute("SELECT version, compatible_from FROM schema_info WHERE name = ?",
                          (name,))


def table_exists(db: Database, table: str) -> bool:
    with db.transaction() as tx:
        if db.dialect == "sqlite":
            rows = tx.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,))
        else:
            rows = tx.execute("SELECT 1 FROM pg_tables WHERE tablename = ?", (table,))
    return bool(rows)


# Transactions


def test_a_transaction_commits_when_its_block_ends(db: Database) -> None:
    migrate(db, [V1], name="test")
    with db.transaction() as tx:
        assert tx.execute("INSERT INTO things (id, name) VALUES (?, ?)", (1, "one")) == []
        assert tx.rowcount == 1
    with db.transaction() as tx:
        assert tx.execute("SELECT id, name FROM things") == [(1, "one")]


def test_a_transaction_rolls_back_when_its_block_raises(db: Database) -> None:
    migrate(db, [V1], name="test")
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.execute("INSERT INTO things (id, name) VALUES (?, ?)", (1, "one"))
        raise RuntimeError("the caller failed half way")
    with db.transaction() as tx:
        assert tx.execute("SELECT COUNT(*) FROM things") == [(0,)]


def test_question_marks_are_placeholders_and_percent_signs_stay_literal(db: Database) -> None:
    with db.transaction() as tx:
        rows = tx.execute("SELECT ? || '%', ? WHERE 'a%b' LIKE 'a%'", ("50", 7))
    assert rows == [("50%", 7)]


def test_rowcount_counts_the_rows_a_statement_changed(db: Database) -> None:
    migrate(db, [V1], name="test")
    with db.transaction() as tx:
        for number in range(3):
            tx.execute("INSERT INTO things (id, name) VALUES (?, ?)", (number, f"n{number}"))
        tx.execute("UPDATE things SET name = name || '!' WHERE id < ?", (2,))
        assert tx.rowcount == 2


def test_a_unique_violation_is_a_conflict_and_ends_the_transaction(db: Database) -> None:
    migrate(db, [V1], name="test")
    with db.transaction() as tx:
        tx.execute("INSERT INTO things (id, name) VALUES (1, 'one')")
    with pytest.raises(Conflict), db.transaction() as tx:
        tx.execute("INSERT INTO things (id, name) VALUES (2, 'two')")
        tx.execute("INSERT INTO things (id, name) VALUES (3, 'one')")
    assert issubclass(Conflict, DatabaseError)
    with db.transaction() as tx:
        assert tx.execute("SELECT id FROM things") == [(1,)]


def test_other_sql_errors_propagate_as_the_driver_raised_them(db: Database) -> None:
    migrate(db, [V1], name="test")
    with pytest.raises(Exception) as raised, db.transaction() as tx:
        tx.execute("INSERT INTO things (id, name) VALUES (1, NULL)")
    assert not isinstance(raised.value, DatabaseError)
    assert "null" in str(raised.value).lower()


def test_the_lock_keeps_a_second_transaction_waiting_until_the_first_ends(url: str) -> None:
    first, second = open_database(url), open_database(url)
    events: list[str] = []
    locked = threading.Event()

    def hold() -> None:
        with first.transaction() as tx:
            tx.lock("migrations")
            locked.set()
            time.sleep(0.5)
            events.append("first done")

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(10)
    with second.transaction() as tx:
        tx.lock("migrations")
        events.append("second locked")
    holder.join()
    first.close()
    second.close()
    assert events == ["first done", "second locked"]


# SQLite


def test_sqlite_creates_a_private_file_in_a_private_directory(tmp_path: Path) -> None:
    path = tmp_path / "new" / "jobs.db"
    db = open_database(f"sqlite://{path}")
    try:
        assert db.dialect == "sqlite"
        assert db.location == str(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        db.close()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    db = open_database(str(tmp_path / "jobs.db"))
    with db.transaction() as tx:
        settings = {pragma: tx.execute(f"PRAGMA {pragma}")[0][0] for pragma in
                    ("journal_mode", "busy_timeout", "foreign_keys", "secure_delete")}
    db.close()
    assert settings == {"journal_mode": "wal", "busy_timeout": 10000, "foreign_keys": 1,
                        "secure_delete": 1}


def test_sqlite_in_memory_is_one_database_for_every_thread() -> None:
    db = open_database(":memory:")
    migrate(db, [V1], name="test")

    def insert() -> None:
        with db.transaction() as tx:
            tx.execute("INSERT INTO things (id, name) VALUES (1, 'from a thread')")

    thread = threading.Thread(target=insert)
    thread.start()
    thread.join()
    with db.transaction() as tx:
        assert tx.execute("SELECT name FROM things") == [("from a thread",)]
    db.close()


def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    path.write_bytes(b"not a database, not at all" * 100)
    with pytest.raises(DatabaseError, match="cannot open the SQLite database"):
        open_database(str(path))


def test_sqlite_cannot_create_a_file_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    with pytest.raises(DatabaseError, match="cannot create the SQLite database"):
        open_database(str(tmp_path / "plain" / "jobs.db"))


def test_an_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(DatabaseError, match="unsupported database URL scheme 'mysql'"):
        open_database("mysql://db.example/jobs")


# PostgreSQL connections


def test_postgres_location_hides_the_password() -> None:
    assert mask_password("postgresql://app:s3cret@db.example:5432/jobs") == \
        "postgresql://app:***@db.example:5432/jobs"
    assert mask_password("postgres://db.example/jobs?password=s3cret&sslmode=require") == \
        "postgres://db.example/jobs?password=***&sslmode=require"
    assert mask_password("postgresql://db.example/jobs") == "postgresql://db.example/jobs"


def test_postgres_that_is_not_there_is_a_clear_error_and_a_quick_one() -> None:
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(DatabaseError) as raised:
            open_database(f"postgresql://app:s3cret@127.0.0.1:{port}/jobs", connect_timeout=2)
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert f"cannot connect to PostgreSQL at postgresql://app:***@127.0.0.1:{port}/jobs" \
        in message
    assert "s3cret" not in message


def test_postgres_location_names_the_server(postgres_server: PostgresServer) -> None:
    url = postgres_server.make_database()
    db = open_database(url)
    assert db.dialect == "postgresql"
    assert db.location == url
    db.close()


# Migrations


def test_a_fresh_database_gets_every_migration(db: Database) -> None:
    assert migrate(db, [V1, V2], name="test") == 2
    assert schema_info(db, "test") == [(2, 1)]
    assert table_exists(db, "things")


def test_migrating_again_changes_nothing(db: Database) -> None:
    migrate(db, [V1], name="test")
    with db.transaction() as tx:
        tx.execute("INSERT INTO things (id, name) VALUES (1, 'kept')")
    assert migrate(db, [V1], name="test") == 1
    with db.transaction() as tx:
        assert tx.execute("SELECT name FROM things") == [("kept",)]


def test_an_older_database_gets_only_the_missing_migrations(db: Database) -> None:
    migrate(db, [V1], name="test")
    assert migrate(db, [V1, V2], name="test") == 2
    assert schema_info(db, "test") == [(2, 1)]


def test_schemas_of_different_names_are_versioned_apart(db: Database) -> None:
    migrate(db, [V1, V2], name="test")
    other = Migration(1, ("CREATE TABLE others (id INTEGER)",), compatible_from=1)
    assert migrate(db, [other], name="other") == 1
    assert schema_info(db, "test") == [(2, 1)]


def test_a_newer_but_compatible_database_is_used_as_it_is(
        db: Database, caplog: pytest.LogCaptureFixture) -> None:
    migrate(db, [V1, V2], name="test")  # a newer release, whose version 2 still suits 1
    caplog.set_level("INFO", logger="http_frontend.database")
    assert migrate(db, [V1], name="test") == 2
    assert schema_info(db, "test") == [(2, 1)]
    assert "version 2, from a newer release" in caplog.text


def test_a_newer_incompatible_database_is_refused_and_left_alone(db: Database) -> None:
    v3 = Migration(3, ("CREATE TABLE v3_only (id INTEGER)",), compatible_from=3)
    migrate(db, [V1, V2, v3], name="test")
    with pytest.raises(DatabaseError) as raised:
        migrate(db, [V1], name="test")
    assert str(raised.value) == (
        "the database schema test is version 3, made by a newer release; this release "
        "understands up to 1 and the database needs at least version 3's code: upgrade this "
        "frontend")
    assert schema_info(db, "test") == [(3, 3)]
    assert table_exists(db, "v3_only")


def test_migrations_out_of_order_are_a_bug() -> None:
    db = open_database(":memory:")
    with pytest.raises(ValueError, match="versions 1, 2"):
        migrate(db, [V2, V1], name="test")
    db.close()


def test_frontends_migrating_at_once_migrate_once(url: str) -> None:
    databases = [open_database(url) for _ in range(4)]
    slow = Migration(1, (*V1.statements, "CREATE TABLE more_things (id INTEGER)"),
                     compatible_from=1)
    results: list[int] = []
    errors: list[BaseException] = []

    def run(db: Database) -> None:
        try:
            results.append(migrate(db, [slow], name="test"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(db,)) for db in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [1, 1, 1, 1]
    assert schema_info(databases[0], "test") == [(1, 1)]
    assert table_exists(databases[0], "more_things")
    for db in databases:
        db.close()


def test_the_sqlite_file_stays_private_after_use(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    db = open_database(str(path))
    migrate(db, [V1], name="test")
    sidecars = [p for p in tmp_path.iterdir() if p.name.startswith("jobs.db-")]
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in [path, *sidecars]}
    db.close()
    assert sidecars  # WAL's -wal and -shm files
    assert set(modes.values()) == {0o600}, modes


def test_sqlite_reads_a_database_another_connection_wrote(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    db = open_database(str(path))
    migrate(db, [V1], name="test")
    with sqlite3.connect(path) as other:
        other.execute("INSERT INTO things (id, name) VALUES (5, 'elsewhere')")
    with db.transaction() as tx:
        assert tx.execute("SELECT name FROM things WHERE id = 5") == [("elsewhere",)]
    db.close()
