"""Priority classes and running limits in a model's queue (broker/fair_queue.py through
JobTable): a higher class first, a lower one still its minimum share, identities at their
running limit passed over without losing their place."""

from __future__ import annotations

from collections import Counter

from broker.fair_queue import LOWER_CLASS_EVERY
from broker.jobs import JobTable
from tests.broker.fakes import BrokerHarness, make_spec
from tests.broker.test_fair_queue import W1, dispatch, job, queue, table
from tests.broker.test_queue_positions import Heard, busy_worker

BATCH = {"priority": "batch"}


def who(order: list[str]) -> str:
    """One letter per dispatched job: its identity's."""
    return "".join(name[0] for name in order)


def blocking_table(blocked: set[str]) -> JobTable:
    """A table whose ``blocked`` says whether an identity is in ``blocked`` (changed by tests)."""
    return JobTable(max_queue=10_000, max_attempts=3, blocked=blocked.__contains__)


def test_the_minimum_share_is_one_job_in_ten() -> None:
    assert LOWER_CLASS_EVERY == 10  # the figures below follow from it


def test_a_lower_class_gets_exactly_its_share_under_a_flood() -> None:
    t = table()
    queue(t, "A", 200)
    queue(t, "B", 50, **BATCH)
    order = dispatch(t, 100)
    assert Counter(who(order)) == {"A": 90, "B": 10}
    # Every tenth dispatch is B's, the nine before it A's; each class FIFO.
    assert who(order) == "AAAAAAAAAB" * 10
    assert [x for x in order if x[0] == "B"] == [f"B{i}" for i in range(10)]
    assert [x for x in order if x[0] == "A"] == [f"A{i}" for i in range(90)]


def test_the_share_counts_from_when_the_lower_class_has_jobs_queued() -> None:
    t = table()
    queue(t, "A", 40)
    dispatch(t, 25)  # nothing of the batch class waited meanwhile: no turn saved up
    queue(t, "B", 2, **BATCH)
    assert who(dispatch(t, 12)) == "AAAAAAAAAB" + "AA"


def test_a_higher_class_arriving_later_goes_first() -> None:
    t = table()
    queue(t, "B", 5, **BATCH)
    queue(t, "A", 3)
    assert dispatch(t, 8) == ["A0", "A1", "A2", "B0", "B1", "B2", "B3", "B4"]


def test_without_interactive_jobs_the_batch_class_takes_everything() -> None:
    t = table()
    queue(t, "B", 20, **BATCH)
    queue(t, "C", 20, **BATCH)
    order = dispatch(t, 40)
    # Fair sharing within the class, exactly as in a class of its own.
    assert who(order) == "BC" * 20
    assert t.queue_depth("tiny") == 0


def test_two_interactive_identities_alternate_and_batch_gets_its_share() -> None:
    t = table()
    queue(t, "A", 100)
    queue(t, "C", 100)
    queue(t, "B", 30, **BATCH)
    order = dispatch(t, 100)
    assert Counter(who(order)) == {"A": 45, "B": 10, "C": 45}
    assert [i for i, x in enumerate(order) if x[0] == "B"] == list(range(9, 100, 10))
    interactive = who([x for x in order if x[0] != "B"])
    assert interactive == "AC" * 45


def test_weights_hold_within_the_lower_class_too() -> None:
    t = table()
    queue(t, "A", 400)
    queue(t, "heavy", 100, weight=3.0, **BATCH)
    queue(t, "light", 100, **BATCH)
    order = dispatch(t, 400)
    counts = Counter(name.rstrip("0123456789") for name in order)
    assert counts["A"] == 360
    assert (counts["heavy"], counts["light"]) == (30, 10)


def test_a_new_batch_job_hears_its_true_place_under_a_flood() -> None:
    t = table()
    queue(t, "A", 30)
    assert queue(t, "B", 4, **BATCH) == [9, 19, 29, 33]  # the last: past the scan, the count


def test_head_is_the_order_of_dispatch_with_both_classes() -> None:
    t = table()
    queue(t, "A", 25, weight=2.0)
    queue(t, "C", 12)
    queue(t, "B", 8, **BATCH)
    queue(t, "D", 6, width=128, **BATCH)
    t.finish("A4")
    t.finish("B0")
    t.finish("D1")
    predicted = [j.id for j in t.head("tiny", 100)]
    assert len(predicted) == t.queue_depth("tiny") == 48
    assert dispatch(t, 48) == predicted


def test_head_is_the_order_of_dispatch_part_way_through_a_turn() -> None:
    t = table()
    queue(t, "A", 30)
    queue(t, "B", 3, **BATCH)
    dispatch(t, 6)  # six of the nine interactive jobs before B's turn
    predicted = [j.id for j in t.head("tiny", 40)]
    assert who(predicted) == "AAAB" + "A" * 9 + "B" + "A" * 9 + "B" + "A" * 3
    assert dispatch(t, 40) == predicted


def test_batch_mates_of_any_class_count_for_their_class() -> None:
    t = table()
    queue(t, "A", 20)
    queue(t, "B", 5, **BATCH)
    assert dispatch(t, 3, max_batch=4) == [
        "A0", "A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8", "B0", "A9", "A10"]
    # B0 rode in the third batch (B's turn came after A8): B's count starts again from it.
    predicted = [j.id for j in t.head("tiny", 12)]
    assert predicted == ["A11", "A12", "A13", "A14", "A15", "A16", "A17", "B1", "A18", "A19",
                         "B2", "B3"]
    assert dispatch(t, 12) == predicted


