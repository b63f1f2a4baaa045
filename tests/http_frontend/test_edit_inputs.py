"""Uploads for /v1/images/edits: decoding, masks, size fitting, data URLs (edit_inputs)."""

from __future__ import annotations

import base64
import io
import math
import struct
import tracemalloc
import zlib

import pytest
from PIL import Image

from gpu_worker import models
from http_frontend import edit_inputs
from http_frontend.edit_inputs import (
    data_url_bytes,
    fit_edit_size,
    mask_from_alpha,
    prepare_input,
    prepare_mask,
    read_image,
    read_mask,
)
from http_frontend.errors import APIError
from tests.openapi_spec import validate

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png(image: Image.Image, **options) -> bytes:
    return encode(image, "PNG", **options)


def assert_bad(call, param: str, code: str, *fragments: str) -> APIError:
    with pytest.raises(APIError) as info:
        call()
    error = info.value
    assert (error.status, error.param, error.code) == (400, param, code), error.message
    assert error.type == "invalid_request_error"
    for fragment in fragments:
        assert fragment in error.message
    validate(error.body(), "ErrorResponse")
    return error


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, *, idat: bytes | None = None) -> bytes:
    """An 8-bit grey PNG of width x height, all black, built row by row: a real bomb of a few
    hundred KB decodes to width*height bytes, yet making it never holds that much."""
    if idat is None:
        squeeze = zlib.compressobj(9)
        row = b"\x00" * (width + 1)  # filter byte 0, then black pixels
        idat = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def halves(size=(40, 20), left=RED, right=BLUE) -> Image.Image:
    """Left half one colour, right half another: shows which way an image was turned."""
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def near(pixel, colour, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], colour, strict=True))


# ---------------------------------------------------------------------------------------------
# read_image: formats


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepts_png_jpeg_and_webp_with_their_size(fmt: str) -> None:
    image = read_image(encode(halves((64, 48)), fmt), "image")
    assert image.size == (64, 48)
    assert image.mode == "RGB"
    assert near(image.getpixel((2, 2)), RED) and near(image.getpixel((60, 40)), BLUE)


def test_the_format_comes_from_the_bytes_not_a_name() -> None:
    # A JPEG is a JPEG whatever the client called it; nothing here reads a filename.
    assert read_image(encode(Image.new("RGB", (8, 8)), "JPEG"), "image").size == (8, 8)


def test_a_jpeg_with_a_second_picture_is_a_jpeg() -> None:
    # Phones write MPO (JPEG + a depth or preview picture); Pillow names it MPO.
    data = encode(Image.new("RGB", (16, 8), RED), "MPO", save_all=True,
                  append_images=[Image.new("RGB", (16, 8), BLUE)])
    image = read_image(data, "image")
    assert image.size == (16, 8) and near(image.getpixel((0, 0)), RED)


@pytest.mark.parametrize(("fmt", "named"), [("GIF", "a GIF file"), ("BMP", "a BMP file"),
                                            ("TIFF", "a TIFF file"), ("ICO", "an ICO file")])
def test_other_image_formats_are_refused_by_name(fmt: str, named: str) -> None:
    data = encode(Image.new("RGB", (16, 16), RED), fmt)
    assert_bad(lambda: read_image(data, "image[1]"), "image[1]", "invalid_image",
               "'image[1]'", named, "PNG, JPEG or WebP")


@pytest.mark.parametrize("data", [
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    b'<?xml version="1.0"?><svg/>',
    b"%PDF-1.7 ...",
])
def test_documents_are_refused(data: bytes) -> None:
    assert_bad(lambda: read_image(data, "image"), "image", "invalid_image", "PNG, JPEG or WebP")


