"""broker/logs.py: text lines as they always were, or one JSON object per line."""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import logs
from broker.logs import JsonFormatter
from broker.protocol import JobSpec

REPO = Path(__file__).resolve().parents[2]
JOB = JobSpec(id="a" * 32, model="tiny", prompt="a secret prompt", width=64, height=64,
              steps=2, seeds=(1,), user="alice")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def record(msg: Any, *args: Any, level: int = logging.INFO, exc_info: Any = None,
           **extra: Any) -> logging.LogRecord:
    return logging.getLogger("tests.logs").makeRecord(
        "tests.logs", level, __file__, 1, msg, args, exc_info, extra=extra or None)


def line(formatter: logging.Formatter, made: logging.LogRecord) -> dict[str, Any]:
    text = formatter.format(made)
    assert text.isascii() and text.splitlines() == [text], text
    entry = json.loads(text)
    assert isinstance(entry, dict)
    return entry


def test_a_json_line_has_the_fixed_fields() -> None:
    entry = line(JsonFormatter("broker"), record("broker %s ready", "b1",
                                                  level=logging.WARNING))
    assert TIME.match(entry["time"]), entry
    assert entry["level"] == "WARNING" and entry["program"] == "broker"
    assert entry["logger"] == "tests.logs" and entry["message"] == "broker b1 ready"
    assert isinstance(entry["pid"], int)
    assert list(entry)[:6] == ["time", "level", "program", "pid", "logger", "message"]
    assert not {"job_id", "worker_id", "model", "user", "request_id", "exception"} & set(entry)


def test_job_fields_ride_on_extra() -> None:
    fields = logs.job_fields(JOB, worker_id="w1", request_id="req-1")
    entry = line(JsonFormatter("worker"), record("job %s", JOB.id, **fields))
    assert {k: entry[k] for k in logs.FIELDS} == {
        "job_id": JOB.id, "worker_id": "w1", "model": "tiny", "user": "alice",
        "request_id": "req-1"}
    assert "secret prompt" not in json.dumps(entry)


def test_job_fields_leave_out_what_is_unknown() -> None:
    job = JobSpec(id="b" * 32, model="tiny", prompt="p", width=64, height=64, steps=2,
                  seeds=(1,))
    assert logs.job_fields(job) == {"job_id": job.id, "model": "tiny"}
    assert logs.job_fields(job, user=None, request_id=None) == {"job_id": job.id,
                                                                 "model": "tiny"}
    assert logs.job_fields(JOB, user="key-name")["user"] == "key-name"
    assert logs.job_fields(JOB, user=None)["user"] == "alice"


def test_static_fields_are_on_every_line_unless_the_line_names_another() -> None:
    formatter = JsonFormatter("worker", {"worker_id": "w1"})
    assert line(formatter, record("hello"))["worker_id"] == "w1"
    assert line(formatter, record("about w2", worker_id="w2"))["worker_id"] == "w2"


def test_exceptions_are_one_field_on_one_line() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        made = record("failed", level=logging.ERROR, exc_info=sys.exc_info())
    entry = line(JsonFormatter("frontend"), made)
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: boom\nsecond line" in entry["exception"]
    assert entry["message"] == "failed"


@pytest.mark.parametrize("message", [
    "two\nlines", "cr\rlf", "tab\there", "nul\x00byte", "naïve café ✓ 画像", "line\u2028sep",
    "next\x85line", "lone \ud800 surrogate", "\x1b[31mred\x1b[0m", "",
])
def test_hostile_messages_stay_one_line(message: str) -> None:
    entry = line(JsonFormatter("frontend"), record("%s", message, user=message))
    assert entry["message"] == message and entry["user"] == message


# Hypothesis leaves lone surrogates (category Cs) out unless asked.
@given(st.text(st.one_of(st.characters(), st.characters(categories=["Cs"]))))
def test_any_text_stays_one_line(text: str) -> None:
    entry = line(JsonFormatter("frontend"), record(text, request_id=text))
    assert entry["message"] == text and entry["request_id"] == text


