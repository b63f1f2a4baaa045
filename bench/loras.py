"""What LoRA adapters cost a worker between batches: switching sets, back to the base model,
and loading an adapter it does not hold.

A worker switches to each batch's adapter set just before the pipeline call
(gpu_worker/loras.py ``LoraLibrary.apply``), on the device thread: the device waits for it.
Measured here, on one ``PipelineRunner`` with a folder of seeded adapters made for its model
(tests/gpu_worker/lora_fixtures.py, rank 4 on the attention projections):

- ``switch``: from one loaded set to another (``set_adapters``), alternating;
- ``to base``: from a set to none (``disable_lora``), and back to the set;
- ``load``: an adapter it does not hold (``load_lora_weights``), evicting another (on a
  runner whose cache holds one);

against one denoising step of the same pipeline at 512² (the ``step`` column), so the ratio
says what a switch costs a batch. The tiny model's adapters are miniatures: a real model's
load reads and places far more weights (tens to hundreds of MB).

Then whether fusing would pay for a long run of one set: a denoising step with the set
active as workers run it (unfused: each adapted projection adds its low-rank product), with
the set fused into the weights (``fuse_lora``: no extra work per step), and with none; and
what fusing and unfusing once cost. Workers never fuse: unfusing does not restore the base
weights bit for bit, and a request without adapters must get the base model's exact bytes.
The break-even run length (steps) is the fuse + unfuse cost over the step time saved.

    .venv/bin/python bench/loras.py                      # CPU, tiny, about 30 s
    .venv/bin/python bench/loras.py --device cuda --model sd-1.5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import print_header, table
from gpu import median_seconds
from previews import step_seconds

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def adapter_folder(runner: Any, count: int) -> Path:
    """``count`` seeded adapters for the runner's model, in a new folder."""
    from tests.gpu_worker.lora_fixtures import lora_folder

    return lora_folder(runner.pipe, Path(tempfile.mkdtemp(prefix="bench-loras-")),
                       {f"a{index}": index for index in range(count)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="a registry name (default: tiny)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs each (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on CPU (a CPU worker runs with few)")
    args = parser.parse_args(argv)

    from gpu_worker import models
    from gpu_worker.pipeline import LoadOptions, PipelineRunner

    spec = models.resolve(args.model)
    plain = PipelineRunner(spec, LoadOptions(device=args.device, threads=args.threads))
    folder = adapter_folder(plain, 4)
    runner = PipelineRunner(spec, LoadOptions(device=args.device, threads=args.threads,
                                              lora_dir=folder, lora_cache=3))
    library = runner.loras
    library.announcement()
    first, second = (("a0", 0.8),), (("a1", 0.6), ("a2", 0.4))
    library.apply(first)
    library.apply(second)
    flip = [first, second]

    def switch() -> None:
        flip.reverse()
        library.apply(flip[0])

    def to_base_and_back() -> None:
        library.apply(())
        library.apply(first)

    # A cache of one: alternating two adapters loads one (and evicts the other) every time.
    single = PipelineRunner(spec, LoadOptions(device=args.device, threads=args.threads,
                                              lora_dir=folder, lora_cache=1)).loras
    single.announcement()
    cycle = ["a0", "a3"]

    def load() -> None:
        cycle.reverse()
        single.apply(((cycle[0], 1.0),))

    fusing = fused_or_not(runner, first, args.device, args.repeats)
    switch_s = median_seconds(switch, args.device, args.repeats)
    base_s = median_seconds(to_base_and_back, args.device, args.repeats) / 2
    load_s = median_seconds(load, args.device, args.repeats)
    library.apply(())
    step = step_seconds(runner, 1, 512, args.device)
    shutil.rmtree(folder)

    print_header(f"LoRA adapter sets on {args.model} on {args.device}")
    rows = [[name, f"{seconds * 1000:.1f}", f"{step * 1000:.1f}", f"{seconds / step:.1%}"]
            for name, seconds in (("switch", switch_s), ("to base", base_s),
                                  ("load", load_s))]
    print(table(["between batches", "ms", "step ms (512²)", "of a step"], rows))
    print("\nswitch: between two loaded sets; to base: to none (the base model's exact "
          "weights); load: an adapter not in memory, evicting another.")
    print_fusing(fusing)
    return 0


def fused_or_not(runner: Any, loras: tuple[tuple[str, float], ...], device: str,
                 repeats: int, rounds: int = 3) -> dict[str, float]:
    """Step seconds at 512² with ``loras`` unfused, fused and with none (each the median of
    ``rounds``, taken in turn so that a busy machine weighs on all three alike); fuse +
    unfuse seconds. Leaves the runner with no adapter active and none fused."""
    library, pipe = runner.loras, runner.pipe
    library.apply(loras)

    def fuse_and_unfuse() -> None:
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unfuse_lora()

    cycle = median_seconds(fuse_and_unfuse, device, repeats)
    taken: dict[str, list[float]] = {"unfused": [], "fused": [], "base": []}
    for _ in range(rounds):
        library.apply(loras)
        taken["unfused"].append(step_seconds(runner, 1, 512, device, loras=loras))
        pipe.fuse_lora(lora_scale=1.0)
        # The library would set the adapters again, which unmerges them (PEFT): not now.
        runner.loras = _Unchanging()
        try:
            taken["fused"].append(step_seconds(runner, 1, 512, device, loras=loras))
        finally:
            runner.loras = library
            pipe.unfuse_lora()
        library.apply(())
        taken["base"].append(step_seconds(runner, 1, 512, device))
    found = {name: statistics.median(values) for name, values in taken.items()}
    return {**found, "fuse + unfuse": cycle}


class _Unchanging:
    """A LoRA library that leaves the pipeline's adapters as they are."""

    def apply(self, loras: tuple[tuple[str, float], ...]) -> None:
        pass


def print_fusing(seconds: dict[str, float]) -> None:
    base = seconds["base"]
    print_header("One adapter set for a long run: fused or not (512², one image)")
    rows = [[name, f"{seconds[name] * 1000:.1f}", f"{seconds[name] / base:.3f}"]
            for name in ("unfused", "fused", "base")]
    print(table(["step with the set", "ms", "x base"], rows))
    saved = seconds["unfused"] - seconds["fused"]
    cycle = seconds["fuse + unfuse"]
    verdict = (f"fusing pays after {cycle / saved:.0f} steps of one set" if saved > 0
               else "fusing saves nothing measurable here")
    print(f"\nfuse + unfuse once: {cycle * 1000:.1f} ms; a step saves {saved * 1000:.2f} ms "
          f"fused: {verdict}.")


if __name__ == "__main__":
    sys.exit(main())