@pytest.mark.parametrize("data", [b"", b"\x00", b"hello, world", bytes(range(256)) * 8,
                                  b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00WEBP"])
def test_empty_and_garbage_are_refused(data: bytes) -> None:
    assert_bad(lambda: read_image(data, "image"), "image", "invalid_image", "'image'")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_truncated_file_is_refused(fmt: str) -> None:
    noise = Image.effect_noise((256, 256), 64).convert("RGB")  # incompressible: a long file
    data = encode(noise, fmt)
    half = data[: len(data) // 2]
    assert_bad(lambda: read_image(half, "image"), "image", "invalid_image",
               "could not be decoded")


def test_a_png_with_a_corrupt_checksum_is_refused() -> None:
    data = bytearray(png(Image.new("RGB", (32, 32), RED)))
    data[40] ^= 0xFF  # inside IDAT
    assert_bad(lambda: read_image(bytes(data), "image"), "image", "invalid_image")


# ---------------------------------------------------------------------------------------------
# read_image: decompression bombs


def test_a_bomb_is_refused_from_its_header_before_decoding() -> None:
    bomb = crafted_png(8000, 8000)  # 64 Mpx of black: about 60 KB of file
    assert len(bomb) < 500_000
    tracemalloc.start()
    try:
        error = assert_bad(lambda: read_image(bomb, "image"), "image", "image_too_large",
                           "8000x8000", "64000000 pixels", "at most 50000000")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, "the bomb was decoded"
    assert error.message.startswith("'image'")


def test_the_crafted_png_is_a_real_image() -> None:
    # The bomb above is refused for its size alone: the same recipe, small, decodes.
    image = read_image(crafted_png(300, 200), "image")
    assert image.size == (300, 200) and image.getpixel((150, 100)) == (0, 0, 0)


@pytest.mark.parametrize("side", [10_000, 100_000])
def test_headers_past_pillows_own_limit_are_too_large_too(side: int) -> None:
    # Above Image.MAX_IMAGE_PIXELS Pillow warns (made an error here), above twice it raises.
    bomb = crafted_png(side, side, idat=zlib.compress(b"\x00" * 64))
    assert_bad(lambda: read_image(bomb, "image"), "image", "image_too_large", "at most")


def test_max_pixels_is_an_argument() -> None:
    data = png(Image.new("RGB", (20, 20)))
    assert_bad(lambda: read_image(data, "mask", max_pixels=399), "mask", "image_too_large",
               "20x20 (400 pixels)", "at most 399")
    assert read_image(data, "mask", max_pixels=400).size == (20, 20)
    assert edit_inputs.MAX_INPUT_PIXELS == 50_000_000


def test_a_header_with_no_data_under_the_limit_is_a_decode_error() -> None:
    data = crafted_png(7000, 7000, idat=b"")
    assert_bad(lambda: read_image(data, "image"), "image", "invalid_image")


# ---------------------------------------------------------------------------------------------
# read_image: orientation, frames and modes


def exif_with_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_is_turned_upright(fmt: str) -> None:
    # Orientation 6: the stored picture must turn 90 degrees clockwise to be upright, so its
    # left half (red) ends on top.
    data = encode(halves((40, 20)), fmt, exif=exif_with_orientation(6))
    image = read_image(data, "image")
    assert image.size == (20, 40)
    assert near(image.getpixel((10, 5)), RED) and near(image.getpixel((10, 35)), BLUE)


def test_exif_orientation_3_is_turned_half_round() -> None:
    data = png(halves((40, 20)), exif=exif_with_orientation(3))
    image = read_image(data, "image")
    assert image.size == (40, 20)
    assert image.getpixel((35, 10)) == RED and image.getpixel((5, 10)) == BLUE


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_animation_gives_its_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100,
                  lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image = read_image(data, "image")
    assert image.size == (16, 16) and near(image.getpixel((8, 8)), RED, 2)


def test_a_palette_with_transparency_becomes_rgba() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    decoded = read_image(png(image, transparency=0), "image")
    assert decoded.mode == "RGBA"
    assert decoded.getpixel((0, 0))[3] == 0 and decoded.getpixel((1, 1)) == (255, 0, 0, 255)


def test_a_palette_without_transparency_becomes_rgb() -> None:
    image = Image.new("RGB", (4, 4), RED).convert("P")
    decoded = read_image(png(image), "image")
    assert decoded.mode == "RGB" and decoded.getpixel((1, 1)) == RED


@pytest.mark.parametrize(("mode", "expected"), [("L", "RGB"), ("1", "RGB"), ("LA", "RGBA"),
                                                ("RGBA", "RGBA"), ("RGB", "RGB")])
def test_png_modes(mode: str, expected: str) -> None:
    assert read_image(png(Image.new(mode, (4, 4))), "image").mode == expected


def test_a_16_bit_grey_png_keeps_its_greys() -> None:
    # Pillow's own I;16 -> RGB clips every value above 255 to white.
    image = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32768, 65535)):
        image.putpixel((x, 0), value)
    decoded = read_image(png(image), "image")
    assert decoded.mode == "RGB"
    assert [decoded.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_a_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")  # red in CMYK
    image = read_image(data, "image")
    assert image.mode == "RGB" and near(image.getpixel((4, 4)), RED)


def test_a_grey_jpeg_becomes_rgb() -> None:
    image = read_image(encode(Image.new("L", (8, 8), 200), "JPEG"), "image")
    assert image.mode == "RGB" and near(image.getpixel((4, 4)), (200, 200, 200), 3)


# ---------------------------------------------------------------------------------------------
# read_mask


def alpha_mask(size=(8, 8), hole=(0, 0, 4, 8), alpha_elsewhere=255) -> bytes:
    """An RGBA mask, opaque black except a fully transparent ``hole`` (OpenAI's style)."""
    mask = Image.new("RGBA", size, (0, 0, 0, alpha_elsewhere))
    mask.paste((255, 255, 255, 0), hole)
    return png(mask)


def test_transparent_pixels_are_the_ones_to_edit() -> None:
    mask = read_mask(alpha_mask(), (8, 8))
    assert mask.mode == "L" and mask.size == (8, 8)
    assert mask.getpixel((1, 1)) == 255 and mask.getpixel((6, 6)) == 0


def test_with_alpha_the_colour_does_not_matter() -> None:
    # Opaque white is kept: transparency, not colour, marks the edit in OpenAI's rule.
    image = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    image.paste((0, 0, 0, 0), (0, 0, 2, 2))
    mask = read_mask(png(image), (8, 8))
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((5, 5)) == 0


def test_only_fully_transparent_pixels_are_edited() -> None:
    image = Image.new("RGBA", (3, 1), (0, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 1))
    mask = read_mask(png(image), (3, 1))
    assert [mask.getpixel((x, 0)) for x in range(3)] == [255, 0, 0]


def test_half_transparency_alone_marks_nothing() -> None:
    data = png(Image.new("RGBA", (8, 8), (255, 255, 255, 128)))
    assert_bad(lambda: read_mask(data, (8, 8)), "mask", "invalid_mask",
               "the mask marks no pixel to edit")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_without_transparency_white_is_edited(mode: str) -> None:
    black, white = {"L": (0, 255), "RGB": ((0, 0, 0), (255, 255, 255)),
                    "RGBA": ((0, 0, 0, 255), (255, 255, 255, 255))}[mode]
    image = Image.new(mode, (8, 8), black)
    image.paste(white, (4, 0, 8, 8))
    mask = read_mask(png(image), (8, 8))
    assert mask.getpixel((1, 1)) == 0 and mask.getpixel((6, 6)) == 255


def test_white_means_luminance_from_128() -> None:
    image = Image.new("L", (2, 1))
    image.putpixel((0, 0), 127)
    image.putpixel((1, 0), 128)
    mask = read_mask(png(image), (2, 1))
    assert [mask.getpixel((0, 0)), mask.getpixel((1, 0))] == [0, 255]


def test_a_palette_mask_with_a_transparent_index_follows_openai() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    mask = read_mask(png(image, transparency=0), (4, 4))
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((2, 2)) == 0  # white, yet kept


@pytest.mark.parametrize("data", [
    png(Image.new("RGBA", (8, 8), (0, 0, 0, 255))),  # opaque: the white rule, and all black
    png(Image.new("L", (8, 8), 0)),
    png(Image.new("RGB", (8, 8), (127, 127, 127))),
])
def test_a_mask_that_keeps_everything_is_refused(data: bytes) -> None:
    assert_bad(lambda: read_mask(data, (8, 8)), "mask", "invalid_mask",
               "the mask marks no pixel to edit", "fully transparent", "white")


def test_a_mask_of_another_size_is_refused_naming_both() -> None:
    assert_bad(lambda: read_mask(alpha_mask((8, 6)), (64, 48)), "mask", "invalid_mask",
               "8x6", "64x48")


def test_a_mask_goes_through_the_image_checks() -> None:
    assert_bad(lambda: read_mask(encode(Image.new("RGB", (8, 8)), "GIF"), (8, 8)), "mask",
               "invalid_image", "a GIF file")
    assert_bad(lambda: read_mask(b"", (8, 8), "mask[0]"), "mask[0]", "invalid_image")


@pytest.mark.parametrize("fmt", ["WEBP", "JPEG"])
def test_webp_and_jpeg_masks_decode(fmt: str) -> None:
    image = Image.new("L", (16, 16), 0)
    image.paste(255, (0, 0, 8, 16))
    mask = read_mask(encode(image, fmt, quality=95), (16, 16))
    assert mask.getpixel((2, 8)) == 255 and mask.getpixel((13, 8)) == 0


def test_mask_from_alpha_for_an_image_sent_without_a_mask() -> None:
    image = Image.new("RGBA", (4, 4), (9, 9, 9, 255))
    assert mask_from_alpha(image) is None  # opaque: nothing marked
    assert mask_from_alpha(Image.new("RGB", (4, 4))) is None
    image.putpixel((3, 3), (0, 0, 0, 0))
    mask = mask_from_alpha(image)
    assert mask is not None and mask.mode == "L"
    assert mask.getpixel((3, 3)) == 255 and mask.getpixel((0, 0)) == 0


# ---------------------------------------------------------------------------------------------
# fit_edit_size


def spec(**limits):
    return models.generic("x", **limits)


def test_a_size_that_fits_is_kept_without_a_warning() -> None:
    assert fit_edit_size(1024, 768, spec(max_pixels=1024 * 1024)) == (1024, 768, None)


def test_a_large_photo_shrinks_to_the_model_keeping_its_aspect() -> None:
    flux = spec(max_pixels=1024 * 1024, size_multiple=16).with_defaults(name="flux.2-klein")
    width, height, warning = fit_edit_size(3000, 2000, flux)
    assert (width, height) == (1248, 832)
    assert warning == ("the input image is 3000x2000; it was resized to 1248x832 to fit "
                       "flux.2-klein (multiples of 16, at most 1048576 pixels)")


@pytest.mark.parametrize("size", [(3000, 2000), (4032, 3024), (1080, 1920), (5000, 333),
                                  (1023, 1025), (2049, 2047), (1234, 567), (17, 9999)])
@pytest.mark.parametrize("multiple", [8, 16, 32, 64])
def test_fitted_sizes_obey_the_model(size: tuple[int, int], multiple: int) -> None:
    model = spec(max_pixels=1024 * 1024, min_pixels=256 * 256, size_multiple=multiple)
    width, height, _ = fit_edit_size(*size, model)
    assert width % multiple == 0 and height % multiple == 0
    assert model.min_pixels <= width * height <= model.max_pixels
    if max(size) / min(size) < 8:  # not so extreme that one side meets a bound
        assert abs(math.log(width / height * size[1] / size[0])) < 0.05
        assert width * height > 0.85 * min(size[0] * size[1], model.max_pixels)


def test_a_small_image_grows_to_the_least_pixels() -> None:
    width, height, warning = fit_edit_size(10, 10, spec(min_pixels=64 * 64, size_multiple=16))
    assert (width, height) == (64, 64)
    assert warning is not None and "at least 4096 pixels" in warning and "10x10" in warning


def test_rounding_alone_warns_too() -> None:
    width, height, warning = fit_edit_size(1000, 700, spec(size_multiple=16))
    assert width % 16 == 0 and height % 16 == 0
    assert abs(width - 1000) <= 16 and abs(height - 700) <= 16
    assert warning is not None and "multiples of 16" in warning and "pixels" not in warning


def test_an_extreme_aspect_ratio_still_gets_a_legal_size() -> None:
    model = spec(max_pixels=1024 * 1024, min_pixels=64 * 64, size_multiple=16)
    for size in [(100_000, 1), (1, 100_000), (40_000, 30)]:
        width, height, _ = fit_edit_size(*size, model)
        assert width % 16 == 0 and height % 16 == 0
        assert model.min_pixels <= width * height <= model.max_pixels
        assert (width > height) == (size[0] > size[1])


def test_allowed_sizes_give_the_nearest_aspect_ratio() -> None:
    hunyuan = models.FAMILIES["HunyuanDiTPipeline"].with_defaults(name="hunyuan")
    assert fit_edit_size(3000, 2000, hunyuan)[:2] == (1280, 768)  # 5:3 is nearest 3:2
    # 4:3 is nearest 7:5, and of the 4:3 sizes 1280x960 nearest its 1.4 Mpx
    assert fit_edit_size(1400, 1000, hunyuan)[:2] == (1280, 960)
    assert fit_edit_size(600, 1000, hunyuan)[:2] == (768, 1280)  # 3:5
    assert fit_edit_size(1280, 1280, hunyuan) == (1280, 1280, None)
    width, height, warning = fit_edit_size(500, 500, hunyuan)
    assert (width, height) == (1024, 1024)  # of the square sizes, the nearer in pixels
    assert warning is not None and "it takes only 1024x1024, 1280x1280" in warning


# ---------------------------------------------------------------------------------------------
# prepare_input / prepare_mask


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_prepare_input_resizes_to_an_rgb_png() -> None:
    out = decoded(prepare_input(halves((300, 200)), 96, 64))
    assert (out.size, out.mode) == ((96, 64), "RGB")
    assert near(out.getpixel((5, 32)), RED, 2) and near(out.getpixel((90, 32)), BLUE, 2)


def test_prepare_input_keeps_an_image_of_the_size_exactly() -> None:
    image = Image.effect_noise((32, 16), 50).convert("RGB")
    assert decoded(prepare_input(image, 32, 16)).tobytes() == image.tobytes()


def test_prepare_input_flattens_transparency_over_white() -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))  # hidden black under full transparency
    image.putpixel((1, 0), (0, 0, 0, 128))
    out = decoded(prepare_input(image, 4, 4))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == RED
    assert near(out.getpixel((1, 0)), (127, 127, 127), 2)


