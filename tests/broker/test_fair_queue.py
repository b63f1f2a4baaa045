"""Fair sharing of a model's queue between identities (broker/fair_queue.py through JobTable):
who gets dispatched next, in what order, and what the queue says its order is."""

from __future__ import annotations

from collections import Counter
from typing import Any

from broker import protocol
from broker.jobs import Job, JobTable
from tests.broker.fakes import BrokerHarness, make_spec
from tests.broker.test_queue_positions import Heard, busy_worker

W1, W2 = b"worker-1", b"worker-2"
CLIENT = b"client"


def job(job_id: str, tenant: str | None, *, weight: float = 1.0, deadline: float = 1000.0,
        **spec: Any) -> Job:
    return Job(spec=make_spec(job_id, tenant=tenant, weight=weight, **spec), client=CLIENT,
               deadline=deadline)


def table() -> JobTable:
    return JobTable(max_queue=10_000, max_attempts=3)


def queue(t: JobTable, tenant: str | None, count: int, *, weight: float = 1.0,
          **spec: Any) -> list[int]:
    """Queue ``count`` jobs named ``{tenant}{i}``; the positions ``add`` answered."""
    return [t.add(job(f"{tenant}{i}", tenant, weight=weight, **spec)) for i in range(count)]


def dispatch(t: JobTable, count: int, *, max_batch: int = 1) -> list[str]:
    """The ids of the next ``count`` batches' jobs, one batch at a time."""
    taken: list[str] = []
    for _ in range(count):
        taken += [j.id for j in t.take_batch("tiny", W1, max_batch)]
    return taken


def test_a_late_identity_is_served_before_the_flooders_fourth_job() -> None:
    t = table()
    queue(t, "A", 20)
    queue(t, "B", 2)
    order = dispatch(t, 22)
    assert order[:5] == ["A0", "B0", "A1", "B1", "A2"]
    assert order.index("B1") < order.index("A3")
    assert order[5:] == [f"A{i}" for i in range(3, 20)]


def test_a_new_identity_hears_its_fair_place_not_the_end_of_the_line() -> None:
    t = table()
    assert queue(t, "A", 20) == list(range(20))
    assert queue(t, "B", 2) == [1, 3]  # after A0, and after A1


def test_equal_weights_alternate_with_one_job_each_in_between() -> None:
    t = table()
    queue(t, "A", 30)
    queue(t, "B", 1)
    queue(t, "C", 1)
    assert dispatch(t, 5) == ["A0", "B0", "C0", "A1", "A2"]


def test_weights_three_to_one_share_three_to_one_over_a_long_run() -> None:
    for served in (40, 100, 200, 400):
        t2 = table()
        queue(t2, "heavy", 400, weight=3.0)
        queue(t2, "light", 400, weight=1.0)
        counts = Counter(name.rstrip("0123456789") for name in dispatch(t2, served))
        assert abs(counts["heavy"] - 3 * counts["light"]) <= 3, (served, counts)
        assert abs(counts["heavy"] - served * 3 / 4) <= 1, (served, counts)


def test_shares_are_of_work_so_bigger_jobs_cost_more() -> None:
    t = table()
    queue(t, "big", 10, width=128, height=128)  # four times the work of a 64x64 job
    queue(t, "small", 40)
    counts = Counter(name.rstrip("0123456789") for name in dispatch(t, 25))
    assert (counts["big"], counts["small"]) == (5, 20)


def test_fifo_within_an_identity() -> None:
    t = table()
    for i in range(10):
        t.add(job(f"A{i}", "A"))
        t.add(job(f"B{i}", "B"))
    order = dispatch(t, 20)
    for tenant in "AB":
        assert [x for x in order if x[0] == tenant] == [f"{tenant}{i}" for i in range(10)]


def test_jobs_without_an_identity_share_one_anonymous_identity() -> None:
    t = table()
    queue(t, None, 5)  # an old frontend's jobs: no tenant, weight 1
    queue(t, "B", 2)
    assert dispatch(t, 5) == ["None0", "B0", "None1", "B1", "None2"]


