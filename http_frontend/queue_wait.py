"""How long a queued job will wait before it starts, estimated from the workers' own stats.

The broker tells each waiting job its ``position``: the jobs of its model ahead of it that have
not started, whether they are still queued or already held by a worker. The workers measure
themselves (``WorkerStats`` in their heartbeats, relayed in the broker's STATUS_REPLY):
seconds per denoising step in their last batch, and the jobs that batch held. From those, the
model's ready workers drain the line at

    rate = sum over workers of  batch_size / (steps x step_seconds)    jobs per second

and a job with ``position`` jobs ahead starts after about ``(position + batch) / rate``
seconds, ``batch`` being the jobs all of them take at once: the batches running now end
first, then those ahead go in batches. It counts denoising time only (text encoding and the
VAE decode come on top), takes every job ahead to have this one's steps, and is None when no
ready worker of the model has measured itself yet.
"""

from __future__ import annotations

import math
from typing import Any

from http_frontend.broker_client import ClusterStatus

MAX_WAIT = 86_400.0  # seconds; past a day an estimate says nothing


def estimate_wait(status: ClusterStatus | None, model: str, position: int | None,
                  steps: int | None) -> float | None:
    """Seconds until a job at ``position`` starts (one decimal), or None when unknown."""
    if status is None or position is None or position < 0 or not steps or steps < 1:
        return None
    rate = 0.0  # jobs per second the model's workers start
    batch = 0  # jobs they take at once
    for worker in status.served_models().get(model, []):
        measured = _measured(worker)
        if measured is None:
            continue
        step_seconds, batch_size = measured
        rate += batch_size / (steps * step_seconds)
        batch += batch_size
    if rate <= 0:
        return None
    wait = (position + batch) / rate
    # A worker's step time is any finite number: a lying or broken one must not put an
    # infinity (not JSON) or an absurd wait in front of a user.
    return round(wait, 1) if math.isfinite(wait) and wait <= MAX_WAIT else None


def _measured(worker: dict[str, Any]) -> tuple[float, int] | None:
    """(seconds per step, jobs per batch) a worker measured, or None before it did."""
    stats = worker.get("stats")
    if not isinstance(stats, dict):
        return None
    step_seconds = stats.get("step_seconds")
    if isinstance(step_seconds, bool) or not isinstance(step_seconds, (int, float)) \
            or not math.isfinite(step_seconds) or step_seconds <= 0:
        return None
    batch_size = stats.get("batch_size")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        batch_size = 1
    max_batch = worker.get("max_batch")
    if isinstance(max_batch, int) and not isinstance(max_batch, bool) and max_batch >= 1:
        batch_size = min(batch_size, max_batch)
    return float(step_seconds), batch_size
