"""The image store: both backends against real storage (a directory; moto's S3 server)."""

from __future__ import annotations

import base64
import logging
import os
import socket
import stat
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.config
import pytest
from hypothesis import given
from hypothesis import strategies as st

from http_frontend.image_store import (
    CONTENT_TYPES,
    DirectoryStore,
    Entry,
    ImageStore,
    Retention,
    S3Store,
    StoreError,
    Sweeper,
    new_name,
    open_store,
    parse_duration,
    parse_size,
    sweep,
    valid_name,
)
from tests.s3 import S3Server, running_s3_server

URLSAFE = string.ascii_letters + string.digits + "-_"
VALID = "A" * 16 + "-_" + "z09" * 4 + "b" * 2 + ".png"  # 32 characters, a dot, a known format

INVALID_NAMES = [
    "",
    "../x.png",
    "../" + "A" * 29 + ".png",  # the right length, escaping the store
    "a/b.png",
    "A" * 15 + "/" + "A" * 16 + ".png",
    "A" * 15 + "\\" + "A" * 16 + ".png",
    "A" * 31 + ".png",  # too short
    "A" * 33 + ".png",  # too long
    "A" * 32 + ".gif",  # unknown format
    "A" * 32 + ".PNG",
    "A" * 32 + ".png.png",
    "A" * 32 + ".png\n",
    "A" * 32 + ".",
    "A" * 32,
    "." + "A" * 31 + ".png",
    "A" * 31 + "\x00.png",
    "é" * 32 + ".png",
    "\uff21" * 32 + ".png",  # fullwidth letters, which NFKC folds to ASCII
    "\ud800" * 32 + ".png",  # lone surrogates: not even encodable
]


def image_bytes(size: int = 1000) -> bytes:
    return os.urandom(size)


@pytest.fixture
def s3_store(s3_server: S3Server) -> S3Store:
    """A store in a fresh bucket (test_open_store_* build the client as production does)."""
    bucket = s3_server.make_bucket(f"images-{uuid.uuid4().hex[:12]}")
    return S3Store(bucket, "runs/a/", client=s3_server.client)


@pytest.fixture
def directory_store(tmp_path: Path) -> DirectoryStore:
    return DirectoryStore(tmp_path / "images")


@pytest.fixture(params=["directory", "s3"])
def store(request: pytest.FixtureRequest) -> ImageStore:
    store: ImageStore = request.getfixturevalue(f"{request.param}_store")
    return store


def entry_of(store: ImageStore, name: str) -> Entry:
    (entry,) = [entry for entry in store.entries() if entry.name == name]
    return entry


# Names.


def test_new_name_is_192_random_bits_in_32_urlsafe_characters() -> None:
    for ext in CONTENT_TYPES:
        name = new_name(ext)
        token, _, suffix = name.partition(".")
        assert suffix == ext
        assert len(token) == 32 and set(token) <= set(URLSAFE)
        assert len(base64.urlsafe_b64decode(token)) == 24
        assert valid_name(name)
    assert len({new_name("png") for _ in range(1000)}) == 1000


@pytest.mark.parametrize("ext", ["gif", "", "PNG", ".png", "png/../x", "jpg"])
def test_new_name_refuses_an_unknown_format(ext: str) -> None:
    with pytest.raises(ValueError, match="unknown image format"):
        new_name(ext)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_valid_name_refuses(name: str) -> None:
    assert not valid_name(name)


@given(position=st.integers(0, len(VALID) - 1),
       char=st.characters(exclude_categories=()))  # surrogates included
def test_one_changed_character_is_still_valid_only_if_new_name_could_make_it(
        position: int, char: str) -> None:
    name = VALID[:position] + char + VALID[position + 1:]
    in_token = position < 32
    could_be_made = (char in URLSAFE) if in_token else (char == VALID[position])
    assert valid_name(name) == could_be_made


# Every backend: bytes in, the same bytes out.


@pytest.mark.parametrize("ext", sorted(CONTENT_TYPES))
def test_put_then_get_returns_the_bytes_and_their_type(store: ImageStore, ext: str) -> None:
    name, data = new_name(ext), image_bytes()
    before = time.time()
    store.put(name, data)
    image = store.get(name)
    assert image is not None
    assert image.data == data
    assert image.content_type == CONTENT_TYPES[ext]
    assert before - 2 <= image.modified <= time.time() + 2  # S3 keeps whole seconds


