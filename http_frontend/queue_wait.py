"""How long a queued job will wait before it starts, estimated from the workers' own stats.

Work is counted in megapixel-steps: a job's steps times the pixels of all its images
(``JobSpec.work``), what a worker's time grows with. The broker tells each waiting job its
``position`` and its ``work_ahead``: the work of the jobs of its model ahead of it that have not
started (queued, or held by a worker), plus what is left of the batches its model's workers
run now, by how far each has got. The workers measure themselves (``WorkerStats`` in their
heartbeats, relayed in the broker's STATUS_REPLY): seconds per step in their last batch, and
the megapixels one step of that batch drew. So the model's ready workers get through

    rate = sum over workers of  step_megapixels / step_seconds    megapixel-steps per second

and a job starts after about ``work_ahead / rate`` seconds. A job behind one large, slow job
hears a longer wait than a job behind several small ones, as it should.

From a broker that sends no ``work_ahead`` (an older one), every job ahead is taken to be like
this one, the batches running now included in full: ``(position + batches) x work / rate``;
likewise a worker that does not say what its step drew is taken to batch jobs like this one.

It counts denoising only (text encoding and the VAE decode come on top), and is None when no
ready worker of the model has measured itself yet.
"""

from __future__ import annotations

import math
from typing import Any

from http_frontend.broker_client import ClusterStatus

MAX_WAIT = 86_400.0  # seconds; past a day an estimate says nothing


def estimate_wait(status: ClusterStatus | None, model: str, position: int | None, *,
                  steps: int | None, megapixels: float | None,
                  work_ahead: float | None = None) -> float | None:
    """Seconds until a job at ``position`` starts (one decimal), or None when unknown.

    ``steps`` and ``megapixels`` (all its images' pixels, in millions) are the job's own;
    ``work_ahead`` is the broker's, in megapixel-steps.
    """
    if status is None or position is None or position < 0 or not steps or steps < 1 \
            or not megapixels or megapixels <= 0:
        return None
    rate = 0.0  # megapixel-steps per second, all the model's measured workers together
    batches = 0  # jobs they run at once
    for worker in status.served_models().get(model, []):
        measured = _measured(worker, megapixels)
        if measured is not None:
            rate += measured[0]
            batches += measured[1]
    if rate <= 0:
        return None
    if work_ahead is None:
        work_ahead = (position + batches) * steps * megapixels
    wait = work_ahead / rate
    # A worker's step time is any finite number: a lying or broken one must not put an
    # infinity (not JSON) or an absurd wait in front of a user.
    return round(wait, 1) if math.isfinite(wait) and wait <= MAX_WAIT else None


def _measured(worker: dict[str, Any], megapixels: float) -> tuple[float, int] | None:
    """(megapixel-steps per second, jobs per batch) a worker measured, None before it did.

    A worker that does not say what its last step drew is taken to have drawn its last
    batch's jobs at ``megapixels`` each."""
    stats = worker.get("stats")
    if not isinstance(stats, dict):
        return None
    step_seconds = _positive(stats.get("step_seconds"))
    if step_seconds is None:
        return None
    batch_size = stats.get("batch_size")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        batch_size = 1
    max_batch = worker.get("max_batch")
    if isinstance(max_batch, int) and not isinstance(max_batch, bool) and max_batch >= 1:
        batch_size = min(batch_size, max_batch)
    drawn = _positive(stats.get("step_megapixels"))
    if drawn is None:
        drawn = batch_size * megapixels
    return drawn / step_seconds, batch_size


def _positive(value: Any) -> float | None:
    """A finite number above 0 as a float; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        return None
    return float(value)
