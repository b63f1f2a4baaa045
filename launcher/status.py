"""`launch.py status`: a running cluster as its frontend's public HTTP API shows it.

It reads GET /readyz, /v1/cluster and /v1/jobs only, so it works from any host that reaches
the frontend. It shows what those answers hold and computes nothing they do not support: each
worker's rate is the one it measured itself (its `stats`, from its last heartbeat; `-` from a
worker that sends none); the frontend's rate comes from the `finished` times of its newest
jobs, against the server's clock.
"""

from __future__ import annotations

import http.client
import json
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.utils import parsedate_to_datetime
from typing import Any, TextIO, TypeGuard

from broker.defaults import HTTP_HOST, HTTP_PORT

DEFAULT_URL = f"http://{HTTP_HOST}:{HTTP_PORT}"
EXIT_READY, EXIT_NOT_READY, EXIT_UNREACHABLE = 0, 1, 2
TIMEOUT = 10.0  # seconds for each request
JOBS_PAGE = 100  # the most one page of GET /v1/jobs holds
WINDOWS = ((60, "last minute"), (300, "last 5 minutes"))
MAX_ANSWER = 16 << 20  # bytes read from one answer; a longer one is not the API's
MAX_CELL = 40  # characters of one table cell
MAX_N = 10_000  # images one job may claim; a larger n is refused as garbage


class StatusError(Exception):
    """The frontend cannot be reached, refuses the key, or answers something not its API."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # the decoded JSON
    date: float | None  # the server's clock (its Date header), seconds since the epoch


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow one: urllib would send the Authorization header to wherever it points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Frontend:
    """GETs JSON from a frontend's public API, with a Bearer key when there is one."""

    def __init__(self, url: str, *, api_key: str | None = None,
                 timeout: float = TIMEOUT) -> None:
        if not timeout > 0:
            raise StatusError(f"the timeout must be above 0 seconds, not {timeout}")
        self.url = normalize_url(url)
        self.api_key = api_key
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirects)

    def get(self, path: str) -> Answer:
        headers = {"Accept": "application/json", "User-Agent": "diffusion-cluster-status"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, headers=headers)
        deadline = time.monotonic() + self.timeout
        try:
            try:
                with self._opener.open(request, timeout=self.timeout) as resp:
                    status, data, answer_headers = resp.status, self._read(resp, deadline), \
                        resp.headers
            except urllib.error.HTTPError as exc:  # a 4xx or 5xx: its body says why
                with exc:
                    status, data, answer_headers = exc.code, self._read(exc, deadline), \
                        exc.headers
        except (OSError, http.client.HTTPException) as exc:
            raise StatusError(f"cannot reach {self.url}: {cell(reason(exc), width=200)}"
                              ) from None
        return self._decode(path, status, data, answer_headers)

    def _read(self, resp: Any, deadline: float) -> bytes:
        """The answer's body, up to MAX_ANSWER + 1 bytes, read by --timeout as a whole: the
        socket's own timeout is per read, which an answer trickled a byte at a time never
        reaches."""
        data = bytearray()
        while len(data) <= MAX_ANSWER:
            if time.monotonic() > deadline:
                raise StatusError(f"{self.url} took longer than {self.timeout:g} s to answer")
            chunk = resp.read1(min(1 << 16, MAX_ANSWER + 1 - len(data)))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def _decode(self, path: str, status: int, data: bytes, headers: Message) -> Answer:
        if status == 401:
            if self.api_key:
                raise StatusError(f"{self.url} refused the API key (HTTP 401): check "
                                  "--api-key or DC_API_KEY")
            raise StatusError(f"{self.url} wants an API key (HTTP 401): pass --api-key KEY "
                              "or set DC_API_KEY")
        where = f"{self.url}{path.split('?', 1)[0]}"
        if 300 <= status < 400:
            target = cell(headers.get("Location"), width=200)
            raise StatusError(f"{where} redirects to {target}: give the frontend's own URL")
        if len(data) > MAX_ANSWER:
            raise StatusError(f"{where} answered more than {MAX_ANSWER >> 20} MiB: "
                              "is this a diffusion-cluster frontend?")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):
            raise StatusError(f"{where} answered HTTP {status} that is not JSON: is this a "
                              "diffusion-cluster frontend?") from None
        return Answer(status, body, server_time(headers.get("Date")))


