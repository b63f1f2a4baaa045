"""Turn generated images into the bytes a client asked for."""

from __future__ import annotations

import io

from PIL import Image

FORMATS = ("png", "jpeg", "webp")

# zlib level 3 is within a few percent of level 9's size at a fraction of its time.
PNG_COMPRESS_LEVEL = 3
DEFAULT_QUALITY = 95


def encode_image(image: Image.Image, fmt: str, compression: int | None = None) -> bytes:
    """Encode one image as png, jpeg or webp; ``compression`` is OpenAI's 0-100 quality."""
    buf = io.BytesIO()
    quality = DEFAULT_QUALITY if compression is None else max(0, min(100, compression))
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return buf.getvalue()
