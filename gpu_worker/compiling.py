"""``--compile``: torch.compile the denoiser, and say when it compiles.

Regional compilation (the default) compiles the denoiser's repeated block once and reuses the
code for every copy of it (diffusers' ``compile_repeated_blocks``): a FLUX transformer has 57
blocks of two kinds, so compiling takes seconds where the whole model takes minutes, for
nearly the same speed. ``--compile-scope full`` compiles the whole denoiser.

A compiled function compiles again for a shape it has not seen (another size; a batch size
until dynamo makes that dimension dynamic), which a job would wait for. The warm-up runs the
shapes it can name (gpu_worker/pipeline.py), and every compile after it is logged with what
caused it, so an operator sees which requests pay for one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

SCOPES = ("regional", "full")


def compile_denoiser(pipe: Any, scope: str, backend: str = "inductor") -> str:
    """Compile ``pipe``'s denoiser in place; the scope it got (full where it has no
    repeated blocks to compile). ``backend`` is torch.compile's: tests use "eager", which
    captures graphs and recompiles exactly as inductor does, without its minutes of C++
    code generation on a CPU."""
    if scope not in SCOPES:
        raise ValueError(f"--compile-scope {scope!r}: one of {', '.join(SCOPES)}")
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None:
        raise ValueError(f"--compile: {type(pipe).__name__} has no transformer or unet")
    # Not fullgraph: a step cache's hooks run outside the graph on purpose (graph breaks).
    if scope == "regional" and getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks(fullgraph=False, backend=backend)
        log.info("compiling %s's repeated blocks (%s) on first use",
                 type(denoiser).__name__, ", ".join(denoiser._repeated_blocks))
        return "regional"
    if scope == "regional":
        log.info("%s names no repeated blocks: compiling it whole", type(denoiser).__name__)
    denoiser.compile(fullgraph=False, backend=backend)
    return "full"


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileLog:
    """Logs each call that made dynamo compile, with the shape that made it."""

    def __init__(self) -> None:
        self.compiles = 0  # calls that compiled something

    @contextmanager
    def watch(self, shape: str) -> Iterator[None]:
        before, started = graphs_compiled(), time.perf_counter()
        yield
        new = graphs_compiled() - before
        if new:
            self.compiles += 1
            log.info("compiled %d graph(s) for %s: that call took %.1f s (%d graphs so far)",
                     new, shape, time.perf_counter() - started, graphs_compiled())
