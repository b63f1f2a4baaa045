"""WATCH: another frontend follows a job (the jobs API on a shared database). The broker relays
the job's place in line and its progress there too, never its outcome, which only the job's
own frontend gets (it settles the shared record)."""

from __future__ import annotations

from broker import protocol
from broker.broker import MAX_WATCHERS
from broker.protocol import MsgType
from tests.broker.fakes import BrokerHarness, make_spec


def progress(spec_id: str, step: int, payloads: list[bytes] | None = None) -> list:
    fields = {"job_id": spec_id, "step": step, "steps": 4}
    if payloads:
        fields |= {"image_index": 0, "preview_format": "png"}
    return protocol.encode(MsgType.PROGRESS, fields, payloads or [])


def test_a_watcher_hears_the_place_and_progress_but_not_the_outcome(
        harness: BrokerHarness) -> None:
    worker = harness.worker(capacity=1)
    owner, watcher = harness.client("web-a"), harness.client("web-b")
    running, waiting = make_spec("running"), make_spec("waiting")
    owner.submit(running)
    [leased] = worker.take()
    owner.submit(waiting)
    watcher.send_msg(MsgType.WATCH, {"job_id": "waiting"})
    told = watcher.expect(MsgType.ACCEPTED)
    assert (told["job_id"], told["position"]) == ("waiting", 0)

    with harness.consumes(clients=1):
        watcher.send_msg(MsgType.WATCH, {"job_id": "running"})
    worker.send(progress("running", 1))
    worker.send(progress("running", 2, [b"preview-bytes"]))
    for who in (owner, watcher):
        first = who.expect(MsgType.PROGRESS)
        second = who.expect(MsgType.PROGRESS)
        assert (first["step"], second["step"]) == (1, 2)
        assert bytes(second.payloads[0]) == b"preview-bytes"

    worker.result(leased)
    assert owner.expect(MsgType.RESULT)["job_id"] == "running"
    watcher.assert_silent(0.2)  # the outcome is the owner's to settle


def test_watching_a_job_the_broker_does_not_have_is_ignored(harness: BrokerHarness) -> None:
    watcher = harness.client("web-b")
    with harness.consumes(clients=1):
        watcher.send_msg(MsgType.WATCH, {"job_id": "not-here"})
    watcher.assert_silent(0.2)
    assert watcher.submit(make_spec("its-own")).type is MsgType.ACCEPTED  # served as before


def test_the_owner_watching_its_own_job_is_not_told_twice(harness: BrokerHarness) -> None:
    worker = harness.worker(capacity=1)
    owner = harness.client("web-a")
    owner.submit(make_spec("mine"))
    worker.take()
    with harness.consumes(clients=1):
        owner.send_msg(MsgType.WATCH, {"job_id": "mine"})
    worker.send(progress("mine", 1))
    assert owner.expect(MsgType.PROGRESS)["step"] == 1
    owner.assert_silent(0.2)
    assert harness.broker.jobs.get("mine").watchers == []


def test_watchers_are_bounded_and_a_gone_one_is_forgotten(harness: BrokerHarness) -> None:
    worker = harness.worker(capacity=1)
    owner = harness.client("web-a")
    spec = make_spec("popular")
    owner.submit(spec)
    worker.take()
    watchers = [harness.client(f"w{i}") for i in range(MAX_WATCHERS + 2)]
    with harness.consumes(clients=len(watchers)):
        for watcher in watchers:
            watcher.send_msg(MsgType.WATCH, {"job_id": "popular"})
    job = harness.broker.jobs.get("popular")
    assert len(job.watchers) == MAX_WATCHERS
    watchers[-1].close()  # its connection is gone: the next relay forgets it
    harness.wait_for(lambda: _relay_once(harness, worker) and len(job.watchers) < MAX_WATCHERS)
    assert watchers[-2].expect(MsgType.PROGRESS)["job_id"] == "popular"


def _relay_once(harness: BrokerHarness, worker) -> bool:
    worker.send(progress("popular", 1))
    with harness.consumes(workers=1):
        pass
    return True
