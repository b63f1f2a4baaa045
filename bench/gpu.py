"""GPU: seconds per image and images/s at batch 1..8 for real-size models, and the fraction of
the GPU's peak FLOP/s that this is.

Each model is built at its real size with random weights from its published configs (see
_real_size.py; nothing is downloaded) and wrapped in the worker's own PipelineRunner, so the
dtype, channels-last layout, fused QKV and TF32 settings are the ones a worker uses. For each
batch size B it runs B jobs as one pipeline call, the way the broker batches them: one warm-up
call, then ``--repeats`` timed calls (median shown).

The FLOPs of one image are counted once, with torch's FLOP counter over a whole batch-1 call
(text encoders, every denoising step, VAE decode): matmuls, convolutions and attention, the
operations a GPU's peak figure counts. Achieved FLOP/s = FLOPs per image x images/s; the
fraction is that over the GPU's dense bf16 peak from the vendor's datasheet (--peak-tflops for
a GPU not in the table).

Every speed setting of the worker gets its rows (``--setting``, repeatable; default all: plain,
each step cache, each quantisation the device can run, regional compile; bench/_settings.py),
each on a fresh denoiser with the same weights. ``x plain`` is its images/s over plain's at the
same batch size. TFLOP/s and the fraction of peak are given only for settings that do the
plain model's dense arithmetic (plain, compile): a step cache skips some of it and a quantised
model runs int8 or float8 matmuls, so "—" there. A setting the device or the model cannot run
says "not run" and why (quantize.check, the step cache's own check: the worker's refusals).

    .venv/bin/python bench/gpu.py                      # FLUX.1-schnell 1024² x4, SDXL-Turbo 512² x1
    .venv/bin/python bench/gpu.py --models sdxl-turbo --batches 1,4 --repeats 5
    .venv/bin/python bench/gpu.py --device cpu --depth 1 --size 128 --batches 1,2 --repeats 1
                                                       # smoke run on a laptop (not real-size)
    .venv/bin/python bench/gpu.py --device cpu --tiny --compile-backend eager
                                                       # every setting on miniatures (wiring)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _real_size
import _settings
from _common import print_header, table

from broker.protocol import JobSpec

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets. The
# first name contained in torch.cuda.get_device_name() wins, so longer names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)

PROMPT = "a lighthouse on a cliff at dusk, oil on canvas, study {}"


def peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    """The peak to compare with, and where it came from."""
    if override:
        return override, "--peak-tflops"
    if not device.startswith("cuda"):
        return None, "no peak known for a CPU (give --peak-tflops)"
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    if "MIG" in name:  # a slice has a fraction of the card's peak, whatever its name says
        return None, f"{name} is a MIG slice (give --peak-tflops)"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"{name}: datasheet dense bf16"
    return None, f"{name} is not in the table (give --peak-tflops)"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def median_seconds(run: Callable[[], Any], device: str, repeats: int) -> float:
    """The median wall time of ``run`` over ``repeats`` runs, the device drained around each."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def jobs_for(spec: Any, batch: int, size: int, steps: int) -> list[JobSpec]:
    """``batch`` one-image jobs with one batch key, as the broker hands them to a worker."""
    return [JobSpec(id=f"b{batch}-{i}", model=spec.name, prompt=PROMPT.format(i), width=size,
                    height=size, steps=steps, seeds=(i,), guidance=spec.default_guidance)
            for i in range(batch)]


@dataclass
class FlopCount:
    total: float  # FLOPs of one image
    by_component: dict[str, float]  # pipeline component ("transformer", "vae", ...) -> FLOPs


def count_flops(runner: Any, job: JobSpec) -> FlopCount:
    """FLOPs of one batch-1 call, split by the pipeline's components."""
    import torch._dynamo
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # Counted eagerly: a compiled denoiser (--compile) does the same matmuls, and dynamo
    # does not trace through the counter's dispatch mode.
    with torch._dynamo.config.patch(disable=True), counter:
        runner.generate_batch([job])
    # A call made with dynamo disabled marks the code it ran as "skip" for good: forget that,
    # or --compile would time eager code.
    torch._dynamo.reset()
    owner = _component_of_class(runner.pipe)
    by_component: dict[str, float] = {}
    for name, ops in counter.get_flop_counts().items():
        if name != "Global" and "." not in name:  # top-level entries only: no double counting
            component = owner.get(name, name)
            by_component[component] = by_component.get(component, 0.0) + sum(ops.values())
    return FlopCount(float(counter.get_total_flops()), by_component)


def _component_of_class(pipe: Any) -> dict[str, str]:
    """Module class name -> the component it belongs to.

    The counter files FLOPs under the outermost module whose forward() ran. The VAE decodes
    through vae.decode(), not forward(), so its FLOPs arrive under its children (Decoder,
    Conv2d): a component's direct children are mapped to it too. The VAE comes first in every
    pipeline's components, so a generic class such as Conv2d goes to it. Keyed by class
    name, as the counter is: of two components of one class (SD3's two CLIP encoders) the
    first would get both; the models here have none.
    """
    import torch

    owner: dict[str, str] = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for part in (module, *module.children()):
                owner.setdefault(type(part).__name__, name)
    return owner


