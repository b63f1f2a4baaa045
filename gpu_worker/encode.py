"""Turn generated images into the bytes a client asked for, with what they say about themselves.

A finished image carries, in its metadata (docs/image-metadata.md):

- always, XMP marking it as made by a trained model (IPTC DigitalSourceType
  trainedAlgorithmicMedia), which the operator cannot turn off;
- unless the worker runs with --no-image-metadata, how it was made: the "parameters" text that
  Automatic1111-compatible tools read, and the same fields as JSON.

Only what the request and the image's seed determine goes in, so one request still gives
identical bytes. Previews carry nothing. An operator may add an invisible watermark and a signed
C2PA manifest (gpu_worker/marking.py); a manifest makes the bytes differ on every signing.
"""

from __future__ import annotations

import io
import json
import re
import struct
from dataclasses import asdict, dataclass
from typing import Any
from xml.sax.saxutils import escape

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from broker.protocol import JobSpec
from gpu_worker.marking import Marking

FORMATS = ("png", "jpeg", "webp")

# zlib level 3 is within a few percent of level 9's size at a fraction of its time.
PNG_COMPRESS_LEVEL = 3
DEFAULT_QUALITY = 95

PARAMETERS_KEY = "parameters"  # the PNG text chunk Automatic1111 writes and reads
JSON_KEY = "diffusion-cluster"  # the PNG text chunk with the fields as JSON
XMP_KEY = "XML:com.adobe.xmp"  # the PNG iTXt keyword the XMP specification names
AI_GENERATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
XMP_NAMESPACE = "urn:diffusion-cluster:xmp:1.0/"  # ours, for the JSON in JPEG and WebP

# A JPEG marker segment holds at most 65533 bytes; Pillow refuses to write a longer one.
JPEG_MAX_EXIF = 65533
JPEG_MAX_XMP = 65533 - len(b"http://ns.adobe.com/xap/1.0/\0")

_XMP = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
    xmlns:dcluster="{namespace}">
   <Iptc4xmpExt:DigitalSourceType>{source}</Iptc4xmpExt:DigitalSourceType>{generation}
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""
_XMP_GENERATION = "\n   <dcluster:generation>{}</dcluster:generation>"
# Characters XML 1.0 forbids that JSON leaves as they are (it escapes the C0 controls itself).
_NOT_XML = re.compile("[\ufffe\uffff]")


@dataclass(frozen=True, kw_only=True)
class Generation:
    """How one image was made: the request's fields and this image's seed, nothing else."""

    prompt: str
    negative_prompt: str | None
    model: str
    width: int
    height: int
    steps: int
    guidance: float | None
    seed: int
    output_format: str

    @classmethod
    def of(cls, job: JobSpec, seed: int) -> Generation:
        negative = None if job.negative_prompt is None else _valid(job.negative_prompt)
        return cls(prompt=_valid(job.prompt), negative_prompt=negative, model=_valid(job.model),
                   width=job.width, height=job.height, steps=job.steps, guidance=job.guidance,
                   seed=seed, output_format=job.output_format)

    def parameters(self) -> str:
        """The generation as Automatic1111's infotext; fields it has and we do not are left out."""
        settings = {"Steps": self.steps, "CFG scale": self.guidance, "Seed": self.seed,
                    "Size": f"{self.width}x{self.height}", "Model": self.model}
        line = ", ".join(f"{key}: {_quote(str(value))}"
                         for key, value in settings.items() if value is not None)
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        return f"{self.prompt}{negative}\n{line}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class ImageMetadata:
    """What a finished image says: always that a model made it; how, unless ``generation`` is
    None (the operator keeps prompts out of images)."""

    generation: Generation | None = None
    model: str = ""  # the model that made it, for a C2PA manifest (not a private setting)


