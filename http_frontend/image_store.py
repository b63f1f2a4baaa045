"""Where generated images are kept so they can be served by URL, and how long they stay.

Every image is written under a fresh name, ``<id>.<ext>``, whose id is 192 random bits: the
name is the only secret, since ``GET /v1/images/files/<name>`` works without an API key.
``valid_name`` refuses anything ``new_name`` could not have made before a store is touched,
so a name from a URL can never reach outside the store.

Two backends: ``DirectoryStore`` (a local directory, written atomically with a rename) and
``S3Store`` (a bucket on S3 or anything that speaks its API: MinIO, Ceph, R2...).
``open_store`` picks one from a location: ``s3://bucket/prefix`` or a directory path.

S3 images are proxied through the frontend rather than handed out as presigned URLs: every
backend gets the same URL shape; the bucket stays private and need not be reachable by
clients; and an image lives as long as the frontend's retention says, not a signature's
lifetime (presigned URLs expire after at most 7 days, and they leak the bucket's endpoint).

``Retention`` is that policy: a maximum age and a cap on total size. ``sweep`` applies it once;
a ``Sweeper`` thread applies it every minute or so.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

TOKEN_BYTES = 24  # 192 random bits: 32 characters of URL-safe base64
_NAME = re.compile(rf"[A-Za-z0-9_-]{{32}}\.(?:{'|'.join(CONTENT_TYPES)})")

S3_DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
S3_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})


def new_name(ext: str) -> str:
    """Make a fresh unguessable name for an image of format ``ext``."""
    if ext not in CONTENT_TYPES:
        known = ", ".join(CONTENT_TYPES)
        raise ValueError(f"unknown image format {ext!r}: expected one of {known}")
    return f"{secrets.token_urlsafe(TOKEN_BYTES)}.{ext}"


def valid_name(name: str) -> bool:
    """Whether ``name`` is one ``new_name`` could have made."""
    return _NAME.fullmatch(name) is not None


def _content_type(name: str) -> str:
    return CONTENT_TYPES[name.rpartition(".")[2]]


def _require_valid(name: str) -> None:
    if not valid_name(name):
        raise ValueError(f"not an image name: {name!r}")


class StoreError(Exception):
    """The store could not be used; the message is fit for an operator's log."""


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    content_type: str
    modified: float  # epoch seconds when it was written


@dataclass(frozen=True)
class Entry:
    name: str
    size: int
    modified: float  # epoch seconds


class ImageStore(abc.ABC):
    """Images by name: written whole, read back, listed and deleted by the sweeper."""

    location: str  # for logs and docs: the directory, or "s3://bucket/prefix"

    @abc.abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``; a reader sees the whole image or none of it."""

    @abc.abstractmethod
    def get(self, name: str) -> StoredImage | None:
        """The image called ``name``; None if there is none (or the name is invalid)."""

    @abc.abstractmethod
    def delete(self, names: Iterable[str]) -> None:
        """Delete these images; names already gone are fine."""

    @abc.abstractmethod
    def entries(self) -> Iterator[Entry]:
        """Every image stored."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise StoreError, saying why, if the store cannot be used."""


class DirectoryStore(ImageStore):
    """Images as files: ``root/<first two characters>/<name>``, private to this user."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the image directory {root}: {err.strerror}") from err

    def _path(self, name: str) -> Path:
        # Two-character subdirectories keep any one directory small (at most 4096 of them).
        return self.root / name[:2] / name

    def put(self, name: str, data: bytes) -> None:
        _require_valid(name)
        path = self._path(name)
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            _write_atomically(path, data)
        except OSError as err:
            raise StoreError(f"cannot write {path}: {err.strerror}") from err

    def get(self, name: str) -> StoredImage | None:
        if not valid_name(name):
            return None
        path = self._path(name)
        try:
            # Once open, the file reads whole even if a sweep unlinks it meanwhile.
            with open(path, "rb") as file:
                modified = os.fstat(file.fileno()).st_mtime
                data = file.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StoreError(f"cannot read {path}: {err.strerror}") from err
        return StoredImage(data, _content_type(name), modified)

    def delete(self, names: Iterable[str]) -> None:
        for name in names:
            if not valid_name(name):
                continue  # nothing by that name can have been stored
            path = self._path(name)
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                raise StoreError(f"cannot delete {path}: {err.strerror}") from err

    def entries(self) -> Iterator[Entry]:
        try:
            with os.scandir(self.root) as subdirs:
                for subdir in subdirs:
                    if subdir.is_dir(follow_symlinks=False):
                        yield from _files_in(Path(subdir.path))
        except OSError as err:
            raise StoreError(f"cannot list {self.root}: {err.strerror}") from err

    def check(self) -> None:
        # A real write is the only honest test: permissions, read-only mounts, full disks.
        try:
            descriptor, probe = tempfile.mkstemp(dir=self.root, prefix=".check-")
            os.close(descriptor)
            os.unlink(probe)
        except OSError as err:
            raise StoreError(
                f"the image directory {self.root} is not writable: {err.strerror}") from err


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``."""
    # The temporary name starts with a dot, so it is never a valid name: entries() skips it.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with open(descriptor, "wb") as file:
            file.write(data)
            # Flushed before the rename, so a crash cannot leave an empty file under the name.
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _files_in(subdir: Path) -> Iterator[Entry]:
    with os.scandir(subdir) as files:
        for file in files:
            if not valid_name(file.name) or not file.name.startswith(subdir.name):
                continue  # temporary files, and anything else that is not an image
            try:
                stat = file.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since the directory was read
            yield Entry(file.name, stat.st_size, stat.st_mtime)


