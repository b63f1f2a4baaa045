"""bench/quality.py: its image metrics against hand-computed cases, its settings' text, and a
smoke run on CPU with the miniature FLUX.1-schnell."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import _settings  # noqa: E402
import _similarity  # noqa: E402


def noise_image(seed: int = 0, shape: tuple[int, int] = (32, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3)).astype(np.uint8)


# ------------------------------------------------------------------------------ PSNR


def test_psnr_of_an_image_against_itself_is_inf() -> None:
    image = noise_image()
    assert _similarity.psnr(image, image.copy()) == math.inf


def test_psnr_of_one_level_off_everywhere_is_20_log10_255() -> None:
    image = np.full((16, 16, 3), 100, np.uint8)
    # MSE = 1, so PSNR = 10 log10(255² / 1) = 48.1308 dB
    assert _similarity.psnr(image, image + 1) == pytest.approx(48.1308, abs=1e-4)


def test_psnr_counts_every_channel() -> None:
    a = np.zeros((10, 10, 3), np.uint8)
    b = a.copy()
    b[..., 0] = 30  # one channel of three: MSE = 900 / 3 = 300
    assert _similarity.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 300))


# ------------------------------------------------------------------------------ SSIM


def test_ssim_of_identical_images_is_one() -> None:
    image = noise_image()
    assert _similarity.ssim(image, image.copy()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_two_flat_images_is_the_luminance_term_alone() -> None:
    # No variance anywhere: SSIM = (2·a·b + C1) / (a² + b² + C1), C1 = (0.01·255)² = 6.5025
    a, b = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 110, np.uint8)
    expected = (2 * 100 * 110 + 6.5025) / (100 ** 2 + 110 ** 2 + 6.5025)  # 0.995477
    assert _similarity.ssim(a, b) == pytest.approx(expected, rel=1e-9)


def test_ssim_matches_the_windowed_formula_computed_window_by_window() -> None:
    x = _similarity.luma(noise_image(1, (13, 12)))
    y = _similarity.luma(noise_image(2, (13, 12)))
    g = _similarity.gaussian_window()
    window = np.outer(g, g)  # the 2-D Gaussian, sum 1
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for top in range(13 - 10):
        for left in range(12 - 10):
            px, py = x[top:top + 11, left:left + 11], y[top:top + 11, left:left + 11]
            mx, my = (window * px).sum(), (window * py).sum()
            vx = (window * (px - mx) ** 2).sum()
            vy = (window * (py - my) ** 2).sum()
            cov = (window * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cov + c2)
                          / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert len(values) == 6
    assert _similarity.ssim(noise_image(1, (13, 12)), noise_image(2, (13, 12))) == \
        pytest.approx(np.mean(values), rel=1e-9)


def test_ssim_falls_with_a_shift_and_with_more_noise() -> None:
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 255, 48)
    smooth = np.clip(np.add.outer(ramp, ramp) / 2 + rng.normal(0, 20, (48, 48)), 0, 255)
    image = np.repeat(smooth[..., None], 3, axis=2).astype(np.uint8)
    shifted = np.roll(image, 3, axis=1)

    def noisy(sigma: float) -> np.ndarray:
        return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)

    assert _similarity.ssim(image, shifted) < 0.9
    little, more = _similarity.ssim(image, noisy(5)), _similarity.ssim(image, noisy(40))
    assert 1.0 > little > more
    assert _similarity.psnr(image, noisy(5)) > _similarity.psnr(image, noisy(40))


def test_ssim_of_grey_images_reads_the_grey_level() -> None:
    grey = np.full((12, 12), 80, np.uint8)  # mode "L"-like: one channel
    assert _similarity.luma(grey) == pytest.approx(np.full((12, 12), 80.0))


def test_ssim_refuses_images_smaller_than_its_window() -> None:
    with pytest.raises(ValueError, match="at least 11x11"):
        _similarity.ssim(noise_image(shape=(10, 30)), noise_image(shape=(10, 30)))


# ------------------------------------------------------------------------------ settings


def test_all_is_plain_each_step_cache_each_quantisation_and_compile() -> None:
    labels = [s.label for s in _settings.expand(["all"])]
    assert labels == ["plain", "step-cache=first-block:threshold=0.08",
                      "step-cache=taylorseer:interval=3", "step-cache=mag", "quantize=fp8",
                      "quantize=fp8-weight-only", "quantize=int8", "quantize=int8-weight-only",
                      "compile"]
    compiled = [s.label for s in _settings.expand(["plain", "quantize=int8"], compile_each=True)]
    assert compiled == ["compile", "quantize=int8+compile"]


def test_a_setting_reads_as_the_worker_flags() -> None:
    setting = _settings.parse("quantize=fp8+compile=full")
    assert (setting.quantize, setting.compile_scope, setting.step_cache) == ("fp8", "full",
                                                                             "none")
    assert not setting.dense and _settings.parse("compile").dense
    assert _settings.parse("plain").dense
    cached = _settings.parse("step-cache=taylorseer:interval=3,warmup=1")
    assert cached.step_cache == "taylorseer:interval=3,warmup=1" and not cached.dense
    for bad in ("turbo", "quantize", "quantize=fp8+fast=1"):
        with pytest.raises(_settings.SettingError):
            _settings.parse(bad)


# ------------------------------------------------------------------------------ the script


def test_smoke_run_on_cpu_compares_each_setting_with_plain(
        capsys: pytest.CaptureFixture[str]) -> None:
    import quality

    # compile's wiring is gpu.py's test; here one setting that changes the images, one that
    # the CPU cannot run
    args = ["--device", "cpu", "--tiny", "--size", "32", "--prompts", "2", "--repeats", "1",
            "--models", "flux-schnell", "--setting", "quantize=int8-weight-only",
            "--setting", "quantize=fp8"]
    assert quality.main(args) == 0
    out = capsys.readouterr().out
    assert "random weights: these figures prove only that each setting is wired" in out
    rows = {row[1]: row for row in (line.split() for line in out.splitlines())
            if row and row[0] == "flux-schnell" and len(row) > 3}
    assert list(rows) == ["plain", "quantize=int8-weight-only", "quantize=fp8"]
    # columns: model setting images PSNR min SSIM min repeats s/image time/plain speed-up
    assert rows["plain"][2:8] == ["2", "inf", "inf", "1.0000", "1.0000", "yes"]
    assert rows["plain"][9:] == ["1.00", "1.00"]
    quantised = rows["quantize=int8-weight-only"]
    assert 20 < float(quantised[3]) < math.inf and float(quantised[5]) <= 1.0
    assert quantised[7] == "yes"
    assert float(quantised[9]) * float(quantised[10]) == pytest.approx(1.0, abs=0.02)
    assert rows["quantize=fp8"][2:] == ["not", "run", "[1]"]
    assert "[1] --quantize fp8 runs float8 matmuls" in out


def test_real_size_on_a_cpu_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    import quality

    with pytest.raises(SystemExit) as stopped:
        quality.parse_args(["--device", "cpu"])
    assert stopped.value.code == 2
    assert "give --tiny" in capsys.readouterr().err


def test_a_setting_that_fails_is_a_row_and_the_run_goes_on(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import quality

    from gpu_worker.pipeline import PipelineRunner

    generate = PipelineRunner.generate_batch

    def failing(self: PipelineRunner, jobs: list, *args: object, **kwargs: object) -> list:
        if self.options.quantize != "none":
            raise RuntimeError("no kernel for this layout")
        return generate(self, jobs, *args, **kwargs)

    monkeypatch.setattr(PipelineRunner, "generate_batch", failing)
    assert quality.main(["--device", "cpu", "--tiny", "--size", "32", "--prompts", "1",
                         "--repeats", "1", "--models", "flux-schnell",
                         "--setting", "quantize=int8-weight-only"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^flux-schnell\s+quantize=int8-weight-only\s+failed \[1\]", out,
                     re.MULTILINE)
    assert "[1] quantize=int8-weight-only: RuntimeError('no kernel for this layout')" in out
    assert re.search(r"^flux-schnell\s+plain\s+1\s+inf", out, re.MULTILINE)
