"""LoRA adapters on the tiny SD pipeline through the runner: what a LoRA folder announces, and
what each batch gets: its adapters at their scales, the base model's exact bytes without
them, a bounded cache that evicts and reloads, and fused attention refused."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import shutil
from pathlib import Path

import pytest

from broker.protocol import JobSpec
from gpu_worker import models
from gpu_worker.loras import LoraError, LoraLibrary
from gpu_worker.pipeline import LoadOptions, PipelineRunner
from gpu_worker.tiny import build_tiny_pipeline
from tests.gpu_worker.lora_fixtures import lora_folder, make_kohya_lora, make_lora


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sd") / "model"
    build_tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA folder: two diffusers-format adapters (one in a subfolder), one kohya."""
    pipe = build_tiny_pipeline()
    folder = lora_folder(pipe, tmp_path_factory.mktemp("loras"), {"ink": 1, "styles/pastel": 2})
    kohya = make_kohya_lora(pipe, folder / "made" / "kohya", seed=3)
    shutil.copy(kohya, folder / "old-style.safetensors")
    shutil.rmtree(folder / "made")
    (folder / ".hidden.safetensors").write_bytes(b"not even a header")
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    return folder


@pytest.fixture(scope="module")
def runner(sd_dir: Path, adapters: Path) -> PipelineRunner:
    return PipelineRunner(models.resolve(str(sd_dir)),
                          LoadOptions(threads=1, lora_dir=adapters))


def job(*loras: tuple[str, float], seed: int = 1) -> JobSpec:
    return JobSpec(id="j", model="m", prompt="a fox", width=64, height=64, steps=2,
                   seeds=(seed,), guidance=5.0, loras=tuple(loras))


def image_bytes(runner: PipelineRunner, spec: JobSpec) -> bytes:
    return runner.generate_batch([spec])[0][0].tobytes()


@pytest.fixture(scope="module")
def base(runner: PipelineRunner) -> bytes:
    """The base model's image, before any adapter was ever loaded."""
    assert runner.loras.loaded() == []
    return image_bytes(runner, job())


def test_the_folder_announces_what_fits_by_path_name(runner: PipelineRunner) -> None:
    announced = runner.loras.announcement()
    assert sorted(announced) == ["ink", "old-style", "styles/pastel"]  # hidden, broken: no
    assert all(entry["source"] == "file" and entry["bytes"] > 0 for entry in announced.values())


def test_an_adapter_changes_the_image_and_its_scale_matters(runner, base) -> None:
    inked = image_bytes(runner, job(("ink", 1.0)))
    assert inked != base
    assert image_bytes(runner, job(("ink", 0.5))) not in (inked, base)
    assert image_bytes(runner, job(("ink", 1.0))) == inked  # the same request, the same bytes
    assert runner.loras.announcement()["ink"]["loaded"] is True


def test_scale_zero_is_the_base_model(runner, base) -> None:
    assert image_bytes(runner, job(("ink", 0.0))) == base


def test_two_adapters_differ_from_each_alone(runner) -> None:
    both = image_bytes(runner, job(("ink", 0.8), ("styles/pastel", 0.6)))
    assert both != image_bytes(runner, job(("ink", 0.8)))
    assert both != image_bytes(runner, job(("styles/pastel", 0.6)))
    # The order a request names them in changes nothing.
    assert both == image_bytes(runner, job(("styles/pastel", 0.6), ("ink", 0.8)))


def test_a_kohya_file_applies_too(runner, base) -> None:
    assert image_bytes(runner, job(("old-style", 1.0))) != base


def test_after_adapters_a_plain_request_is_the_base_models_exact_bytes(runner, base) -> None:
    image_bytes(runner, job(("ink", 0.9), ("styles/pastel", 0.4)))
    assert image_bytes(runner, job()) == base


def test_an_unknown_adapter_fails_the_job_not_the_worker(runner, base) -> None:
    with pytest.raises(LoraError, match="no LoRA adapter 'nope'"):
        runner.loras.apply((("nope", 1.0),))
    assert image_bytes(runner, job()) == base


