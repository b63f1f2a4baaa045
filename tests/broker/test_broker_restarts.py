"""The broker across restarts: its incarnation, workers that register again, the grace."""

from __future__ import annotations

import pytest

from broker import protocol
from broker.jobs import JobState
from broker.protocol import MsgType
from tests.broker.fakes import BrokerHarness, make_spec, plain

pytestmark = pytest.mark.timeout(30)

STARTUP_GRACE = 6.0  # 2 x liveness at the default heartbeat


def test_every_message_the_broker_makes_names_its_incarnation(harness: BrokerHarness) -> None:
    incarnation = harness.broker.incarnation
    worker = harness.worker("w1")
    client = harness.client()
    assert client.submit(make_spec("j1"))["incarnation"] == incarnation
    assert worker.expect(MsgType.JOBS)["incarnation"] == incarnation
    client.send_msg(MsgType.STATUS)
    assert client.expect(MsgType.STATUS_REPLY)["incarnation"] == incarnation
    client.cancel("j1")
    assert worker.expect(MsgType.CANCEL)["incarnation"] == incarnation
    assert client.expect(MsgType.FAILED)["incarnation"] == incarnation
    harness.clock.advance(1.0)
    assert worker.recv(skip=())["incarnation"] == incarnation  # a heartbeat
    stranger = harness.raw_worker(b"stranger")
    stranger.heartbeat()
    assert stranger.expect(MsgType.RECONNECT)["incarnation"] == incarnation


def test_two_brokers_have_different_incarnations(make_harness) -> None:
    assert make_harness().broker.incarnation != make_harness().broker.incarnation


def test_a_worker_registering_with_a_job_the_frontend_resubmits_keeps_it(
        harness: BrokerHarness) -> None:
    # A new broker: the worker (running j1 across the restart) registers first, then the
    # frontend resubmits j1. It must not run twice.
    worker = harness.raw_worker(b"w1")
    worker.ready("w1", capacity=2, held=["j1"])
    harness.wait_for(lambda: harness.broker.workers.get(b"w1") is not None)
    client = harness.client("frontend-a")
    assert client.submit(make_spec("j1"))["position"] == 0
    job = harness.broker.jobs.get("j1")
    assert (job.state, job.worker) == (JobState.RUNNING, b"w1")
    worker.assert_silent()  # not sent to it again
    worker.result(make_spec("j1"))
    assert client.expect(MsgType.RESULT)["job_id"] == "j1"


def test_a_frontend_resubmitting_before_the_worker_registers_gives_it_back_its_job(
        harness: BrokerHarness) -> None:
    client = harness.client("frontend-a")
    client.submit(make_spec("j1"))  # queued: nobody serves tiny yet (start-up grace)
    client.submit(make_spec("j2"))
    worker = harness.raw_worker(b"w1")
    worker.ready("w1", capacity=2, held=["j1"])
    # j1 is its lease at once; only j2 is sent.
    assert [s.id for s in worker.take()] == ["j2"]
    assert harness.broker.jobs.get("j1").worker == b"w1"
    assert harness.broker.jobs.queue_depth("tiny") == 0


def test_a_held_job_leased_to_another_worker_moves_to_the_worker_that_held_it(
        harness: BrokerHarness) -> None:
    # A new broker leased j1 to a worker that registered first; the worker that ran j1
    # across the restart registers after. j1 stays with it; the other is told to stop.
    client = harness.client("frontend-a")
    client.submit(make_spec("j1"))  # queued in the start-up grace
    early = harness.worker("early")
    early.take()
    holder = harness.worker("holder", held=["j1"])
    assert harness.broker.jobs.get("j1").worker == holder.identity
    assert plain(early.expect(MsgType.CANCEL)) == {"job_id": "j1"}
    # The early worker's slot comes back when it says it stopped; its answer is dropped.
    early_record = harness.broker.workers.get(early.identity)
    assert early_record.running == {"j1"}
    early.send(protocol.failed("j1", protocol.ErrorCode.CANCELLED, "cancelled"))
    harness.wait_for(lambda: not early_record.running)
    holder.result(make_spec("j1"))
    assert client.expect(MsgType.RESULT)["job_id"] == "j1"
    client.assert_silent(skip=(MsgType.ACCEPTED, MsgType.HEARTBEAT))


