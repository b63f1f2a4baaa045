"""A LoRA adapter from a Hugging Face repo through a launch.py cluster, as an operator runs one
offline: `--lora-repo owner/name` with the adapter pre-seeded in the Hugging Face cache that
HF_HUB_CACHE names and HF_HUB_OFFLINE=1; requests name it in `loras` or as a <lora:...> prompt
tag, through the official `openai` client."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gpu_worker.tiny import build_tiny_pipeline
from tests.cluster import Cluster
from tests.gpu_worker.lora_fixtures import make_lora, seed_hub_cache

pytestmark = pytest.mark.slow

REPO_ID = "owner/ink-lora"


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The built-in tiny model's architecture: its adapters fit the cluster's workers.
    return make_lora(build_tiny_pipeline(), tmp_path_factory.mktemp("made"), seed=1)


@pytest.fixture(scope="module")
def cluster(cache_dir: Path, adapter_file: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    hub_cache = tmp_path_factory.mktemp("hf-cache")
    seed_hub_cache(hub_cache, REPO_ID, adapter_file)
    running = Cluster(cache_dir, workers=1, extra=["--lora-repo", REPO_ID],
                      env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


def made(client: openai.OpenAI, prompt: str = "a lighthouse", **extra) -> bytes:
    result = client.images.generate(model="tiny", prompt=prompt, size="64x64",
                                    extra_body={"seed": 11, "steps": 2, **extra})
    return base64.b64decode(result.data[0].b64_json)


def test_the_cluster_lists_the_repos_adapter(client: openai.OpenAI, cluster: Cluster,
                                             adapter_file: Path) -> None:
    listed = httpx.get(f"{cluster.url}/v1/loras", timeout=10).json()["data"]
    assert [entry["id"] for entry in listed] == [REPO_ID]
    assert listed[0]["models"] == ["tiny"] and listed[0]["workers"] == 1
    assert listed[0]["bytes"] == adapter_file.stat().st_size  # not loaded yet: the file's
    assert client.models.retrieve("tiny").model_extra["loras"] == [REPO_ID]


def test_the_repos_adapter_changes_the_image_by_name_or_prompt_tag(client) -> None:
    before = made(client)
    inked = made(client, loras=[{"name": REPO_ID, "scale": 1}])
    assert inked != before
    assert made(client, f"a lighthouse <lora:{REPO_ID}:1>") == inked
    assert made(client) == before  # and without it, the base model's bytes again
