"""LoRA adapters as requests name them: the `loras` field and <lora:name:scale> prompt tags,
checked against what the workers announce before anything is queued; GET /v1/loras."""

from __future__ import annotations

from typing import Any

import falcon.testing
import pytest

from http_frontend.app import FrontendConfig, create_app
from http_frontend.service import ImageService, ServiceConfig
from tests.http_frontend.test_app import FakeBroker, checked, error_of, worker

GENERATIONS = "/v1/images/generations"


def lora_worker(worker_id: str, model: str, **loras: bool) -> dict[str, Any]:
    """A ready worker of ``model`` announcing adapters (name -> loaded)."""
    return worker(worker_id, model) | {
        "loras": {name.replace("__", "/"): {"loaded": loaded, "bytes": 4096, "source": "file"}
                  for name, loaded in loras.items()}}


@pytest.fixture
def broker() -> FakeBroker:
    fake = FakeBroker()
    fake.workers = [lora_worker("w1", "tiny", ink=True, pastel=False),
                    lora_worker("w2", "tiny", ink=False, styles__grain=False),
                    lora_worker("w3", "sdxl", sdxl_detail=False)]
    return fake


@pytest.fixture
def client(broker: FakeBroker) -> falcon.testing.TestClient:
    config = FrontendConfig(service=ServiceConfig(default_timeout=30.0))
    return falcon.testing.TestClient(create_app(config, broker,
                                                service=ImageService(broker, config.service)))


def generate(client: falcon.testing.TestClient, **body: Any) -> falcon.testing.Result:
    return checked(client.simulate_post(GENERATIONS, json={"model": "tiny", "size": "64x64",
                                                           **body}))


def test_the_field_reaches_the_job_sorted_by_name(client, broker) -> None:
    result = generate(client, prompt="a fox", loras=[{"name": "pastel", "scale": 0.5},
                                                     {"name": "ink"}])
    assert result.status_code == 200, result.text
    assert broker.submitted[-1].loras == (("ink", 1.0), ("pastel", 0.5))


def test_prompt_tags_are_taken_out_and_applied(client, broker) -> None:
    result = generate(client, prompt="a fox <lora:ink:0.7>, at dusk <lora:styles/grain>")
    assert result.status_code == 200, result.text
    job = broker.submitted[-1]
    assert job.loras == (("ink", 0.7), ("styles/grain", 1.0))
    assert job.prompt == "a fox , at dusk"


def test_a_tag_and_the_field_together(client, broker) -> None:
    result = generate(client, prompt="a fox <lora:pastel:-0.5>", loras=[{"name": "ink"}])
    assert result.status_code == 200, result.text
    assert broker.submitted[-1].loras == (("ink", 1.0), ("pastel", -0.5))


@pytest.mark.parametrize("body, param", [
    ({"loras": "ink"}, "loras"),
    ({"loras": ["ink"]}, "loras[0]"),
    ({"loras": [{"scale": 1}]}, "loras[0].name"),
    ({"loras": [{"name": ""}]}, "loras[0].name"),
    ({"loras": [{"name": "x" * 201}]}, "loras[0].name"),
    ({"loras": [{"name": "ink\n"}]}, "loras[0].name"),
    ({"loras": [{"name": "ink", "scale": "1"}]}, "loras[0].scale"),
    ({"loras": [{"name": "ink", "scale": True}]}, "loras[0].scale"),
    ({"loras": [{"name": "ink", "scale": 4.5}]}, "loras[0].scale"),
    ({"loras": [{"name": "ink"}, {"name": "ink", "scale": 0.5}]}, "loras[1].name"),
    ({"loras": [{"name": f"a{i}"} for i in range(9)]}, "loras"),
    ({"prompt": "a fox <lora:ink:lots>"}, "prompt"),
    ({"prompt": "a fox <lora:ink:9>"}, "prompt"),
    ({"prompt": "a fox <lora:ink> <lora:ink:0.5>"}, "prompt"),
    ({"prompt": "a fox <lora:ink>", "loras": [{"name": "ink"}]}, "prompt"),
    ({"prompt": "<lora:ink:0.5>"}, "prompt"),
])
def test_bad_adapter_requests_name_their_field(client, broker, body, param) -> None:
    error = error_of(generate(client, **{"prompt": "a fox", **body}), 400)
    assert error["param"] == param, error
    assert broker.submitted == []


def test_an_adapter_no_worker_of_the_model_has_is_a_400(client, broker) -> None:
    error = error_of(generate(client, prompt="a fox", loras=[{"name": "sdxl_detail"}]), 400)
    assert (error["param"], error["code"]) == ("loras", "lora_not_found")
    assert "sdxl_detail" in error["message"] and "/v1/loras" in error["message"]


def test_a_set_no_single_worker_has_is_a_400(client, broker) -> None:
    # w1 has pastel, w2 has styles/grain: the job would wait for a worker that has both.
    error = error_of(generate(client, prompt="a fox <lora:pastel> <lora:styles/grain>"), 400)
    assert error["param"] == "loras" and "no single worker" in error["message"]
    assert broker.submitted == []


def test_the_loras_list_says_which_models_and_workers_have_each(client) -> None:
    listed = client.simulate_get("/v1/loras").json
    by_name = {entry["id"]: entry for entry in listed["data"]}
    assert sorted(by_name) == ["ink", "pastel", "sdxl_detail", "styles/grain"]
    assert by_name["ink"] == {"id": "ink", "object": "lora", "models": ["tiny"],
                              "workers": 2, "loaded_on": 1, "bytes": 4096}
    assert by_name["sdxl_detail"]["models"] == ["sdxl"]
    model = client.simulate_get("/v1/models/tiny").json
    assert model["loras"] == ["ink", "pastel", "styles/grain"]


def test_workers_that_announce_nonsense_adapters_do_not_break_the_listing(client,
                                                                         broker) -> None:
    broker.workers = [worker("w1", "tiny") | {"loras": ["not", "a", "map"]},
                      worker("w2", "tiny") | {"loras": {"ink": "not a map"}}]
    listed = client.simulate_get("/v1/loras")
    assert listed.status_code == 200
    assert [entry["id"] for entry in listed.json["data"]] == ["ink"]
