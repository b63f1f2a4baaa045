"""An edit's inputs in its job record: stored with it, sent again by a frontend that takes the
job over, deleted with it; and an edit as a job (POST /v1/jobs/edits)."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from PIL import Image

from broker.protocol import ErrorCode, JobSpec
from http_frontend.errors import JobError
from http_frontend.history import input_names
from http_frontend.image_store import DirectoryStore, StoreError
from http_frontend.pending import PendingJob
from tests.http_frontend.test_history import (
    Frontend,
    OwnedBroker,
    make_frontend,
    make_history,
    settle_all,
    stored_files,
)


class InputsBroker(OwnedBroker):
    """Remembers the frames each job was submitted with."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: dict[str, tuple[bytes, ...]] = {}

    def submit(self, job: JobSpec, *, owner: str | None = None,
               inputs: tuple[bytes, ...] = ()) -> PendingJob:
        self.inputs[job.id] = tuple(inputs)
        return super().submit(job, owner=owner)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
             f'{value}\r\n'.encode() for name, value in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
              f'filename="{name}.png"\r\nContent-Type: image/png\r\n\r\n'.encode() + data
              + b"\r\n" for name, data in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary


def post_edit(front: Frontend, path: str = "/v1/jobs/edits", *, mask: bool = True,
              headers: dict[str, str] | None = None) -> falcon.testing.Result:
    image = Image.new("RGB", (96, 64), (200, 40, 40))
    keep = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    keep.paste((0, 0, 0, 0), (0, 0, 48, 64))
    files = {"image": png(image), **({"mask": png(keep)} if mask else {})}
    body, boundary = multipart({"prompt": "a door", "steps": "4", "seed": "3"}, files)
    return front.client.simulate_post(path, body=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})})


@pytest.fixture
def broker() -> InputsBroker:
    return InputsBroker()


@pytest.fixture
def front(broker: InputsBroker, tmp_path: Path) -> Any:
    history = make_history(tmp_path)
    yield make_frontend(broker, history)
    history.close()


def test_an_edit_job_is_answered_202_with_its_stored_inputs_named(front, broker,
                                                                  tmp_path) -> None:
    result = post_edit(front)
    assert result.status_code == 202, result.text
    job = result.json
    assert (job["status"], job["width"], job["height"]) == ("queued", 96, 64)
    names = input_names(job["request"])
    assert len(names) == 2  # the image, then the mask
    upload = job["request"]["image"][0]
    assert upload["bytes"] > 0 and len(upload["sha256"]) == 64
    sent = broker.inputs[job["id"]]
    for name, frame in zip(names, sent, strict=True):
        stored = front.history.store.get(name)
        assert stored is not None and stored.data == frame  # what the workers got
    assert Image.open(io.BytesIO(sent[1])).mode == "L"  # the mask, 255 where to edit
    assert front.client.simulate_get(f"/v1/images/files/{names[0]}").status_code == 200


def test_deleting_the_job_deletes_its_inputs(front, broker, tmp_path) -> None:
    job = post_edit(front).json
    broker.answer(job["id"])
    settle_all(front.history)
    assert front.client.simulate_delete(f"/v1/jobs/{job['id']}").status_code == 200
    assert stored_files(tmp_path / "images") == []


def test_a_repeated_idempotency_key_keeps_no_second_copy(front, broker, tmp_path) -> None:
    headers = {"Idempotency-Key": "edit-once"}
    first = post_edit(front, headers=headers).json
    count = len(stored_files(tmp_path / "images"))
    again = post_edit(front, headers=headers)
    assert again.status_code == 200 and again.json["id"] == first["id"]
    assert len(stored_files(tmp_path / "images")) == count == 2
    assert len(broker.inputs) == 1


def test_a_taken_over_edit_is_sent_again_with_its_stored_inputs(tmp_path) -> None:
    first_broker = InputsBroker()
    history = make_history(tmp_path)
    first = make_frontend(first_broker, history)
    job = post_edit(first).json
    history.close()
    # Another life of the frontend (or another frontend on the same records) adopts it.
    again_broker = InputsBroker()
    again_history = make_history(tmp_path)
    again = make_frontend(again_broker, again_history)
    record = again_history.records.get(job["id"])
    assert record is not None
    again.jobs.adopt(record, record.created)
    assert again_broker.inputs[job["id"]] == first_broker.inputs[job["id"]]
    again_history.close()


