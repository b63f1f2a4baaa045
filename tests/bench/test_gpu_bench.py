"""bench/gpu.py: real-size architectures from the published configs, and a smoke run on CPU.

The benchmark itself needs a GPU. What can rot without one is checked here: that the configs
still build the real architectures (parameter counts on the meta device, no memory), and that
the whole script runs end to end on a cut-down build, printing its table and FLOP count.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import _real_size  # noqa: E402

# Published parameter counts of the real checkpoints.
REAL_PARAMETERS = {
    "flux-schnell": {"transformer": 11.89e9, "text_encoder_2": 4.762e9,  # T5-XXL encoder
                     "text_encoder": 123.06e6, "vae": 83.8e6},  # CLIP-L text
    "sdxl-turbo": {"unet": 2.5675e9, "text_encoder_2": 694.66e6,  # OpenCLIP bigG + projection
                   "text_encoder": 123.06e6, "vae": 83.65e6},
}


@pytest.mark.parametrize("name", sorted(REAL_PARAMETERS))
def test_real_size_builds_have_the_published_parameter_counts(name: str) -> None:
    import torch

    pipe = _real_size.build(_real_size.MODELS[name], "meta", torch.bfloat16)
    for component, expected in REAL_PARAMETERS[name].items():
        module = getattr(pipe, component)
        count = sum(p.numel() for p in module.parameters())
        assert count == pytest.approx(expected, rel=0.002), component
        assert all(p.dtype == torch.bfloat16 for p in module.parameters()), component


def test_schedulers_are_built_in_float32_whatever_the_weights() -> None:
    import torch

    pipe = _real_size.build(_real_size.MODELS["sdxl-turbo"], "meta", torch.bfloat16, depth=1)
    assert pipe.scheduler.alphas_cumprod.dtype == torch.float32
    assert pipe.scheduler.config.timestep_spacing == "trailing"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(BENCH / "gpu.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


def test_smoke_run_on_cpu_prints_a_row_per_batch_and_the_flops() -> None:
    done = _run("--device", "cpu", "--depth", "1", "--size", "64", "--batches", "1,2",
                "--repeats", "1", "--threads", "1", "--models", "sdxl-turbo",
                "--setting", "plain")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "NOT real-size" in out
    rows = re.findall(r"^sdxl-turbo\s+plain\s+64²\s+1\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
                      out, re.MULTILINE)
    assert [int(batch) for batch, *_ in rows] == [1, 2]
    for batch, per_call, per_image, rate in rows:
        assert float(per_call) > 0
        assert float(per_image) == pytest.approx(float(per_call) / int(batch), abs=0.002)
        assert float(rate) == pytest.approx(int(batch) / float(per_call), rel=0.05)
    flops = re.search(r"FLOPs per image counted once at batch 1: ([\d.]+) TFLOP", out)
    assert flops and float(flops.group(1)) > 0
    # Every component that computes shows up in the split, and nothing else.
    split = re.search(r"1 step\(s\): [\d.]+ TFLOP \((.*)\)", out)
    assert split is not None
    assert {part.rsplit(" ", 1)[0] for part in split.group(1).split(", ")} == {
        "unet", "vae", "text_encoder", "text_encoder_2"}


SETTINGS = ("plain", "step-cache=first-block:threshold=0.08", "quantize=int8-weight-only",
            "quantize=fp8", "compile")


def test_each_setting_gets_its_rows_and_peak_only_where_the_work_is_dense(
        capsys: pytest.CaptureFixture[str]) -> None:
    import gpu

    args = ["--device", "cpu", "--tiny", "--size", "32", "--batches", "1", "--repeats", "1",
            "--models", "flux-schnell", "--compile-backend", "eager", "--peak-tflops", "1"]
    for setting in SETTINGS:
        args += ["--setting", setting]
    assert gpu.main(args) == 0
    out = capsys.readouterr().out
    cells = {row[1]: row for row in (line.split() for line in out.splitlines())
             if row and row[0] == "flux-schnell" and len(row) > 5}
    assert list(cells) == list(SETTINGS)
    # columns: model setting size steps batch s/call s/image images/s x1 x-plain TFLOP/s peak GiB
    for setting in ("plain", "compile"):
        assert float(cells[setting][10]) >= 0 and cells[setting][11].endswith("%"), setting
    assert cells["plain"][9] == "1.00"
    for setting in ("step-cache=first-block:threshold=0.08", "quantize=int8-weight-only"):
        assert cells[setting][10:12] == ["—", "—"], setting
        assert float(cells[setting][9]) > 0
    assert cells["quantize=fp8"][5:] == ["not", "run", "[1]"]
    assert "[1] --quantize fp8 runs float8 matmuls" in out
    assert "given only for settings with neither (plain, compile)" in out


def test_without_cuda_it_says_so_and_exits_2() -> None:
    done = _run("--models", "sdxl-turbo")
    assert done.returncode == 2
    assert "needs a GPU" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_setting_that_does_not_read_is_refused() -> None:
    done = _run("--models", "sdxl-turbo", "--setting", "turbo=on")
    assert done.returncode == 2
    assert "is not plain, step-cache=METHOD" in done.stderr


def test_unknown_model_is_refused() -> None:
    done = _run("--models", "sdxl-turbo,nope")
    assert done.returncode == 2
    assert "unknown model(s): nope" in done.stderr


def test_counting_flops_leaves_a_compiled_denoiser_to_compile() -> None:
    # FLOPs are counted with dynamo disabled; that must not stop --compile from compiling
    # afterwards (dynamo remembers code it was told to skip).
    from types import SimpleNamespace

    import gpu
    import torch

    compiled: list[object] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        compiled.append(graph)
        return graph.forward

    class Denoiser(torch.nn.Module):  # dynamo traces our code, not torch.nn's own modules
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x) * 2

    layer = Denoiser()
    layer.compile(backend=backend)
    x = torch.randn(2, 8)

    class Runner:
        pipe = SimpleNamespace(components={"denoiser": layer})

        def generate_batch(self, jobs: object) -> None:
            layer(x)

    flops = gpu.count_flops(Runner(), None)
    assert flops.total == 2 * 2 * 8 * 8
    assert flops.by_component == {"denoiser": 2 * 2 * 8 * 8}
    assert not compiled
    layer(x)
    assert compiled, "the denoiser ran eager after the FLOP count"


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA L40", 181.0),
    ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_lookup(monkeypatch: pytest.MonkeyPatch, name: str, peak: float | None) -> None:
    import gpu
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu.peak_tflops("cuda", None)[0] == peak
    assert gpu.peak_tflops("cuda", 100.0) == (100.0, "--peak-tflops")
