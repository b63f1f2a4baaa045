"""/v1/images/edits against a hostile client: every malformed form, field and image is a 400 (or
413/415) in OpenAI's shape naming its field, nothing reaches the broker, and the frontend goes
on serving."""

from __future__ import annotations

import base64
import io
from typing import Any

import falcon.testing
import pytest
from PIL import Image

from http_frontend.app import FrontendConfig, create_app
from http_frontend.service import ImageService, ServiceConfig
from tests.http_frontend.test_app import FakeBroker, error_of, worker
from tests.http_frontend.test_edit_records import multipart

EDITS = "/v1/images/edits"
MAX_EDIT = 2 << 20


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


IMAGE = png(Image.new("RGB", (64, 64), (10, 120, 200)))


@pytest.fixture
def broker() -> FakeBroker:
    fake = FakeBroker()
    fake.workers = [worker("w1", "tiny"), worker("w2", "pixart-sigma")]
    return fake


@pytest.fixture
def client(broker: FakeBroker) -> falcon.testing.TestClient:
    config = FrontendConfig(service=ServiceConfig(default_timeout=30.0), max_edit_body=MAX_EDIT)
    service = ImageService(broker, config.service)
    return falcon.testing.TestClient(create_app(config, broker, service=service))


def send(client: falcon.testing.TestClient, fields: dict[str, str],
         files: dict[str, bytes] | None = None) -> falcon.testing.Result:
    body, boundary = multipart({"model": "tiny", **fields}, files or {"image": IMAGE})
    return client.simulate_post(EDITS, body=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})


def test_a_good_edit_still_works_beside_the_attacks(client, broker) -> None:
    result = send(client, {"prompt": "a fox", "n": "2", "stream": "false", "strength": "0.5"})
    assert result.status_code == 200, result.text
    job = broker.submitted[-1]
    assert (job.inputs, job.mask, job.strength, job.n) == (1, False, 0.5, 2)


@pytest.mark.parametrize("fields, param", [
    ({}, "prompt"),
    ({"prompt": "a fox", "n": "two"}, "n"),
    ({"prompt": "a fox", "n": "99"}, "n"),
    ({"prompt": "a fox", "strength": "nan"}, "strength"),
    ({"prompt": "a fox", "strength": "1e400"}, "strength"),
    ({"prompt": "a fox", "strength": "0"}, "strength"),
    ({"prompt": "a fox", "strength": "1.5"}, "strength"),
    ({"prompt": "a fox", "stream": "yes"}, "stream"),
    ({"prompt": "a fox", "steps": "-3"}, "steps"),
    ({"prompt": "a fox", "size": "64x64x64"}, "size"),
    ({"prompt": "a fox", "model": "pixart-sigma"}, "model"),
    ({"prompt": "a fox", "steps": "2", "strength": "0.2"}, "strength"),  # runs no step
])
def test_bad_fields_name_themselves(client, broker, fields, param) -> None:
    result = send(client, fields)
    assert error_of(result, 400)["param"] == param
    assert broker.submitted == []


