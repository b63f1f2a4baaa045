"""Priority classes on a real cluster: one worker, an interactive key floods the queue, a batch
key's jobs still finish before the flood does, at the turns the minimum share gives them
(broker/fair_queue.py, LOWER_CLASS_EVERY)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from broker.fair_queue import LOWER_CLASS_EVERY
from tests.cluster import Cluster
from tests.e2e.test_fair_sharing import JOB, completions

pytestmark = pytest.mark.slow

KEYS = "sk-hi name=hi class=interactive\nsk-lo name=lo class=batch\nsk-ops name=ops admin\n"
FLOOD = 26  # enough interactive jobs that two turns of the batch class come before the last


@pytest.fixture
def keyed_cluster(cache_dir: Path, tmp_path: Path) -> Iterator[Cluster]:
    keys = tmp_path / "api-keys"
    keys.write_text(KEYS)
    cluster = Cluster(cache_dir, workers=1, extra=["--api-keys-file", str(keys)])
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


def submit(http: httpx.Client, key: str, count: int) -> list[str]:
    """Send ``count`` jobs with ``key`` at once (eight at a time): the flood lands fast."""
    def one(seed: int) -> str:
        resp = http.post("/v1/jobs", json={**JOB, "seed": seed},
                         headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def test_a_batch_key_gets_its_turns_under_an_interactive_flood(keyed_cluster: Cluster) -> None:
    with keyed_cluster.client() as http:
        flood = submit(http, "sk-hi", FLOOD)
        late = submit(http, "sk-lo", 2)
        http.headers["Authorization"] = "Bearer sk-ops"  # an admin lists every key's jobs
        rounds = list(completions(http, flood + late, timeout=120))
    seen_at = {job_id: n for n, seen in enumerate(rounds) for job_id in seen}
    order = [sorted("L" if i in late else "H" for i in seen) for seen in rounds]

    def his_before(job_id: str) -> range:
        """How many of hi's jobs ended before ``job_id``: a range when some were seen done in
        the same poll (polls come far more often than jobs end, so rarely)."""
        before = sum(seen_at[h] < seen_at[job_id] for h in flood)
        return range(before, before + sum(seen_at[h] == seen_at[job_id] for h in flood) + 1)

    first, second = sorted(late, key=seen_at.__getitem__)
    # When lo's jobs are queued, hi's first job runs and its second waits at the worker (it
    # holds one batch running and one waiting); the first may have ended already, so two or
    # three of hi's jobs have left the queue by then: the one job of slack. From then on the
    # batch class is passed over nine times and the tenth dispatch is lo's, so lo's first
    # ends after 11 or 12 of hi's. Its count starts again with that job: exactly nine of
    # hi's come between lo's two, and the flood is not done when lo's are.
    turn = LOWER_CLASS_EVERY - 1
    assert {2 + turn, 3 + turn} & set(his_before(first)), order
    assert any(b - a == turn for a in his_before(first) for b in his_before(second)), order
    assert max(his_before(second)) < FLOOD, order
