"""Peers from before this protocol grew owners, sessions, held jobs and incarnations.

The frames below were recorded from the code at 35e4a85 (the release before), so a rolling
upgrade with old and new peers side by side keeps working.
"""

from __future__ import annotations

import pytest

from broker import protocol
from broker.protocol import MsgType
from tests.broker.fakes import BrokerHarness, FakeClient, FakeWorker, make_spec

pytestmark = pytest.mark.timeout(30)

OLD: dict[str, list[bytes]] = {
    "worker_ready": [b'\x8a\xa1v\x01\xa1t\xa5ready\xa9worker_id\xaaold-worker\xa4host\xa1h\xa6device\xa3cpu\xa6models\x91\xa4tiny\xa9max_batch\x01\xa8capacity\x02\xa7version\xa50.1.0\xaamodel_info\x80'],  # noqa: E501
    "worker_heartbeat": [b'\x83\xa1v\x01\xa1t\xa9heartbeat\xa7running\x91\xa7old-job'],
    "worker_result": [b'\x86\xa1v\x01\xa1t\xa6result\xa6job_id\xa7old-job\xa6images\x91\x84\xa4seed\x07\xa5width@\xa6height@\xa6format\xa3png\xa7timings\x81\xaagenerate_s\xcb?\xb9\x99\x99\x99\x99\x99\x9a\xa9worker_id\xaaold-worker', b'\x89PNG\r\n\x1a\nold'],  # noqa: E501
    "frontend_submit": [b'\x83\xa1v\x01\xa1t\xa6submit\xa3job\x8f\xa2id\xa7old-job\xa5model\xa4tiny\xa6prompt\xaca lighthouse\xa5width@\xa6height@\xa5steps\x02\xa5seeds\x91\x07\xafnegative_prompt\xc0\xa8guidance\xc0\xadoutput_format\xa3png\xb2output_compression\xc0\xa7timeout\xcb@r\xc0\x00\x00\x00\x00\x00\xa4user\xc0\xa7attempt\x00\xa8previews\x00'],  # noqa: E501
    "frontend_cancel": [b'\x83\xa1v\x01\xa1t\xa6cancel\xa6job_id\xa7old-job'],
    "broker_jobs": [b'\x83\xa1v\x01\xa1t\xa4jobs\xa4jobs\x91\x8f\xa2id\xa7old-job\xa5model\xa4tiny\xa6prompt\xaca lighthouse\xa5width@\xa6height@\xa5steps\x02\xa5seeds\x91\x07\xafnegative_prompt\xc0\xa8guidance\xc0\xadoutput_format\xa3png\xb2output_compression\xc0\xa7timeout\xcb@r\xc0\x00\x00\x00\x00\x00\xa4user\xc0\xa7attempt\x00\xa8previews\x00'],  # noqa: E501
    "broker_cancel": [b'\x83\xa1v\x01\xa1t\xa6cancel\xa6job_id\xa7old-job'],
    "broker_heartbeat": [b'\x82\xa1v\x01\xa1t\xa9heartbeat'],
    "broker_reconnect": [b'\x82\xa1v\x01\xa1t\xa9reconnect'],
    "broker_accepted": [b'\x84\xa1v\x01\xa1t\xa8accepted\xa6job_id\xa7old-job\xa8position\x00'],
    "broker_status_reply": [b'\x84\xa1v\x01\xa1t\xacstatus_reply\xa7workers\x90\xa6queues\x80'],
}


@pytest.mark.parametrize("name", sorted(OLD))
def test_every_old_message_still_decodes(name: str) -> None:
    msg = protocol.decode(OLD[name])
    assert msg.get("incarnation") is None and msg.get("owner") is None


def old_peers(harness: BrokerHarness) -> tuple[FakeWorker, FakeClient]:
    """An old worker registered and an old frontend that submitted 'old-job'."""
    worker = harness.raw_worker(b"old-worker")
    worker.send(OLD["worker_ready"])
    harness.wait_for(lambda: harness.broker.workers.get(b"old-worker") is not None)
    frontend = harness.client()
    frontend.send(OLD["frontend_submit"])
    assert frontend.expect(MsgType.ACCEPTED)["job_id"] == "old-job"
    return worker, frontend


def test_an_old_frontend_and_an_old_worker_get_a_job_done_by_a_new_broker(
        harness: BrokerHarness) -> None:
    worker, frontend = old_peers(harness)
    (job,) = worker.take()
    assert job == make_spec("old-job", timeout=300.0)
    worker.send(OLD["worker_heartbeat"])
    worker.send(OLD["worker_result"])
    result = frontend.expect(MsgType.RESULT)
    assert list(result.payloads) == [b"\x89PNG\r\n\x1a\nold"]


def test_an_old_worker_that_never_answers_a_cancel_gets_its_slot_back(
        harness: BrokerHarness) -> None:
    worker, frontend = old_peers(harness)
    worker.take()
    frontend.send(OLD["frontend_cancel"])  # from the job's (owner-less) frontend: obeyed
    assert frontend.expect(MsgType.FAILED)["code"] == "cancelled"
    worker.expect(MsgType.CANCEL)
    record = harness.broker.workers.get(b"old-worker")
    assert record.running == {"old-job"}  # it may still be on the device
    harness.clock.advance(2.5)
    worker.send_msg(MsgType.HEARTBEAT, {"running": []})  # an old worker's word that it ended
    harness.wait_for(lambda: not record.running)
