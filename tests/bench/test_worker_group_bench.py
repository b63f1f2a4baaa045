"""bench/worker_group.py runs end to end: a group of one and of two CPU ranks (gloo) on a
saved miniature FLUX, and prints its table. The speed-up it prints on a CPU means nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_smoke_run_on_cpu_times_one_and_two_ranks(tmp_path: Path) -> None:
    from tests.gpu_worker.families import flux

    flux.build(tmp_path / "flux")
    ran = subprocess.run(
        [sys.executable, str(REPO / "bench" / "worker_group.py"), "--model",
         str(tmp_path / "flux"), "--device", "cpu", "--gpus", "1,2", "--size", "64",
         "--steps", "2", "--repeats", "1", "--threads", "1"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    rows = re.findall(r"^([12])\s+([0-9.]+)\s+([0-9.]+)$", ran.stdout, re.MULTILINE)
    assert [row[0] for row in rows] == ["1", "2"], ran.stdout
    assert rows[0][2] == "1.00" and float(rows[1][1]) > 0
    assert "says nothing of GPUs" in ran.stdout