def test_a_requeued_job_goes_back_to_the_head_of_its_class() -> None:
    t = table()
    queue(t, "A", 30)
    queue(t, "B", 3, **BATCH)
    taken = [j for _ in range(10) for j in t.take_batch("tiny", W1, 1)]
    assert who([j.id for j in taken]) == "AAAAAAAAAB"
    b0, a8 = taken[9], taken[8]
    assert t.requeue(b0)  # back at the head of B's line, not ahead of the interactive jobs
    assert t.requeue(a8)  # back at the head of A's line: next
    predicted = [j.id for j in t.head("tiny", 12)]
    assert predicted == ["A8"] + [f"A{i}" for i in range(9, 17)] + ["B0", "A17", "A18"]
    assert dispatch(t, 12) == predicted


def test_a_blocked_identity_is_passed_over_and_keeps_its_place() -> None:
    blocked = {"A"}
    t = blocking_table(blocked)
    queue(t, "A", 3)
    queue(t, "B", 6)
    assert dispatch(t, 2) == ["B0", "B1"]  # A runs all it may: its jobs wait, in place
    assert t.queue_depth("tiny") == 7
    # Positions are a forecast: A's jobs are where its turn puts them.
    assert [j.id for j in t.head("tiny", 3)] == ["A0", "A1", "A2"]
    blocked.clear()
    # A was not charged while it waited: its pass is where it was, so it is first until it
    # has caught up with B (an identity held back by its limit runs at its limit).
    assert dispatch(t, 7) == ["A0", "A1", "A2", "B2", "B3", "B4", "B5"]


def test_a_blocked_identity_runs_at_its_limit_and_the_rest_fill_in() -> None:
    running: Counter[str] = Counter()
    t = JobTable(max_queue=100, max_attempts=3,  # A may run one job at a time, B any number
                 blocked=lambda tenant: tenant == "A" and running["A"] >= 1)
    queue(t, "A", 4)
    queue(t, "B", 6)
    order: list[str] = []
    for step in range(10):
        (taken,) = t.take_batch("tiny", W1, 1)
        order.append(taken.id)
        running[taken.spec.tenant or ""] += 1
        if step % 3 == 2:  # A's job ends every third dispatch
            running["A"] = 0
    # Whenever A's job has ended, A's next is first: A was not charged while it waited.
    assert order == ["A0", "B0", "B1", "A1", "B2", "B3", "A2", "B4", "B5", "A3"]


def test_a_due_class_whose_identities_are_all_blocked_waits_and_goes_next() -> None:
    blocked = {"B"}
    t = blocking_table(blocked)
    queue(t, "A", 30)
    queue(t, "B", 2, **BATCH)
    assert who(dispatch(t, 14)) == "A" * 14  # B's turn came at the tenth, but B may not run
    blocked.clear()
    assert who(dispatch(t, 11)) == "B" + "A" * 9 + "B"


def test_a_blocked_identitys_jobs_are_not_taken_as_batch_mates() -> None:
    blocked = {"B"}
    t = blocking_table(blocked)
    queue(t, "A", 2)
    queue(t, "B", 3)
    queue(t, "C", 2)
    batch = t.take_batch("tiny", W1, 5)
    assert [j.id for j in batch] == ["A0", "C0", "A1", "C1"]
    assert t.queue_depth("tiny") == 3
    assert [j.id for j in t.head("tiny", 5)] == ["B0", "B1", "B2"]
    assert t.take_batch("tiny", W1, 5) == []  # all of what is queued is B's: nothing starts
    blocked.clear()
    assert [j.id for j in t.take_batch("tiny", W1, 5)] == ["B0", "B1", "B2"]


def test_without_blocked_no_identity_is_ever_blocked() -> None:
    t = table()
    queue(t, "A", 3)
    assert dispatch(t, 1, max_batch=3) == ["A0", "A1", "A2"]


def test_jobs_of_one_identity_in_two_classes_are_served_each_in_its_class() -> None:
    t = table()
    queue(t, "A", 12)
    for i in range(2):  # A's key changed class: these wait in A's batch line
        t.add(job(f"a{i}", "A", **BATCH))
    assert [j.id for j in t.head("tiny", 14)] == [
        *(f"A{i}" for i in range(9)), "a0", "A9", "A10", "A11", "a1"]
    assert dispatch(t, 14) == [*(f"A{i}" for i in range(9)), "a0", "A9", "A10", "A11", "a1"]


def test_the_broker_tells_a_batch_job_its_place_under_a_flood(harness: BrokerHarness) -> None:
    worker = busy_worker(harness)
    heard = Heard(harness, harness.client())
    flood = [make_spec(f"a{i}", tenant="alice") for i in range(12)]
    late = [make_spec(f"b{i}", tenant="bob", priority="batch") for i in range(2)]
    heard.submit(*flood)
    assert [s.id for s in worker.take()] == ["a0"]
    assert [s.id for s in worker.take()] == ["a1"]  # held, waiting behind a0
    # a1 waits at the worker (place 0); nine of alice's queued jobs, then bob's turn; after
    # alice's last, only bob's are left.
    assert heard.submit(*late) == [10, 12]
    predicted = [j.id for j in harness.broker.jobs.head("tiny", 20)]
    assert predicted == [*(f"a{i}" for i in range(2, 11)), "b0", "a11", "b1"]
    # Each answer frees the worker's slot for the next job: they come in the order told.
    specs = {spec.id: spec for spec in flood + late}
    holding, taken = ["a0", "a1"], []
    for _ in predicted:
        worker.result(specs[holding.pop(0)])
        (spec,) = worker.take()
        holding.append(spec.id)
        taken.append(spec.id)
    assert taken == predicted