def test_a_requeued_job_goes_to_the_head_of_its_identity() -> None:
    t = table()
    queue(t, "A", 3)
    queue(t, "B", 3)
    (a0,) = t.take_batch("tiny", W1, 1)
    (b0,) = t.take_batch("tiny", W1, 1)
    assert t.requeue(a0)
    # A's charge for A0 is refunded: A0 is next, and A stands where it stood before A0
    # left (its pass even with B's; the tie goes to the older job).
    assert [j.id for j in t.head("tiny", 6)] == ["A0", "A1", "B1", "A2", "B2"]
    assert dispatch(t, 5) == ["A0", "A1", "B1", "A2", "B2"]
    assert b0.state.value == "running"


def test_a_handed_back_batch_goes_back_in_its_order() -> None:
    t = table()
    queue(t, "A", 2)
    queue(t, "B", 2)
    batch = t.take_batch("tiny", W1, 4)
    assert [j.id for j in batch] == ["A0", "B0", "A1", "B1"]
    for taken in reversed(batch):
        t.hand_back(taken)
    assert t.queue_depth("tiny") == 4
    assert [j.id for j in t.head("tiny", 10)] == ["A0", "B0", "A1", "B1"]
    assert dispatch(t, 1, max_batch=4) == ["A0", "B0", "A1", "B1"]


def test_cancelled_and_expired_jobs_are_skipped() -> None:
    t = table()
    t.add(job("A0", "A", deadline=5.0))
    t.add(job("A1", "A"))
    t.add(job("B0", "B"))
    t.add(job("B1", "B"))
    t.add(job("C0", "C", deadline=5.0))
    t.finish("B0")  # cancelled
    assert [j.id for j in t.expired(10.0)] == ["A0", "C0"]
    assert t.queue_depth("tiny") == 2
    assert [j.id for j in t.head("tiny", 10)] == ["A1", "B1"]
    assert dispatch(t, 3) == ["A1", "B1"]
    assert t.queue_depth("tiny") == 0


def test_head_is_the_order_of_dispatch() -> None:
    t = table()
    queue(t, "A", 12, weight=2.0)
    queue(t, "B", 5)
    queue(t, "C", 7, weight=0.5)
    queue(t, "D", 3, width=128)
    t.finish("A3")
    t.finish("C0")
    predicted = [j.id for j in t.head("tiny", 100)]
    assert len(predicted) == t.queue_depth("tiny") == 25
    assert dispatch(t, 25) == predicted


def test_head_limit_with_many_identities() -> None:
    t = table()
    for i in range(500):
        t.add(job(f"u{i}-0", f"u{i}"))
        t.add(job(f"u{i}-1", f"u{i}"))
    assert [j.id for j in t.head("tiny", 3)] == ["u0-0", "u1-0", "u2-0"]
    assert dispatch(t, 501)[-2:] == ["u499-0", "u0-1"]


def test_batch_mates_come_from_any_identity_and_are_charged() -> None:
    t = table()
    queue(t, "A", 4)
    queue(t, "B", 4)
    queue(t, "C", 4, steps=3)  # another batch key
    assert dispatch(t, 1, max_batch=3) == ["A0", "B0", "A1"]
    # C was not served: it goes next; A paid for two jobs, B for one.
    assert [j.id for j in t.head("tiny", 4)] == ["C0", "B1", "C1", "A2"]


def test_a_job_that_failed_on_a_worker_waits_for_another_in_its_place() -> None:
    t = table()
    queue(t, "A", 2)
    queue(t, "B", 1)
    (a0,) = t.take_batch("tiny", W1, 1)
    a0.failed_on = W1
    t.hand_back(a0)
    assert dispatch(t, 1) == ["B0"]  # W1 skips A0 but keeps the fair order otherwise
    assert [j.id for j in t.take_batch("tiny", W2, 1)] == ["A0"]


def test_a_worker_without_the_adapter_gets_the_next_fair_job_it_can_run() -> None:
    t = table()
    t.add(job("A0", "A", loras=(("style", 1.0),)))
    t.add(job("A1", "A"))
    t.add(job("B0", "B"))
    taken = t.take_batch("tiny", W1, 1, runnable=lambda spec: not spec.loras)
    assert [j.id for j in taken] == ["B0"]
    assert [j.id for j in t.head("tiny", 5)] == ["A0", "A1"]