def encode_image(image: Image.Image, fmt: str, compression: int | None = None, *,
                 metadata: ImageMetadata | None = None, marking: Marking | None = None
                 ) -> bytes:
    """Encode one image as png, jpeg or webp; ``compression`` is OpenAI's 0-100 quality.

    Without ``metadata`` (previews) the image carries none; ``marking`` adds the operator's
    watermark and manifest to a finished image.
    """
    if marking is not None:
        image = marking.pixels(image)
    data = _encode(image, fmt, compression, metadata)
    if marking is not None:
        data = marking.file(data, fmt, model=metadata.model if metadata else "")
    return data


def _encode(image: Image.Image, fmt: str, compression: int | None,
            metadata: ImageMetadata | None) -> bytes:
    buf = io.BytesIO()
    quality = DEFAULT_QUALITY if compression is None else max(0, min(100, compression))
    options = {} if metadata is None else _metadata_options(fmt, metadata.generation)
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, **options)
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality, **options)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, method=4, **options)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return buf.getvalue()


def _metadata_options(fmt: str, generation: Generation | None) -> dict[str, Any]:
    """Pillow's save options that write the metadata in format ``fmt``."""
    if fmt == "png":
        return {"pnginfo": _png_chunks(generation)}
    return _exif_and_xmp(generation, jpeg=fmt == "jpeg")


def _png_chunks(generation: Generation | None) -> PngInfo:
    info = PngInfo()
    if generation is not None:
        info.add_text(PARAMETERS_KEY, generation.parameters())  # tEXt, or iTXt beyond latin-1
        info.add_text(JSON_KEY, generation.to_json())
    info.add_itxt(XMP_KEY, _xmp(None))
    return info


def _exif_and_xmp(generation: Generation | None, *, jpeg: bool) -> dict[str, Any]:
    """Pillow's save options for JPEG and WebP: the parameters in EXIF, the JSON in XMP.

    A JPEG segment that would be too long is left out whole, never cut: a very long prompt
    loses its EXIF copy, its XMP copy, or both, each checked on its own; the AI marking stays.
    """
    if generation is None:
        return {"xmp": _xmp(None).encode()}
    options: dict[str, Any] = {}
    exif = _user_comment_exif(generation.parameters())
    if not jpeg or len(exif) <= JPEG_MAX_EXIF:
        options["exif"] = exif
    xmp = _xmp(generation).encode()
    options["xmp"] = xmp if not jpeg or len(xmp) <= JPEG_MAX_XMP else _xmp(None).encode()
    return options


def _user_comment_exif(text: str) -> bytes:
    """EXIF holding only a UserComment, as Automatic1111 writes it (with piexif): big-endian
    TIFF, and the text in UTF-16BE after the UNICODE prefix, so any character survives."""
    comment = b"UNICODE\0" + text.encode("utf-16-be")
    ifd0 = 8  # right after the TIFF header
    exif_ifd = ifd0 + 18  # after IFD0: a count, one 12-byte entry, the next-IFD offset
    data = exif_ifd + 18
    long_, undefined = 4, 7  # TIFF field types
    return (b"Exif\0\0" + b"MM\0\x2a" + struct.pack(">I", ifd0)
            + struct.pack(">HHHIII", 1, 0x8769, long_, 1, exif_ifd, 0)  # pointer to Exif IFD
            + struct.pack(">HHHIII", 1, 0x9286, undefined, len(comment), data, 0)
            + comment)


def _xmp(generation: Generation | None) -> str:
    inner = ""
    if generation is not None:
        text = _NOT_XML.sub(lambda m: f"\\u{ord(m[0]):04x}", generation.to_json())
        inner = _XMP_GENERATION.format(escape(text))
    return _XMP.format(namespace=XMP_NAMESPACE, source=AI_GENERATED, generation=inner)


def _quote(text: str) -> str:
    """A value as Automatic1111 writes it: JSON-quoted when it holds a comma, colon or newline."""
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def _valid(text: str) -> str:
    """``text`` with lone surrogates replaced, so that every encoding of it succeeds."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
