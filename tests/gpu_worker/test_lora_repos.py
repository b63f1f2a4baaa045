"""LoRA adapters from Hugging Face repos (--lora-repo), offline, from a pre-seeded Hugging Face
cache in the real hub layout: what is announced and under which name, that a repo's adapter
makes exactly the image its file makes from a LoRA folder, and the worker refusing to start,
in one clear line, when a repo cannot be had or does not fit its model."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.protocol import JobSpec
from gpu_worker import models
from gpu_worker.loras import (
    DEFAULT_WEIGHT_NAME,
    LoraLibrary,
    LoraSetupError,
    resolve_lora_repo,
)
from gpu_worker.pipeline import LoadOptions, PipelineRunner
from gpu_worker.tiny import build_tiny_pipeline
from tests.cluster import REPO
from tests.gpu_worker.lora_fixtures import make_lora, seed_hub_cache
from tests.gpu_worker.test_loras import sd_dir

__all__ = ["sd_dir"]  # the tiny SD pipeline saved once per module, as a fixture here too

EX_CONFIG = 78  # launcher.supervisor.EXIT_CONFIG: "cannot start as configured"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapter files for the tiny SD pipeline, by seed name, and one for FLUX."""
    from diffusers import FluxPipeline

    from tests.gpu_worker.families import flux

    scratch = tmp_path_factory.mktemp("made")
    pipe = build_tiny_pipeline()
    files = {name: make_lora(pipe, scratch / name, seed=seed)
             for name, seed in {"ink": 1, "pastel": 2}.items()}
    flux.build(scratch / "flux-model")
    files["flux"] = make_lora(FluxPipeline.from_pretrained(scratch / "flux-model"),
                              scratch / "flux", seed=1)
    return files


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, made: dict[str, Path]) -> Path:
    """A Hugging Face cache seeded as `huggingface-cli download` would have left it."""
    cache = tmp_path_factory.mktemp("hf-cache")
    seed_hub_cache(cache, "owner/ink-lora", made["ink"])  # diffusers' default file name
    seed_hub_cache(cache, "owner/styles", made["ink"], weight_name="ink.safetensors")
    seed_hub_cache(cache, "owner/styles", made["pastel"], weight_name="pastel.safetensors")
    seed_hub_cache(cache, "owner/single", made["pastel"], weight_name="pastel-v2.safetensors")
    seed_hub_cache(cache, "other/flux-style", made["flux"])
    return cache


@pytest.fixture(scope="module", autouse=True)
def offline_from(hub_cache: Path) -> Iterator[None]:
    """HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them. huggingface_hub reads them into
    its constants when first imported (diffusers imported it long before this), so the
    constants are set too; a worker process reads them at its start (test below)."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(hub_cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield


def job(*loras: tuple[str, float], seed: int = 1) -> JobSpec:
    return JobSpec(id="j", model="m", prompt="a fox", width=64, height=64, steps=2,
                   seeds=(seed,), guidance=5.0, loras=tuple(loras))


def image_bytes(runner: PipelineRunner, spec: JobSpec) -> bytes:
    return runner.generate_batch([spec])[0][0].tobytes()


def runner_with(sd_dir: Path, *specs: str, lora_dir: Path | None = None) -> PipelineRunner:
    repos = tuple(resolve_lora_repo(spec) for spec in specs)
    return PipelineRunner(models.resolve(str(sd_dir)),
                          LoadOptions(threads=1, lora_dir=lora_dir, lora_repos=repos))


@pytest.fixture(scope="module")
def hub_runner(sd_dir: Path) -> PipelineRunner:
    """A worker's pipeline with repo adapters and no LoRA folder."""
    return runner_with(sd_dir, "owner/ink-lora", "owner/styles:pastel.safetensors")


@pytest.fixture(scope="module")
def base(hub_runner: PipelineRunner) -> bytes:
    return image_bytes(hub_runner, job())


