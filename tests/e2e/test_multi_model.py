"""Several models in one cluster: launch.py --models, routing by model, /v1/models."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from tests.cluster import Cluster
from tests.gpu_worker.families import pixart_sigma
from tests.openapi_spec import validate

pytestmark = pytest.mark.slow


def test_requests_are_routed_by_model(cache_dir: Path, tmp_path: Path) -> None:
    pixart = tmp_path / "pixart"
    pixart_sigma.build(pixart)
    cluster = Cluster(cache_dir, extra=["--models", f"tiny:2,{pixart}:1"])
    try:
        cluster.wait_ready()
        with cluster.client() as http:
            listed = http.get("/v1/models").json()
            validate(listed, "ListModelsResponse")
            by_id = {m["id"]: m for m in listed["data"]}
            assert set(by_id) == {"tiny", str(pixart)}
            assert by_id["tiny"]["ready_workers"] == 2
            assert by_id[str(pixart)]["ready_workers"] == 1
            assert by_id[str(pixart)]["limits"]["pipeline"] == "PixArtSigmaPipeline"
            assert by_id[str(pixart)]["limits"]["negative_prompt"] is True

            status = http.get("/v1/cluster").json()
            workers = {w["worker_id"]: w["models"] for w in status["workers"]}
            for model in ("tiny", str(pixart)):
                resp = http.post("/v1/images/generations",
                                 json={"prompt": "x", "model": model, "size": "64x64",
                                       "steps": 2})
                assert resp.status_code == 200, resp.text
                assert workers[resp.json()["worker_id"]] == [model]
                image = Image.open(io.BytesIO(base64.b64decode(resp.json()["data"][0]["b64_json"])))
                assert image.size == (64, 64)
            # No model named: the first of --models.
            default = http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"})
            assert default.json()["model"] == "tiny"
            # Per-model limits: tiny takes multiples of 8, the PixArt family 16.
            bad = http.post("/v1/images/generations",
                            json={"prompt": "x", "model": str(pixart), "size": "72x72"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"
            ok = http.post("/v1/images/generations",
                           json={"prompt": "x", "model": "tiny", "size": "72x72", "steps": 1})
            assert ok.status_code == 200
    finally:
        cluster.stop()
