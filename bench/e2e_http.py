"""Serving overhead: tiny over HTTP (frontend + broker + worker) against the same pipeline
called in-process; then what recording a job costs.

Both sides make the same images (same size, steps, PNG, base64) on one CPU thread of torch;
the HTTP side keeps ``--concurrency`` requests in flight so the worker's prefetch can hide the
round trip. The ratio HTTP / in-process is the serving overhead.

The cost of history: the same HTTP load against a cluster that records every job durably (the
default: SQLite in WAL mode with synchronous=FULL, each image written to the directory store)
and one that keeps its records in memory and stores no image (``--db :memory:
--no-image-store``), in alternating rounds; the difference of the p50s is the added latency.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _cluster import Cluster
from _common import ms, percentile, print_header, table


def in_process(size: int, steps: int, seconds: float) -> list[float]:
    """Latencies of back-to-back generations in this process, encode and base64 included."""
    import torch

    from broker.protocol import JobSpec
    from gpu_worker import models
    from gpu_worker.encode import encode_image
    from gpu_worker.pipeline import LoadOptions, PipelineRunner

    torch.set_num_threads(1)
    runner = PipelineRunner(models.resolve("tiny"), LoadOptions(threads=1))
    runner.warm_up()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    seed = 0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        job = JobSpec(id="b", model="tiny", prompt="a lighthouse", width=size, height=size,
                      steps=steps, seeds=(seed,), guidance=5.0)
        image = runner.generate(job)[0]
        base64.b64encode(encode_image(image, "png"))
        latencies.append(time.perf_counter() - started)
        seed += 1
    return latencies


def over_http(url: str, size: int, steps: int, seconds: float, concurrency: int,
              **extra: str) -> list[float]:
    import httpx

    body = {"prompt": "a lighthouse", "size": f"{size}x{size}", "steps": steps, **extra}
    deadline = time.perf_counter() + seconds

    def client_loop(index: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=120) as http:
            seed = index * 1_000_000
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                resp = http.post(f"{url}/v1/images/generations", json={**body, "seed": seed})
                resp.raise_for_status()
                latencies.append(time.perf_counter() - started)
                seed += 1
        return latencies

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return [lat for part in pool.map(client_loop, range(concurrency)) for lat in part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per side")
    parser.add_argument("--concurrency", type=int, default=2, help="HTTP requests in flight")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating rounds of the history comparison")
    args = parser.parse_args()
    print_header("serving overhead: HTTP vs in-process (tiny, one CPU worker)")
    local = in_process(args.size, args.steps, args.seconds)
    with Cluster() as cluster:
        over_http(cluster.url, args.size, args.steps, 3.0, args.concurrency)  # warm-up
        remote = over_http(cluster.url, args.size, args.steps, args.seconds, args.concurrency)
    rows = []
    for name, latencies in (("in-process", local), (f"HTTP, {args.concurrency} in flight",
                                                    remote)):
        rate = len(latencies) / args.seconds
        rows.append([name, f"{rate:.1f}", ms(percentile(latencies, 50)),
                     ms(percentile(latencies, 99))])
    print(table(["path", "images/s", "p50 ms", "p99 ms"], rows))
    local_rate, remote_rate = len(local) / args.seconds, len(remote) / args.seconds
    print(f"\nthroughput ratio HTTP / in-process: {remote_rate / local_rate:.2f}")
    print(f"added p50 latency: {ms(percentile(remote, 50) - percentile(local, 50))} ms "
          "(HTTP + JSON + base64 + broker + queueing behind the request in flight)")
    print("note: client, frontend, broker and worker share this machine's cores")
    history_cost(args)


HISTORY_SETUPS = {
    "recorded (SQLite file + image files)": (),
    "not kept (records in memory, no images)": ("--db", ":memory:", "--no-image-store"),
}


def history_cost(args: argparse.Namespace) -> None:
    """p50 latency with durable records and stored images, and without; alternating rounds
    so that drift on a shared machine falls on both alike."""
    print_header("the cost of recording each job (same HTTP load, alternating rounds)")
    latencies: dict[str, list[float]] = {name: [] for name in HISTORY_SETUPS}
    for _ in range(args.rounds):
        for name, flags in HISTORY_SETUPS.items():
            with Cluster(*flags) as cluster:
                over_http(cluster.url, args.size, args.steps, 3.0, args.concurrency)
                latencies[name] += over_http(cluster.url, args.size, args.steps,
                                             args.seconds, args.concurrency)
    rows = [[name, str(len(values)), ms(percentile(values, 50)), ms(percentile(values, 99))]
            for name, values in latencies.items()]
    print(table(["history", "requests", "p50 ms", "p99 ms"], rows))
    kept, memory = (percentile(values, 50) for values in latencies.values())
    print(f"\nadded p50 latency of recording a job: {ms(kept - memory)} ms "
          f"(ratio {kept / memory:.3f}; differences of a few ms are this machine's noise)")
    alone = recording_alone(args.size, 200)
    print(f"recording alone, in-process (record the job, store its PNG, end the record; "
          f"SQLite file + directory): p50 {ms(percentile(alone, 50))} ms, "
          f"p99 {ms(percentile(alone, 99))} ms")


def recording_alone(size: int, jobs: int) -> list[float]:
    """Seconds to record one job from start to end, as the frontend does: History.open,
    then the settle (the PNG written, the record ended and read back)."""
    import io
    import tempfile
    from pathlib import Path

    from PIL import Image

    from broker.protocol import ImageInfo, JobSpec, Message, MsgType
    from http_frontend.database import open_database
    from http_frontend.history import Caller, History, Tracked
    from http_frontend.image_store import DirectoryStore
    from http_frontend.pending import PendingJob
    from http_frontend.records import JobRecords

    png = io.BytesIO()
    Image.new("RGB", (size, size)).save(png, "PNG")
    with tempfile.TemporaryDirectory() as tmp:
        history = History(JobRecords(open_database(str(Path(tmp) / "jobs.db"))),
                          DirectoryStore(Path(tmp) / "images"), frontend="bench")
        latencies = []
        for index in range(jobs):
            job = JobSpec(id=f"{index:032x}", model="tiny", prompt="a lighthouse",
                          width=size, height=size, steps=4, seeds=(index,))
            result = Message(MsgType.RESULT, {
                "job_id": job.id, "images": [ImageInfo(seed=index, width=size, height=size,
                                                       format="png")]},
                [png.getvalue()])
            started = time.perf_counter()
            history.open(job, {"prompt": "a lighthouse"}, kind="generation",
                         caller=Caller(None, "http://bench"), submitter="bench")
            pending = PendingJob(job.id, job)
            pending.update(result)
            history._settle(Tracked(job, pending))
            latencies.append(time.perf_counter() - started)
        history.close()
    return latencies


if __name__ == "__main__":
    main()
