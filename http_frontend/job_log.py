"""The frontend's two lines per job: when it is sent to the broker, and how it ended.

Both carry the job's fields (job_id, model, user, request_id), so that in JSON logs
``grep JOB_ID`` finds the job here and on the broker and worker that ran it. The prompt is
never logged: prompts can be private.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from broker import logs
from broker.protocol import JobSpec
from http_frontend import request_ids
from http_frontend.pending import PendingJob

log = logging.getLogger(__name__)


def log_job(job: JobSpec, pending: PendingJob) -> None:
    """Log ``job`` as sent now and again when it ends."""
    fields = logs.job_fields(job, request_id=request_ids.current())
    log.info("job %s sent to the broker: %d image(s) of %dx%d, %d steps", job.id, job.n,
             job.width, job.height, job.steps, extra=fields)
    pending.when_done(lambda done: _log_end(done, fields))


def _log_end(pending: PendingJob, fields: dict[str, Any]) -> None:
    # Runs on the thread that ends the job (often the broker client's): never raise there.
    try:
        seconds = time.monotonic() - pending.submitted_at
        if pending.result is not None:
            log.info("job %s succeeded: %d image(s) in %.2f s", pending.job_id,
                     len(pending.result["images"]), seconds, extra=fields)
        elif pending.error is not None:
            log.info("job %s failed after %.2f s: %s: %s", pending.job_id, seconds,
                     pending.error.code, pending.error.message, extra=fields)
    except Exception:
        log.exception("job %s: cannot log how it ended", pending.job_id, extra=fields)