def test_a_worker_process_restarted_under_the_same_id_loses_its_jobs(
        harness: BrokerHarness) -> None:
    # PID 1 in a container: the restarted process has the same worker_id, a new session.
    worker = harness.raw_worker(b"first-socket")
    worker.send_msg(MsgType.READY, {"worker_id": "w1", "host": "h", "device": "cpu",
                                    "models": ["tiny"], "session": "one"})
    harness.wait_for(lambda: harness.broker.workers.get(b"first-socket") is not None)
    client = harness.client()
    client.submit(make_spec("crasher"))
    worker.take()
    again = harness.raw_worker(b"second-socket")
    again.send_msg(MsgType.READY, {"worker_id": "w1", "host": "h", "device": "cpu",
                                   "models": ["tiny"], "session": "two", "held": []})
    (spec,) = again.take()
    assert (spec.id, spec.attempt) == ("crasher", 1)  # counted: it may be what killed it


def test_a_worker_on_a_new_connection_keeps_what_it_lists_and_hands_back_the_rest(
        harness: BrokerHarness) -> None:
    old = harness.worker("w1", capacity=2)
    client = harness.client()
    client.submit(make_spec("j1"))
    client.submit(make_spec("j2"))
    assert [s.id for s in old.take() + old.take()] == ["j1", "j2"]
    # Same worker process (same worker_id and session), new socket: it still runs j1, it
    # never got j2.
    new = harness.raw_worker(b"w1-again")
    new.ready("w1", capacity=2, held=["j1"])
    harness.wait_for(lambda: harness.broker.workers.get(b"w1-again") is not None)
    assert harness.broker.workers.get(b"w1") is None
    assert harness.broker.jobs.get("j1").worker == b"w1-again"
    (again,) = new.take()
    assert (again.id, again.attempt) == ("j2", 0)  # handed back, not counted as a loss


def test_a_claim_for_a_job_that_never_comes_frees_the_slot_with_its_answer(
        harness: BrokerHarness) -> None:
    worker = harness.raw_worker(b"w1")
    worker.ready("w1", capacity=2, max_batch=1, held=["gone", "gone-too"])
    harness.wait_for(lambda: harness.broker.workers.get(b"w1") is not None)
    client = harness.client()
    client.submit(make_spec("j1"))
    worker.assert_silent()  # both slots are taken by what it holds
    worker.result(make_spec("gone"))  # nobody waits for it
    assert [s.id for s in worker.take()] == ["j1"]
    client.assert_silent(skip=(MsgType.ACCEPTED, MsgType.HEARTBEAT))  # no answer for "gone"


def test_claims_are_capped_at_the_worker_capacity(harness: BrokerHarness) -> None:
    worker = harness.raw_worker(b"w1")
    worker.ready("w1", capacity=2, max_batch=1, held=[f"j{i}" for i in range(50)])
    harness.wait_for(lambda: harness.broker.workers.get(b"w1") is not None)
    assert len(harness.broker.workers.get(b"w1").running) == 2


def test_when_the_grace_ends_jobs_for_models_nobody_announced_fail_at_once(
        harness: BrokerHarness) -> None:
    client = harness.client()
    client.submit(make_spec("ghost", model="nobody-serves-this", timeout=300.0))
    client.submit(make_spec("j1"))
    worker = harness.worker("w1")  # tiny comes back; the other model never does
    assert [s.id for s in worker.take()] == ["j1"]
    client.assert_silent(skip=(MsgType.ACCEPTED, MsgType.HEARTBEAT))
    harness.clock.advance(STARTUP_GRACE)
    worker.heartbeat()
    msg = client.expect(MsgType.FAILED)
    assert (msg["job_id"], msg["code"], msg["retryable"]) == ("ghost", "no_worker", True)
    assert "ghost" not in harness.broker.jobs


def test_a_burst_after_a_restart_gets_one_reconnect_and_one_registration(
        harness: BrokerHarness) -> None:
    worker = harness.raw_worker(b"w1")
    with harness.consumes(workers=40):
        for _ in range(20):
            worker.heartbeat()
            worker.send_msg(MsgType.PROGRESS, {"job_id": "old", "step": 1, "steps": 2})
    assert worker.expect(MsgType.RECONNECT)
    worker.assert_silent()
    worker.ready("w1")
    worker.ready("w1")  # a second READY for the same restart changes nothing
    harness.wait_for(lambda: harness.broker.workers.get(b"w1") is not None)
    assert len(harness.broker.workers) == 1
    assert protocol.MsgType.RECONNECT not in {m.type for m in _drain(worker)}


def _drain(worker) -> list:
    found = []
    while (msg := worker.poll_msg()) is not None:
        found.append(msg)
    return found
