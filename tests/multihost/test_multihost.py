"""Multi-host (issue 6): workers on other "hosts" join over CURVE, and survive a cut cable.

Needs root and working ``ip netns`` (skipped with the reason otherwise). The topology, built by
conftest.py and torn down after the module even when a test fails::

      root namespace                 dcmh-<pid>-head                    dcmh-<pid>-a / -b / -c
    +------------------+          +--------------------------+        +---------------------+
    | pytest (httpx)   |          | broker                   |        | gpu_worker           |
    |   -> 127.0.0.1:P |          |   --workers              |  veth  |   eth0 10.213.0.2    |
    | http_frontend    |--ipc://--|     tcp://10.213.0.1:5556|--------|   (.3 host-b,        |
    |   on 127.0.0.1:P |  (file)  |   --clients ipc://...    | bridge |    .4 host-c)        |
    +------------------+          |   br0 10.213.0.1/24      |  br0   +---------------------+
                                  +--------------------------+

- Each worker host is a namespace with one veth pair whose other end hangs on a bridge in the
  head namespace; every address is in 10.213.0.0/24 and exists only inside these namespaces.
  Cutting a host's link is ``ip -n HEAD link set veth-X down``: the host's eth0 loses carrier
  and its TCP connection to the broker goes silent (no RST, no FIN), as with a pulled cable.
- The frontend runs in the root namespace on 127.0.0.1, so the test talks HTTP to it directly,
  and it reaches the broker's client endpoint through an ``ipc://`` socket: a Unix socket is a
  file, not a network address, so it crosses namespaces without giving the root namespace an
  address in the test subnet or a route into it (only the broker's *worker* endpoint is the
  multi-host part under test).
- host-a and host-b hold keys on the allow-list; host-c is where the outsiders run: a worker
  with the key pair ``rogue`` (generated, then its public key deleted from keys/workers/) and a
  worker without CURVE at all.

Every wait is a poll with a deadline; nothing asserts on speed.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the fixture's type; its helpers are reached through the fixture
    from conftest import MultiHost, Proc

pytestmark = pytest.mark.slow

SMALL = {"size": "128x128", "steps": 4}
SLOW_JOB = {"prompt": "cut the cable", "size": "512x512", "steps": 40, "seed": 6}


def generate_many(multihost: MultiHost, count: int, prefix: str,
                  body: dict | None = None) -> list[dict]:
    """``count`` concurrent small requests; each must be a 200 with a 128x128 PNG."""
    body = body or SMALL

    def one(i: int) -> dict:
        resp = multihost.generate({**body, "prompt": f"{prefix} {i}", "seed": i})
        return multihost.check_image(resp, 128, 128)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def watch_outsider(multihost: MultiHost, outsider: str, seconds: float) -> None:
    """For ``seconds``, /v1/cluster must never list the outsider, nor anyone but our hosts."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ids = {w["worker_id"] for w in multihost.workers()}
        assert outsider not in ids, multihost.workers()
        assert ids <= set(multihost.serving), ids
        time.sleep(0.1)


def refused(multihost: MultiHost, outsider: Proc, line: str, since: int = 0) -> bool:
    """Whether the broker logged ``line`` (after line ``since``); the outsider meanwhile must
    keep running (it hears nothing, so it keeps trying) and never be listed."""
    assert outsider.process.poll() is None, outsider.log.text()
    assert outsider.name not in {w["worker_id"] for w in multihost.workers()}
    assert multihost.broker is not None
    return any(line in logged for logged in multihost.broker.log.lines[since:])


def test_requests_are_served_by_both_hosts(multihost: MultiHost) -> None:
    multihost.wait_ready()
    seen: set[str] = set()
    for attempt in range(3):  # two idle workers and 8 queued jobs: both get work at once
        bodies = generate_many(multihost, 8, f"both {attempt}")
        seen |= {body["worker_id"] for body in bodies}
        if seen == set(multihost.serving):
            break
    assert seen == set(multihost.serving)


