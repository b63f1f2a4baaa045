"""The images and masks of /v1/images/edits: decoded, checked and fitted before anything is queued.

Every failure is a 400 naming the form field (``param``: "image", "image[1]", "mask"); an
upload never reaches a worker unless Pillow decoded all of it here. What travels to a worker is
PNG bytes at the size the job runs at (``prepare_input``, ``prepare_mask``).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import warnings
from urllib.parse import unquote_to_bytes

from PIL import Image, ImageOps, UnidentifiedImageError

from gpu_worker.models import ModelSpec
from http_frontend.errors import APIError, invalid

MAX_INPUT_PIXELS = 50_000_000  # an upload's own size; more is refused as a decompression bomb
_FORMATS = ("PNG", "JPEG", "WEBP")
# Pillow opens a JPEG that carries a second picture (many phones write one) as "MPO".
_ACCEPTED = {"PNG", "JPEG", "MPO", "WEBP"}
# Only to name what was sent in the error: Pillow is never asked to parse these.
_OTHER_FORMATS = ((b"GIF8", "a GIF"), (b"BM", "a BMP"), (b"II*\x00", "a TIFF"),
                  (b"MM\x00*", "a TIFF"), (b"\x00\x00\x01\x00", "an ICO"),
                  (b"%PDF", "a PDF"), (b"<svg", "an SVG"), (b"<?xml", "an XML (SVG?)"))
# What Pillow raises on a corrupt or hostile file: it has no one exception class for it.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError,
                  TypeError, KeyError, ZeroDivisionError)
_WHITE = (255, 255, 255, 255)
_EDIT_WHERE_TRANSPARENT = [255] + [0] * 255  # point() tables: alpha / luminance -> mask
_EDIT_WHERE_WHITE = [0] * 128 + [255] * 128


def read_image(data: bytes, param: str, *, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Decode an upload: PNG, JPEG or WebP only, upright, first frame; RGBA if it has alpha,
    else RGB.

    The pixel count is checked from the header before any pixel is decoded. Pillow's own
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) still applies above ``max_pixels``.
    """
    if not data:
        raise invalid(param, f"'{param}' is empty; send a PNG, JPEG or WebP image",
                      "invalid_image")
    try:
        # catch_warnings changes process-wide filters, racing other threads: harmless here,
        # since the max_pixels check below refuses what the warning is about anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _decode(data, param, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(param, None, max_pixels) from None
    except _DECODE_ERRORS as exc:
        raise invalid(param, f"'{param}' could not be decoded as an image "
                             f"({str(exc)[:200] or type(exc).__name__}); "
                             f"send a complete PNG, JPEG or WebP file", "invalid_image") from None
    return image


def _decode(data: bytes, param: str, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=_FORMATS)
    except UnidentifiedImageError:
        raise invalid(param, f"'{param}' is {_sniff(data)}; send a PNG, JPEG or WebP image",
                      "invalid_image") from None
    if image.format not in _ACCEPTED:  # formats= already limits this; a second lock is cheap
        raise invalid(param, f"'{param}' is a {image.format} image; send a PNG, JPEG or WebP "
                             f"image", "invalid_image")
    width, height = image.size
    if width * height > max_pixels:  # Image.open read only the header so far
        raise _too_large(param, image.size, max_pixels)
    if width < 1 or height < 1:
        raise invalid(param, f"'{param}' has no pixels ({width}x{height})", "invalid_image")
    image.load()  # the first frame of an animation; decoding errors surface here
    upright = ImageOps.exif_transpose(image) or image
    return _to_rgb_or_rgba(upright)


