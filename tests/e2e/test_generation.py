"""Generate images through a real cluster: launch.py, broker, two CPU workers, waitress."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import threading
import time

import openai
import pytest
from PIL import Image

from tests.cluster import Cluster
from tests.openapi_spec import validate

pytestmark = pytest.mark.slow


def generate(cluster: Cluster, **body) -> dict:
    with cluster.client() as http:
        resp = http.post("/v1/images/generations", json={"prompt": "a red fox", **body})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    validate(data, "ImagesResponse")
    return data


def decode(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_png_of_the_requested_size(cluster: Cluster) -> None:
    data = generate(cluster, size="320x192", seed=11)
    assert len(data["data"]) == 1
    image = decode(data["data"][0])
    assert image.format == "PNG"
    assert image.size == (320, 192)
    assert data["data"][0]["seed"] == 11
    assert data["output_format"] == "png"
    assert "size" not in data  # 320x192 is not one of the spec's response sizes
    assert (data["width"], data["height"]) == (320, 192)


def test_auto_size_is_the_model_default(cluster: Cluster) -> None:
    data = generate(cluster, size="auto", model="tiny")
    assert decode(data["data"][0]).size == (256, 256)


def test_n_images_have_consecutive_seeds_and_differ(cluster: Cluster) -> None:
    data = generate(cluster, n=3, seed=100, size="64x64")
    seeds = [item["seed"] for item in data["data"]]
    assert seeds == [100, 101, 102]
    payloads = {item["b64_json"] for item in data["data"]}
    assert len(payloads) == 3


def test_same_seed_gives_identical_bytes(cluster: Cluster) -> None:
    first = generate(cluster, seed=4242, size="128x128", n=2)
    second = generate(cluster, seed=4242, size="128x128", n=2)
    assert [i["b64_json"] for i in first["data"]] == [i["b64_json"] for i in second["data"]]


def test_no_seed_gives_fresh_random_seeds(cluster: Cluster) -> None:
    first = generate(cluster, size="64x64")
    second = generate(cluster, size="64x64")
    assert isinstance(first["data"][0]["seed"], int)
    assert first["data"][0]["seed"] != second["data"][0]["seed"]
    assert first["data"][0]["b64_json"] != second["data"][0]["b64_json"]


@pytest.mark.parametrize("fmt, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_jpeg_and_webp_decode(cluster: Cluster, fmt: str, pil_format: str) -> None:
    data = generate(cluster, output_format=fmt, output_compression=60, size="128x64")
    image = decode(data["data"][0])
    assert image.format == pil_format
    assert image.size == (128, 64)
    assert data["output_format"] == fmt


def test_compression_changes_jpeg_size(cluster: Cluster) -> None:
    low = generate(cluster, output_format="jpeg", output_compression=10, seed=1, size="256x256")
    high = generate(cluster, output_format="jpeg", output_compression=95, seed=1, size="256x256")
    assert len(low["data"][0]["b64_json"]) < len(high["data"][0]["b64_json"])


def test_spec_fields_are_accepted(cluster: Cluster) -> None:
    data = generate(cluster, size="1024x1024", quality="high", background="opaque",
                    moderation="low", style="vivid", user="user-1", partial_images=0,
                    steps=1)
    assert data["size"] == "1024x1024"
    assert data["quality"] == "high"
    assert decode(data["data"][0]).size == (1024, 1024)


def test_extensions(cluster: Cluster) -> None:
    data = generate(cluster, width=96, height=160, steps=2, guidance=3.0,
                    negative_prompt="blurry", seed=3)
    assert decode(data["data"][0]).size == (96, 160)
    assert (data["steps"], data["guidance"]) == (2, 3.0)
    # A negative prompt changes the image at the same seed.
    plain = generate(cluster, width=96, height=160, steps=2, guidance=3.0, seed=3)
    assert plain["data"][0]["b64_json"] != data["data"][0]["b64_json"]


def test_timings_say_how_long_the_device_sat_idle_before_the_batch(cluster: Cluster) -> None:
    # device_idle_s runs from the end of the worker's previous batch to the start of this one.
    # Sequential requests with pauses between them bound it from both sides, whichever of the
    # two workers each one lands on: from the previous answer on that worker to this request.
    sent: list[tuple[float, float, dict]] = []  # (request sent, answer received, answer)
    for _ in range(4):
        started = time.monotonic()
        data = generate(cluster, size="64x64", steps=1)
        sent.append((started, time.monotonic(), data))
        time.sleep(0.4)
    for data in (d for _, _, d in sent):
        timings = data["timings"]
        assert timings["batch_size"] == 1
        assert timings["generate_s"] > 0 and timings["encode_s"] > 0
    pairs = 0
    for i, (sent_at, received_at, data) in enumerate(sent):
        earlier = [s for s in sent[:i] if s[2]["worker_id"] == data["worker_id"]]
        if not earlier:
            continue
        prev_sent, prev_received, _ = earlier[-1]
        idle = data["timings"]["device_idle_s"]
        assert sent_at - prev_received <= idle <= received_at - prev_sent
        pairs += 1
    assert pairs >= 2  # four requests on two workers


def test_openai_client(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="tiny", prompt="a lighthouse", n=2, size="256x256",
                                    extra_body={"seed": 77})
    assert len(result.data) == 2
    assert [item.model_extra["seed"] for item in result.data] == [77, 78]
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (256, 256)
    assert result.output_format == "png"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_openai_client_sees_errors(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="tiny", prompt="x", size="100x33")
    assert bad.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="no-such-model", prompt="x")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.InternalServerError) as unserved:
        client.images.generate(model="sdxl", prompt="x")
    assert unserved.value.status_code == 503


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "n": 11}, 400, "n"),
    ({"prompt": "x", "steps": 0}, 400, "steps"),
    ({"prompt": "x", "steps": 51}, 400, "steps"),
    ({"prompt": "x", "size": "99999x99999"}, 400, "size"),
    ({"prompt": "x", "output_format": "gif"}, 400, "output_format"),
    ({"n": 1}, 400, "prompt"),
    ({"prompt": "x", "model": "nope"}, 404, "model"),
    ({"prompt": "x", "model": "flux-schnell"}, 503, "model"),
])
def test_errors_have_openai_shape(cluster: Cluster, body: dict, status: int,
                                  param: str) -> None:
    with cluster.client() as http:
        resp = http.post("/v1/images/generations", json=body)
    assert resp.status_code == status, resp.text
    validate(resp.json(), "ErrorResponse")
    assert resp.json()["error"]["param"] == param
    if status == 503:
        assert int(resp.headers["retry-after"]) > 0
    else:
        assert resp.headers["x-should-retry"] == "false"


def test_models_health_and_readiness(cluster: Cluster) -> None:
    with cluster.client() as http:
        models = http.get("/v1/models").json()
        validate(models, "ListModelsResponse")
        assert models["data"][0]["id"] == "tiny"
        assert models["data"][0]["ready_workers"] == 2
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["workers"] == 2


def test_concurrent_requests_use_both_workers(cluster: Cluster) -> None:
    def one(i: int) -> tuple[int, dict]:
        return i, generate(cluster, prompt=f"prompt number {i}", seed=5000 + i, size="128x128")

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = dict(pool.map(one, range(20)))
    assert len(results) == 20
    for i, data in results.items():
        assert data["data"][0]["seed"] == 5000 + i
        assert decode(data["data"][0]).size == (128, 128)
    assert len({data["worker_id"] for data in results.values()}) == 2
    # Every answer belongs to its request: the same prompt and seed alone give the same bytes.
    for i in (0, 7, 19):
        alone = generate(cluster, prompt=f"prompt number {i}", seed=5000 + i, size="128x128")
        assert alone["data"][0]["b64_json"] == results[i]["data"][0]["b64_json"]


def test_long_job_does_not_block_an_idle_worker(cluster: Cluster) -> None:
    slow_done = threading.Event()

    def slow() -> None:
        generate(cluster, size="512x512", steps=40)
        slow_done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        # Wait until the slow job is running on one worker.
        with cluster.client() as http:
            for _ in range(200):
                workers = http.get("/v1/cluster").json()["workers"]
                if any(w["running"] for w in workers):
                    break
                threading.Event().wait(0.05)
        quick = generate(cluster, size="64x64", steps=1)
        assert quick["data"]
        assert not slow_done.is_set(), "the quick job waited behind the slow one"
    finally:
        thread.join(120)
    assert slow_done.is_set()


def test_deadline_gives_504_and_frees_the_worker(cluster: Cluster) -> None:
    with cluster.client() as http:
        resp = http.post("/v1/images/generations",
                         json={"prompt": "slow", "size": "512x512", "steps": 50, "timeout": 1})
        assert resp.status_code == 504, resp.text
        validate(resp.json(), "ErrorResponse")
        assert resp.json()["error"]["code"] == "timeout"
        # The interrupted job leaves its worker within a step: both are idle again soon.
        for _ in range(100):
            workers = http.get("/v1/cluster").json()["workers"]
            if not any(w["running"] for w in workers):
                break
            threading.Event().wait(0.1)
        assert not any(w["running"] for w in workers)


def test_a_prompt_longer_than_clip_reads_is_read_whole(cluster: Cluster) -> None:
    """diffusers drops what CLIP cannot read (77 tokens) without a word; the tiny model is
    SD's family, whose prompts are encoded in chunks: the words past 77 tokens change the
    image, and nothing is said to have been cut."""
    long_prompt = " ".join(["a red fox in deep snow under a pale winter sky"] * 10)
    data = generate(cluster, prompt=long_prompt, size="64x64", steps=2, seed=5)
    assert "warnings" not in data
    longer = generate(cluster, prompt=long_prompt + " at night", size="64x64", steps=2, seed=5)
    assert longer["data"][0]["b64_json"] != data["data"][0]["b64_json"]


def test_automatic1111_weights_through_the_openai_client(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)

    def made(prompt: str) -> bytes:
        """The pixels: the PNG's metadata holds the prompt as written."""
        result = client.images.generate(model="tiny", prompt=prompt, size="64x64",
                                        extra_body={"seed": 9, "steps": 2})
        assert result.data and result.data[0].b64_json
        return decode({"b64_json": result.data[0].b64_json}).tobytes()

    plain = made("a red fox in snow")
    weighted = made("a (red fox:1.5) in [snow]")
    assert weighted != plain and weighted == made("a (red fox:1.5) in [snow]")
    assert made("a (red fox:1) in snow") == plain  # a weight of 1 is no weight
    with pytest.raises(openai.BadRequestError) as info:
        made("a (red fox:25) in snow")
    assert info.value.body["param"] == "prompt" and "from 0 to 10" in info.value.message
