"""Batching gain: images per second at max_batch 1, 2, 4, 8 with tiny, under the same load.

For each setting a cluster with one CPU worker runs with ``--max-batch B``; ``--concurrency``
clients keep requests in flight (identical settings, so they batch) for ``--seconds``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _cluster import Cluster
from _common import ms, percentile, print_header, table


def load(url: str, size: int, steps: int, warmup: float, seconds: float, concurrency: int
         ) -> tuple[list[float], list[dict[str, float]]]:
    """Latencies and the worker's timings of the requests sent in the measured window.

    One continuous load: the first ``warmup`` seconds are not counted, so the worker never
    sees the pause between a warm-up run and the measured one.
    """
    import httpx

    begin = time.perf_counter()
    start, deadline = begin + warmup, begin + warmup + seconds

    def client_loop(index: int) -> tuple[list[float], list[dict[str, float]]]:
        latencies, timings = [], []
        with httpx.Client(timeout=120) as http:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                resp = http.post(f"{url}/v1/images/generations",
                                 json={"prompt": f"client {index}", "size": f"{size}x{size}",
                                       "steps": steps})
                resp.raise_for_status()
                if started >= start:
                    latencies.append(time.perf_counter() - started)
                    timings.append(resp.json()["timings"])
        return latencies, timings

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        parts = list(pool.map(client_loop, range(concurrency)))
    return ([lat for part, _ in parts for lat in part],
            [t for _, part in parts for t in part])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,2,4,8", help="max_batch values to try")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time each")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    args = parser.parse_args()
    print_header("batching gain: one CPU worker, tiny")
    rows, base = [], None
    for max_batch in [int(b) for b in args.sizes.split(",")]:
        with Cluster("--max-batch", str(max_batch)) as cluster:
            latencies, timings = load(cluster.url, args.size, args.steps, 2.0, args.seconds,
                                      args.concurrency)
        rate = len(latencies) / args.seconds
        base = base or rate
        batches = [int(t.get("batch_size", 1)) for t in timings]
        idle = [t["device_idle_s"] for t in timings if "device_idle_s" in t]
        rows.append([max_batch, f"{rate:.1f}", f"{rate / base:.2f}",
                     f"{sum(batches) / max(1, len(batches)):.1f}",
                     ms(percentile(latencies, 50)), ms(percentile(latencies, 99)),
                     ms(percentile(idle, 50)), ms(percentile(idle, 99)),
                     f"{_idle_share(timings):.1%}"])
    print(table(["max_batch", "images/s", "x batch 1", "mean batch", "p50 ms", "p99 ms",
                 "idle p50 ms", "idle p99 ms", "idle share"], rows))
    print("\nidle: the worker's device_idle_s timing, from the end of its previous pipeline "
          "call to the start of the batch that answered (per answer); idle share = idle / "
          "(idle + generating), each batch once. With requests always queued, prefetching "
          "should keep it near zero.")
    print("note: on a CPU the gain is what batching saves in per-call overhead; on a GPU it "
          "also fills the device (see docs/performance.md)")


def _idle_share(timings: list[dict[str, float]]) -> float:
    """Idle over idle + generating time. Every job of a batch reports the batch's timings, so
    each counts 1/batch_size of them: each batch once."""
    idle = busy = 0.0
    for t in timings:
        weight = 1 / t.get("batch_size", 1)
        idle += t.get("device_idle_s", 0.0) * weight
        busy += t["generate_s"] * weight
    return idle / (idle + busy) if idle + busy else 0.0


if __name__ == "__main__":
    main()