def test_prepare_mask_resizes_to_an_l_png_with_a_soft_edge() -> None:
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (4, 0, 8, 8))
    out = decoded(prepare_mask(mask, 64, 64))
    assert (out.size, out.mode) == ((64, 64), "L")
    assert out.getpixel((2, 32)) == 0 and out.getpixel((60, 32)) == 255
    edge = {out.getpixel((x, 32)) for x in range(64)}
    assert any(0 < v < 255 for v in edge)


def test_prepare_mask_of_the_size_is_exact() -> None:
    mask = read_mask(alpha_mask(), (8, 8))
    assert decoded(prepare_mask(mask, 8, 8)).tobytes() == mask.tobytes()


# ---------------------------------------------------------------------------------------------
# data_url_bytes


PAYLOAD = png(Image.new("RGB", (4, 4), RED))
B64 = base64.b64encode(PAYLOAD).decode()


@pytest.mark.parametrize("url", [
    f"data:image/png;base64,{B64}",
    f"data:;base64,{B64}",
    f"DATA:image/PNG;BASE64,{B64}",
    f"data:image/png;name=x.png;base64,{B64}",
    f"data:application/octet-stream;base64,{B64}",
    "data:image/png;base64," + "\n".join(B64[i:i + 76] for i in range(0, len(B64), 76)),
    f"data:image/png;base64,{B64.rstrip('=')}",
    f"data:image/png;base64,{B64.replace('+', '%2B').replace('/', '%2F')}",
    f"data:image/png;base64,{base64.urlsafe_b64encode(PAYLOAD).decode()}",
])
def test_data_urls_decode(url: str) -> None:
    assert data_url_bytes(url, "image", max_bytes=10_000) == PAYLOAD