def normalize_url(url: str) -> str:
    """'host:8000', 'http://host:8000/' -> 'http://host:8000'; anything else is refused."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise StatusError(f"{url!r} is not a frontend's http(s) URL")
    return url


def reason(exc: BaseException) -> str:
    """Why a request failed, in a few words: 'Connection refused', 'timed out'."""
    cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, http.client.BadStatusLine | http.client.LineTooLong):
        return "it answers something that is not HTTP"
    if isinstance(cause, TimeoutError):
        return "timed out"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__


def server_time(date: str | None) -> float | None:
    if not date:
        return None
    try:
        return parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def run(url: str, *, api_key: str | None = None, timeout: float = TIMEOUT,
        out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print the cluster's state; 0 when the frontend is ready, 1 when not, 2 when unknown."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        frontend = Frontend(url, api_key=api_key, timeout=timeout)
        ready, why = readiness(frontend.get("/readyz"))
        cluster = section(frontend.get("/v1/cluster"), "workers", list, "queues", dict)
        jobs = section(frontend.get(f"/v1/jobs?limit={JOBS_PAGE}"), "data", list)
    except StatusError as exc:
        print(f"launch.py status: {exc}", file=err, flush=True)
        return EXIT_UNREACHABLE
    state = (f"ready ({why})" if why else "ready") if ready else f"NOT READY: {why}"
    lines = [f"Frontend {frontend.url}: {state}"]
    lines += describe_cluster(cluster)
    lines += describe_throughput(jobs, keyed=bool(api_key))
    print("\n".join(lines), file=out, flush=True)
    return EXIT_READY if ready else EXIT_NOT_READY


def readiness(answer: Answer) -> tuple[bool, str]:
    """(ready, detail or why not) from /readyz: 200 or 503 with a JSON object, else garbage."""
    if answer.status not in (200, 503) or not isinstance(answer.body, dict):
        raise StatusError(f"/readyz answered HTTP {answer.status} without its JSON object: "
                          "is this a diffusion-cluster frontend?")
    if answer.status == 200:
        workers = answer.body.get("workers")
        return True, f"{cell(workers)} worker(s) ready" if is_number(workers) else ""
    return False, cell(answer.body.get("reason") or "not ready", width=200)


def section(answer: Answer, *fields: Any) -> Answer | str:
    """The answer when it holds ``fields`` (name, type pairs); a line saying why not when
    the frontend could not answer it (5xx); StatusError for anything else."""
    body = answer.body
    if answer.status >= 500:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        return f"unavailable (HTTP {answer.status}: {cell(message or 'no detail', width=200)})"
    names = fields[::2]
    if answer.status != 200 or not isinstance(body, dict) or not all(
            isinstance(body.get(name), kind) for name, kind in zip(names, fields[1::2],
                                                                   strict=True)):
        raise StatusError(f"HTTP {answer.status} without {' and '.join(names)}: is this a "
                          "diffusion-cluster frontend of this version?")
    return answer


def describe_cluster(cluster: Answer | str) -> list[str]:
    if isinstance(cluster, str):
        return ["", f"Workers: {cluster}"]
    workers = [w for w in cluster.body["workers"] if isinstance(w, dict)]
    queues: dict[str, Any] = cluster.body["queues"]
    rows = [("WORKER", "HOST", "DEVICE", "MODELS", "STATE", "RUNNING", "JOBS DONE",
             "IMAGES/S")]
    rows += [(cell(w.get("worker_id")), cell(w.get("host")), cell(w.get("device")),
              cell(w.get("models")), state_of(w), count(w.get("running")),
              count(w.get("jobs_done")), images_per_second(w)) for w in workers]
    lines = ["", f"Workers ({len(workers)})"]
    lines += table(rows) if workers else ["  none registered"]
    models = sorted({str(m) for w in workers if isinstance(w.get("models"), list)
                     for m in w["models"]} | set(queues))
    queue_rows = [("MODEL", "QUEUED", "READY WORKERS")]
    queue_rows += [(cell(model), count(queues.get(model, 0)),
                    str(sum(1 for w in workers if w.get("state") == "ready"
                            and isinstance(w.get("models"), list) and model in w["models"])))
                   for model in models]
    lines += ["", "Queues"]
    lines += table(queue_rows) if models else ["  no model served, nothing queued"]
    return lines


def describe_throughput(jobs: Answer | str, *, keyed: bool) -> list[str]:
    """Images of succeeded jobs by their `finished` time, in each window before now."""
    whose = "the newest jobs this key may list" if keyed else "the newest jobs"
    title = f"Images finished (succeeded jobs, among {whose}, at most {JOBS_PAGE})"
    if isinstance(jobs, str):
        return ["", f"{title}: {jobs}"]
    listed = [job for job in jobs.body["data"] if isinstance(job, dict)]
    now = jobs.date if jobs.date is not None else time.time()
    oldest = min((job["created"] for job in listed if is_number(job.get("created"))),
                 default=now)
    lines = ["", title]
    for seconds, label in WINDOWS:
        images = sum(images_of(job) for job in listed if job.get("status") == "succeeded"
                     and is_number(job.get("finished")) and job["finished"] >= now - seconds)
        # A full page whose oldest job is inside the window: older pages may hold more.
        bound = "at least " if jobs.body.get("has_more") and oldest >= now - seconds else ""
        lines.append(f"  {label + ':':16} {bound}{images} image(s), "
                     f"{bound}{images / seconds:.2f} images/s")
    return lines


def images_of(job: dict[str, Any]) -> int:
    images, n = job.get("images"), job.get("n")
    if isinstance(images, list) and images:
        return len(images)
    # A job makes a handful of images: a larger n is a frontend's garbage, not a count.
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_N else 0


def images_per_second(worker: dict[str, Any]) -> str:
    """The worker's own rate over its last minute, from its last heartbeat's stats."""
    stats = worker.get("stats")
    rate = finite(stats.get("images_per_second") if isinstance(stats, dict) else None)
    return "-" if rate is None else f"{rate:.2f}"


def state_of(worker: dict[str, Any]) -> str:
    left = finite(worker.get("quarantine_left_s"))
    state = cell(worker.get("state"))
    return f"{state} ({left:g} s left)" if left is not None else state


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (JSON's integers have no bound, and
    Python's json reads NaN and Infinity), else None."""
    if not is_number(value):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def count(value: Any) -> str:
    """A count: the length of a list (running job ids), a number as it is, else '-'."""
    if isinstance(value, list):
        return str(len(value))
    return cell(value) if is_number(value) else "-"


def cell(value: Any, *, width: int = MAX_CELL) -> str:
    """One value as printable text: what a peer sent may hold escape sequences."""
    if value is None:
        return "-"
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= width else text[:width - 3] + "..."


def table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]
