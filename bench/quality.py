"""Quality guard: the images of each speed setting against plain's, next to its speed-up.

The same prompts and seeds run through the worker's own PipelineRunner with each setting (each
step cache, each quantisation the device can run, compile) and without any (plain); each
setting's images are compared with plain's by PSNR (RGB) and SSIM (Wang et al. 2004, on luma:
bench/_similarity.py), and its time with the setting over the time without (median of
``--repeats`` calls, each after one warm-up call that also compiles).

**The models here have random weights** (bench/_real_size.py: nothing is downloaded). Their
images are noise shaped by the architecture, so these figures prove only that a setting is
wired: that it runs, changes the images by the kind of amount it should, and repeats. They
say nothing of what it costs a real checkpoint's pictures; measure that on real weights
before turning any setting on by default.

    .venv/bin/python bench/quality.py                   # CUDA: FLUX.1-schnell 1024² x4, SDXL-Turbo
    .venv/bin/python bench/quality.py --device cpu --tiny --compile-backend eager
                                                        # CPU: miniature models, wiring only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _real_size
import _settings
import _similarity
from _common import print_header, table

from broker.protocol import JobSpec

PROMPTS = ("a lighthouse on a cliff at dusk, oil on canvas",
           "a red fox asleep in fresh snow, photograph",
           "a city street in the rain at night, neon signs",
           "a bowl of lemons on a wooden table, still life")
WIRING_ONLY = ("random weights: these figures prove only that each setting is wired (it runs, "
               "changes the images, repeats); they say nothing of its quality on a real model")
FLAT = 2.0  # luma standard deviation under which a reference image is all but one colour


@dataclass
class Run:
    """One setting's images and time, or why it did not run."""
    setting: _settings.Setting
    images: list[Any] = field(default_factory=list)  # of the last timed call
    first: list[Any] = field(default_factory=list)  # of the warm-up call
    seconds: float = 0.0  # median per call
    skipped: str = ""  # why it did not run, or how it failed
    failed: bool = False  # it started and raised


def jobs_for(model: str, spec: Any, count: int, size: int, steps: int) -> list[JobSpec]:
    """``count`` one-image jobs, prompt i with seed i, run as one batch."""
    return [JobSpec(id=f"q{i}", model=model, prompt=PROMPTS[i % len(PROMPTS)], width=size,
                    height=size, steps=steps, seeds=(i,), guidance=spec.default_guidance)
            for i in range(count)]


def images_of(runner: Any, jobs: list[JobSpec]) -> list[Any]:
    return [image for made in runner.generate_batch(jobs) for image in made]


def timed_images(runner: Any, jobs: list[JobSpec], repeats: int,
                 device: str) -> tuple[list[Any], list[Any], float]:
    """One warm-up call, then ``repeats`` timed: the warm-up's images, the last call's, the
    median seconds per call."""
    from gpu import synchronize

    first = images_of(runner, jobs)  # compiles, when compiled; fills the allocator
    seconds, last = [], first
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        last = images_of(runner, jobs)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return first, last, statistics.median(seconds)


def run_setting(model: _real_size.RealSize, setting: _settings.Setting,
                shared: dict[str, Any], build: _settings.Build, jobs: list[JobSpec],
                repeats: int) -> Run:
    why = _settings.why_not(setting, build.device)
    if why:
        return Run(setting, skipped=why)
    print(f"  {setting.label} ...", flush=True)
    with _settings.released(build.device):
        runner, why = _settings.try_runner(model, setting, shared, build)
        if runner is None:
            return Run(setting, skipped=why)
        try:
            first, images, seconds = timed_images(runner, jobs, repeats, build.device)
        except Exception as exc:  # one setting's failure is a finding, not the run's end
            traceback.print_exc()
            return Run(setting, skipped=f"{setting.label}: {exc!r}", failed=True)
        finally:
            del runner
    return Run(setting, images, first, seconds)


def measure(model: _real_size.RealSize, args: argparse.Namespace,
            settings: list[_settings.Setting]) -> tuple[list[Run], bool]:
    """Run every setting of ``model``; the runs, and whether they were interrupted."""
    from gpu_worker import models

    spec = models.resolve(model.name)
    build = _settings.Build.of(args, spec)
    size, steps = args.size or model.size, args.steps or model.steps
    print(f"\n{model.name}: {args.prompts} prompts at {size}x{size}, {steps} step(s), "
          f"{build.scale} on {build.device} in {str(build.dtype).removeprefix('torch.')}",
          flush=True)
    started = time.perf_counter()
    shared = _settings.shared_components(model, build)
    print(f"  shared components built in {time.perf_counter() - started:.1f} s", flush=True)
    jobs = jobs_for(model.name, spec, args.prompts, size, steps)
    runs: list[Run] = []
    interrupted = False
    try:
        for setting in settings:
            runs.append(run_setting(model, setting, shared, build, jobs, args.repeats))
            print_progress(runs[0], runs[-1])
    except KeyboardInterrupt:  # gpu_run.sh's time limit: still report what was measured
        print(f"\ninterrupted: the table holds the {len(runs)} setting(s) done", flush=True)
        interrupted = True
    del shared
    return runs, interrupted