def test_get_of_an_absent_name_is_none(store: ImageStore) -> None:
    assert store.get(new_name("png")) is None


def test_put_replaces_an_image_whole(store: ImageStore) -> None:
    name, first, second = new_name("png"), image_bytes(5000), image_bytes(10)
    store.put(name, first)
    store.put(name, second)
    image = store.get(name)
    assert image is not None and image.data == second


def test_delete_removes_and_ignores_what_is_absent(store: ImageStore) -> None:
    kept, gone = new_name("png"), new_name("webp")
    store.put(kept, b"kept")
    store.put(gone, b"gone")
    store.delete([gone, new_name("png"), "../x.png"])
    assert store.get(gone) is None
    assert store.get(kept) is not None
    store.delete([])


def test_entries_list_every_image_with_its_size(store: ImageStore) -> None:
    assert list(store.entries()) == []
    sizes = {new_name("png"): 10, new_name("jpeg"): 2000, new_name("webp"): 0}
    for name, size in sizes.items():
        store.put(name, image_bytes(size))
    entries = list(store.entries())
    assert {entry.name: entry.size for entry in entries} == sizes
    assert all(abs(entry.modified - time.time()) < 10 for entry in entries)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_refused_before_the_store_is_touched(
        store: ImageStore, name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an image name"):
        store.put(name, b"data")
    assert store.get(name) is None
    assert list(store.entries()) == []
    assert [path.name for path in tmp_path.iterdir()] in ([], ["images"])  # nothing escaped


def test_check_passes_on_a_usable_store(store: ImageStore) -> None:
    store.check()


def test_sweep_by_age(store: ImageStore) -> None:
    names = [new_name("png"), new_name("png")]
    for name in names:
        store.put(name, image_bytes(100))
    newest = max(entry.modified for entry in store.entries())
    retention = Retention(max_age=3600, max_bytes=None)

    report = sweep(store, retention, now=newest + 5)
    assert (report.deleted, report.kept, report.kept_bytes) == (0, 2, 200)

    report = sweep(store, retention, now=newest + 3601)
    assert (report.deleted, report.freed, report.kept, report.kept_bytes) == (2, 200, 0, 0)
    assert all(store.get(name) is None for name in names)


def test_sweep_by_size_spares_images_younger_than_the_grace(store: ImageStore) -> None:
    for _ in range(3):
        store.put(new_name("png"), image_bytes(1000))
    newest = max(entry.modified for entry in store.entries())
    retention = Retention(max_age=None, max_bytes=2500, grace=300)

    assert sweep(store, retention, now=newest + 10).deleted == 0  # all just handed out

    report = sweep(store, retention, now=newest + 301)
    assert (report.deleted, report.freed, report.kept, report.kept_bytes) == (1, 1000, 2, 2000)
    assert len(list(store.entries())) == 2


# The directory backend.


def age(store: DirectoryStore, name: str, modified: float, size: int = 100) -> None:
    """Store ``size`` bytes under ``name``, written at ``modified``."""
    store.put(name, image_bytes(size))
    path = store.root / name[:2] / name
    os.utime(path, (modified, modified))


def test_files_are_private_to_the_user(directory_store: DirectoryStore) -> None:
    name = new_name("png")
    directory_store.put(name, b"secret")
    path = directory_store.root / name[:2] / name
    assert stat.S_IMODE(directory_store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_write_in_progress_is_never_visible(directory_store: DirectoryStore,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    name, data = new_name("png"), image_bytes(100_000)
    real_replace = os.replace
    seen: list[bytes] = []

    def replace_after_looking(source: str, target: str) -> None:
        seen.append(Path(source).read_bytes())  # written whole before it gets the name
        assert directory_store.get(name) is None
        assert list(directory_store.entries()) == []  # the temporary file is not an image
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_after_looking)
    directory_store.put(name, data)
    assert seen == [data]
    image = directory_store.get(name)
    assert image is not None and image.data == data


def test_a_failed_write_leaves_nothing_behind(directory_store: DirectoryStore,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    name = new_name("png")
    with pytest.raises(StoreError, match="No space left on device"):
        directory_store.put(name, image_bytes())
    assert directory_store.get(name) is None
    assert list((directory_store.root / name[:2]).iterdir()) == []


def test_a_reader_that_opened_the_file_reads_it_whole_after_a_sweep(
        directory_store: DirectoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    name, data = new_name("png"), image_bytes(100_000)
    directory_store.put(name, data)
    real_fstat = os.fstat

    def fstat_then_delete(descriptor: int) -> os.stat_result:
        directory_store.delete([name])  # a sweep between the open and the read
        return real_fstat(descriptor)

    monkeypatch.setattr(os, "fstat", fstat_then_delete)
    image = directory_store.get(name)
    assert image is not None and image.data == data
    monkeypatch.undo()
    assert directory_store.get(name) is None


def test_a_store_that_is_no_longer_a_directory_fails_the_check(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "images")
    (tmp_path / "images").rmdir()
    (tmp_path / "images").write_bytes(b"")  # even root cannot write inside a plain file
    with pytest.raises(StoreError, match="is not writable"):
        store.check()
    with pytest.raises(StoreError, match="cannot list"):
        list(store.entries())


def test_a_root_that_cannot_be_created_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot create the image directory"):
        DirectoryStore(tmp_path / "file" / "images")


def test_the_age_rule_ignores_the_grace_and_the_cap_takes_the_oldest_first(
        directory_store: DirectoryStore) -> None:
    now = 1_000_000.0
    expired, oldest, older, young = (new_name("png") for _ in range(4))
    age(directory_store, expired, now - 7200)
    age(directory_store, oldest, now - 3000)
    age(directory_store, older, now - 2000)
    age(directory_store, young, now - 10)

    report = sweep(directory_store, Retention(max_age=3600, max_bytes=150, grace=5000), now)
    assert (report.deleted, report.kept) == (1, 3)  # the cap spares all: none is past the grace

    report = sweep(directory_store, Retention(max_age=3600, max_bytes=150, grace=1000), now)
    assert (report.deleted, report.freed, report.kept, report.kept_bytes) == (2, 200, 1, 100)
    assert [entry.name for entry in directory_store.entries()] == [young]


def test_the_cap_stops_at_the_first_young_image_even_over_the_cap(
        directory_store: DirectoryStore) -> None:
    now = 1_000_000.0
    old, young, younger = (new_name("png") for _ in range(3))
    age(directory_store, old, now - 1000)
    age(directory_store, young, now - 100)
    age(directory_store, younger, now - 1)
    report = sweep(directory_store, Retention(max_age=None, max_bytes=0, grace=300), now)
    assert (report.deleted, report.kept, report.kept_bytes) == (1, 2, 200)


def test_no_limits_keep_everything(directory_store: DirectoryStore) -> None:
    age(directory_store, new_name("png"), 0.0)
    report = sweep(directory_store, Retention(max_age=None, max_bytes=None), now=1e12)
    assert (report.deleted, report.kept) == (0, 1)


# The S3 backend.


def test_s3_keys_sit_under_the_prefix_with_their_content_type(
        s3_store: S3Store, s3_server: S3Server) -> None:
    name = new_name("webp")
    s3_store.put(name, b"webp bytes")
    head = s3_server.client.head_object(Bucket=s3_store.bucket, Key=f"runs/a/{name}")
    assert head["ContentType"] == "image/webp"
    assert s3_store.location == f"s3://{s3_store.bucket}/runs/a"


def test_s3_entries_skip_what_is_not_the_stores(s3_store: S3Store, s3_server: S3Server) -> None:
    name = new_name("png")
    s3_store.put(name, b"mine")
    for foreign in ["runs/a/notes.txt", f"runs/a/sub/{new_name('png')}", new_name("png"),
                    f"runs/ab/{new_name('png')}"]:
        s3_server.client.put_object(Bucket=s3_store.bucket, Key=foreign, Body=b"not mine")
    assert [entry.name for entry in s3_store.entries()] == [name]


def test_s3_without_a_prefix_uses_the_bare_name(s3_server: S3Server) -> None:
    bucket = s3_server.make_bucket(f"bare-{uuid.uuid4().hex[:12]}")
    store = S3Store(bucket, "/", client=s3_server.client)
    name = new_name("png")
    store.put(name, b"bare")
    listing = s3_server.client.list_objects_v2(Bucket=bucket)
    assert [item["Key"] for item in listing["Contents"]] == [name]
    assert store.location == f"s3://{bucket}"


def test_s3_deletes_in_batches_of_a_thousand(s3_server: S3Server) -> None:
    s3_store = S3Store(s3_server.make_bucket(f"batches-{uuid.uuid4().hex[:12]}"),
                       client=own_client(s3_server.endpoint_url))  # its events are this test's
    stored = [new_name("png") for _ in range(3)]
    for name in stored:
        s3_store.put(name, b"x")
    batches: list[int] = []
    s3_store._client.meta.events.register(
        "before-call.s3.DeleteObjects",
        lambda params, **_: batches.append(params["body"].count(b"<Key>")))
    s3_store.delete(stored + [new_name("png") for _ in range(2000)])
    assert batches == [1000, 1000, 3]
    assert list(s3_store.entries()) == []


def test_s3_lists_past_one_page(s3_server: S3Server) -> None:
    s3_store = S3Store(s3_server.make_bucket(f"pages-{uuid.uuid4().hex[:12]}"),
                       client=own_client(s3_server.endpoint_url))  # its events are this test's
    names = {new_name("png") for _ in range(5)}
    for name in names:
        s3_store.put(name, b"")
    pages: list[str] = []

    def two_keys_a_page(params: dict[str, object], **_: object) -> None:
        params["MaxKeys"] = 2  # S3 answers at most 1000 a page; this is the same path, cheaper
        pages.append("page")

    s3_store._client.meta.events.register("before-parameter-build.s3.ListObjectsV2",
                                          two_keys_a_page)
    assert {entry.name for entry in s3_store.entries()} == names
    assert len(pages) == 3


def test_s3_client_has_bounded_timeouts_and_retries(s3_server: S3Server) -> None:
    config = S3Store("any", endpoint_url=s3_server.endpoint_url)._client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (5, 30)
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}  # three in all


def test_s3_missing_bucket_fails_the_check_clearly(s3_server: S3Server) -> None:
    store = S3Store("no-such-bucket", client=s3_server.client)
    with pytest.raises(StoreError, match="the bucket 'no-such-bucket' does not exist at http"):
        store.check()
    with pytest.raises(StoreError, match="NoSuchBucket"):
        store.get(new_name("png"))  # a vanished bucket is an outage, not a missing image
    with pytest.raises(StoreError, match="NoSuchBucket"):
        store.put(new_name("png"), b"x")


def test_s3_without_credentials_fails_the_check_clearly(
        s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store(s3_server.make_bucket(f"creds-{uuid.uuid4().hex[:12]}"),
                    endpoint_url=s3_server.endpoint_url)
    with pytest.raises(StoreError, match="Unable to locate credentials"):
        store.check()


def test_s3_refused_credentials_fail_the_check_clearly(tmp_path: Path) -> None:
    strict = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}  # moto checks credentials, and knows none
    with running_s3_server(tmp_path / "moto.log", strict) as server:
        store = S3Store("images", client=server.client)
        with pytest.raises(StoreError, match=r"access to the bucket was refused \(403\): check "
                                             "the credentials"):
            store.check()


def own_client(endpoint_url: str, timeout: float = 10.0) -> Any:
    """A client of its own, which tries once and gives up after ``timeout`` seconds."""
    import boto3

    config = botocore.config.Config(connect_timeout=timeout, read_timeout=timeout,
                                    retries={"mode": "standard", "total_max_attempts": 1})
    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test", config=config)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


CALLS: dict[str, Callable[[S3Store], object]] = {
    "check": lambda store: store.check(),
    "put": lambda store: store.put(new_name("png"), b"x"),
    "get": lambda store: store.get(new_name("png")),
    "entries": lambda store: list(store.entries()),
    "delete": lambda store: store.delete([new_name("png")]),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_s3_dead_endpoint_is_a_store_error_not_a_hang(closed_port: int,
                                                       call: Callable[[S3Store], object]) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    store = S3Store("images", client=own_client(endpoint, 1.0))
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"127.0.0.1:{closed_port}"):
        call(store)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_s3_silent_endpoint_times_out_as_a_store_error(silent_port: int,
                                                       call: Callable[[S3Store], object]) -> None:
    store = S3Store("images", client=own_client(f"http://127.0.0.1:{silent_port}", 0.3))
    started = time.monotonic()
    with pytest.raises(StoreError, match="timeout"):
        call(store)
    assert time.monotonic() - started < 3


# Opening a store from a location.


def test_open_store_for_a_directory(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "images"))
    assert isinstance(store, DirectoryStore)
    assert store.location == str(tmp_path / "images")
    assert (tmp_path / "images").is_dir()


def test_open_store_for_s3_takes_the_endpoint_from_the_environment(
        s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)  # AWS_ENDPOINT_URL among them
    bucket = s3_server.make_bucket(f"open-{uuid.uuid4().hex[:12]}")
    store = open_store(f"s3://{bucket}/deep/prefix")
    assert isinstance(store, S3Store) and store.location == f"s3://{bucket}/deep/prefix"
    store.check()
    name = new_name("jpeg")
    store.put(name, b"jpeg bytes")
    assert s3_server.client.get_object(Bucket=bucket, Key=f"deep/prefix/{name}")[
        "Body"].read() == b"jpeg bytes"


def test_open_store_passes_the_s3_endpoint(s3_server: S3Server,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    bucket = s3_server.make_bucket(f"endpoint-{uuid.uuid4().hex[:12]}")
    store = open_store(f"s3://{bucket}", s3_endpoint=s3_server.endpoint_url)
    store.check()


@pytest.mark.parametrize("location", ["", "  ", "s3://", "s3:///prefix", "s3://bad bucket/x",
                                      "gs://bucket", "https://example.com/images"])
def test_open_store_refuses_a_bad_location(location: str) -> None:
    with pytest.raises(ValueError, match="image store"):
        open_store(location)


# The sweeper thread.


class BrokenStore(DirectoryStore):
    def __init__(self, root: Path, error: Exception) -> None:
        super().__init__(root)
        self.error = error

    def entries(self) -> Iterator[Entry]:
        raise self.error


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def sweeper_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "image-sweeper"]


@pytest.mark.parametrize("error", [StoreError("the disk is on fire"), RuntimeError("a bug")])
def test_the_sweeper_logs_a_failing_sweep_and_carries_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception) -> None:
    store = BrokenStore(tmp_path / "images", error)
    sweeper = Sweeper(store, Retention(max_age=1, max_bytes=None), interval=0.02)
    with caplog.at_level(logging.ERROR, logger="http_frontend.image_store"):
        sweeper.start()
        try:
            wait_for(lambda: len(caplog.records) >= 3)  # it failed, and tried again
            assert sweeper_threads()
        finally:
            sweeper.stop()
    record = caplog.records[0]
    assert "sweeping the images in" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is error
    assert not sweeper_threads()


def test_the_sweeper_sweeps_on_its_own_by_its_clock(directory_store: DirectoryStore,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    old, new = new_name("png"), new_name("png")
    age(directory_store, old, 1000.0)
    age(directory_store, new, 9000.0)
    sweeper = Sweeper(directory_store, Retention(max_age=3600, max_bytes=None),
                      interval=0.02, clock=lambda: 10_000.0)
    with caplog.at_level(logging.INFO, logger="http_frontend.image_store"):
        sweeper.start()
        try:
            wait_for(lambda: directory_store.get(old) is None)
        finally:
            sweeper.stop()
    assert directory_store.get(new) is not None
    assert any("swept 1 images" in record.getMessage() for record in caplog.records)


def test_sweep_now_runs_on_the_callers_thread(directory_store: DirectoryStore) -> None:
    age(directory_store, new_name("png"), 1000.0)
    sweeper = Sweeper(directory_store, Retention(max_age=60, max_bytes=None),
                      clock=lambda: 2000.0)
    report = sweeper.sweep_now()
    assert (report.deleted, report.freed, report.kept) == (1, 100, 0)


def test_stop_wakes_a_sleeping_sweeper(directory_store: DirectoryStore) -> None:
    sweeper = Sweeper(directory_store, Retention(max_age=None, max_bytes=None), interval=3600)
    sweeper.start()
    started = time.monotonic()
    sweeper.stop()
    assert time.monotonic() - started < 1
    assert not sweeper_threads()


# Durations and sizes, as operators write them.


@pytest.mark.parametrize(("text", "seconds"), [
    ("3600", 3600.0), ("0", 0.0), ("90s", 90.0), ("30m", 1800.0), ("12h", 43200.0),
    ("7d", 604800.0), ("1.5h", 5400.0), (" 10m ", 600.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", " ", "-1", "-5m", "10x", "m", "1e3", "inf", "nan", "Infinity", "1 h", "1hh", "1H",
    "1.", ".5", "١٢", "9" * 400, "10m30s",
])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("1048576", 1048576), ("0", 0), ("64K", 65536), ("500M", 500 << 20), ("10G", 10 << 30),
    ("1T", 1 << 40), ("64k", 65536), (" 2G", 2 << 30),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [
    "", "-1", "1.5G", "10GB", "10X", "G", "1e9", "inf", "nan", "1 G", "\uff11\uff10", "0x10",
])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)
