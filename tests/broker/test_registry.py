"""Tests for broker.registry.WorkerRegistry: registration, liveness and who gets work."""

from __future__ import annotations

from typing import Any

from broker import protocol
from broker.protocol import Message, MsgType
from broker.registry import WorkerRecord, WorkerRegistry, WorkerState


def load(reg: WorkerRegistry, worker: WorkerRecord, job_ids: list[str], *, now: float) -> None:
    """Give ``worker`` jobs as Leases.lease does: its load belongs to the leases."""
    worker.running.update(job_ids)
    reg.offer(worker, dispatched=now)


def unload(reg: WorkerRegistry, worker: WorkerRecord, job_id: str) -> None:
    """Take a job off ``worker`` as Leases.release does."""
    worker.running.discard(job_id)
    reg.offer(worker)


def ready(worker_id: str = "w", **fields: Any) -> Message:
    values = {"worker_id": worker_id, "host": "gpu-host", "device": "cuda:0",
              "models": ["tiny"], **fields}
    return protocol.decode(protocol.encode(MsgType.READY, values))


def test_register_reads_ready_fields() -> None:
    reg = WorkerRegistry(liveness=3.0)
    worker = reg.register(b"id-1", ready("w1", models=["a", "b"], capacity=2, max_batch=4,
                                         version="1.2", model_info={"a": {"x": 1}}), now=10.0)
    assert reg.get(b"id-1") is worker and len(reg) == 1
    assert (worker.identity, worker.worker_id, worker.host, worker.device) == \
        (b"id-1", "w1", "gpu-host", "cuda:0")
    assert worker.models == ("a", "b")
    assert (worker.capacity, worker.max_batch, worker.version) == (2, 4, "1.2")
    assert worker.model_info == {"a": {"x": 1}}
    assert worker.expires_at == 13.0
    assert worker.state is WorkerState.READY and worker.running == set()
    assert worker.free == 2


def test_register_defaults() -> None:
    worker = WorkerRegistry(liveness=1.0).register(b"i", ready(), now=0.0)
    assert (worker.capacity, worker.max_batch, worker.version, worker.model_info) == \
        (1, 1, "", {})


def test_register_again_replaces_the_record() -> None:
    reg = WorkerRegistry(liveness=3.0)
    first = reg.register(b"i", ready("old"), now=0.0)
    first.running.add("job")
    second = reg.register(b"i", ready("new"), now=1.0)
    assert reg.get(b"i") is second and len(reg) == 1
    assert second.worker_id == "new" and second.running == set()


def test_register_again_carries_health_over_but_not_leases() -> None:
    reg = WorkerRegistry(liveness=3.0)
    first = reg.register(b"i", ready("w"), now=0.0)
    load(reg, first, ["job"], now=1.0)
    first.jobs_done, first.failures = 4, 1
    second = reg.register(b"i-again", ready("w"), now=2.0, keep=first)
    assert (second.jobs_done, second.failures, second.last_dispatch) == (4, 1, 1.0)
    assert second.running == set()  # Leases.keep or Leases.move decide what it holds


def test_touch_extends_expiry() -> None:
    reg = WorkerRegistry(liveness=3.0)
    worker = reg.register(b"i", ready(), now=0.0)
    assert reg.expired(2.9) == []
    assert reg.expired(3.0) == [worker]
    assert reg.touch(b"i", now=2.5) is worker
    assert worker.expires_at == 5.5
    assert reg.expired(5.0) == []
    assert reg.expired(5.5) == [worker]
    assert reg.touch(b"unknown", now=1.0) is None


def test_expired_lists_only_silent_workers_and_keeps_them() -> None:
    reg = WorkerRegistry(liveness=1.0)
    early = reg.register(b"a", ready("a"), now=0.0)
    reg.register(b"b", ready("b"), now=0.5)
    assert reg.expired(1.2) == [early]
    assert len(reg) == 2  # the broker removes them; expired() only reports
    assert reg.remove(b"a") is early
    assert reg.remove(b"a") is None
    assert [w.worker_id for w in reg] == ["b"]


def drain(reg: WorkerRegistry, model: str = "tiny") -> list[WorkerRecord]:
    """Every candidate for ``model``, best first (each leaves the candidates)."""
    found = []
    while (worker := reg.next_free(model)) is not None:
        found.append(worker)
    return found


def test_next_free_least_running_first() -> None:
    reg = WorkerRegistry(liveness=3.0)
    a = reg.register(b"a", ready("a", capacity=4, max_batch=2), now=0.0)
    b = reg.register(b"b", ready("b", capacity=4, max_batch=2), now=0.0)
    c = reg.register(b"c", ready("c", capacity=4, max_batch=2), now=0.0)
    load(reg, a, ["1", "2"], now=1.0)
    load(reg, b, ["3"], now=1.0)
    assert drain(reg) == [c, b, a]
    load(reg, c, ["4", "5", "6"], now=2.0)  # no room for a whole batch
    reg.offer(a)
    reg.offer(b)
    assert drain(reg) == [b, a]
    unload(reg, c, "4")  # room again
    assert drain(reg) == [c]


