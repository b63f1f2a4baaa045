"""LoRA adapters through a launch.py cluster, as a user would use them: a folder of adapters
given to the workers, requests naming them in `loras` or as <lora:...> prompt tags, through
the official `openai` client; a new file picked up without a restart; and an adapter from a
Hugging Face repo (`--lora-repo owner/name`), as an operator runs one offline: pre-seeded in
the Hugging Face cache that HF_HUB_CACHE names, with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from gpu_worker.tiny import build_tiny_pipeline
from tests.cluster import Cluster, wait_until
from tests.gpu_worker.lora_fixtures import (
    lora_folder,
    make_kohya_lora,
    make_lora,
    seed_hub_cache,
)

pytestmark = pytest.mark.slow

REPO_ID = "owner/ink-lora"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pipe = build_tiny_pipeline()  # the built-in tiny model's architecture: its adapters fit
    folder = lora_folder(pipe, tmp_path_factory.mktemp("loras"), {"ink": 1, "styles/pastel": 2})
    made = tmp_path_factory.mktemp("made")
    shutil.copy(make_kohya_lora(pipe, made / "kohya", seed=3), folder / "old.safetensors")
    return folder


@pytest.fixture(scope="module")
def hub_cache(lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """REPO_ID in a Hugging Face cache: the folder's "ink" (the same file, so the same image)."""
    cache = tmp_path_factory.mktemp("hf-cache")
    seed_hub_cache(cache, REPO_ID, lora_dir / "ink.safetensors")
    return cache


@pytest.fixture(scope="module")
def cluster(cache_dir: Path, lora_dir: Path, hub_cache: Path) -> Iterator[Cluster]:
    running = Cluster(cache_dir, workers=2, extra=["--lora-dir", str(lora_dir),
                                                   "--lora-cache", "2", "--lora-repo", REPO_ID],
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


def pixels(png: bytes) -> bytes:
    """An image's pixels: its PNG's metadata names the adapters as the request did."""
    return Image.open(io.BytesIO(png)).tobytes()


def test_the_cluster_lists_its_adapters(client: openai.OpenAI, cluster: Cluster,
                                        lora_dir: Path) -> None:
    names = ["ink", "old", REPO_ID, "styles/pastel"]
    listed = httpx.get(f"{cluster.url}/v1/loras", timeout=10).json()["data"]
    assert [entry["id"] for entry in listed] == names
    assert all(entry["models"] == ["tiny"] and entry["workers"] == 2 for entry in listed)
    assert client.models.retrieve("tiny").model_extra["loras"] == names
    from_hub = next(entry for entry in listed if entry["id"] == REPO_ID)
    assert from_hub["bytes"] == (lora_dir / "ink.safetensors").stat().st_size


def test_the_repos_adapter_makes_the_image_the_same_file_makes_from_the_folder(client) -> None:
    before = made(client)
    from_hub = made(client, loras=[{"name": REPO_ID, "scale": 1}])
    assert from_hub != before
    assert pixels(from_hub) == pixels(made(client, loras=[{"name": "ink", "scale": 1}]))
    assert made(client, f"a lighthouse <lora:{REPO_ID}:1>") == from_hub  # the tag is the same
    assert made(client) == before  # and without it, the base model's bytes again


def test_adapters_change_the_image_and_leave_plain_requests_exact(client) -> None:
    before = made(client)  # before any adapter was loaded anywhere
    inked = made(client, loras=[{"name": "ink", "scale": 1.0}])
    assert inked != before
    assert made(client, loras=[{"name": "ink", "scale": 0.0}]) == before  # scale 0: none
    both = made(client, loras=[{"name": "ink"}, {"name": "styles/pastel", "scale": 0.7}])
    assert both not in (inked, made(client, loras=[{"name": "styles/pastel", "scale": 0.7}]))
    assert made(client, loras=[{"name": "ink", "scale": 1.0}]) == inked  # identical again
    assert made(client, "a lighthouse <lora:ink:1>") == inked  # the prompt tag is the same
    assert made(client, loras=[{"name": "old"}]) not in (before, inked)  # the kohya file
    # Both workers served some of these; a plain request is the base model's bytes anyway.
    for _ in range(2):
        assert made(client) == before


def test_an_unknown_adapter_is_a_400_before_anything_runs(client) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        made(client, loras=[{"name": "nope"}])
    assert refused.value.body["param"] == "loras"
    assert refused.value.body["code"] == "lora_not_found"


def test_a_new_file_is_picked_up_without_a_restart(client, cluster, lora_dir,
                                                   tmp_path) -> None:
    fresh = make_lora(build_tiny_pipeline(), tmp_path / "fresh", seed=9)
    shutil.copy(fresh, lora_dir / "fresh.safetensors")

    def listed() -> bool:
        return "fresh" in client.models.retrieve("tiny").model_extra["loras"]

    wait_until(listed, 30, "the new adapter announced")
    assert made(client, "a lighthouse <lora:fresh:0.9>") != made(client)
