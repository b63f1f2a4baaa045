"""The official SDKs, unmodified, against a real cluster: Python's and Node's."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.slow

NODE_SCRIPT = """
import OpenAI from "openai";
const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });
const model = await client.models.retrieve("tiny");
const image = await client.images.generate({ model: "dall-e-3", prompt: "a lighthouse",
                                             size: "64x64" });
const missing = await client.models.retrieve("no-such-model").catch((err) => err.status);
console.log(JSON.stringify({ model, image, missing }));
"""


def test_the_python_sdk_retrieves_a_model_and_runs_openais_names(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    model = client.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "diffusion-cluster")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    # DALL·E's name, no response_format: a URL, as OpenAI's DALL·E answers, made by tiny.
    image = client.images.generate(model="dall-e-3", prompt="a lighthouse", size="64x64")
    assert image.model_extra["model"] == "tiny"
    assert httpx.get(image.data[0].url, timeout=10).content.startswith(b"\x89PNG")
    gpt = client.images.generate(model="gpt-image-1", prompt="a lighthouse", size="64x64")
    assert gpt.data[0].b64_json and gpt.model_extra["model"] == "tiny"


@pytest.fixture(scope="session")
def node_openai(cache_dir: Path) -> Path:
    """A directory with the `openai` npm package installed (once per run)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed: `scripts/bootstrap test` installs Debian's "
                    "nodejs and npm")
    where = cache_dir / "node-openai"
    if not (where / "node_modules" / "openai").is_dir():
        where.mkdir(exist_ok=True)
        (where / "package.json").write_text('{"type": "module", "private": true}')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent",
                        "openai@^4"], cwd=where, check=True, timeout=300)
    return where


def test_the_node_sdk_retrieves_a_model_and_runs_dall_e_3(cluster: Cluster,
                                                          node_openai: Path) -> None:
    script = node_openai / "dialect.mjs"
    script.write_text(NODE_SCRIPT)
    done = subprocess.run(["node", str(script), f"{cluster.url}/v1"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["model"]["id"] == "tiny" and out["model"]["object"] == "model"
    assert out["missing"] == 404
    assert out["image"]["model"] == "tiny"
    url = out["image"]["data"][0]["url"]
    assert httpx.get(url, timeout=10).content.startswith(b"\x89PNG")