class S3Store(ImageStore):
    """Images as objects in an S3 bucket, under ``prefix/<name>``."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 client: Any = None) -> None:
        # Imported here, not at the top: boto3 takes a while to import, and only S3 needs it.
        import botocore.config  # type: ignore[import-untyped]
        import botocore.exceptions  # type: ignore[import-untyped]

        self.bucket = bucket
        prefix = prefix.strip("/")
        self._key_prefix = f"{prefix}/" if prefix else ""
        self.location = f"s3://{bucket}/{prefix}".rstrip("/")
        self._errors = (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)
        if client is None:
            client = _make_client(endpoint_url, botocore.config.Config(
                # Bounded, so a dead S3 costs a request thread seconds, never forever.
                # ("max_attempts" would count retries only: 3 of them are 4 attempts.)
                connect_timeout=5, read_timeout=30,
                retries={"mode": "standard", "total_max_attempts": 3}))
        self._client = client

    def _key(self, name: str) -> str:
        return self._key_prefix + name

    def put(self, name: str, data: bytes) -> None:
        _require_valid(name)
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data,
                                    ContentType=_content_type(name))
        except self._errors as err:
            raise self._store_error(f"cannot write {name}", err) from err

    def get(self, name: str) -> StoredImage | None:
        if not valid_name(name):
            return None
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
            data = response["Body"].read()
        except self._errors as err:
            if _error_code(err) in S3_NOT_FOUND:
                return None
            raise self._store_error(f"cannot read {name}", err) from err
        return StoredImage(data, _content_type(name), response["LastModified"].timestamp())

    def delete(self, names: Iterable[str]) -> None:
        keys = [self._key(name) for name in names if valid_name(name)]
        for start in range(0, len(keys), S3_DELETE_BATCH):
            self._delete_batch(keys[start:start + S3_DELETE_BATCH])

    def _delete_batch(self, keys: list[str]) -> None:
        objects = [{"Key": key} for key in keys]
        try:
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        except self._errors as err:
            raise self._store_error(f"cannot delete {len(keys)} images", err) from err
        # DeleteObjects answers 200 even when some keys failed; those are listed here.
        failures = response.get("Errors", [])
        if failures:
            first = failures[0]
            raise StoreError(f"{self.location}: cannot delete {len(failures)} images, the first "
                             f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}")

    def entries(self) -> Iterator[Entry]:
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key_prefix):
                for item in page.get("Contents", []):
                    name = item["Key"][len(self._key_prefix):]
                    if valid_name(name):
                        yield Entry(name, item["Size"], item["LastModified"].timestamp())
        except self._errors as err:
            raise self._store_error("cannot list the images", err) from err

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except self._errors as err:
            code = _error_code(err)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(f"{self.location}: the bucket {self.bucket!r} does not exist "
                                 f"at {self._endpoint()}") from err
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreError(f"{self.location}: access to the bucket was refused ({code}): "
                                 "check the credentials (AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY) and their permissions") from err
            raise self._store_error("cannot use the bucket", err) from err

    def _endpoint(self) -> str:
        return str(getattr(self._client.meta, "endpoint_url", "the default endpoint"))

    def _store_error(self, action: str, err: Exception) -> StoreError:
        return StoreError(f"{self.location} at {self._endpoint()}: {action}: {err}")


def _make_client(endpoint_url: str | None, config: Any) -> Any:
    import boto3  # type: ignore[import-untyped]
    import botocore.exceptions

    try:
        # A session of its own reads the environment now, not whenever boto3's shared default
        # session first did (it keeps the credentials it found then).
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
    except (botocore.exceptions.BotoCoreError, ValueError) as err:
        raise StoreError(f"cannot set up an S3 client for {endpoint_url or 'AWS'}: {err}") from err


def _error_code(err: Exception) -> str | None:
    """The S3 error code of a ClientError ("NoSuchKey", "404"...); None for other errors."""
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code is not None else None


def open_store(location: str, *, s3_endpoint: str | None = None) -> ImageStore:
    """The store at ``location``: ``s3://bucket/prefix``, or a directory path."""
    scheme, separator, rest = location.partition("://")
    if not separator:
        if not location.strip():
            raise ValueError("the image store location is empty: give a directory or s3://BUCKET")
        return DirectoryStore(Path(location).expanduser())
    if scheme.lower() != "s3":
        raise ValueError(f"image store {location!r}: only s3://BUCKET/PREFIX URLs or directory "
                         "paths are supported")
    bucket, _, prefix = rest.partition("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", bucket):
        raise ValueError(f"image store {location!r}: expected s3://BUCKET or s3://BUCKET/PREFIX "
                         "with a bucket name of letters, digits, dots and dashes")
    return S3Store(bucket, prefix, endpoint_url=s3_endpoint)