@pytest.mark.parametrize(("url", "fragment"), [
    ("https://example.com/a.png", "not a data URL"),
    ("data:image/png;base64", "not a data URL"),  # no comma
    (f"data:image/png,{B64}", "base64 data URL"),
    ("data:text/plain,hello", "base64 data URL"),
    ("data:image/png;base64,", "empty data URL"),
    ("data:image/png;base64,abc*def=", "invalid base64"),
    ("data:image/png;base64,a", "invalid base64"),
    ("data:image/png;base64,AAAA====AAAA", "invalid base64"),
    ("data:image/png;base64,\u00e9\u00e9\u00e9\u00e9", "invalid base64"),
    ("", "not a data URL"),
])
def test_bad_data_urls_are_refused(url: str, fragment: str) -> None:
    assert_bad(lambda: data_url_bytes(url, "images[0].image_url", max_bytes=10_000),
               "images[0].image_url", "invalid_data_url", fragment)


def test_a_data_url_too_large_is_refused_before_decoding(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(edit_inputs.base64, "b64decode", lambda *a, **k: calls.append(a))
    url = "data:image/png;base64," + "A" * 4000  # 3000 bytes
    assert_bad(lambda: data_url_bytes(url, "image", max_bytes=2999), "image",
               "image_too_large", "3000 bytes", "at most 2999")
    assert calls == []


def test_a_data_url_of_exactly_max_bytes_is_taken() -> None:
    data = bytes(range(256)) * 4  # 1024 bytes: its base64 ends in "=="
    url = "data:;base64," + base64.b64encode(data).decode()
    assert data_url_bytes(url, "image", max_bytes=1024) == data
    assert_bad(lambda: data_url_bytes(url, "image", max_bytes=1023), "image", "image_too_large")