def test_drop_queue_forgets_every_identity() -> None:
    t = table()
    queue(t, "A", 3)
    queue(t, "B", 2)
    assert [j.id for j in t.drop_queue("tiny")] == ["A0", "A1", "A2", "B0", "B1"]
    assert t.queue_depth("tiny") == 0 and t.head("tiny", 5) == []
    queue(t, "B", 1)
    assert dispatch(t, 2) == ["B0"]


def test_an_identity_that_went_idle_earns_no_credit() -> None:
    t = table()
    queue(t, "A", 1)
    dispatch(t, 1)
    queue(t, "B", 10)
    dispatch(t, 8)  # A had nothing queued meanwhile
    for i in range(3):
        t.add(job(f"A-back{i}", "A"))
    # A starts at the virtual time now (the pass of the job last served, B7's): it
    # alternates with B, no burst of three.
    assert dispatch(t, 4) == ["A-back0", "B8", "A-back1", "B9"]


def test_an_identity_whose_jobs_left_at_once_still_pays_for_them() -> None:
    t = table()
    for i in range(3):  # each dispatched as soon as it came: A never had a queue
        t.add(job(f"A{i}", "A"))
        dispatch(t, 1)
    queue(t, "B", 4)
    t.add(job("A-late", "A"))
    # A's last job started at the virtual time B starts at now: A owes for it, so its next
    # comes after B's first two. (Forgetting it would put A-late right after B0.)
    assert dispatch(t, 5) == ["B0", "B1", "A-late", "B2", "B3"]


def test_the_broker_tells_fair_positions_and_a_resubmission_counts_once(
        harness: BrokerHarness) -> None:
    worker = busy_worker(harness)
    heard = Heard(harness, harness.client())
    flood = [make_spec(f"a{i}", tenant="alice") for i in range(6)]
    late = [make_spec(f"b{i}", tenant="bob") for i in range(2)]
    heard.submit(*flood)
    assert [s.id for s in worker.take()] == ["a0"]
    assert [s.id for s in worker.take()] == ["a1"]  # held, waiting behind a0
    # a1 waits at the worker (place 0); bob's first is next after it, his second one later.
    assert heard.submit(*late) == [1, 3]
    # The frontend sends it again (it saw a new broker, or reconnected): the same job.
    assert heard.submit(late[0]) == [1]
    assert harness.broker.jobs.queue_depth("tiny") == 6
    assert [j.id for j in harness.broker.jobs.head("tiny", 10)] == [
        "b0", "a2", "b1", "a3", "a4", "a5"]
    worker.result(flood[0])
    assert [s.id for s in worker.take()] == ["b0"]


def test_each_identitys_load_is_listed_busiest_first_and_bounded() -> None:
    """What STATUS_REPLY carries for /v1/cluster and the metrics: names, counts by state."""
    table = JobTable(max_queue=100, max_attempts=3)
    for index in range(3):
        table.add(Job(spec=make_spec(f"a{index}", tenant="alice"), client=b"c", deadline=1e9))
    table.add(Job(spec=make_spec("b0", tenant="bob"), client=b"c", deadline=1e9))
    table.add(Job(spec=make_spec("n0"), client=b"c", deadline=1e9))
    table.take_batch("tiny", b"w", 1)  # one of them runs
    load = table.load_by_identity(limit=10)
    assert sum(line["running"] for line in load) == 1
    assert load[0]["identity"] == "alice" and load[0]["queued"] + load[0]["running"] == 3
    assert {line["identity"] for line in load} == {"alice", "bob", ""}
    assert len(table.load_by_identity(limit=2)) == 2
    reply = protocol.encode(protocol.MsgType.STATUS_REPLY,
                            {"workers": [], "queues": {}, "identities": load})
    decoded = protocol.decode(reply)["identities"]
    assert [(line.identity, line.queued + line.running) for line in decoded] == \
        [(line["identity"], line["queued"] + line["running"]) for line in load]