@dataclass(frozen=True)
class Retention:
    """How long images are kept, and how much space they may take."""

    max_age: float | None  # seconds; None: kept forever by age
    max_bytes: int | None  # total size cap; None: no cap
    # The size cap never deletes an image younger than this, so a URL just handed out still
    # works for a client about to fetch it. The age rule is the operator's explicit choice
    # and applies as is.
    grace: float = 300.0


@dataclass(frozen=True)
class SweepReport:
    deleted: int
    freed: int  # bytes
    kept: int  # images left
    kept_bytes: int


def sweep(store: ImageStore, retention: Retention, now: float) -> SweepReport:
    """Delete images older than max_age; then the oldest while the total is over max_bytes."""
    kept = sorted(store.entries(), key=lambda entry: (entry.modified, entry.name))
    doomed: list[Entry] = []
    if retention.max_age is not None:
        max_age = retention.max_age
        doomed = [entry for entry in kept if now - entry.modified > max_age]
        kept = kept[len(doomed):]  # sorted oldest first, so the expired ones lead
    if retention.max_bytes is not None:
        evicted = _over_the_cap(kept, retention.max_bytes, now - retention.grace)
        doomed += evicted
        kept = kept[len(evicted):]
    if doomed:
        store.delete(entry.name for entry in doomed)
    return SweepReport(deleted=len(doomed), freed=sum(entry.size for entry in doomed),
                       kept=len(kept), kept_bytes=sum(entry.size for entry in kept))


def _over_the_cap(oldest_first: list[Entry], max_bytes: int, young_since: float) -> list[Entry]:
    """The oldest entries to delete to bring the total under ``max_bytes``, none young."""
    total = sum(entry.size for entry in oldest_first)
    evicted: list[Entry] = []
    for entry in oldest_first:
        if total <= max_bytes or entry.modified > young_since:
            break
        evicted.append(entry)
        total -= entry.size
    return evicted


class Sweeper:
    """A daemon thread that applies the retention every ``interval`` seconds."""

    FIRST_DELAY = 1.0  # seconds from start() to the first sweep, at most
    STOP_TIMEOUT = 10.0  # how long stop() waits for a sweep in progress

    def __init__(self, store: ImageStore, retention: Retention, *, interval: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.retention = retention
        self.interval = interval
        self._clock = clock
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="image-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Wake the thread and wait for it, a bounded time."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.STOP_TIMEOUT)
            self._thread = None

    def sweep_now(self) -> SweepReport:
        """Sweep once, on the caller's thread."""
        return sweep(self.store, self.retention, self._clock())

    def _run(self) -> None:
        delay = min(self.FIRST_DELAY, self.interval)
        while not self._stopping.wait(delay):
            self._sweep_and_log()
            delay = self.interval

    def _sweep_and_log(self) -> None:
        try:
            report = self.sweep_now()
        except Exception:
            # Logged and retried next time: a store that is down for a while must not end
            # the sweeping for good.
            log.exception("sweeping the images in %s failed; next try in %.0f s",
                          self.store.location, self.interval)
            return
        if report.deleted:
            log.info("swept %d images (%d bytes) from %s; %d kept (%d bytes)", report.deleted,
                     report.freed, self.store.location, report.kept, report.kept_bytes)


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"([0-9]+)([KMGT]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float:
    """Seconds in "3600", "90s", "30m", "12h" or "7d"."""
    match = _DURATION.fullmatch(text.strip())
    seconds = float(match[1]) * _DURATION_UNITS[match[2]] if match else math.inf
    if not math.isfinite(seconds):  # garbage, or so many digits that they overflow
        raise ValueError(f"not a duration: {text!r}: expected a number of seconds, or a number "
                         "with a unit s, m, h or d (90s, 30m, 12h, 7d)")
    return seconds


def parse_size(text: str) -> int:
    """Bytes in "1048576", "64K", "500M", "10G" or "1T" (binary: K = 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r}: expected a number of bytes, or a whole number "
                         "with a unit K, M, G or T (64K, 500M, 10G; K = 1024)")
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]
