"""How alike two 8-bit images are: PSNR and SSIM, in numpy (bench/quality.py).

Perceptual metrics (LPIPS, DreamSim) need network weights this project cannot fetch, so these
are the two classic full-reference ones:

- PSNR over every pixel of every RGB channel, peak 255: 10·log10(255² / MSE); inf for
  identical images.
- SSIM as Wang, Bovik, Sheikh and Simoncelli (2004) define it, on luma (ITU-R BT.601:
  Y = 0.299 R + 0.587 G + 0.114 B, unrounded): an 11x11 Gaussian window of sigma 1.5,
  K1 = 0.01, K2 = 0.03, L = 255, the window's weighted means, variances and covariance,
  kept only where the window lies inside the image (their reference code's "valid" filter),
  and the mean of that map. 1.0 for identical images.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WINDOW = 11
SIGMA = 1.5
K1, K2, PEAK = 0.01, 0.03, 255.0
LUMA = np.array([0.299, 0.587, 0.114])


def pixels(image: object) -> np.ndarray:
    """An image (PIL or array) as float64 HxWx3 RGB."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image,
                       dtype=np.float64)
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


def psnr(a: object, b: object) -> float:
    """Peak signal-to-noise ratio in dB, over every channel; inf where they are equal."""
    x, y = pixels(a), pixels(b)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(PEAK ** 2 / mse)


def ssim(a: object, b: object) -> float:
    """Mean structural similarity of the two images' luma (see the module's docstring)."""
    x, y = luma(a), luma(b)
    if min(x.shape) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels")
    c1, c2 = (K1 * PEAK) ** 2, (K2 * PEAK) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / \
        ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def luma(image: object) -> np.ndarray:
    return pixels(image) @ LUMA


def gaussian_window() -> np.ndarray:
    """The 1-D factor of the separable 11x11 window, summing to 1."""
    offsets = np.arange(WINDOW) - WINDOW // 2
    weights = np.exp(-(offsets ** 2) / (2 * SIGMA ** 2))
    return weights / weights.sum()


def blur(plane: np.ndarray) -> np.ndarray:
    """The window's weighted mean around every pixel it fits around ("valid"): rows, then
    columns, as the window is separable."""
    g = gaussian_window()
    rows = sliding_window_view(plane, WINDOW, axis=1) @ g
    return sliding_window_view(rows, WINDOW, axis=0) @ g