def _too_large(param: str, size: tuple[int, int] | None, max_pixels: int) -> APIError:
    claimed = f"{size[0]}x{size[1]} ({size[0] * size[1]} pixels)" if size else \
        "more pixels than this server decodes"
    return invalid(param, f"'{param}' is {claimed}; uploads may have at most {max_pixels} "
                          f"pixels", "image_too_large")


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip()
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            return f"{name} file"
    return "not a PNG, JPEG or WebP image (or it is damaged)"


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):
        # Pillow's I;16 -> RGB clips at 255 instead of scaling: a 16-bit grey PNG turns white.
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    target = "RGBA" if _has_alpha(image) else "RGB"
    return image if image.mode == target else image.convert(target)


def read_mask(data: bytes, size: tuple[int, int], param: str = "mask") -> Image.Image:
    """Decode a mask for an image of ``size``: mode L, 255 where to edit and 0 where to keep.

    OpenAI's rule: the mask's fully transparent pixels (alpha 0) are the ones to edit. A mask
    without transparency (grey or RGB, or RGBA whose alpha is 255 everywhere) follows the
    diffusers/A1111 convention instead: white (luminance >= 128) is edited, black kept.
    A mask must have the first image's size and mark at least one pixel to edit.
    """
    image = read_image(data, param)
    if image.size != size:
        raise invalid(param, f"'{param}' is {image.size[0]}x{image.size[1]} but the image is "
                             f"{size[0]}x{size[1]}; the mask must have the image's size",
                      "invalid_mask")
    if image.mode == "RGBA" and image.getchannel("A").getextrema() != (255, 255):
        mask = image.getchannel("A").point(_EDIT_WHERE_TRANSPARENT)
    else:
        mask = image.convert("L").point(_EDIT_WHERE_WHITE)
    if mask.getextrema()[1] == 0:
        raise invalid(param, f"the mask marks no pixel to edit: make the area to edit fully "
                             f"transparent (alpha 0) or, in a mask without transparency, "
                             f"white; '{param}' would return the image unchanged",
                      "invalid_mask")
    return mask


def mask_from_alpha(image: Image.Image) -> Image.Image | None:
    """The L mask (255 = edit) that ``image``'s fully transparent pixels mark, or None when it
    has none: OpenAI edits an image's transparent area when no mask is sent (dall-e-2)."""
    if image.mode != "RGBA":
        return None
    alpha = image.getchannel("A")
    if alpha.getextrema()[0] != 0:
        return None
    return alpha.point(_EDIT_WHERE_TRANSPARENT)


def fit_edit_size(width: int, height: int, spec: ModelSpec) -> tuple[int, int, str | None]:
    """The size an edit of a ``width``x``height`` input runs at on ``spec``'s model.

    The input is scaled, never cropped, into the model's pixel range, each side a multiple of
    its ``size_multiple``, keeping the aspect ratio as closely as that allows; a model with
    ``allowed_sizes`` gets the allowed size closest in aspect ratio (then in pixel count).
    The third value is a warning for the response when the size changed, else None.
    """
    if spec.allowed_sizes:
        fitted = min(spec.allowed_sizes, key=lambda s: (
            abs(math.log(s[0] / s[1] * height / width)), abs(s[0] * s[1] - width * height)))
        limits = "it takes only " + ", ".join(f"{w}x{h}" for w, h in spec.allowed_sizes)
    else:
        fitted = _fit_free_size(width, height, spec)
        limits = _limits_text(width * height, spec)
    if fitted == (width, height):
        return width, height, None
    return fitted[0], fitted[1], (f"the input image is {width}x{height}; it was resized to "
                                  f"{fitted[0]}x{fitted[1]} to fit {spec.name} ({limits})")


def _limits_text(pixels: int, spec: ModelSpec) -> str:
    text = f"multiples of {spec.size_multiple}"
    if pixels > spec.max_pixels:
        text += f", at most {spec.max_pixels} pixels"
    elif pixels < spec.min_pixels:
        text += f", at least {spec.min_pixels} pixels"
    return text


