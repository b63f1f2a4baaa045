"""Logging for every program of the cluster: today's text lines, or one JSON object per line.

Each entry point (broker, worker, frontend, launch.py) calls ``configure`` once. In JSON mode
every line on stderr is one object, with the job's fields wherever a line concerns a job, so
one job can be followed across programs with ``grep JOB_ID`` or ``jq``. Call sites pass those
fields with ``extra=``; ``job_fields`` builds them from a JobSpec:

    log.info("job %s sent", job.id, extra=logs.job_fields(job, request_id=rid))

Text mode ignores the extras: its lines stay as they always were.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

from broker import defaults

if TYPE_CHECKING:
    from broker.protocol import JobSpec

FORMATS = ("text", "json")
DEFAULT_FORMAT = "text"
# The fields a record may carry (passed with extra=), in the order they are written.
FIELDS = ("job_id", "worker_id", "model", "user", "request_id")


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    """--log-level and --log-format, the same on every program (launch.py sets all at once)."""
    parser.add_argument("--log-level", default=defaults.LOG_LEVEL,
                        help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-format", choices=FORMATS, default=DEFAULT_FORMAT,
                        help="text lines for people, or one JSON object per line with the "
                             "job's id, model and user (docs/logs.md)")


def configure(program: str, level: str, log_format: str = DEFAULT_FORMAT,
              **static_fields: Any) -> None:
    """Log to stderr at ``level`` as ``program`` (broker, worker, frontend, launch).

    ``static_fields`` go on every JSON line (a worker's worker_id). Like logging.basicConfig,
    this leaves alone a root logger that has handlers already (a test capturing logs), but
    replaces the handler an earlier call installed.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _Handler)]
    if len(ours) != len(root.handlers):
        return
    for handler in ours:
        root.removeHandler(handler)
    handler = _Handler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(program, static_fields))
        # Python prints warnings and uncaught exceptions as plain lines: log them instead.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    else:
        handler.setFormatter(TextFormatter(_text_format(program)))
    root.addHandler(handler)
    root.setLevel(level.upper())


def add_static_fields(**fields: Any) -> None:
    """Put ``fields`` on every JSON line from now on (a worker learns its id after starting
    to log); nothing in text mode."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _Handler) and isinstance(handler.formatter, JsonFormatter):
            handler.formatter.static_fields.update(fields)


def add_filter(log_filter: logging.Filter) -> None:
    """Run ``log_filter`` on every line of the handler ``configure`` installed (the frontend
    adds the current request's id)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _Handler):
            handler.addFilter(log_filter)


def job_fields(job: JobSpec, **more: Any) -> dict[str, Any]:
    """The fields of a line about ``job``, for ``extra=``: its id, model and user, and
    ``more`` (worker_id, request_id; a user that replaces the job's); None is left out."""
    fields = {"job_id": job.id, "model": job.model, "user": job.user}
    fields.update((name, value) for name, value in more.items() if value is not None)
    return {name: value for name, value in fields.items() if value is not None}


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler ``configure`` installs (a class of its own, to find it again)."""


# Characters that would end a text line, or forge one, inside a message: a worker's failure
# message or a peer's id is not ours to print raw.
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


class TextFormatter(logging.Formatter):
    """Today's text lines, with the message's control characters escaped (``\\n``), so that
    one record stays one line whatever a peer put in it. Tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def escape_controls(text: str) -> str:
    return _LINE_BREAKING.sub(lambda found: found.group().encode("unicode_escape").decode(),
                              text)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line whatever the message holds."""

    def __init__(self, program: str, static_fields: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.program = program
        self.static_fields = dict(static_fields or {})

    def format(self, record: logging.LogRecord) -> str:
        entry = self.entry(record)
        try:
            return _dumps(entry)
        except (TypeError, ValueError, RecursionError):  # NaN, a cycle, a str() that raises
            return _dumps({key: _plain(value) for key, value in entry.items()})

    def entry(self, record: logging.LogRecord) -> dict[str, Any]:
        """The record as a map: the fixed fields, the job's, the program's, the traceback."""
        entry: dict[str, Any] = {
            "time": _rfc3339(record.created), "level": record.levelname,
            "program": self.program, "pid": record.process, "logger": record.name,
            "message": _message(record),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        for name, value in self.static_fields.items():
            entry.setdefault(name, value)  # a line about another worker names that one
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return entry


def _log_uncaught(kind: type[BaseException], value: BaseException,
                  traceback: TracebackType | None) -> None:
    logging.getLogger("uncaught").critical("uncaught %s: %s", kind.__name__, value,
                                           exc_info=(kind, value, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return  # as threading's own hook: a thread may end itself with SystemExit
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("uncaught").critical(
        "uncaught %s in thread %s: %s", args.exc_type.__name__, name, args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _text_format(program: str) -> str:
    # Several workers share a host and a terminal: their lines name the process.
    name = f"worker[{os.getpid()}]" if program == "worker" else program
    return f"%(asctime)s {name} %(levelname)s %(message)s"


def _rfc3339(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _message(record: logging.LogRecord) -> str:
    """The formatted message; a call whose arguments do not fit its format still logs."""
    try:
        return record.getMessage()
    except Exception as exc:  # logging would print a multi-line "Logging error" instead
        return f"{_plain(record.msg)} (cannot format {_plain(record.args)}: {_plain(exc)})"


def _dumps(entry: dict[str, Any]) -> str:
    # ASCII only: a line stays one line for every reader (U+2028 and NEL are escaped too),
    # and lone surrogates cannot break the write.
    return json.dumps(entry, ensure_ascii=True, allow_nan=False, default=_plain)


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it: itself when it can, else its text."""
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"
