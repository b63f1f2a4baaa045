"""One resolver for every route: what workers announced first, then the registry, then generic."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gpu_worker import models
from http_frontend import model_resolver
from http_frontend.broker_client import ClusterStatus
from tests.http_frontend.test_app import error_of, post, worker


def status(*workers: Any) -> ClusterStatus:
    return ClusterStatus(list(workers), {}, time.monotonic())


def announcing(worker_id: str, spec: models.ModelSpec, state: str = "ready") -> dict[str, Any]:
    return {**worker(worker_id, spec.name, state=state),
            "model_info": {spec.name: spec.describe()}}


MINE = models.generic("someone/model", default_size=(512, 384), size_multiple=64,
                      default_steps=12, max_steps=20, description="mine")


def test_what_a_worker_announced_wins_over_generic_defaults():
    spec = model_resolver.spec_for(status(announcing("w1", MINE)), MINE.name)
    assert spec == MINE


def test_an_announced_pipeline_brings_its_familys_quirks():
    sana = models.for_pipeline("someone/sana-finetune", "SanaPipeline")
    spec = model_resolver.spec_for(status(announcing("w1", sana)), sana.name)
    assert (spec.family, spec.resolution_binning, spec.size_multiple) == ("sana", True, 32)


def test_a_narrower_announcement_wins_for_a_registry_model():
    tiny = models.REGISTRY["tiny"]
    narrower = tiny.with_defaults(max_steps=10)
    assert model_resolver.spec_for(status(announcing("w1", narrower)), "tiny").max_steps == 10


def test_an_unknown_model_gets_the_generic_spec():
    for broker_status in (None, status(), status(worker("w1", "tiny"))):
        assert model_resolver.spec_for(broker_status, "nobody/knows") == \
            models.generic("nobody/knows")
    assert not model_resolver.is_known(status(worker("w1", "tiny")), "nobody/knows")


def test_the_frontends_own_disk_is_never_read(tmp_path: Path):
    # A directory that exists here, naming a family: only what a worker announces counts.
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    name = str(tmp_path)
    assert model_resolver.spec_for(None, name) == models.generic(name)
    assert not model_resolver.is_known(None, name)
    sdxl = models.for_pipeline(name, "StableDiffusionXLPipeline")
    assert model_resolver.spec_for(status(announcing("w1", sdxl)), name).family == "sdxl"


def test_known_means_in_the_registry_or_announced_by_any_worker_ready_or_not():
    broker_status = status(announcing("w1", MINE, state="draining"))
    assert model_resolver.is_known(broker_status, MINE.name)
    assert model_resolver.is_known(None, "sdxl")
    assert model_resolver.is_known(None, "stabilityai/sdxl-turbo")  # a registered repo id


def test_canonical_names_are_aliases():
    assert model_resolver.canonical_name("stabilityai/sdxl-turbo") == "sdxl-turbo"
    assert model_resolver.canonical_name("someone/model") == "someone/model"


def test_announced_models_survive_any_shape():
    broker_status = status(worker("w1", "b", "a"), worker("w2", "a"), "not a worker",
                           {"models": "not a list"}, {"models": [7, None, "c"]})
    assert model_resolver.announced_models(broker_status) == ["a", "b", "c"]
    assert model_resolver.announced_models(None) == []


# ------------------------------------------------------------------------------ over HTTP

def test_the_model_list_and_the_generations_route_hold_a_model_to_the_same_limits(
        client, broker):
    broker.workers = [announcing("w1", MINE)]
    listed = client.simulate_get("/v1/models").json["data"]
    assert [(m["id"], m["limits"]["max_steps"]) for m in listed] == [(MINE.name, 20)]
    assert error_of(post(client, {"prompt": "a fox", "model": MINE.name, "steps": 21}),
                    400)["param"] == "steps"
    assert post(client, {"prompt": "a fox", "model": MINE.name, "steps": 20}).status_code == 200


def test_a_model_only_a_worker_that_is_not_ready_announced_is_a_503_not_a_404(client, broker):
    broker.workers = [worker("w1", "tiny"), announcing("w2", MINE, state="draining")]
    error = error_of(post(client, {"prompt": "a fox", "model": MINE.name}), 503)
    assert error["code"] == "no_worker"