def test_a_cached_repo_resolves_to_its_snapshot_file(hub_cache: Path, made) -> None:
    adapter = resolve_lora_repo("owner/ink-lora")
    assert adapter.name == "owner/ink-lora" and adapter.source == "hub"
    assert adapter.path.parent.parent.parent == hub_cache / "models--owner--ink-lora"
    assert adapter.path.name == DEFAULT_WEIGHT_NAME
    assert adapter.path.read_bytes() == made["ink"].read_bytes()
    assert adapter.size == made["ink"].stat().st_size


def test_repo_adapters_are_announced_as_from_the_hub(hub_runner: PipelineRunner,
                                                     made) -> None:
    announced = hub_runner.loras.announcement()
    assert sorted(announced) == ["owner/ink-lora", "owner/styles/pastel"]
    assert all(entry["source"] == "hub" for entry in announced.values())
    assert announced["owner/ink-lora"]["bytes"] == made["ink"].stat().st_size


def test_a_repo_adapter_makes_the_image_its_file_makes_from_a_folder(
        hub_runner: PipelineRunner, base: bytes, sd_dir: Path, made, tmp_path: Path) -> None:
    inked = image_bytes(hub_runner, job(("owner/ink-lora", 1.0)))
    assert inked != base
    assert hub_runner.loras.announcement()["owner/ink-lora"]["loaded"] is True
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(made["ink"], folder / "ink.safetensors")
    from_folder = PipelineRunner(models.resolve(str(sd_dir)),
                                 LoadOptions(threads=1, lora_dir=folder))
    from_folder.loras.announcement()
    assert image_bytes(from_folder, job()) == base
    assert image_bytes(from_folder, job(("ink", 1.0))) == inked
    assert image_bytes(hub_runner, job()) == base  # and without it, the base model exactly


def test_a_named_file_is_named_after_the_repo_and_the_file(hub_runner, base) -> None:
    pastel = image_bytes(hub_runner, job(("owner/styles/pastel", 1.0)))
    assert pastel not in (base, image_bytes(hub_runner, job(("owner/ink-lora", 1.0))))
    adapter = resolve_lora_repo("owner/styles:ink.safetensors")
    assert (adapter.name, adapter.path.name) == ("owner/styles/ink", "ink.safetensors")


def test_a_repo_without_the_default_file_gives_its_one_safetensors_file(made) -> None:
    adapter = resolve_lora_repo("owner/single")
    assert adapter.name == "owner/single"
    assert adapter.path.name == "pastel-v2.safetensors"
    assert adapter.path.read_bytes() == made["pastel"].read_bytes()


def test_a_repo_of_several_files_must_name_one() -> None:
    with pytest.raises(LoraSetupError, match=r"owner/styles: .*2 other .safetensors files "
                                             r"\(ink.safetensors, pastel.safetensors\).*"
                                             r"owner/styles:FILE"):
        resolve_lora_repo("owner/styles")


def test_a_repo_not_in_the_cache_is_a_clear_start_up_error(hub_cache: Path) -> None:
    for spec in ("nobody/missing", "owner/ink-lora:absent.safetensors"):
        with pytest.raises(LoraSetupError) as refused:
            resolve_lora_repo(spec)
        message = str(refused.value)
        assert message.startswith(f"--lora-repo {spec}: cannot be resolved: not in the "
                                  f"Hugging Face cache {hub_cache}")
        assert "HF_HUB_OFFLINE" in message and "\n" not in message


@pytest.mark.parametrize(("spec", "why"), [
    ("owner/x:", "no file name after ':'"),
    ("owner/x:weights.bin", "only .safetensors"),
    ("owner/x:<odd>.safetensors", "not usable"),
    ("not a repo", "cannot be resolved: HFValidationError"),
    (":x.safetensors", "cannot be resolved: HFValidationError"),
    ("../../etc", "cannot be resolved: HFValidationError"),
    ("owner/" + "x" * 300, "not usable"),
])
def test_a_spec_that_cannot_name_an_adapter_is_refused(spec: str, why: str) -> None:
    with pytest.raises(LoraSetupError, match=why):
        resolve_lora_repo(spec)


