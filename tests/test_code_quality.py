"""The linter and the type checker, as tests: a failure names the file and line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_ruff() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = run("mypy", "broker", "gpu_worker", "http_frontend", "launcher", "launch.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_frontend_and_broker_never_import_torch() -> None:
    code = ("import sys, broker.__main__, http_frontend.__main__, http_frontend.app; "
            "sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, "the broker or frontend imported torch or diffusers"
