"""What workers announce about a model's limits is checked, and never widens the registry's.

Driven through model_resolver.spec_for, the one resolver every route uses.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import pytest

from gpu_worker import models
from http_frontend import limits
from http_frontend.broker_client import ClusterStatus
from http_frontend.model_resolver import spec_for
from tests.http_frontend.test_app import error_of, post, worker

TINY = models.REGISTRY["tiny"]  # 256x256 default, multiples of 8, 8*8..1024*1024 px, <= 50 steps


def status(*announcements: tuple[str, dict[str, Any]]) -> ClusterStatus:
    """One ready worker per (model, announced limits)."""
    workers = [{**worker(f"w{i}", model), "model_info": {model: info}}
               for i, (model, info) in enumerate(announcements)]
    return ClusterStatus(workers, {}, time.monotonic())


def announced(spec: models.ModelSpec = TINY, **changes: Any) -> dict[str, Any]:
    return {**spec.describe(), **changes}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(limits, "_warn", limits._RateLimitedWarnings(limits.WARN_EVERY))


@pytest.mark.parametrize(("field", "value"), [
    ("max_steps", "50"), ("max_steps", 5.5), ("max_steps", None), ("max_steps", True),
    ("max_steps", -1), ("max_steps", 10**9), ("size_multiple", 0), ("size_multiple", "8"),
    ("min_pixels", [1]), ("max_pixels", {"a": 1}), ("default_size", "abcxdef"),
    ("default_size", "٦٤x٦٤"), ("default_size", 256), ("default_size", "0x256"),
    ("allowed_sizes", "256x256"), ("allowed_sizes", ["256x256", 7]),
    ("allowed_sizes", ["8x8"] * 1000), ("default_guidance", "5"),
    ("default_guidance", float("nan")), ("default_guidance", 1e9), ("negative_prompt", 1),
    ("default_steps", b"4"), ("description", b"bytes"), ("family", ["x"]),
])
def test_a_badly_typed_limit_is_ignored_with_a_log_line(field, value, caplog):
    with caplog.at_level(logging.WARNING, logger="http_frontend.limits"):
        spec = spec_for(status(("tiny", announced(**{field: value}))), "tiny")
    assert spec == TINY
    assert field in caplog.text and "w0" in caplog.text


def test_the_log_line_is_rate_limited(caplog):
    bad = status(("tiny", announced(max_steps="50")))
    with caplog.at_level(logging.WARNING, logger="http_frontend.limits"):
        for _ in range(100):
            spec_for(bad, "tiny")
    assert len(caplog.records) == 1


@pytest.mark.parametrize(("field", "wider"), [
    ("max_steps", 1000), ("max_pixels", 4096 * 4096), ("min_pixels", 1), ("size_multiple", 1),
    ("negative_prompt", True),
])
def test_a_worker_never_widens_a_registry_models_limits(field, wider):
    spec = spec_for(status(("tiny", announced(**{field: wider}))), "tiny")
    assert getattr(spec, field) == getattr(TINY, field)


def test_a_worker_narrows_a_registry_models_limits_field_by_field():
    spec = spec_for(status(("tiny", announced(
        max_steps=20, max_pixels=512 * 512, min_pixels=32 * 32, size_multiple=16,
        negative_prompt=False, allowed_sizes=["256x256", "512x512", "4096x4096"],
        default_steps=8, default_size="512x512"))), "tiny")
    assert (spec.max_steps, spec.max_pixels, spec.min_pixels, spec.size_multiple) == \
        (20, 512 * 512, 32 * 32, 16)
    assert spec.negative_prompt is False
    assert spec.allowed_sizes == ((256, 256), (512, 512), (4096, 4096))
    assert (spec.default_steps, spec.default_size) == (8, (512, 512))


def test_a_default_outside_the_narrowed_limits_is_not_taken():
    spec = spec_for(status(("tiny", announced(max_steps=20, default_steps=40))), "tiny")
    assert (spec.max_steps, spec.default_steps) == (20, TINY.default_steps)


def test_the_narrowest_of_several_workers_wins():
    spec = spec_for(status(("tiny", announced(max_steps=30)),
                           ("tiny", announced(max_steps=10)),
                           ("tiny", announced(max_steps=40))), "tiny")
    assert spec.max_steps == 10


def test_a_model_outside_the_registry_takes_valid_announcements_over_generic_defaults():
    mine = models.generic("someone/model", default_size=(512, 384), size_multiple=64,
                          default_steps=12, max_steps=20, description="mine")
    spec = spec_for(status((mine.name, mine.describe()),
                           (mine.name, announced(mine, max_steps=15))), mine.name)
    assert (spec.default_size, spec.size_multiple, spec.default_steps, spec.max_steps) == \
        ((512, 384), 64, 12, 15)
    assert (spec.name, spec.description) == (mine.name, "mine")


def test_a_model_outside_the_registry_with_contradicting_limits_gets_generic_ones(caplog):
    mine = models.generic("someone/model", min_pixels=4096 * 4096, max_pixels=64 * 64)
    with caplog.at_level(logging.WARNING, logger="http_frontend.limits"):
        spec = spec_for(status((mine.name, mine.describe())), mine.name)
    assert spec == models.generic(mine.name)
    assert "contradict" in caplog.text


@pytest.mark.parametrize("info", [None, "limits", ["x"], {"max_steps": {"nested": True}}])
def test_model_info_of_any_shape_is_survived(info):
    workers = [{**worker("w1", "tiny"), "model_info": {"tiny": info}},
               {**worker("w2", "tiny"), "model_info": "not a map"}, "not a worker"]
    spec = spec_for(ClusterStatus(workers, {}, time.monotonic()), "tiny")
    # Its limits stay the registry's; an announcement without its edit modes has none.
    expected = dataclasses.replace(TINY, edit_pipeline="", inpaint_pipeline="") \
        if isinstance(info, dict) else TINY
    assert spec == expected


def test_edit_modes_are_what_every_worker_announces() -> None:
    full = TINY.describe()
    no_inpaint = {**full, "inpaint_pipeline": ""}
    older = {k: v for k, v in full.items() if k not in ("edit_pipeline", "inpaint_pipeline")}
    assert spec_for(status(("tiny", full)), "tiny").modes == ("generate", "edit", "inpaint")
    assert spec_for(status(("tiny", full), ("tiny", no_inpaint)), "tiny").modes == \
        ("generate", "edit")
    # A worker that does not know of editing would make an image from the prompt alone.
    assert spec_for(status(("tiny", full), ("tiny", older)), "tiny").modes == ("generate",)
    lying = {**full, "edit_pipeline": "os.system", "max_inputs": 99}
    spec = spec_for(status(("tiny", lying)), "tiny")
    assert spec.edit_pipeline == TINY.edit_pipeline and spec.max_inputs == 1


# ------------------------------------------------------------------------------ over HTTP

def test_a_badly_typed_announcement_is_not_a_500(client, broker):
    broker.workers = [{**worker("w1", "tiny"), "model_info": {"tiny": announced(max_steps="50",
                                                                                 min_pixels=None)}}]
    result = post(client, {"prompt": "a fox", "model": "tiny", "size": "64x64"})
    assert result.status_code == 200, result.text
    assert error_of(post(client, {"prompt": "a fox", "model": "tiny", "steps": 51}),
                    400)["param"] == "steps"
    models_page = client.simulate_get("/v1/models")
    assert models_page.status_code == 200
    assert models_page.json["data"][0]["limits"]["max_steps"] == 50


def test_a_worker_announcing_more_steps_does_not_let_a_request_past_the_registry(client, broker):
    broker.workers = [{**worker("w1", "tiny"), "model_info": {"tiny": announced(max_steps=100)}}]
    error = error_of(post(client, {"prompt": "a fox", "model": "tiny", "steps": 60}), 400)
    assert error["param"] == "steps"
    assert "50" in error["message"]
    assert broker.submitted == []
