"""The real programs configured by their environment alone, secrets from files included; and
a variable that cannot be used, which stops each with exit status 78 and one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from launcher import environment
from tests.cluster import REPO, OutputLog, bound_broker_endpoints, bound_http_port, free_port


def start(module: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], OutputLog]:
    process = subprocess.Popen([sys.executable, "-m", module], cwd=REPO,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, OutputLog(process)


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def test_a_frontend_takes_everything_from_its_environment(tmp_path: Path) -> None:
    (tmp_path / "api-keys").write_text("sk-from-a-file\n")
    records = tmp_path / "records" / "jobs.db"
    records.parent.mkdir()
    (tmp_path / "db-url").write_text(f"sqlite:///{records}\n")
    process, log = start("http_frontend", {
        "DC_FRONTEND_HOST": "127.0.0.1", "DC_FRONTEND_PORT": "0",
        "DC_FRONTEND_BROKER": f"tcp://127.0.0.1:{free_port()}",
        "DC_FRONTEND_API_KEY_FILE": str(tmp_path / "api-keys"),
        "DC_FRONTEND_DB_FILE": str(tmp_path / "db-url"),
        "DC_FRONTEND_NO_IMAGE_STORE": "yes", "DC_FRONTEND_LOG_FORMAT": "json",
        "DC_FRONTEND_CORS_ORIGIN": "https://a.example,https://b.example"})
    try:
        port = bound_http_port(log)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        with_key = httpx.get(f"{url}/v1/models", timeout=10,
                             headers={"Authorization": "Bearer sk-from-a-file",
                                      "Origin": "https://b.example"})
        assert with_key.status_code != 401
        assert with_key.headers.get("access-control-allow-origin") == "https://b.example"
        assert records.exists()  # the database the file named
        command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert b"sk-from" not in command_line and b"sqlite" not in command_line
    finally:
        stop(process)
    assert all(json.loads(line) for line in log.lines), log.text()  # --log-format json


def test_a_broker_takes_its_endpoints_from_its_environment(tmp_path: Path) -> None:
    (tmp_path / "clients").write_text("tcp://127.0.0.1:*\n")
    process, log = start("broker", {"DC_BROKER_CLIENTS_FILE": str(tmp_path / "clients"),
                                    "DC_BROKER_WORKERS": "tcp://127.0.0.1:*",
                                    "DC_BROKER_HEARTBEAT": "0.5"})
    try:
        clients, workers = bound_broker_endpoints(log)
        assert clients.startswith("tcp://127.0.0.1:") and workers.startswith("tcp://127.0.0.1:")
    finally:
        stop(process)
    assert process.returncode == 0, log.text()


@pytest.mark.parametrize(("argv", "env", "said"), [
    (["-m", "broker"], {"DC_BROKER_HEARTBEAT": "fast"},
     "DC_BROKER_HEARTBEAT (--heartbeat): 'fast': not a valid float value"),
    (["-m", "broker"], {"DC_BROKER_MAX_QUEU": "9"},
     "DC_BROKER_MAX_QUEU is the variable of no flag: did you mean DC_BROKER_MAX_QUEUE?"),
    (["-m", "http_frontend"], {"DC_FRONTEND_NO_HISTORY": "sometimes"},
     "DC_FRONTEND_NO_HISTORY (--no-history): 'sometimes': not a yes or no"),
    (["-m", "http_frontend"], {"DC_FRONTEND_DB_FILE": "/nonexistent/db-url"},
     "DC_FRONTEND_DB_FILE (--db): /nonexistent/db-url: cannot read it"),
    (["-m", "gpu_worker"], {"DC_WORKER_MAX_BATCH": "many"},
     "DC_WORKER_MAX_BATCH (--max-batch): 'many': not a valid int value"),
    (["launch.py"], {"DC_LAUNCH_NUM_WORKERS": "two"},
     "DC_LAUNCH_NUM_WORKERS (--num-workers): 'two': not a valid int value"),
    (["launch.py"], {"DC_WORKER_THREADS": "4"},
     "DC_WORKER_THREADS: launch.py sets the worker's --threads itself"),
], ids=["broker", "broker-typo", "frontend", "frontend-file", "worker", "launch",
        "launch-refused"])
def test_a_variable_that_cannot_be_used_stops_the_program_with_one_line(
        argv: list[str], env: dict[str, str], said: str) -> None:
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == environment.EXIT_CONFIG == 78, done.stderr
    assert said in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