def test_the_cache_evicts_the_least_recently_used_and_reloads_it_the_same(sd_dir, adapters):
    small = PipelineRunner(models.resolve(str(sd_dir)),
                           LoadOptions(threads=1, lora_dir=adapters, lora_cache=1))
    small.loras.announcement()
    inked = image_bytes(small, job(("ink", 1.0)))
    image_bytes(small, job(("styles/pastel", 1.0)))
    assert small.loras.loaded() == ["styles/pastel"]  # ink went
    assert image_bytes(small, job(("ink", 1.0))) == inked  # and comes back the same
    assert small.loras.loaded() == ["ink"]
    # A set larger than the cache still runs whole: the bound gives way to the batch.
    image_bytes(small, job(("ink", 1.0), ("styles/pastel", 1.0)))
    assert sorted(small.loras.loaded()) == ["ink", "styles/pastel"]


def test_files_added_changed_and_removed_are_noticed_without_a_restart(sd_dir, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    clock = [0.0]
    pipe_runner = PipelineRunner(models.resolve(str(sd_dir)),
                                 LoadOptions(threads=1, lora_dir=folder))
    library = pipe_runner.loras
    library._clock = lambda: clock[0]
    assert library.announcement() == {}
    made = make_lora(build_tiny_pipeline(), tmp_path / "made", seed=5)
    shutil.copy(made, folder / "new.safetensors")
    clock[0] += 10
    assert list(library.announcement()) == ["new"]
    first = image_bytes(pipe_runner, job(("new", 1.0)))
    other = make_lora(build_tiny_pipeline(), tmp_path / "other", seed=6)
    shutil.copy(other, folder / "new.safetensors")
    os.utime(folder / "new.safetensors", (1, 1))  # another version, whatever the clock
    clock[0] += 10
    library.announcement()
    assert image_bytes(pipe_runner, job(("new", 1.0))) != first  # the new file's adapter
    (folder / "new.safetensors").unlink()
    clock[0] += 10
    assert library.announcement() == {}
    with pytest.raises(LoraError):
        pipe_runner.loras.apply((("new", 1.0),))


def test_an_adapter_for_another_family_is_not_announced(sd_dir, tmp_path) -> None:
    from tests.gpu_worker.families import flux

    flux_dir = tmp_path / "flux"
    flux.build(flux_dir)
    from diffusers import FluxPipeline

    flux_pipe = FluxPipeline.from_pretrained(flux_dir)
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(make_lora(flux_pipe, tmp_path / "made", seed=1), folder / "flux-style.safetensors")
    library = LoraLibrary(build_tiny_pipeline(), folder)
    assert library.announcement() == {}


def test_fused_attention_is_refused_at_start(tmp_path) -> None:
    """A fused QKV projection has no LoRA: diffusers loads an adapter around it and leaves
    its q, k and v parts out, without a word. A worker applying adapters never fuses them
    (PipelineRunner), and a pipeline that is fused anyway is refused."""
    pipe = build_tiny_pipeline()
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused"):
        LoraLibrary(pipe, tmp_path)
    LoraLibrary(pipe, None)  # without adapters, fused is fine


def test_compile_with_a_lora_folder_is_refused_at_start(sd_dir, adapters) -> None:
    with pytest.raises(ValueError, match="--compile"):
        PipelineRunner(models.resolve(str(sd_dir)),
                       LoadOptions(threads=1, lora_dir=adapters, compile=True))


def test_switching_between_loaded_sets_loads_nothing(runner) -> None:
    """What a switch costs is measured by bench/loras.py, never asserted here; this checks
    that switching between sets held in memory loads no adapter again."""
    runner.loras.apply((("ink", 1.0),))
    runner.loras.apply((("styles/pastel", 1.0),))
    loaded = runner.loras.loaded()
    runner.loras.apply((("ink", 0.3),))
    assert sorted(runner.loras.loaded()) == sorted(loaded)


def test_a_folder_of_thousands_announces_what_a_heartbeat_can_carry(tmp_path, monkeypatch):
    from broker import protocol
    from broker.protocol import MAX_HEADER_BYTES, MsgType
    from gpu_worker import loras as loras_module

    made = make_lora(build_tiny_pipeline(), tmp_path / "made", seed=1)
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(40):
        (folder / f"{'x' * 150}-{index:04d}.safetensors").symlink_to(made)
    monkeypatch.setattr(loras_module, "MAX_ANNOUNCED", 25)
    library = LoraLibrary(build_tiny_pipeline(), folder)
    announced = library.announcement()
    assert len(announced) == 25
    frames = protocol.encode(MsgType.HEARTBEAT, {"running": [], "loras": announced})
    assert len(frames[0]) < MAX_HEADER_BYTES
    # At the real bounds, the names alone stay far under the header limit.
    assert loras_module.MAX_ANNOUNCED_CHARS + 64 * loras_module.MAX_ANNOUNCED < MAX_HEADER_BYTES