@dataclass
class Row:
    batch: int
    seconds: list[float]  # per call
    peak_memory: float | None  # bytes
    error: str = ""

    @property
    def per_call(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.per_call


def time_batch(runner: Any, jobs: list[JobSpec], repeats: int, device: str) -> Row:
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    seconds: list[float] = []
    try:
        runner.generate_batch(jobs)  # warm-up at this shape: allocator, kernel choices
        for _ in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            runner.generate_batch(jobs)
            synchronize(device)
            seconds.append(time.perf_counter() - started)
    except torch.OutOfMemoryError:
        out_of_memory = True
    else:
        out_of_memory = False
    if out_of_memory:
        # Outside the except block, so the failed call's tensors are no longer referenced.
        gc.collect()
        torch.cuda.empty_cache()
        return Row(len(jobs), [], None, error="out of memory")
    memory = torch.cuda.max_memory_allocated(torch.device(device)) if cuda else None
    return Row(len(jobs), seconds, memory)


def measure(model: _real_size.RealSize, args: argparse.Namespace) -> bool:
    """Time every setting of ``model``, print the table; whether it was interrupted."""
    from gpu_worker import models

    spec = models.resolve(model.name)
    build = _settings.Build.of(args, spec)
    size, steps = args.size or model.size, args.steps or model.steps
    print(f"\n{model.name}: building at {build.scale} on {args.device} in "
          f"{str(build.dtype).removeprefix('torch.')} ...", flush=True)
    started = time.perf_counter()
    shared = _settings.shared_components(model, build)
    print(f"  shared components built in {time.perf_counter() - started:.1f} s", flush=True)
    job = jobs_for(spec, 1, size, steps)[0]
    results: list[Result] = []
    flops: FlopCount | None = None
    interrupted = False
    try:
        for setting in args.settings:
            why = _settings.why_not(setting, args.device)
            if why:
                results.append(Result(setting, [], skipped=why))
                continue
            print(f"  {setting.label} ...", flush=True)
            with _settings.released(args.device):
                runner, why = _settings.try_runner(model, setting, shared, build)
                if runner is None:
                    results.append(Result(setting, [], skipped=why))
                    continue
                try:
                    if flops is None and setting.dense:
                        flops = describe(runner, job, build.dtype)
                    results.append(Result(setting, time_batches(runner, spec, size, steps,
                                                                args)))
                except Exception as exc:  # one setting's failure is a finding, not the end
                    traceback.print_exc()
                    results.append(Result(setting, [], skipped=f"{setting.label}: {exc!r}",
                                          failed=True))
                del runner
    except KeyboardInterrupt:  # gpu_run.sh's time limit: still print what was measured
        interrupted = True
        print(f"\ninterrupted: the table holds the {len(results)} setting(s) done",
              flush=True)
    peak, source = peak_tflops(args.device, args.peak_tflops)
    report(model.name, size, steps, results, flops, peak, source)
    del shared
    return interrupted


def describe(runner: Any, job: JobSpec, dtype: Any) -> FlopCount:
    """Print the model's parameters and FLOPs (counted once, on the first dense setting)."""
    import torch

    params = {name: sum(p.numel() for p in module.parameters())
              for name, module in runner.pipe.components.items()
              if isinstance(module, torch.nn.Module)}
    print("    parameters: " + ", ".join(f"{name} {_count(count)}"
                                         for name, count in params.items()), flush=True)
    flops = count_flops(runner, job)
    parts = ", ".join(f"{name} {value / flops.total:.0%}"
                      for name, value in sorted(flops.by_component.items(), key=lambda kv: -kv[1]))
    print(f"    one image at {job.width}x{job.height}, {job.steps} step(s): "
          f"{flops.total / 1e12:.2f} TFLOP ({parts})", flush=True)
    vae = getattr(runner.pipe, "vae", None)
    if getattr(getattr(vae, "config", None), "force_upcast", False) and dtype == torch.float16:
        print("    note: this VAE decodes in float32 (force_upcast), yet its FLOPs are counted "
              "against the bf16 peak: 'of peak' understates the denoiser", flush=True)
    return flops


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 1e8 else f"{parameters / 1e6:.2f} M"


def time_batches(runner: Any, spec: Any, size: int, steps: int,
                 args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for batch in args.batches:
        if rows and rows[-1].error:
            # Larger batches would fail too, and an OOM can leave a module half-converted
            # (SDXL's VAE upcasts to float32 to decode): stop here.
            rows.append(Row(batch, [], None, error="skipped"))
            continue
        print(f"    batch {batch} ...", end=" ", flush=True)
        rows.append(time_batch(runner, jobs_for(spec, batch, size, steps), args.repeats,
                               args.device))
        # Each figure as it comes: a run stopped by a time limit still tells what it measured.
        print(rows[-1].error or f"{rows[-1].per_call:.3f} s/call", flush=True)
    return rows


@dataclass
class Result:
    """One setting's rows, or why it did not run."""
    setting: _settings.Setting
    rows: list[Row]
    skipped: str = ""  # why it did not run, or how it failed
    failed: bool = False  # it started and raised


NOT_DENSE = ("—: a step cache skips work and quantisation runs int8 or float8 matmuls, so the "
             "plain model's FLOPs over their time are not what they did: TFLOP/s and % of "
             "dense bf16 peak are given only for settings with neither (plain, compile)")


def report(name: str, size: int, steps: int, results: list[Result], flops: FlopCount | None,
           peak: float | None, source: str) -> None:
    plain = next((r for r in results if r.setting.label == _settings.PLAIN and not r.skipped),
                 None)
    plain_rate = {row.batch: row.images_per_second for row in plain.rows if not row.error} \
        if plain else {}
    cells, notes = [], []
    for result in results:
        if result.skipped:
            notes.append(result.skipped)
            cells.append([name, result.setting.label, f"{size}²", steps, "-",
                          f"{'failed' if result.failed else 'not run'} [{len(notes)}]"]
                         + [""] * 7)
            continue
        cells += setting_cells(name, size, steps, result, flops, peak, plain_rate)
    print()
    print(table(["model", "setting", "size", "steps", "batch", "s/call", "s/image", "images/s",
                 "x batch 1", "x plain", "TFLOP/s", "of peak", "peak GiB"], cells))
    counted = (f"FLOPs per image counted once at batch 1: {flops.total / 1e12:.2f} TFLOP"
               if flops else "FLOPs not counted: no setting without a step cache or "
                             "quantisation ran")
    print(f"peak: {f'{peak:g} TFLOP/s' if peak else 'unknown'} ({source}); {counted}")
    if any(not r.setting.dense and not r.skipped for r in results):
        print(NOT_DENSE)
    for number, note in enumerate(notes, 1):
        print(f"[{number}] {note}")


def setting_cells(name: str, size: int, steps: int, result: Result, flops: FlopCount | None,
                  peak: float | None, plain_rate: dict[int, float]) -> list[list[Any]]:
    rows = result.rows
    base = next((row.images_per_second for row in rows if row.batch == 1 and not row.error),
                None)
    cells = []
    for row in rows:
        head = [name, result.setting.label, f"{size}²", steps, row.batch]
        if row.error:
            cells.append([*head, row.error] + [""] * 7)
            continue
        achieved = flops.total * row.images_per_second / 1e12 if flops else None
        if not result.setting.dense:
            flop_cells = ["—", "—"]
        else:
            flop_cells = [f"{achieved:.1f}" if achieved is not None else "-",
                          f"{achieved / peak:.1%}" if achieved is not None and peak else "-"]
        reference = plain_rate.get(row.batch)
        cells.append([
            *head, f"{row.per_call:.3f}", f"{row.per_call / row.batch:.3f}",
            f"{row.images_per_second:.2f}",
            f"{row.images_per_second / base:.2f}" if base else "-",
            f"{row.images_per_second / reference:.2f}" if reference else "-",
            *flop_cells,
            f"{row.peak_memory / 2**30:.1f}" if row.peak_memory is not None else "-",
        ])
    return cells


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(_real_size.MODELS),
                        help=f"comma-separated, from: {', '.join(_real_size.MODELS)}")
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size")
    parser.add_argument("--device", default="cuda", help="torch device")
    parser.add_argument("--size", type=int, default=0,
                        help="image side in pixels (default: each model's, 1024 / 512)")
    parser.add_argument("--steps", type=int, default=0,
                        help="denoising steps (default: each model's, 4 / 1)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for a GPU not in the table")
    parser.add_argument("--compile", action="store_true",
                        help="compile every setting too, as the worker's --compile does "
                             "(plain becomes compile, int8 int8+compile, ...)")
    _settings.add_arguments(parser)
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - set(_real_size.MODELS)
    if unknown:
        parser.error(f"unknown model(s): {', '.join(sorted(unknown))}")
    args.batches = [int(b) for b in args.batches.split(",")]
    if min(args.batches) < 1 or args.repeats < 1:
        parser.error("batch sizes and --repeats must be at least 1")
    try:
        args.settings = _settings.expand(args.setting or [], compile_each=args.compile)
    except _settings.SettingError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from gpu_worker.pipeline import quiet_libraries

    quiet_libraries()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (or --device cpu with --tiny or "
              "--depth for a smoke run)", file=sys.stderr)
        return 2
    print_header("GPU: real-size models with random weights")
    print(_settings.stack_line(args.device))
    if args.depth or args.tiny:
        print("note: --depth / --tiny cut the models; these are NOT real-size figures")
    for name in args.models.split(","):
        if measure(_real_size.MODELS[name], args):
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
