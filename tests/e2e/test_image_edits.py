"""POST /v1/images/edits on a real cluster, through the official `openai` client as a user
would call it: img2img, inpainting with a mask, streaming, the JSON form with data: URLs, and
what a client sees for what it cannot do."""

from __future__ import annotations

import base64
import io
import json
import socket

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.cluster import Cluster
from tests.e2e.test_streaming import sse_events
from tests.openapi_spec import validate

pytestmark = pytest.mark.slow


def png_file(image: Image.Image, name: str = "in.png") -> tuple[str, bytes, str]:
    out = io.BytesIO()
    image.save(out, "PNG")
    return (name, out.getvalue(), "image/png")


def picture(width: int = 96, height: int = 64, seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def openai_mask(width: int = 96, height: int = 64) -> Image.Image:
    """OpenAI's kind: opaque where to keep, fully transparent (alpha 0) where to edit: the
    left half."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return mask


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


@pytest.fixture
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


def test_the_models_say_what_they_can_do(client: openai.OpenAI) -> None:
    model = client.models.retrieve("tiny")
    assert model.model_extra["capabilities"] == ["generate", "edit", "inpaint"]


def test_an_edit_keeps_the_inputs_size_and_a_seed_its_bytes(client: openai.OpenAI) -> None:
    source = png_file(picture())
    first = client.images.edit(model="tiny", image=source, prompt="a watercolour",
                               extra_body={"seed": 5, "steps": 4})
    again = client.images.edit(model="tiny", image=source, prompt="a watercolour",
                               extra_body={"seed": 5, "steps": 4})
    image = decoded(first.data[0].b64_json)
    assert image.size == (96, 64)  # the input's own size: a multiple of 8 within tiny's limits
    assert first.data[0].b64_json == again.data[0].b64_json
    validate(first.model_dump(exclude_none=True), "ImagesResponse")
    other = client.images.edit(model="tiny", image=source, prompt="a watercolour",
                               extra_body={"seed": 6, "steps": 4})
    assert other.data[0].b64_json != first.data[0].b64_json


def test_inpainting_keeps_every_pixel_outside_the_mask(client: openai.OpenAI) -> None:
    original = picture(seed=3)
    result = client.images.edit(model="tiny", image=png_file(original),
                                mask=png_file(openai_mask(), "mask.png"),
                                prompt="a red door", n=2, size="96x64",
                                extra_body={"seed": 9, "steps": 4})
    assert len(result.data) == 2
    had = np.asarray(original, dtype=np.int16)
    for item in result.data:
        got = np.asarray(decoded(item.b64_json), dtype=np.int16)
        assert got.shape == had.shape
        assert np.array_equal(got[:, 48:], had[:, 48:])  # kept: the input's own pixels
        assert np.abs(got[:, :40] - had[:, :40]).mean() > 5  # made anew


def test_a_streamed_edit_gives_the_specs_events(cluster: Cluster) -> None:
    files = {"image": png_file(picture())}
    data = {"model": "tiny", "prompt": "a fox", "stream": "true", "partial_images": "1",
            "steps": "3"}
    with httpx.stream("POST", f"{cluster.url}/v1/images/edits", files=files, data=data,
                      timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(resp.iter_lines()))
    names = [name for name, _ in events]
    assert names[-1] == "image_edit.completed" and "image_edit.partial_image" in names
    for name, event in events:
        assert event["type"] == name
        validate(event, "ImageEditStreamEvent")
    assert decoded(events[-1][1]["b64_json"]).size == (96, 64)


def test_the_json_form_takes_data_urls(cluster: Cluster) -> None:
    raw = png_file(picture())[1]
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    resp = httpx.post(f"{cluster.url}/v1/images/edits", timeout=120, json={
        "model": "tiny", "prompt": "a fox", "images": [{"image_url": url}], "size": "64x64",
        "seed": 1, "steps": 2})
    assert resp.status_code == 200, resp.text
    assert decoded(resp.json()["data"][0]["b64_json"]).size == (64, 64)


@pytest.mark.parametrize("body, param, fragment", [
    ({"images": [{"image_url": "http://169.254.169.254/latest/meta-data"}]}, "images[0]",
     "does not fetch image URLs"),
    ({"images": [{"file_id": "file-abc"}]}, "images[0]", "Files API"),
    ({"images": []}, "images", "1 to 16"),
    ({"images": [{"image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}]}, "images[0]", ""),
])
def test_the_json_form_refuses_what_it_cannot_take(cluster: Cluster, body: dict, param: str,
                                                   fragment: str) -> None:
    resp = httpx.post(f"{cluster.url}/v1/images/edits", timeout=30,
                      json={"model": "tiny", "prompt": "a fox", **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and fragment in error["message"]


def test_bad_uploads_are_clear_400s_and_the_cluster_goes_on(client: openai.OpenAI,
                                                            cluster: Cluster) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.edit(model="tiny", image=("x.png", b"GIF89a not really", "image/png"),
                           prompt="a fox")
    assert bad.value.body["param"] == "image"
    with pytest.raises(openai.BadRequestError) as wrong_mask:
        client.images.edit(model="tiny", image=png_file(picture()),
                           mask=png_file(openai_mask(32, 32), "mask.png"), prompt="a fox")
    assert wrong_mask.value.body["param"] == "mask" and "32x32" in wrong_mask.value.body["message"]
    with pytest.raises(openai.BadRequestError) as two:
        client.images.edit(model="tiny", image=[png_file(picture()), png_file(picture())],
                           prompt="a fox")
    assert two.value.body["param"] == "image[1]" and "one image" in two.value.body["message"]
    with pytest.raises(openai.BadRequestError) as weak:
        client.images.edit(model="tiny", image=png_file(picture()), prompt="a fox",
                           extra_body={"steps": 2, "strength": 0.2})
    assert weak.value.body["param"] == "strength"
    # Still serving.
    fine = client.images.edit(model="tiny", image=png_file(picture()), prompt="a fox",
                              extra_body={"steps": 2})
    assert fine.data[0].b64_json


def test_an_upload_over_the_limit_is_a_413_before_it_is_read(cluster: Cluster) -> None:
    """A client announcing a gigabyte hears 413 at once: nothing waits for the bytes."""
    host, port = cluster.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: %d\r\n\r\n--x\r\n" % (1 << 30))
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_the_official_client_streams_an_edit(client: openai.OpenAI) -> None:
    """client.images.edit(..., stream=True), as the issue asks: spec-valid events, ending
    with the image at the input's size."""
    stream = client.images.edit(model="tiny", image=png_file(picture()),
                                mask=png_file(openai_mask(), "mask.png"), prompt="a red door",
                                stream=True, partial_images=1,
                                extra_body={"steps": 3, "seed": 4})
    events = list(stream)
    assert [event.type for event in events][-1] == "image_edit.completed"
    assert any(event.type == "image_edit.partial_image" for event in events)
    for event in events:
        validate(event.model_dump(exclude_none=True), "ImageEditStreamEvent")
    assert decoded(events[-1].b64_json).size == (96, 64)