@pytest.mark.parametrize("files, param", [
    ({}, "image"),
    ({"image": b""}, "image"),
    ({"image": b"GIF89a" + b"\0" * 100}, "image"),
    ({"image": IMAGE[: len(IMAGE) // 2]}, "image"),  # cut short
    ({"image": png(Image.new("RGB", (64, 64)), "BMP")}, "image"),
    ({"image": IMAGE, "mask": png(Image.new("L", (32, 32), 255))}, "mask"),  # another size
    ({"image": IMAGE, "mask": png(Image.new("L", (64, 64), 0))}, "mask"),  # marks nothing
    ({"image": IMAGE, "mask": b"<svg/>"}, "mask"),
    ({"image": IMAGE, "notes": b"a file where text belongs"}, "notes"),
])
def test_bad_files_name_their_field(client, broker, files, param) -> None:
    body, boundary = multipart({"prompt": "a fox", "model": "tiny"}, files)
    result = client.simulate_post(EDITS, body=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert error_of(result, 400)["param"] == param
    assert broker.submitted == []


def test_a_decompression_bomb_is_refused_before_it_is_decoded(client, broker) -> None:
    bomb = png(Image.new("1", (10_000, 10_000)))  # 100 megapixels in a small file
    assert len(bomb) < 200_000
    result = send(client, {"prompt": "a fox"}, {"image": bomb})
    error = error_of(result, 400)
    assert (error["param"], error["code"]) == ("image", "image_too_large")


def test_more_images_than_the_model_takes_names_the_extra_one(client) -> None:
    body, boundary = multipart({"prompt": "a fox", "model": "tiny"}, {"image": IMAGE})
    # Two parts named image[]: what the SDKs send for a list.
    extra = body.replace(b'name="image"', b'name="image[]"')
    doubled = extra.replace(f"--{boundary}--".encode(), b"") + extra.split(b"\r\n", 1)[0] \
        + b"\r\n" + extra.split(b"\r\n", 1)[1]
    result = client.simulate_post(EDITS, body=doubled, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    error = error_of(result, 400)
    assert error["param"] == "image[1]" and "one image" in error["message"]


@pytest.mark.parametrize("body, headers, status, code", [
    (b"{}", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (b"--nothing", {"Content-Type": "multipart/form-data"}, 400, None),  # no boundary
    (b"garbage without parts", {"Content-Type": "multipart/form-data; boundary=b"}, 400, None),
    (b"x" * (MAX_EDIT + 10), {"Content-Type": "multipart/form-data; boundary=b"}, 413,
     "request_too_large"),
])
def test_a_broken_body_is_a_clear_error(client, broker, body, headers, status, code) -> None:
    error = error_of(client.simulate_post(EDITS, body=body, headers=headers), status)
    if code:
        assert error["code"] == code
    assert broker.submitted == []


def test_too_many_parts_is_a_400_not_a_crash(client) -> None:
    fields = {f"field{i}": "x" for i in range(100)}
    result = send(client, {"prompt": "a fox", **fields})
    assert error_of(result, 400)["code"] == "invalid_multipart"


@pytest.mark.parametrize("body, param", [
    ({"images": "data:image/png;base64,AAAA"}, "images"),
    ({"images": [{"image_url": 5}]}, "images[0]"),
    ({"images": ["data:image/png;base64,AAAA"]}, "images[0]"),
    ({"images": [{"image_url": "data:image/png,not-base64"}]}, "images[0]"),
    ({"images": [{"image_url": "data:image/png;base64,!!!!"}]}, "images[0]"),
    ({"images": [{"image_url": "file:///etc/passwd"}]}, "images[0]"),
    ({"images": [{"image_url": "http://127.0.0.1:5555/"}]}, "images[0]"),
    ({"images": [{"image_url": "data:image/png;base64,"
                                + base64.b64encode(IMAGE).decode()}],
      "mask": "not a ref"}, "mask"),
    ({"image": [{"image_url": "x"}]}, "images"),  # the multipart name in a JSON body
])
def test_the_json_form_refuses_bad_references(client, broker, body: dict[str, Any],
                                              param: str) -> None:
    result = client.simulate_post(EDITS, json={"prompt": "a fox", "model": "tiny", **body})
    assert error_of(result, 400)["param"] == param
    assert broker.submitted == []


def test_a_transparent_input_without_a_mask_is_inpainted_there(client, broker) -> None:
    holed = Image.new("RGBA", (64, 64), (10, 120, 200, 255))
    holed.paste((0, 0, 0, 0), (0, 0, 32, 64))
    result = send(client, {"prompt": "a fox"}, {"image": png(holed)})
    assert result.status_code == 200, result.text
    assert (broker.submitted[-1].mask, broker.submitted[-1].strength) == (True, 1.0)


def test_uploads_wait_their_turn_to_decode_then_get_a_429(broker) -> None:
    config = FrontendConfig(service=ServiceConfig(default_timeout=30.0, max_decodes=1,
                                                  decode_wait=0.05), max_edit_body=MAX_EDIT)
    service = ImageService(broker, config.service)
    client = falcon.testing.TestClient(create_app(config, broker, service=service))
    service._decodes.acquire()  # another upload is being decoded
    try:
        error = error_of(send(client, {"prompt": "a fox"}), 429)
        assert error["code"] == "too_many_requests"
    finally:
        service._decodes.release()
    assert send(client, {"prompt": "a fox"}).status_code == 200


@pytest.mark.parametrize("field, value", [("n", "--1"), ("seed", "--7"), ("n", "9" * 5000),
                                          ("steps", "٣"), ("strength", "1" * 100)])
def test_numbers_that_are_not_are_400s_naming_the_field(client, field, value) -> None:
    assert error_of(send(client, {"prompt": "a fox", field: value}), 400)["param"] == field


def test_an_edit_never_takes_the_threads_kept_for_health_checks(broker) -> None:
    config = FrontendConfig(service=ServiceConfig(default_timeout=30.0, max_waiting=1),
                            max_edit_body=MAX_EDIT)
    service = ImageService(broker, config.service)
    client = falcon.testing.TestClient(create_app(config, broker, service=service))
    release = service.take_waiting_slot()  # every waiting slot is taken
    try:
        assert error_of(send(client, {"prompt": "a fox"}), 429)["code"] == "too_many_requests"
    finally:
        release()
    assert send(client, {"prompt": "a fox"}).status_code == 200


def test_a_stopping_server_refuses_an_edit_before_decoding_it(client, broker, monkeypatch):
    from http_frontend import edit_jobs

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decoded while stopping")

    monkeypatch.setattr(edit_jobs.EditPlan, "make", never)
    service = client.app._router.find("/v1/images/edits")[0].service
    service.begin_drain(0.0)
    assert error_of(send(client, {"prompt": "a fox"}), 503)["code"] == "shutting_down"


class CountingFetcher:
    """An ImageFetcher stand-in: what each URL was allowed, and a fixed body per fetch."""

    def __init__(self, body: bytes, timeout: float = 10.0) -> None:
        self.body = body
        self.timeout = timeout
        self.allowed: list[tuple[int, float]] = []

    def within(self, *, max_bytes: int, seconds: float) -> CountingFetcher:
        self.allowed.append((max_bytes, seconds))
        return self

    def fetch(self, url: str, param: str) -> bytes:
        return self.body


def test_the_urls_of_one_edit_share_one_size_limit_and_one_deadline() -> None:
    from http_frontend.edit_requests import _read_json_body

    fetcher = CountingFetcher(IMAGE)
    refs = [{"image_url": f"https://example.com/{i}.png"} for i in range(3)]
    upload = _read_json_body({"prompt": "x", "images": refs}, 10_000, fetcher)  # type: ignore[arg-type]
    assert len(upload.images) == 3
    sizes = [allowed[0] for allowed in fetcher.allowed]
    assert sizes == [10_000, 10_000 - len(IMAGE), 10_000 - 2 * len(IMAGE)]
    deadlines = [allowed[1] for allowed in fetcher.allowed]
    assert deadlines == sorted(deadlines, reverse=True) and deadlines[0] <= 10.0


def test_a_forms_loras_field_is_its_json_text(client, broker) -> None:
    broker.workers = [worker("w1", "tiny") | {"loras": {"ink": {"loaded": False}}}]
    result = send(client, {"prompt": "a fox", "loras": '[{"name": "ink", "scale": 0.5}]'})
    assert result.status_code == 200, result.text
    assert broker.submitted[-1].loras == (("ink", 0.5),)
    for bad in ("ink", "[" * 5000, '{"name": "ink"}'):
        error = error_of(send(client, {"prompt": "a fox", "loras": bad}), 400)
        assert error["param"] == "loras", bad