def test_a_taken_over_edit_whose_inputs_are_gone_fails_and_says_why(tmp_path) -> None:
    history = make_history(tmp_path)
    first = make_frontend(InputsBroker(), history)
    job = post_edit(first).json
    history.store.delete(input_names(job["request"]))
    later = InputsBroker()
    again = make_frontend(later, history)
    record = history.records.get(job["id"])
    again.jobs.adopt(record, record.created)
    assert job["id"] not in later.inputs  # never sent without its images
    ended = history.records.get(job["id"])
    assert ended.status == "failed" and "input images" in ended.error["message"]
    history.close()


class RefusingStore(DirectoryStore):
    def put(self, name: str, data: bytes) -> None:
        raise StoreError("the disk is full")


def test_an_edit_still_runs_when_the_store_refuses_its_inputs(tmp_path) -> None:
    broker = InputsBroker()
    history = make_history(tmp_path, image_store=RefusingStore(tmp_path / "images"))
    front = make_frontend(broker, history)
    result = post_edit(front)
    assert result.status_code == 202
    assert input_names(result.json["request"]) == []
    assert len(broker.inputs[result.json["id"]]) == 2  # this frontend holds them
    history.close()


def test_an_edit_over_the_json_form_is_a_job_too(front, broker) -> None:
    url = "data:image/png;base64," + base64.b64encode(
        png(Image.new("RGB", (64, 64), (0, 90, 0)))).decode()
    result = front.client.simulate_post("/v1/jobs/edits", json={
        "prompt": "a tree", "images": [{"image_url": url}], "strength": 0.5})
    assert result.status_code == 202, result.text
    assert broker.submitted[-1].strength == 0.5 and not broker.submitted[-1].mask


def test_recorded_inputs_are_only_valid_store_names() -> None:
    request = {"image": [{"name": "../../etc/passwd"}, {"name": 5}, "x"],
               "mask": {"name": "a" * 500}}
    assert input_names(request) == []
    assert input_names(None) == [] and input_names({"image": "x"}) == []


# ------------------------------------------------------------------ the review's leaks


class RefusingBroker(InputsBroker):
    """Refuses every job as a full queue (what the broker says past --max-input-mb)."""

    def submit(self, job: JobSpec, *, owner: str | None = None,
               inputs: tuple[bytes, ...] = ()) -> PendingJob:
        pending = super().submit(job, owner=owner, inputs=inputs)
        pending = PendingJob(job.id, job)
        pending.fail(JobError(ErrorCode.QUEUE_FULL, "full", retryable=True))
        return pending


@pytest.mark.parametrize("path", ["/v1/images/edits", "/v1/jobs/edits"])
def test_a_refused_edit_leaves_no_stored_inputs(tmp_path, path) -> None:
    history = make_history(tmp_path)
    front = make_frontend(RefusingBroker(), history)
    result = post_edit(front, path)
    assert result.status_code == 429, result.text
    settle_all(history)
    assert stored_files(tmp_path / "images") == []
    history.close()


def test_retention_removes_an_edits_inputs_with_its_record(front, broker, tmp_path) -> None:
    from http_frontend.keeper import Keeper

    job = post_edit(front).json
    broker.answer(job["id"])
    settle_all(front.history)
    assert len(stored_files(tmp_path / "images")) == 3  # the input, the mask, the result
    Keeper(front.jobs, connected=lambda: True, history_days=1)._remove_before(10**12)
    assert stored_files(tmp_path / "images") == []


def test_without_history_an_edits_inputs_stay_named_and_go_with_it(tmp_path) -> None:
    broker = InputsBroker()
    history = make_history(tmp_path, keep_prompts=False)
    front = make_frontend(broker, history)
    job = post_edit(front).json
    broker.answer(job["id"])
    settle_all(history)
    ended = history.records.get(job["id"])
    assert ended.prompt is None and "sha256" not in str(ended.request)  # nothing but names
    assert len(input_names(ended.request)) == 2
    assert front.client.simulate_delete(f"/v1/jobs/{job['id']}").status_code == 200
    assert stored_files(tmp_path / "images") == []
    history.close()


def test_an_ended_edit_holds_no_frames_in_memory(front, broker) -> None:
    job = post_edit(front).json
    live = front.jobs._live_job(job["id"])
    assert live is not None and live.prepared.inputs == ()
    # The pending job holds them while it may be sent again (a broker restart), not after.
    pending = PendingJob("j", inputs=(b"image", b"mask"))
    assert pending.inputs == (b"image", b"mask")
    pending.fail(JobError(ErrorCode.WORKER_ERROR, "it broke"))
    assert pending.inputs == ()
