"""The speed flags on the worker's command line: what cannot work stops `python -m gpu_worker`
with exit 78 (no restart) and one clear line, before or right after loading."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_worker.__main__ import add_worker_arguments, config_from_args
from tests.cluster import REPO

EX_CONFIG = 78  # launcher.supervisor.EXIT_CONFIG


def start_worker(cache_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    """A worker as an operator starts it; no broker: these starts end before it connects."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "gpu_worker", "--device", "cpu",
                           "--model", "tiny", "--cache-dir", str(cache_dir), "--no-warm-up",
                           "--broker", "tcp://127.0.0.1:9", "--log-format", "text", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags, says", [
    (("--quantize", "fp8"), "--quantize fp8 runs float8 matmuls"),
    (("--quantize", "int8", "--offload"), "--quantize cannot be used with --offload"),
    (("--step-cache", "first-block:speed=2"), "has no option 'speed'"),
    (("--warm-up-size", "512x"), "--warm-up-size '512x' is not WIDTHxHEIGHT"),
    (("--warm-up-size", "\uff10x512"), "is not WIDTHxHEIGHT"),  # a fullwidth 0
    (("--gpus-per-worker", "2", "--context-parallel", "ring"), "ring needs CUDA"),
    (("--gpus-per-worker", "2", "--step-cache", "taylorseer"), "decide apart"),
    (("--gpus-per-worker", "0"), "at least 1"),
    (("--quantize", "fp8", "--lora-dir", "."), "fp8 cannot be used with LoRA"),
])
def test_flags_that_cannot_work_together_are_refused_before_loading(flags: tuple,
                                                                     says: str) -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--model", "tiny", *flags])
    with pytest.raises(ValueError, match=re.escape(says)):
        config_from_args(args)


@pytest.mark.parametrize("flags, says", [
    # Refused by the model that loaded: tiny's denoiser is a UNet.
    (("--step-cache", "first-block"), "UNet2DConditionModel) has no step caching"),
    (("--gpus-per-worker", "2"), "UNet2DConditionModel has no context-parallel plan"),
])
def test_what_cannot_work_stops_the_worker_with_one_line(cache_dir: Path, flags: tuple,
                                                         says: str) -> None:
    ran = start_worker(cache_dir, *flags)
    assert ran.returncode == EX_CONFIG, ran.stderr
    assert "Traceback" not in ran.stderr, ran.stderr
    last = ran.stderr.strip().splitlines()[-1]
    assert "ERROR cannot start:" in last and says in last, ran.stderr
