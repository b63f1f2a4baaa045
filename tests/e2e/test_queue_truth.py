"""Queue truth on a real cluster: one worker, several jobs waiting behind it, each with its own
position and, once the worker has measured itself, an estimated wait (the jobs API)."""

from __future__ import annotations

import httpx

from tests.cluster import Cluster, wait_until
from tests.e2e.test_streaming import sse_events

JOB = {"prompt": "a queue", "size": "512x512", "steps": 30}  # seconds a job: the line holds still


def test_jobs_behind_one_worker_each_hear_their_own_position(solo_cluster: Cluster) -> None:
    cluster = solo_cluster  # one worker: one job running, one held waiting
    with cluster.client() as http:
        submitted = [http.post("/v1/jobs", json={**JOB, "seed": i}).json()
                     for i in range(4)]
        ids = [job["id"] for job in submitted]
        # The first runs; the others are never "next in line" together.
        assert [job["position"] for job in submitted[1:]] == [0, 1, 2], submitted

        def described() -> list[dict]:
            return [http.get(f"/v1/jobs/{job_id}").json() for job_id in ids]

        def lined_up() -> list[dict] | None:
            jobs = described()
            waiting = [(j["status"], j["position"]) for j in jobs[1:]]
            return jobs if jobs[0]["status"] == "running" \
                and waiting == [("queued", 0), ("queued", 1), ("queued", 2)] else None

        # The second is held by the worker, not started: still position 0, not running.
        wait_until(lined_up, 60, "one running, three queued at 0, 1, 2",
                   lambda: str(described()))

        with httpx.stream("GET", f"{cluster.url}/v1/jobs/{ids[3]}/events",
                          timeout=300) as resp:
            events = list(sse_events(resp.iter_lines()))
        queued = [data for name, data in events if name == "queued"]
        positions = [data["position"] for data in queued]
        assert positions[0] == 2 and positions[-1] == 0, positions
        assert positions == sorted(positions, reverse=True), positions
        assert all("eta_seconds" in data for data in queued)
        # Once a batch finished, the worker's stats give an estimate.
        estimates = [d["eta_seconds"] for d in queued if d["eta_seconds"] is not None]
        assert estimates and all(e > 0 for e in estimates), queued
        assert events[-1][0] == "completed"
        for job_id in ids:
            http.delete(f"/v1/jobs/{job_id}")


LIGHT = {"prompt": "a light job", "size": "64x64", "steps": 2}
HEAVY = {"prompt": "a heavy job", "size": "512x512", "steps": 30}


def test_a_wait_behind_a_heavy_job_is_told_longer_than_behind_a_light_one(
        solo_cluster: Cluster) -> None:
    """The estimate weighs the work ahead (steps x pixels), not the count of jobs: the same
    light job waits far longer behind one 512x512 job of 30 steps than behind one of its own
    kind. Both estimates come from the same worker's stats, measured on light jobs."""
    cluster = solo_cluster
    with cluster.client() as http:
        warm = http.post("/v1/jobs", json=LIGHT).json()

        def measured() -> bool:
            workers = http.get("/v1/cluster").json().get("workers", [])
            return any((w.get("stats") or {}).get("step_megapixels") for w in workers)

        wait_until(lambda: http.get(f"/v1/jobs/{warm['id']}").json()["status"] == "succeeded",
                   60, "the warm-up job done")
        wait_until(measured, 30, "the worker's stats, with what its step drew")
        heavy = http.post("/v1/jobs", json={**HEAVY, "seed": 1}).json()
        behind_heavy = http.post("/v1/jobs", json={**LIGHT, "seed": 2}).json()
        wait_until(lambda: http.get(f"/v1/jobs/{behind_heavy['id']}").json()["status"]
                   == "succeeded", 300, "the jobs behind the heavy one done")
        light = http.post("/v1/jobs", json={**LIGHT, "seed": 3}).json()
        behind_light = http.post("/v1/jobs", json={**LIGHT, "seed": 4}).json()
        told = (behind_heavy["eta_seconds"], behind_light["eta_seconds"])
        assert told[0] is not None and told[1] is not None, told
        # 30 x 512^2 against 2 x 64^2 pixel-steps ahead: about 960 times the work.
        assert told[0] >= 1.0 and told[0] > 50 * told[1], told
        for job in (warm, heavy, behind_heavy, light, behind_light):
            http.delete(f"/v1/jobs/{job['id']}")