def test_a_repo_adapter_for_another_family_refuses_the_start(sd_dir: Path) -> None:
    """A folder file of another family is quietly not announced; a repo the operator named
    is a mistake to say at once."""
    flux_style = resolve_lora_repo("other/flux-style")  # resolving does not look inside
    with pytest.raises(LoraSetupError, match="other/flux-style is not for this model: its "
                                             "weights do not fit its UNet2DConditionModel"):
        PipelineRunner(models.resolve(str(sd_dir)),
                       LoadOptions(threads=1, lora_repos=(flux_style,)))


def test_a_folder_file_of_the_same_name_gives_way_to_the_repo(
        hub_runner: PipelineRunner, sd_dir: Path, made, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "loras"
    (folder / "owner").mkdir(parents=True)
    shutil.copy(made["pastel"], folder / "owner" / "ink-lora.safetensors")  # another adapter
    shutil.copy(made["pastel"], folder / "pastel.safetensors")
    both = runner_with(sd_dir, "owner/ink-lora", lora_dir=folder)
    clock = [0.0]
    both.loras._clock = lambda: clock[0]
    with caplog.at_level(logging.WARNING, logger="gpu_worker.loras"):
        announced = both.loras.announcement()
        clock[0] += 10
        assert both.loras.announcement() == announced  # looked at again: the same
    assert sorted(announced) == ["owner/ink-lora", "pastel"]
    assert announced["owner/ink-lora"]["source"] == "hub"
    assert announced["pastel"]["source"] == "file"
    hidden = [r for r in caplog.records if "hidden by --lora-repo" in r.getMessage()]
    assert len(hidden) == 1 and "owner/ink-lora.safetensors" in hidden[0].getMessage()
    inked = image_bytes(hub_runner, job(("owner/ink-lora", 1.0)))
    assert image_bytes(both, job(("owner/ink-lora", 1.0))) == inked  # the repo's, not pastel


def test_repo_adapters_alone_refuse_compile_and_fused_attention(sd_dir: Path) -> None:
    ink = resolve_lora_repo("owner/ink-lora")
    with pytest.raises(ValueError, match="--compile"):
        PipelineRunner(models.resolve(str(sd_dir)),
                       LoadOptions(threads=1, lora_repos=(ink,), compile=True))
    pipe = build_tiny_pipeline()
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(LoraSetupError, match="fused"):
        LoraLibrary(pipe, None, repos=(ink,))


# ---------------------------------------------------------------- the worker's command line


def start_worker(*flags: str, hub_cache: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    """`python -m gpu_worker` as an operator starts it, with the Hugging Face cache named by
    the environment only; no broker: these starts end before it would connect."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "gpu_worker", "--device", "cpu",
                           "--model", "tiny", "--cache-dir", str(cache_dir),
                           "--broker", "tcp://127.0.0.1:9", "--log-format", "text", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_the_worker_refuses_to_start_without_its_repo(hub_cache: Path,
                                                      cache_dir: Path) -> None:
    ran = start_worker("--lora-repo", "owner/ink-lora", "--lora-repo", "nobody/missing",
                       hub_cache=hub_cache, cache_dir=cache_dir)
    assert ran.returncode == EX_CONFIG, ran.stderr
    assert "Traceback" not in ran.stderr, ran.stderr
    last = ran.stderr.strip().splitlines()[-1]  # before it: the repo that did resolve
    assert "ERROR cannot start: --lora-repo nobody/missing: cannot be resolved: not in the " \
           f"Hugging Face cache {hub_cache}, and HF_HUB_OFFLINE is set" in last
    assert "owner/ink-lora" in ran.stderr  # resolved from the cache the environment named


def test_the_worker_refuses_to_start_with_a_repo_for_another_model(hub_cache: Path,
                                                                   cache_dir: Path) -> None:
    ran = start_worker("--lora-repo", "other/flux-style", "--no-warm-up",
                       hub_cache=hub_cache, cache_dir=cache_dir)
    assert ran.returncode == EX_CONFIG, ran.stderr
    assert "Traceback" not in ran.stderr, ran.stderr
    assert "ERROR cannot start: --lora-repo adapter other/flux-style is not for this model" \
           in ran.stderr.strip().splitlines()[-1]
