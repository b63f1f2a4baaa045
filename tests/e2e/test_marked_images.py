"""The operator's marks through a real cluster: a worker started with --watermark and a C2PA
key answers over HTTP with images that hold SDXL's watermark and a manifest that validates."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import c2pa  # type: ignore[import-untyped]
import pytest
from PIL import Image

from gpu_worker.marking import AI_GENERATED, c2pa_failures, watermark_match
from tests.cluster import Cluster
from tests.gpu_worker.c2pa_certs import make_signing_files

pytestmark = pytest.mark.slow


def test_a_marking_worker_watermarks_and_signs_what_it_returns(cache_dir: Path,
                                                               tmp_path: Path) -> None:
    signing = make_signing_files(tmp_path)
    cluster = Cluster(cache_dir, workers=1,
                      extra=["--watermark", "--c2pa-cert", str(signing.cert),
                             "--c2pa-key", str(signing.key)])
    try:
        cluster.wait_ready()
        with cluster.client() as http:
            # Big enough for the transform; the tiny model is a few seconds at 512 px with 2 steps.
            resp = http.post("/v1/images/generations",
                             json={"prompt": "a lighthouse", "size": "512x512", "steps": 2,
                                   "output_format": "png", "seed": 5})
            assert resp.status_code == 200, resp.text
            data = base64.b64decode(resp.json()["data"][0]["b64_json"])
            small = http.post("/v1/images/generations",
                              json={"prompt": "a lighthouse", "size": "64x64", "steps": 2,
                                    "output_format": "jpeg", "seed": 5})
            assert small.status_code == 200, small.text
            small_data = base64.b64decode(small.json()["data"][0]["b64_json"])
        log = cluster.log.text()
    finally:
        cluster.stop()

    image = Image.open(io.BytesIO(data))
    # Of SDXL's 48 bits: about half match by chance. The tiny model makes noise, the hardest
    # content for this transform (40 to 46 survive in PNG; unmarked, at most 29).
    assert watermark_match(image) >= 40
    report = json.loads(c2pa.Reader("image/png", io.BytesIO(data)).json())
    manifest = report["manifests"][report["active_manifest"]]
    assert manifest["claim_generator_info"][0]["name"] == "diffusion-cluster"
    (actions,) = [a["data"]["actions"] for a in manifest["assertions"]
                  if a["label"].startswith("c2pa.actions")]
    assert actions == [{"action": "c2pa.created", "digitalSourceType": AI_GENERATED,
                        "softwareAgent": {"name": "tiny"}}]
    assert c2pa_failures(data, "png") == {"signingCredential.untrusted"}  # the test CA

    # Too small to watermark: answered all the same, signed, and the worker said why once.
    assert Image.open(io.BytesIO(small_data)).size == (64, 64)
    assert c2pa_failures(small_data, "jpeg") == {"signingCredential.untrusted"}
    assert log.count("carry no watermark") == 1
