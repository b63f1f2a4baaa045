"""One image's latency on a worker group (--gpus-per-worker N) against one device.

A group's followers load their pipeline from disk, as a worker's do, so the model must be a
saved one: a registry alias or directory (``--model``), or a real-size random-weight model of
_real_size.py built once and saved to a scratch folder (``--real-size flux-schnell``; that is
about 34 GB of disk for FLUX.1 in bf16). For each group size N it starts the group the way a
worker does (gpu_worker/parallel.py), warms up, and times ``--repeats`` calls of one image
(median). Prints s/image and the speed-up over N = 1.

    .venv/bin/python bench/worker_group.py --real-size flux-schnell --device cuda:0 --gpus 1,2,4
    .venv/bin/python bench/worker_group.py --model DIR --device cpu --gpus 1,2 --size 512
                                                 # wiring on a CPU (gloo), not a speed figure
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _real_size
from _common import print_header, table

from broker.protocol import JobSpec


def saved_real_size(name: str, folder: Path) -> str:
    """Build the real-size random-weight model and save it where followers can load it."""
    import torch

    model = _real_size.MODELS[name]
    pipe = _real_size.build(model, "cpu", torch.bfloat16)
    pipe.save_pretrained(folder / name)
    return str(folder / name)


def seconds_per_image(source: str, device: str, size: int, steps: int, gpus: int,
                      repeats: int, threads: int | None) -> float:
    """Median time of one image on a group of ``gpus`` (1: a plain runner)."""
    from gpu_worker import models
    from gpu_worker.parallel import Group, GroupPlan, group_devices
    from gpu_worker.pipeline import LoadOptions, PipelineRunner

    spec = models.resolve(source)
    options = LoadOptions(device=device, threads=threads)
    group = None
    if gpus > 1:
        group = Group.lead(GroupPlan(group_devices(device, gpus), "ulysses"), spec, options)
    runner = PipelineRunner(spec, options, group=group)
    if group is not None:
        group.started()
    job = JobSpec(id="bench", model=spec.name, prompt="a lighthouse on a cliff at dusk",
                  width=size, height=size, steps=steps, seeds=(0,),
                  guidance=spec.default_guidance)
    try:
        runner.generate(job)  # warm-up: lazy set-up, the first collectives
        times = []
        for _ in range(repeats):
            _synchronize(device)
            started = time.perf_counter()
            runner.generate(job)
            _synchronize(device)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        if group is not None:
            group.close()
        del runner
        _free(device)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="registry alias or saved pipeline directory")
    source.add_argument("--real-size", choices=sorted(_real_size.MODELS),
                        help="build this real-size random-weight model and save it first")
    parser.add_argument("--device", default="cuda:0", help="the group's first device")
    parser.add_argument("--gpus", default="1,2", help="group sizes to time, comma-separated")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(n) for n in args.gpus.split(",")]
    print_header("worker group: one image on N devices (context parallelism, Ulysses)")
    with tempfile.TemporaryDirectory(prefix="dc-group-bench-") as scratch:
        source = args.model or saved_real_size(args.real_size, Path(scratch))
        rows: list[list[Any]] = []
        base = None
        for gpus in sizes:
            seconds = seconds_per_image(source, args.device, args.size, args.steps, gpus,
                                        args.repeats, args.threads)
            base = base or (seconds if gpus == 1 else None)
            speed_up = f"{base / seconds:.2f}" if base else "—"
            rows.append([gpus, f"{seconds:.3f}", speed_up])
            print(f"N={gpus}: {seconds:.3f} s/image", flush=True)
    print(table(["N", "s/image", "x N=1"], rows))
    if not args.device.startswith("cuda"):
        print("CPU ranks (gloo): proves the group runs; every rank also runs the text encoders "
              "and the VAE, so a CPU figure says nothing of GPUs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