def print_progress(plain: Run, run: Run) -> None:
    """Each setting's figures as they come: a run stopped by a time limit still tells what
    it measured."""
    if run.skipped or plain.skipped:
        print(f"  {run.setting.label}: {'failed' if run.failed else 'not run'}", flush=True)
        return
    psnrs, ssims = against_plain(plain, run)
    print(f"  {run.setting.label}: PSNR {decibels(min(psnrs))} dB, SSIM {min(ssims):.4f} "
          f"(worst), time/plain {run.seconds / plain.seconds:.2f}", flush=True)


def against_plain(plain: Run, run: Run) -> tuple[list[float], list[float]]:
    """PSNR and SSIM of each of ``run``'s images against plain's of the same prompt and seed;
    for plain itself, of its last call against its first (the device's run-to-run noise)."""
    reference = plain.first if run is plain else plain.images
    pairs = list(zip(reference, run.images, strict=True))
    return ([_similarity.psnr(a, b) for a, b in pairs],
            [_similarity.ssim(a, b) for a, b in pairs])


def repeats(run: Run) -> bool:
    """Whether the warm-up call made the same bytes as the last timed call."""
    return all(a.tobytes() == b.tobytes() for a, b in zip(run.first, run.images, strict=True))


def decibels(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.2f}"


def report(name: str, runs: list[Run]) -> None:
    plain = runs[0]
    if plain.skipped:
        print(f"{name}: plain did not run ({plain.skipped}): nothing to compare with")
        return
    rows, notes = [], []
    for run in runs:
        if run.skipped:
            notes.append(run.skipped)
            rows.append([name, run.setting.label,
                         f"{'failed' if run.failed else 'not run'} [{len(notes)}]"] + [""] * 8)
            continue
        psnrs, ssims = against_plain(plain, run)
        ratio = run.seconds / plain.seconds
        rows.append([name, run.setting.label, len(run.images),
                     decibels(statistics.fmean(psnrs)), decibels(min(psnrs)),
                     f"{statistics.fmean(ssims):.4f}", f"{min(ssims):.4f}",
                     "yes" if repeats(run) else "no",
                     f"{run.seconds / len(run.images):.3f}", f"{ratio:.2f}", f"{1 / ratio:.2f}"])
    print()
    print(table(["model", "setting", "images", "PSNR dB", "min", "SSIM", "min", "repeats",
                 "s/image", "time/plain", "speed-up"], rows))
    print("PSNR and SSIM: against plain's image of the same prompt and seed (mean over the "
          "images, and the worst); plain's own row compares its last call with its first. "
          "repeats: the warm-up call made the same bytes. time/plain: median time per call "
          "with the setting over plain's; speed-up: its inverse.")
    for number, note in enumerate(notes, 1):
        print(f"[{number}] {note}")
    flat = [i for i, image in enumerate(plain.images) if _similarity.luma(image).std() < FLAT]
    if flat:
        print(f"warning: plain's image(s) {flat} are nearly one colour: these random weights "
              "make no structure there, and similarity to them says even less")
    print(f"note: {WIRING_ONLY}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(_real_size.MODELS),
                        help=f"comma-separated, from: {', '.join(_real_size.MODELS)}")
    parser.add_argument("--prompts", type=int, default=2,
                        help=f"images per call: prompt i with seed i (up to {len(PROMPTS)} "
                             "prompts, then again with other seeds)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per setting")
    parser.add_argument("--device", default="cuda", help="torch device")
    parser.add_argument("--size", type=int, default=0,
                        help="image side in pixels (default: each model's, 1024 / 512)")
    parser.add_argument("--steps", type=int, default=0,
                        help="denoising steps (default: each model's, 4 / 1)")
    _settings.add_arguments(parser)
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - set(_real_size.MODELS)
    if unknown:
        parser.error(f"unknown model(s): {', '.join(sorted(unknown))}")
    if args.prompts < 1 or args.repeats < 1:
        parser.error("--prompts and --repeats must be at least 1")
    if not args.device.startswith("cuda") and not (args.tiny or args.depth):
        parser.error("real-size models need a GPU: on a CPU give --tiny (or --depth)")
    try:  # plain first: every other setting is compared with it
        args.settings = _settings.expand([_settings.PLAIN, *(args.setting or [_settings.ALL])])
    except _settings.SettingError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from gpu_worker.pipeline import quiet_libraries

    quiet_libraries()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: give --device cpu --tiny for a run on the CPU", file=sys.stderr)
        return 2
    print_header("Quality guard: each speed setting against plain, same prompts and seeds")
    print(_settings.stack_line(args.device))
    print(f"note: {WIRING_ONLY}")
    if args.tiny or args.depth:
        print("note: --tiny / --depth: NOT real-size models either")
    for name in args.models.split(","):
        runs, interrupted = measure(_real_size.MODELS[name], args, args.settings)
        if runs:
            report(name, runs)
        if interrupted:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