def _fit_free_size(width: int, height: int, spec: ModelSpec) -> tuple[int, int]:
    m, pixels = spec.size_multiple, width * height
    target = min(max(pixels, spec.min_pixels), spec.max_pixels)
    aspect = width / height
    target_h = math.sqrt(target / aspect)
    tallest = spec.max_pixels // (m * m)  # in multiples: a height that leaves width m
    k0 = round(target_h / m)
    # Sides near the scaled input's; the extremes only matter when the aspect ratio is too
    # extreme for the pixel range, and then one side ends at a bound.
    heights = {k for k in (1, tallest, *range(k0 - 2, k0 + 3)) if 1 <= k <= tallest}
    best: tuple[float, int, int] | None = None
    for k in heights:
        for w in _widths(k * m, aspect, spec):
            h = k * m
            score = 4 * abs(math.log(w / h / aspect)) + abs(math.log(w * h / target))
            if best is None or score < best[0]:
                best = (score, w, h)
    if best is None:
        raise ValueError(f"{spec.name}'s size limits admit no size (multiples of {m}, "
                         f"{spec.min_pixels}..{spec.max_pixels} pixels)")
    return best[1], best[2]


def _widths(h: int, aspect: float, spec: ModelSpec) -> list[int]:
    """Multiples of the model's size_multiple nearest h * aspect, clamped into its pixel range
    at height h (none when no width fits)."""
    m = spec.size_multiple
    low = max(m, -(-spec.min_pixels // (h * m)) * m)
    high = spec.max_pixels // (h * m) * m
    if low > high:
        return []
    ideal = h * aspect
    return sorted({min(max(w, low), high) for w in (math.floor(ideal / m) * m,
                                                    math.ceil(ideal / m) * m)})


def prepare_input(image: Image.Image, width: int, height: int) -> bytes:
    """The PNG bytes a worker gets: ``image`` flattened to RGB and resized to width x height."""
    if image.mode == "RGBA":
        # Pipelines take RGB: transparent areas become white (what a viewer shows), not the
        # arbitrary colour hidden under alpha 0. The mask, not the alpha, says what to edit.
        image = Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), image)
    image = image.convert("RGB")
    if image.size != (width, height):
        # reducing_gap: a large upload is first shrunk by whole factors (cheap), then
        # resampled; the same result to the eye at a fraction of the time.
        image = image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return _png(image)


def prepare_mask(mask: Image.Image, width: int, height: int) -> bytes:
    """The PNG bytes of an L mask resized to width x height (bilinear: a soft edge)."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.BILINEAR)
    return _png(mask)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    # Fast over small: these bytes travel only inside the cluster.
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def data_url_bytes(url: str, param: str, *, max_bytes: int) -> bytes:
    """The bytes of an RFC 2397 ``data:`` URL such as ``data:image/png;base64,iVBOR...``.

    Only base64 data URLs are taken; the media type may be left out (the bytes are sniffed
    later anyway). A payload whose decoded size would pass ``max_bytes`` is refused before
    it is decoded.
    """
    header, comma, payload = url.partition(",")
    if header[:5].lower() != "data:" or not comma:
        raise invalid(param, f"'{param}' is not a data URL (data:image/png;base64,...)",
                      "invalid_data_url")
    if header[5:].split(";")[-1].strip().lower() != "base64":
        raise invalid(param, f"'{param}' must be a base64 data URL "
                             f"(data:image/png;base64,...)", "invalid_data_url")
    text = "".join(payload.split())  # line-wrapped base64 is common
    if "%" in text:  # RFC 2397 allows URL escapes, e.g. %2B for "+"
        text = unquote_to_bytes(text).decode("ascii", "replace")
    size = _decoded_size(text)
    if size > max_bytes:
        raise invalid(param, f"'{param}' holds about {size} bytes; at most {max_bytes} are "
                             f"accepted", "image_too_large")
    if not text:
        raise invalid(param, f"'{param}' is an empty data URL", "invalid_data_url")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise invalid(param, f"'{param}' holds invalid base64 data", "invalid_data_url") from None


def _decoded_size(text: str) -> int:
    return len(text) * 3 // 4 - text[-2:].count("=")
