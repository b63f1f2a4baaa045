"""Tests for the broker loop: a real Broker on real sockets with fake workers and clients."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from broker import defaults, protocol
from broker.jobs import JobState
from broker.protocol import ImageInfo, MsgType
from tests.broker.fakes import BrokerHarness, FakeClient, FakeWorker, LiveBroker, make_spec, plain

# Default heartbeat 1 s, liveness 3: the broker queues jobs for unknown models for 6 s.
STARTUP_GRACE = 6.0

pytestmark = pytest.mark.timeout(30)


def leased_to(harness: BrokerHarness, job_id: str) -> bytes | None:
    job = harness.broker.jobs.get(job_id)
    return None if job is None else job.worker


def finish(worker: FakeWorker, client: FakeClient, spec: protocol.JobSpec) -> None:
    """Have ``worker`` answer ``spec`` and check that the client got that answer."""
    worker.result(spec, [f"image of {spec.id}".encode()])
    msg = client.expect(MsgType.RESULT)
    assert msg["job_id"] == spec.id
    assert list(msg.payloads) == [f"image of {spec.id}".encode()]


# --------------------------------------------------------------------------------------------
# Submitting and dispatching


def test_submit_without_worker_fails_no_worker(harness: BrokerHarness) -> None:
    harness.worker("sdxl-only", models=("sdxl",))
    client = harness.client()
    harness.clock.advance(STARTUP_GRACE)
    msg = client.submit(make_spec("j1"))
    assert msg.type is MsgType.FAILED
    assert (msg["job_id"], msg["code"], msg["retryable"]) == ("j1", "no_worker", True)
    assert "j1" not in harness.broker.jobs


def test_just_after_start_a_job_waits_for_its_workers_to_register(
        harness: BrokerHarness) -> None:
    # A restarted broker: the frontend resubmits before the workers have registered again.
    client = harness.client()
    msg = client.submit(make_spec("j1"))
    assert msg.type is MsgType.ACCEPTED
    worker = harness.worker("w1")
    assert [spec.id for spec in worker.take()] == ["j1"]


def test_ready_then_submit_is_accepted_and_dispatched(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    spec = make_spec("j1", seeds=(5, 6), guidance=2.5, negative_prompt="fog", user="u")
    msg = client.submit(spec)
    assert msg.type is MsgType.ACCEPTED
    assert plain(msg) == {"job_id": "j1", "position": 0, "work_ahead": 0.0}
    assert worker.take() == [spec]
    assert leased_to(harness, "j1") == b"w1"
    assert harness.broker.jobs.get("j1").state is JobState.RUNNING
    assert harness.broker.workers.get(b"w1").running == {"j1"}


def test_progress_and_result_reach_the_client_byte_identical(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    spec = make_spec("j1", seeds=(11, 12, 13))
    client.submit(spec)
    worker.take()

    preview = os.urandom(5000)
    worker.send_msg(MsgType.PROGRESS, {"job_id": "j1", "step": 1, "steps": 2,
                                       "image_index": 0}, [preview])
    progress = client.expect(MsgType.PROGRESS)
    assert plain(progress) == {"job_id": "j1", "step": 1, "steps": 2, "image_index": 0}
    assert list(progress.payloads) == [preview]

    # A big image (over the clients' 1 MiB frame limit: that bounds only what clients send),
    # an empty frame and every byte value.
    payloads = [os.urandom(3 << 20), b"", bytes(range(256)) * 3]
    infos = [ImageInfo(seed=s, width=64, height=64, format="png") for s in spec.seeds]
    worker.send(protocol.result("j1", infos, payloads, timings={"generate_s": 1.25},
                                worker_id="w1"))
    result = client.expect(MsgType.RESULT)
    assert result["job_id"] == "j1"
    assert result["images"] == infos
    assert result["timings"] == {"generate_s": 1.25}
    assert result["worker_id"] == "w1"
    assert list(result.payloads) == payloads

    assert "j1" not in harness.broker.jobs
    record = harness.broker.workers.get(b"w1")
    assert record.running == set() and record.jobs_done == 1


def test_worker_failure_is_forwarded_and_frees_the_worker(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    client.submit(make_spec("j1"))
    worker.take()
    worker.send(protocol.failed("j1", protocol.ErrorCode.WORKER_ERROR, "out of memory"))
    msg = client.expect(MsgType.FAILED)
    assert plain(msg) == {"job_id": "j1", "code": "worker_error", "message": "out of memory",
                          "retryable": False}
    assert "j1" not in harness.broker.jobs
    client.submit(make_spec("j2"))
    assert [s.id for s in worker.take()] == ["j2"]


def test_result_from_a_worker_without_the_lease_is_dropped(harness: BrokerHarness) -> None:
    holder = harness.worker("holder")
    client = harness.client()
    spec = make_spec("j1")
    client.submit(spec)
    holder.take()
    other = harness.worker("other")
    with harness.consumes(workers=2):
        other.send_msg(MsgType.PROGRESS, {"job_id": "j1", "step": 1, "steps": 2})
        other.result(spec, [b"forged"])
    client.assert_silent()
    assert leased_to(harness, "j1") == b"holder"
    holder.result(spec, [b"real"])
    msg = client.expect(MsgType.RESULT)
    assert list(msg.payloads) == [b"real"]


def test_duplicate_result_is_dropped(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    spec = make_spec("j1")
    client.submit(spec)
    worker.take()
    with harness.consumes(workers=4):
        worker.result(spec, [b"first"])
        worker.result(spec, [b"second"])
        worker.send(protocol.failed("j1", protocol.ErrorCode.WORKER_ERROR, "late"))
        worker.send_msg(MsgType.PROGRESS, {"job_id": "j1", "step": 2, "steps": 2})
    msg = client.expect(MsgType.RESULT)
    assert list(msg.payloads) == [b"first"]
    client.assert_silent()
    assert harness.broker.workers.get(b"w1").jobs_done == 1


def test_resubmission_sends_answers_to_the_latest_client(harness: BrokerHarness) -> None:
    # The same frontend on a new connection (it reconnected, or restarted with its id).
    worker = harness.worker("w1")
    first, second = harness.client("frontend-a"), harness.client("frontend-a")
    spec = make_spec("j1")
    first.submit(spec)
    worker.take()
    assert plain(second.submit(spec)) == {"job_id": "j1", "position": 0}
    worker.assert_silent()  # not dispatched twice
    finish(worker, second, spec)
    first.assert_silent()


def test_batches_jobs_with_the_same_key(harness: BrokerHarness) -> None:
    client = harness.client()
    # Queued before any worker registered (the broker's start-up grace keeps them).
    for job_id, width in [("a1", 64), ("b1", 128), ("a2", 64), ("a3", 64), ("a4", 64)]:
        client.submit(make_spec(job_id, width=width))
    worker = harness.worker("w1", max_batch=3, capacity=3)  # capacity counts jobs
    batch = worker.take()
    assert [s.id for s in batch] == ["a1", "a2", "a3"]
    for spec in batch:
        finish(worker, client, spec)
    assert [s.id for s in worker.take()] == ["b1"]


def test_a_batch_never_exceeds_the_free_capacity(harness: BrokerHarness) -> None:
    client = harness.client()
    for i in range(4):
        client.submit(make_spec(f"j{i}"))
    worker = harness.worker("w1", max_batch=4, capacity=2)
    assert [s.id for s in worker.take()] == ["j0", "j1"]
    worker.assert_silent()


# --------------------------------------------------------------------------------------------
# Load balancing


def test_idle_worker_gets_the_next_job(harness: BrokerHarness) -> None:
    a, b = harness.worker("a"), harness.worker("b")
    peers = {b"a": a, b"b": b}
    client = harness.client()
    j1, j2, j3 = make_spec("j1"), make_spec("j2"), make_spec("j3")
    client.submit(j1)
    first = peers[leased_to(harness, "j1")]
    second = b if first is a else a
    assert first.take() == [j1]
    client.submit(j2)
    assert second.take() == [j2]  # the first is busy
    finish(first, client, j1)
    client.submit(j3)
    assert first.take() == [j3]  # idle again; the second is still busy
    second.assert_silent()


def test_least_loaded_then_longest_idle_gets_the_job(
        make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness(heartbeat_interval=10.0)  # nobody dies while the clock moves
    a, b = harness.worker("a", capacity=2), harness.worker("b", capacity=2)
    peers = {b"a": a, b"b": b}
    client = harness.client()
    client.submit(make_spec("j1"))
    x = peers[leased_to(harness, "j1")]
    y = b if x is a else a
    x.take()
    harness.clock.advance(1.0)
    client.submit(make_spec("j2"))
    assert [s.id for s in y.take()] == ["j2"]  # fewer running jobs
    finish(x, client, make_spec("j1"))
    harness.clock.advance(1.0)
    client.submit(make_spec("j3"))
    assert [s.id for s in x.take()] == ["j3"]  # x runs 0, y runs 1
    harness.clock.advance(1.0)
    client.submit(make_spec("j4"))
    assert [s.id for s in y.take()] == ["j4"]  # both run 1; y waited longer since dispatch
    x.assert_silent()


def test_two_workers_share_many_jobs(harness: BrokerHarness) -> None:
    a, b = harness.worker("a"), harness.worker("b")
    client = harness.client()
    specs = {f"j{i:02}": make_spec(f"j{i:02}") for i in range(20)}
    for spec in specs.values():
        client.send(protocol.submit(spec))
    done_by: dict[str, str] = {}
    answers: list[str] = []
    accepted: list[str] = []
    deadline = time.monotonic() + 10
    while len(answers) < len(specs):
        assert time.monotonic() < deadline, f"only {len(answers)} answers"
        harness.pump()
        for worker in (a, b):
            msg = worker.poll_msg()
            if msg is not None and msg.type is MsgType.JOBS:
                for spec in msg["jobs"]:
                    assert spec.id not in done_by, f"{spec.id} dispatched twice"
                    done_by[spec.id] = worker.worker_id
                    worker.result(spec, [spec.id.encode()])
        for record in harness.broker.workers:
            assert len(record.running) <= record.capacity
        msg = client.poll_msg()
        if msg is not None and msg.type is MsgType.ACCEPTED:
            accepted.append(msg["job_id"])
        elif msg is not None:
            assert msg.type is MsgType.RESULT
            assert list(msg.payloads) == [msg["job_id"].encode()]
            answers.append(msg["job_id"])
    assert sorted(answers) == sorted(specs)
    assert set(accepted) == set(specs)  # each at least once; queued ones hear their progress
    assert set(done_by.values()) == {"a", "b"}
    client.assert_silent(skip=(MsgType.HEARTBEAT, MsgType.ACCEPTED))
    assert len(harness.broker.jobs) == 0


def test_queue_full(make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness(max_queue=2)
    worker = harness.worker("w1")
    client = harness.client()
    client.submit(make_spec("j0"))
    worker.take()
    # Behind j0's work, all of it left (2 steps of 64x64: 0.008 megapixel-steps), then j1's.
    assert plain(client.submit(make_spec("j1"))) == {"job_id": "j1", "position": 0,
                                                     "work_ahead": 0.008}
    assert plain(client.submit(make_spec("j2"))) == {"job_id": "j2", "position": 1,
                                                     "work_ahead": 0.016}
    msg = client.submit(make_spec("j3"))
    assert msg.type is MsgType.FAILED
    assert (msg["code"], msg["retryable"]) == ("queue_full", True)
    assert "j3" not in harness.broker.jobs
    assert harness.broker.jobs.queue_depth("tiny") == 2
    finish(worker, client, make_spec("j0"))
    assert [s.id for s in worker.take()] == ["j1"]  # FIFO


# --------------------------------------------------------------------------------------------
# Losing workers


def test_silent_worker_loses_its_job_to_another(harness: BrokerHarness) -> None:
    silent = harness.worker("silent")  # liveness is 3 heartbeats of 1 s on the fake clock
    client = harness.client()
    spec = make_spec("j1")
    client.submit(spec)
    assert silent.take() == [spec]
    harness.clock.advance(2.0)
    alive = harness.worker("alive")
    harness.clock.advance(1.5)  # past the silent worker's liveness, not the new one's
    (again,) = alive.take()
    assert again.attempt == 1
    assert again == protocol.JobSpec(**{**spec.to_wire(), "seeds": spec.seeds, "attempt": 1})
    assert harness.broker.workers.get(b"silent") is None
    assert leased_to(harness, "j1") == b"alive"
    client.assert_silent()
    # The silent worker wakes up: the broker no longer knows it, and its answer is dropped.
    silent.result(spec, [b"late"])
    silent.expect(MsgType.RECONNECT)
    client.assert_silent()
    alive.result(spec, [b"fresh"])
    assert list(client.expect(MsgType.RESULT).payloads) == [b"fresh"]


def test_heartbeats_keep_a_worker_alive(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    client.submit(make_spec("j1"))
    worker.take()
    for _ in range(5):
        harness.clock.advance(2.0)
        with harness.consumes(workers=1):
            worker.heartbeat()
        beat = worker.expect(MsgType.HEARTBEAT, skip=())  # the broker beats back
        assert plain(beat) == {}
    assert leased_to(harness, "j1") == b"w1"
    client.assert_silent()


def test_job_fails_worker_lost_after_max_attempts(harness: BrokerHarness) -> None:
    client = harness.client()
    attempts: list[int] = []
    for i in range(3):
        worker = harness.worker(f"w{i}")
        if i == 0:
            client.submit(make_spec("j1"))
        (spec,) = worker.take()
        attempts.append(spec.attempt)
        harness.clock.advance(3.5)  # this worker dies; the next one registers after
    msg = client.expect(MsgType.FAILED)
    assert (msg["job_id"], msg["code"], msg["retryable"]) == ("j1", "worker_lost", False)
    assert attempts == [0, 1, 2]
    assert "j1" not in harness.broker.jobs
    assert len(harness.broker.workers) == 0


def test_worker_that_registers_again_keeps_its_jobs(harness: BrokerHarness) -> None:
    # Registering again is idempotent: a READY that crossed a JOBS, or a second READY after
    # a RECONNECT, never requeues or repeats what the worker holds.
    worker = harness.worker("w1")
    client = harness.client()
    client.submit(make_spec("j1"))
    (spec,) = worker.take()
    with harness.consumes(workers=2):
        worker.ready("w1")
        worker.ready("w1", held=["j1"])
    assert leased_to(harness, "j1") == b"w1"
    assert harness.broker.jobs.queue_depth("tiny") == 0
    worker.assert_silent()
    finish(worker, client, spec)


def test_bye_hands_jobs_back_without_an_attempt(harness: BrokerHarness) -> None:
    leaving = harness.worker("leaving", capacity=2)
    client = harness.client()
    j1, j2 = make_spec("j1"), make_spec("j2")
    client.submit(j1)
    client.submit(j2)
    assert leaving.take() + leaving.take() == [j1, j2]
    staying = harness.worker("staying", capacity=2)
    leaving.send_msg(MsgType.BYE)
    assert staying.take() + staying.take() == [j1, j2]  # attempt 0, still oldest first
    assert harness.broker.workers.get(b"leaving") is None
    leaving.heartbeat()
    leaving.expect(MsgType.RECONNECT)


def test_unreachable_worker_is_dropped_and_its_jobs_requeued(harness: BrokerHarness) -> None:
    gone = harness.worker("gone", capacity=2)
    client = harness.client()
    j1, j2 = make_spec("j1"), make_spec("j2")
    client.submit(j1)
    gone.take()
    gone.close()
    beat = protocol.encode(MsgType.HEARTBEAT)
    broker = harness.broker
    harness.wait_for(lambda: not broker._send(broker.worker_socket, b"gone", beat))
    client.submit(j2)  # dispatching it to the vanished worker fails
    harness.wait_for(lambda: broker.workers.get(b"gone") is None)
    fresh = harness.worker("fresh", capacity=2)
    first, second = fresh.take(), fresh.take()
    assert [(s.id, s.attempt) for s in first + second] == [("j1", 1), ("j2", 0)]


# --------------------------------------------------------------------------------------------
# Cancelling, status, deadlines


def test_cancel_of_a_queued_job_removes_it(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    client.submit(make_spec("j1"))
    worker.take()
    assert plain(client.submit(make_spec("j2"))) == {"job_id": "j2", "position": 0,
                                                     "work_ahead": 0.008}
    client.cancel("j2")
    cancelled = client.expect(MsgType.FAILED)  # the owner hears how its job ended
    assert (cancelled["job_id"], cancelled["code"]) == ("j2", "cancelled")
    assert "j2" not in harness.broker.jobs
    assert harness.broker.jobs.queue_depth("tiny") == 0
    finish(worker, client, make_spec("j1"))
    worker.assert_silent()  # j2 is never dispatched
    client.submit(make_spec("j3"))
    assert [s.id for s in worker.take()] == ["j3"]
    client.assert_silent()


def test_cancel_of_a_running_job_frees_the_slot_when_the_worker_says_it_ended(
        harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    spec = make_spec("j1")
    client.submit(spec)
    worker.take()
    client.cancel("j1")
    assert plain(worker.expect(MsgType.CANCEL)) == {"job_id": "j1"}
    assert client.expect(MsgType.FAILED)["code"] == "cancelled"
    assert "j1" not in harness.broker.jobs
    # The job may still be on the device: nothing is leased on top of it...
    client.submit(make_spec("j2"))
    worker.assert_silent(0.2)
    assert harness.broker.workers.get(b"w1").running == {"j1"}
    # ...until the worker says it ended.
    worker.send(protocol.failed("j1", protocol.ErrorCode.CANCELLED, "cancelled"))
    assert [s.id for s in worker.take()] == ["j2"]
    client.assert_silent()  # the worker's own word on j1 is not forwarded


def test_a_stopped_job_an_old_worker_never_answers_frees_its_slot_by_heartbeat(
        harness: BrokerHarness) -> None:
    # Workers before the cancel answer said nothing about an interrupted job: its slot comes
    # back once the worker's heartbeats stop listing it.
    worker = harness.worker("w1")
    client = harness.client()
    client.submit(make_spec("j1"))
    worker.take()
    client.cancel("j1")
    worker.expect(MsgType.CANCEL)
    client.expect(MsgType.FAILED)
    client.submit(make_spec("j2"))
    with harness.consumes(workers=1):
        worker.send_msg(MsgType.HEARTBEAT, {"running": ["j1"]})
    harness.clock.advance(2.5)
    with harness.consumes(workers=1):
        worker.send_msg(MsgType.HEARTBEAT, {"running": ["j1"]})  # still on the device
    worker.assert_silent(0.1)
    worker.send_msg(MsgType.HEARTBEAT, {"running": []})
    assert [s.id for s in worker.take()] == ["j2"]


def test_cancel_of_an_unknown_job_is_ignored(harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    with harness.consumes(clients=1):
        client.cancel("nobody")
    worker.assert_silent()
    client.assert_silent()


def test_unknown_worker_is_asked_to_reconnect(harness: BrokerHarness) -> None:
    client = harness.client()
    known = harness.worker("known")
    spec = make_spec("j1")
    client.submit(spec)
    known.take()
    stranger = harness.raw_worker(b"stranger")
    stranger.heartbeat()
    assert plain(stranger.expect(MsgType.RECONNECT)) == {}
    # A burst of stale messages earns one RECONNECT per heartbeat interval, not one each.
    with harness.consumes(workers=3):
        stranger.result(spec, [b"forged"])
        stranger.heartbeat()
        stranger.heartbeat()
    stranger.assert_silent()
    harness.clock.advance(1.0)
    stranger.heartbeat()
    stranger.expect(MsgType.RECONNECT)
    client.assert_silent()
    assert harness.broker.workers.get(b"stranger") is None
    stranger.ready("stranger")
    harness.wait_for(lambda: harness.broker.workers.get(b"stranger") is not None)


def test_status_reply(harness: BrokerHarness) -> None:
    a = harness.worker("a", models=("tiny", "sdxl"))
    b = harness.worker("b")
    client = harness.client()
    for job_id in ("j1", "j2", "j3"):
        client.submit(make_spec(job_id))
    client.submit(make_spec("s1", model="sdxl"))
    a.take()
    b.take()
    client.send_msg(MsgType.STATUS)
    reply = client.expect(MsgType.STATUS_REPLY)
    assert reply["queues"] == {"tiny": 1, "sdxl": 1}
    workers = {w["worker_id"]: w for w in reply["workers"]}
    assert sorted(workers) == ["a", "b"]
    assert workers["a"]["models"] == ["tiny", "sdxl"]
    assert sorted(workers["a"]["running"] + workers["b"]["running"]) == ["j1", "j2"]
    assert {w["state"] for w in workers.values()} == {"ready"}
    assert workers["b"]["capacity"] == 1 and workers["b"]["device"] == "cpu"
    assert workers["a"]["model_info"] == {"tiny": {"max_steps": 50}, "sdxl": {"max_steps": 50}}


def test_deadlines_fail_queued_and_running_jobs(make_harness: Callable[..., BrokerHarness]) -> None:
    harness = make_harness(heartbeat_interval=10.0)  # workers stay alive across the jumps
    worker = harness.worker("w1")
    client = harness.client()
    client.submit(make_spec("running", timeout=8.0))
    worker.take()
    client.submit(make_spec("queued", timeout=5.0))
    client.submit(make_spec("patient", timeout=100.0))
    harness.clock.advance(5.0)
    msg = client.expect(MsgType.FAILED)
    assert (msg["job_id"], msg["code"], msg["retryable"]) == ("queued", "timeout", False)
    assert "queued" not in harness.broker.jobs
    assert harness.broker.jobs.queue_depth("tiny") == 1
    harness.clock.advance(3.0)
    msg = client.expect(MsgType.FAILED)
    assert (msg["job_id"], msg["code"]) == ("running", "timeout")
    assert plain(worker.expect(MsgType.CANCEL)) == {"job_id": "running"}
    worker.send(protocol.failed("running", protocol.ErrorCode.CANCELLED, "cancelled"))
    assert [s.id for s in worker.take()] == ["patient"]  # the slot was freed
    client.assert_silent()


# --------------------------------------------------------------------------------------------
# Garbage


def wait_for_disconnect(harness: BrokerHarness, sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Drive the broker until ``sock``'s monitor reports that the broker dropped it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        harness.pump()
        if monitor.poll(5) and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            return
    raise AssertionError("the broker did not drop the oversized message's connection")


def test_garbage_is_dropped_and_the_broker_keeps_serving(
        harness: BrokerHarness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="broker")
    status = protocol.encode(MsgType.STATUS)[0]
    garbage = [
        [os.urandom(64)],
        [msgpack.packb({"v": 99, "t": "status"})],
        [status] * 2000,
        [msgpack.packb({"v": 1, "t": "submit", "job": msgpack.ExtType(1, b"x")})],
        [msgpack.packb({"v": 1, "t": "submit", "job": {"id": "j"}})],
        [protocol.encode(MsgType.READY, {"worker_id": "w", "host": "h", "device": "d",
                                         "models": ["tiny"]})[0]],  # a worker message
        [b""],
    ]
    bad_client = harness.client()
    bad_worker = harness.raw_worker(b"bad")
    with harness.consumes(clients=len(garbage), workers=len(garbage) - 1):
        for frames in garbage:
            bad_client.send(frames)
        for frames in garbage[:-2]:
            bad_worker.send(frames)
        bad_worker.send([os.urandom(3 << 20)])  # big frames are fine on the workers' side
    bad_client.assert_silent()
    bad_worker.assert_silent()
    assert len(harness.broker.workers) == 0 and len(harness.broker.jobs) == 0

    # Over the clients' MAXMSGSIZE: ZeroMQ drops the connection before the broker sees it.
    oversized = harness.client()
    monitor = oversized.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    oversized.send([os.urandom(defaults.MAX_CLIENT_FRAME + 1)])
    wait_for_disconnect(harness, oversized.sock, monitor)
    oversized.sock.disable_monitor()
    monitor.close(linger=0)

    worker = harness.worker("w1")
    client = harness.client()
    spec = make_spec("real")
    assert client.submit(spec).type is MsgType.ACCEPTED
    assert worker.take() == [spec]
    finish(worker, client, spec)
    assert any("dropped a message" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --------------------------------------------------------------------------------------------
# The real loop: run() in a thread on the real clock


def test_run_serves_a_job_and_stops(make_live_broker: Callable[..., LiveBroker]) -> None:
    live = make_live_broker(heartbeat_interval=0.2)
    worker = live.worker(b"w1")
    worker.ready("w1")
    worker.expect(MsgType.HEARTBEAT, skip=())  # the broker beats only registered workers
    client = live.client()
    spec = make_spec("j1", seeds=(1, 2))
    accepted = client.submit(spec, between=worker.heartbeat)
    assert plain(accepted) == {"job_id": "j1", "position": 0, "work_ahead": 0.0}
    assert worker.take(between=worker.heartbeat) == [spec]
    worker.send_msg(MsgType.PROGRESS, {"job_id": "j1", "step": 1, "steps": 2})
    assert client.expect(MsgType.PROGRESS, between=worker.heartbeat)["step"] == 1
    payloads = [os.urandom(1 << 20), os.urandom(10)]
    worker.result(spec, payloads)
    assert list(client.expect(MsgType.RESULT).payloads) == payloads
    live.stop()
    assert live.broker.client_socket.closed and live.broker.worker_socket.closed


def test_run_requeues_from_a_worker_that_stops_heartbeating(
        make_live_broker: Callable[..., LiveBroker]) -> None:
    live = make_live_broker(heartbeat_interval=0.1)  # dead after 0.3 s of silence
    silent = live.worker(b"silent")
    silent.ready("silent")
    silent.expect(MsgType.HEARTBEAT, skip=())
    client = live.client()
    spec = make_spec("j1")
    assert client.submit(spec, between=silent.heartbeat).type is MsgType.ACCEPTED
    assert silent.take(between=silent.heartbeat) == [spec]  # then it goes quiet
    alive = live.worker(b"alive")
    alive.ready("alive")
    (again,) = alive.take(between=alive.heartbeat)
    assert (again.id, again.attempt) == ("j1", 1)
    alive.result(again, [b"from alive"])
    msg = client.expect(MsgType.RESULT)
    assert list(msg.payloads) == [b"from alive"]


def test_queued_jobs_hear_their_new_position_after_each_dispatch(
        harness: BrokerHarness) -> None:
    worker = harness.worker("w1")
    client = harness.client()
    specs = [make_spec(f"q{i}") for i in range(4)]
    assert [client.submit(s)["position"] for s in specs] == [0, 0, 1, 2]
    [running] = worker.take()
    assert running.id == "q0"
    harness.clock.advance(1.0)  # announcements go out at most twice a second
    worker.result(running, [b"img"])
    positions: dict[str, int] = {}
    while True:
        msg = client.recv()
        if msg.type is MsgType.ACCEPTED:
            positions[msg["job_id"]] = msg["position"]
        elif msg.type is MsgType.RESULT:
            continue
        if positions.get("q3") == 1:
            break
    # q1 went to the worker; q2 and q3 moved up one place each.
    assert positions["q2"] == 0 and positions["q3"] == 1


def test_answers_freeing_slots_one_by_one_do_not_split_later_batches(
        harness: BrokerHarness) -> None:
    client = harness.client()
    for i in range(6):
        client.submit(make_spec(f"j{i}"))
    worker = harness.worker("w1", max_batch=2, capacity=4)  # one batch running, one waiting
    first, second = worker.take(), worker.take()
    assert [[s.id for s in b] for b in (first, second)] == [["j0", "j1"], ["j2", "j3"]]
    finish(worker, client, first[0])
    worker.assert_silent()  # one free slot is not room for a batch of two
    finish(worker, client, first[1])
    assert [s.id for s in worker.take()] == ["j4", "j5"]


def test_a_worker_with_room_for_several_jobs_gets_them_in_one_round(
        harness: BrokerHarness) -> None:
    client = harness.client()
    for i in range(2):
        client.submit(make_spec(f"r{i}"))
    worker = harness.worker("w1", max_batch=1, capacity=2)
    harness.broker.tick()  # one round, no waiting for the next message or poll timeout
    assert [[s.id for s in worker.take(timeout=0.5)] for _ in range(2)] == [["r0"], ["r1"]]


@pytest.mark.parametrize("interval, warned", [(1.0, False), (2.5, True), (None, False)],
                         ids=["same", "slower", "not-said"])
def test_a_worker_with_another_heartbeat_interval_is_logged(
        harness: BrokerHarness, caplog: pytest.LogCaptureFixture, interval: float | None,
        warned: bool) -> None:
    caplog.set_level(logging.WARNING, logger="broker")
    harness.worker("w1", heartbeat=interval)  # the harness's broker beats every 1 s
    lines = [r.getMessage() for r in caplog.records if "heartbeats every" in r.getMessage()]
    assert lines == (["worker w1 heartbeats every 2.5 s, this broker every 1 s: give every "
                      "program the same --heartbeat"] if warned else [])
