"""Fair sharing on a real cluster: one worker, one user floods the queue, another user's jobs
are not stuck behind the whole flood (broker/fair_queue.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.slow

# Each job takes the one worker a while (about half a second on CPU), longer than sending a
# whole flood, so the flood is queued when the second user comes and the order the jobs finish
# in is the order the broker dispatched them. Without keys the identity is `user`.
JOB = {"prompt": "a fair share", "size": "256x256", "steps": 16}


def submit(http: httpx.Client, user: str, count: int) -> list[str]:
    """Send ``count`` jobs for ``user`` at once (eight at a time): the flood lands fast."""
    def one(seed: int) -> str:
        resp = http.post("/v1/jobs", json={**JOB, "user": user, "seed": seed})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def completions(http: httpx.Client, ids: list[str], timeout: float) -> Iterator[set[str]]:
    """The jobs seen succeeded at each poll that saw new ones, in order."""
    done: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(done) < len(ids):
        assert time.monotonic() < deadline, f"only {len(done)} of {len(ids)} jobs finished"
        listing = http.get("/v1/jobs", params={"limit": 100}).json()["data"]
        status = {job["id"]: job["status"] for job in listing}
        assert not {s for i, s in status.items() if i in ids} & {"failed", "cancelled"}
        new = {i for i in ids if status.get(i) == "succeeded"} - done
        if new:
            done |= new
            yield new
        time.sleep(0.02)


def test_a_second_user_is_served_before_the_flooders_fourth_job(solo_cluster: Cluster) -> None:
    with solo_cluster.client() as http:
        flood = submit(http, "alice", 20)
        late = submit(http, "bob", 2)
        rounds = list(completions(http, flood + late, timeout=120))
    # The poll each job was first seen done at: polls come far more often than jobs end, so
    # these give the completion order (jobs seen in the same poll tie).
    seen_at = {job_id: n for n, seen in enumerate(rounds) for job_id in seen}
    order = [sorted("B" if job_id in late else "A" for job_id in seen) for seen in rounds]
    alices = sorted(seen_at[job_id] for job_id in flood)
    # Bob's two are done before Alice's fourth (her 20 were queued first), not after all 20.
    assert max(seen_at[job_id] for job_id in late) < alices[3], order