def test_next_free_longest_idle_first_on_ties() -> None:
    reg = WorkerRegistry(liveness=3.0)
    a = reg.register(b"a", ready("a", capacity=2), now=0.0)
    b = reg.register(b"b", ready("b", capacity=2), now=0.0)
    c = reg.register(b"c", ready("c", capacity=2), now=0.0)
    for worker, when in ((a, 30.0), (b, 10.0), (c, 20.0)):
        load(reg, worker, [f"job-{worker.worker_id}"], now=when)
        unload(reg, worker, f"job-{worker.worker_id}")
    assert drain(reg) == [b, c, a]


def test_next_free_filters_by_model_and_skips_removed_workers() -> None:
    reg = WorkerRegistry(liveness=3.0)
    reg.register(b"a", ready("a", models=["sdxl"]), now=0.0)
    b = reg.register(b"b", ready("b", models=["sdxl", "tiny"]), now=0.0)
    c = reg.register(b"c", ready("c", models=["tiny"]), now=0.0)
    reg.remove(b"c")
    assert drain(reg, "tiny") == [b]
    assert drain(reg, "flux") == []
    assert c not in drain(reg, "sdxl")


def test_next_free_wants_room_for_a_whole_batch() -> None:
    reg = WorkerRegistry(liveness=3.0)
    worker = reg.register(b"a", ready("a", capacity=4, max_batch=2), now=0.0)
    load(reg, worker, ["1", "2", "3"], now=1.0)  # one slot free: not a batch of two
    assert drain(reg) == []
    unload(reg, worker, "1")
    assert drain(reg) == [worker]


def test_stale_entries_do_not_pile_up() -> None:
    reg = WorkerRegistry(liveness=3.0)
    worker = reg.register(b"a", ready("a", capacity=2), now=0.0)
    for i in range(10_000):
        load(reg, worker, [str(i)], now=float(i))
        unload(reg, worker, str(i))
    assert len(reg._free["tiny"]) < 100


def test_a_worker_that_fails_jobs_in_a_row_is_quarantined_with_back_off() -> None:
    reg = WorkerRegistry(liveness=3.0)
    worker = reg.register(b"a", ready("a", capacity=2), now=0.0)
    assert not reg.failed(worker, now=1.0, others_serve=True)
    assert not reg.failed(worker, now=1.0, others_serve=True)
    assert reg.failed(worker, now=1.0, others_serve=True)  # the third in a row
    assert worker.free == 0
    assert drain(reg) == []
    assert reg.serves("tiny")  # its model's jobs wait for it (or others); they never fail
    assert worker.describe(now=3.0)["state"] == "quarantined"
    assert worker.describe(now=3.0)["quarantine_left_s"] == 3.0
    assert reg.end_quarantines(now=5.9) == []
    assert reg.end_quarantines(now=6.0) == [worker]
    assert drain(reg) == [worker]
    # On probation: one more failure and it is out again, for twice as long.
    assert reg.failed(worker, now=7.0, others_serve=True)
    assert worker.quarantined_until == 17.0
    reg.end_quarantines(now=17.0)
    reg.succeeded(worker)  # a good answer clears its record
    assert not reg.failed(worker, now=18.0, others_serve=True)
    reg.absolve(worker)  # that job failed elsewhere too: not this worker's fault
    assert worker.failures == 0


def test_the_only_worker_of_a_model_is_never_quarantined() -> None:
    reg = WorkerRegistry(liveness=3.0)
    only = reg.register(b"a", ready("a"), now=0.0)
    other = reg.register(b"b", ready("b", models=["sdxl"]), now=0.0)
    assert reg.others_serve("sdxl", only) and not reg.others_serve("tiny", only)
    assert not reg.others_serve("sdxl", other)
    assert not any(reg.failed(only, now=1.0, others_serve=False) for _ in range(10))
    assert only.state is WorkerState.READY


def test_full_worker_still_serves() -> None:
    reg = WorkerRegistry(liveness=3.0)
    worker = reg.register(b"a", ready("a", models=["tiny", "sdxl"]), now=0.0)
    worker.running.add("job")
    assert worker.free == 0
    assert reg.serves("tiny") and reg.serves("sdxl")  # busy is not absent: jobs may queue
    assert not reg.serves("flux")


def test_serves_nothing_when_empty() -> None:
    assert not WorkerRegistry(liveness=1.0).serves("tiny")


def test_describe() -> None:
    reg = WorkerRegistry(liveness=3.0)
    worker = reg.register(b"a", ready("w1", capacity=2, version="9"), now=0.0)
    worker.running.update({"b-job", "a-job"})
    worker.jobs_done = 5
    assert worker.describe(now=0.0) == {
        "worker_id": "w1", "host": "gpu-host", "device": "cuda:0", "models": ["tiny"],
        "state": "ready", "running": ["a-job", "b-job"], "jobs_done": 5, "max_batch": 1,
        "capacity": 2, "version": "9", "model_info": {}, "consecutive_failures": 0,
    }