class Unprintable:
    def __str__(self) -> str:
        raise ValueError("no")


@pytest.mark.parametrize("value", [
    {1, 2}, b"bytes", object(), Unprintable(), float("nan"), float("inf"),
    Path("/tmp/x"), {"nested": {1: (2, 3)}},
])
def test_values_json_cannot_hold_never_break_a_line(value: Any) -> None:
    entry = line(JsonFormatter("broker"), record("value %s", "x", job_id=value))
    assert entry["message"] == "value x" and "job_id" in entry


def test_a_cycle_never_breaks_a_line() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    entry = line(JsonFormatter("broker"), record("cycle", model=cycle))
    assert entry["message"] == "cycle" and isinstance(entry["model"], str)


def test_arguments_that_do_not_fit_the_format_still_log() -> None:
    entry = line(JsonFormatter("broker"), record("%d jobs", "many"))
    assert "%d jobs" in entry["message"] and "many" in entry["message"]


def run_program(code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


PROGRAM = """
import logging, sys, warnings
from broker import logs
logs.configure("broker", "info", sys.argv[1])
logging.getLogger("broker.x").info("job %s queued", "j1", extra={"job_id": "j1"})
logging.getLogger("broker.x").debug("not shown")
warnings.warn("careful")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("broker.x").exception("oops")
print("on stdout")
"""


def test_json_mode_writes_only_json_to_stderr() -> None:
    result = run_program(PROGRAM, "json")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "on stdout\n"
    entries = [json.loads(text) for text in result.stderr.splitlines()]
    assert entries[0]["message"] == "job j1 queued"
    assert entries[0]["job_id"] == "j1" and entries[0]["program"] == "broker"
    assert any("careful" in e["message"] for e in entries)  # warnings are records too
    assert "ZeroDivisionError" in entries[-1]["exception"]
    assert len(entries) == 3  # DEBUG is below the level


def test_uncaught_exceptions_are_json_too() -> None:
    result = run_program("import threading; from broker import logs; "
                         "logs.configure('frontend', 'INFO', 'json'); "
                         "thread = threading.Thread(target=lambda: 1 / 0, name='t1'); "
                         "thread.start(); thread.join(); raise KeyError('main')")
    assert result.returncode == 1
    in_thread, in_main = (json.loads(text) for text in result.stderr.splitlines())
    assert in_thread["level"] == "CRITICAL" and "in thread t1" in in_thread["message"]
    assert "ZeroDivisionError" in in_thread["exception"]
    assert "KeyError: 'main'" in in_main["exception"]


def test_text_mode_is_unchanged() -> None:
    result = run_program(PROGRAM, "text")
    first = result.stderr.splitlines()[0]
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} broker INFO job j1 queued$",
                    first), first
    assert "Traceback" in result.stderr


def test_text_mode_names_a_workers_pid() -> None:
    result = run_program("import logging, os; from broker import logs; "
                         "logs.configure('worker', 'INFO'); "
                         "logging.info('hi'); print(os.getpid())")
    assert f" worker[{result.stdout.strip()}] INFO hi" in result.stderr


def test_add_static_fields_reaches_later_lines() -> None:
    result = run_program("import logging; from broker import logs; "
                         "logs.configure('worker', 'INFO', 'json'); logging.info('before'); "
                         "logs.add_static_fields(worker_id='w9'); logging.info('after')")
    before, after = (json.loads(text) for text in result.stderr.splitlines())
    assert "worker_id" not in before and after["worker_id"] == "w9"


def test_configure_leaves_a_capturing_root_logger_alone(caplog) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs.configure("broker", "DEBUG", "json")
    assert root.handlers == handlers and root.level == level


def test_the_flags() -> None:
    parser = argparse.ArgumentParser()
    logs.add_log_arguments(parser)
    assert parser.parse_args([]).log_format == "text"
    assert parser.parse_args(["--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-format", "xml"])
