"""OpenAI's dialect in-process: GET /v1/models/{id}, OpenAI's model names and aliases."""

from __future__ import annotations

import json

import pytest

from broker.protocol import Message, MsgType
from http_frontend import model_resolver, schema, streaming
from tests.http_frontend.test_app import FakeBroker, checked, error_of, worker
from tests.http_frontend.test_history import make_frontend, make_history
from tests.openapi_spec import validate

GENERATIONS = "/v1/images/generations"
FOX = {"prompt": "a fox", "size": "64x64"}


@pytest.fixture
def fake() -> FakeBroker:
    return FakeBroker()


def test_a_served_model_is_retrieved_in_openais_shape(fake, tmp_path) -> None:
    front = make_frontend(fake, make_history(tmp_path))
    model = checked(front.client.simulate_get("/v1/models/tiny")).json
    assert {k: model[k] for k in ("id", "object", "owned_by")} == \
        {"id": "tiny", "object": "model", "owned_by": "diffusion-cluster"}
    assert isinstance(model["created"], int) and model["ready_workers"] == 1
    assert "served_by" not in model
    assert front.client.simulate_head("/v1/models/tiny").status_code == 200


@pytest.mark.parametrize("name", ["no-such-model", "sdxl", "x" * 300, "tiny%00"])
def test_a_model_nobody_serves_is_a_404_in_openais_shape(fake, tmp_path, name) -> None:
    front = make_frontend(fake, make_history(tmp_path))
    error = error_of(front.client.simulate_get(f"/v1/models/{name}"), 404)
    assert error["code"] == "model_not_found"
    assert len(error["message"]) < 400


@pytest.mark.parametrize("name", ["dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini",
                                  "gpt-image-1.5", "chatgpt-image-latest"])
def test_openais_names_run_on_the_default_model_and_say_so(fake, tmp_path, name) -> None:
    front = make_frontend(fake, make_history(tmp_path))
    answer = checked(front.client.simulate_post(GENERATIONS, json={**FOX, "model": name}))
    assert answer.json["model"] == "tiny" and fake.submitted[-1].model == "tiny"
    retrieved = checked(front.client.simulate_get(f"/v1/models/{name}")).json
    assert (retrieved["id"], retrieved["served_by"]) == (name, "tiny")


def test_openais_names_follow_the_configured_default_model(tmp_path) -> None:
    fake = FakeBroker([worker("w1", "tiny"), worker("w2", "sdxl-turbo")])
    front = make_frontend(fake, make_history(tmp_path), default_model="tiny")
    checked(front.client.simulate_post(GENERATIONS, json={**FOX, "model": "dall-e-3"}))
    assert fake.submitted[-1].model == "tiny"


def test_an_operator_alias_wins_over_the_default(tmp_path) -> None:
    fake = FakeBroker([worker("w1", "tiny"), worker("w2", "other/model")])
    front = make_frontend(fake, make_history(tmp_path), default_model="tiny",
                          model_aliases=(("dall-e-3", "other/model"), ("house", "tiny")))
    checked(front.client.simulate_post(GENERATIONS, json={**FOX, "model": "dall-e-3"}))
    assert fake.submitted[-1].model == "other/model"
    checked(front.client.simulate_post(GENERATIONS, json={**FOX, "model": "house"}))
    assert fake.submitted[-1].model == "tiny"
    assert checked(front.client.simulate_get("/v1/models/house")).json["served_by"] == "tiny"


def test_a_dall_e_name_without_response_format_answers_urls(fake, tmp_path) -> None:
    front = make_frontend(fake, make_history(tmp_path))
    dall_e = checked(front.client.simulate_post(GENERATIONS,
                                                json={**FOX, "model": "dall-e-3"})).json
    assert "url" in dall_e["data"][0] and "b64_json" not in dall_e["data"][0]
    validate(dall_e, "ImagesResponse")
    gpt_image = checked(front.client.simulate_post(GENERATIONS,
                                                   json={**FOX, "model": "gpt-image-1"})).json
    assert "b64_json" in gpt_image["data"][0]  # as OpenAI's gpt-image models answer
    asked = checked(front.client.simulate_post(GENERATIONS, json={
        **FOX, "model": "dall-e-2", "response_format": "b64_json"})).json
    assert "b64_json" in asked["data"][0]


def test_a_dall_e_name_answers_b64_without_an_image_store(fake, tmp_path) -> None:
    front = make_frontend(fake, make_history(tmp_path, store=False))
    answer = checked(front.client.simulate_post(GENERATIONS,
                                                json={**FOX, "model": "dall-e-3"})).json
    assert "b64_json" in answer["data"][0]


@pytest.mark.parametrize("text", ["", "=", "name=", "=model", "no-equals"])
def test_a_bad_alias_flag_is_refused(text) -> None:
    with pytest.raises(ValueError, match="NAME=MODEL"):
        model_resolver.parse_alias(text)


def test_partial_images_carry_the_real_size() -> None:
    request = schema.parse_request({**FOX, "size": "96x64", "stream": True,
                                    "partial_images": 1})
    fitted = schema.FittedRequest(request, 96, 64, 4, 5.0)
    preview = Message(MsgType.PROGRESS, {"job_id": "j", "step": 2, "steps": 4,
                                         "image_index": 0}, [b"\x89PNG..."])
    [event] = streaming.OpenAIStream(fitted, lambda: 0).events(preview)
    data = json.loads(event.decode().split("data: ", 1)[1])
    assert data["type"] == "image_generation.partial_image" and data["size"] == "auto"
    assert (data["width"], data["height"]) == (96, 64)