def test_a_worker_key_not_on_the_allow_list_never_gets_work(multihost: MultiHost) -> None:
    multihost.wait_ready()
    rogue_key = multihost.public_key("rogue")
    rogue = multihost.start_worker("host-c", "rogue", "rogue", "--no-warm-up")
    try:
        assert multihost.broker is not None
        # The rogue loads its model, then tries to register; the broker's ZAP says no.
        multihost.wait_until(
            lambda: refused(multihost, rogue, f"refused worker key {rogue_key}"), 60,
            "the broker to refuse the rogue's key", multihost.logs)
        # It keeps trying (it hears nothing); it is never listed and never gets a job.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            jobs = pool.submit(generate_many, multihost, 6, "not rogue")
            watch_outsider(multihost, "rogue", 3.0)
            assert {body["worker_id"] for body in jobs.result()} <= set(multihost.serving)
        assert rogue.process.poll() is None, rogue.log.text()
        assert "broker silent" in rogue.log.text()  # nobody ever answers it
        assert not re.search(r"job [0-9a-f]{32}:", rogue.log.text()), rogue.log.text()
    finally:
        rogue.stop()


def test_an_unencrypted_worker_is_refused_and_logged(multihost: MultiHost) -> None:
    multihost.wait_ready()
    assert multihost.broker is not None
    # Read only new lines: the rogue of the test before (stopped by now) was refused too. The
    # broker logs refused handshakes at most once a second, but the plain worker retries every
    # handshake, so a refusal of its own is logged once that second is over.
    mark = len(multihost.broker.log.lines)
    plain = multihost.start_worker("host-c", "plain", None, "--no-warm-up")
    try:
        multihost.wait_until(
            lambda: refused(multihost, plain, "refused a worker connection", mark), 60,
            "the broker to refuse the plain connection", multihost.logs)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            jobs = pool.submit(generate_many, multihost, 4, "not plain")
            watch_outsider(multihost, "plain", 2.0)
            assert {body["worker_id"] for body in jobs.result()} <= set(multihost.serving)
        assert "broker silent" in plain.log.text()  # nobody ever answers it
        assert not re.search(r"job [0-9a-f]{32}:", plain.log.text()), plain.log.text()
    finally:
        plain.stop()


def test_cutting_a_hosts_link_mid_job(multihost: MultiHost) -> None:
    multihost.wait_ready()
    assert multihost.broker is not None
    cut: str | None = None
    # Not a `with`: should an assertion fail, do not wait for the slow request to finish.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        answer = pool.submit(multihost.generate, SLOW_JOB, 180)
        running = multihost.wait_until(
            lambda: [w["worker_id"] for w in multihost.workers() if w["running"]], 30,
            "the slow job to start", multihost.logs)
        assert len(running) == 1, running
        cut = running[0]
        [other] = set(multihost.serving) - {cut}
        multihost.set_link(cut, up=False)
        # The broker hears nothing from the cut host for 3 heartbeats, declares it dead and
        # requeues the job, which the other host runs from the start.
        body = multihost.check_image(answer.result(), 512, 512)
        assert body["worker_id"] == other
        assert body["data"][0]["seed"] == SLOW_JOB["seed"]
        multihost.broker.log.wait_for(f"worker {cut} missed its heartbeats", 5)
        multihost.broker.log.wait_for("requeued after losing worker", 5)
        assert cut not in multihost.ready()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if cut is not None:
            multihost.set_link(cut, up=True)
    # The cut host noticed the broker's silence, keeps reconnecting, and registers again.
    multihost.wait_until(lambda: cut in multihost.ready(), 20, f"{cut} to rejoin",
                         multihost.logs)
    worker = next(p for p in multihost.procs if p.name == cut)
    assert "broker silent" in worker.log.text()
    # And it gets work again.
    seen: set[str] = set()

    def cut_got_a_job() -> bool:
        seen.update(body["worker_id"] for body in generate_many(multihost, 2, "rejoined"))
        return cut in seen

    multihost.wait_until(cut_got_a_job, 60, f"{cut} to get a job after rejoining",
                         lambda: f"served by: {seen}")
