"""Marks an operator may add to finished images: an invisible watermark and a C2PA manifest.

Both are off by default (docs/image-metadata.md). The watermark is the one Stable Diffusion
XL's reference code hides in the pixels (``invisible-watermark``'s DWT-DCT transform with
SDXL's 48-bit message), applied before encoding; the manifest is signed with the operator's
key by ``c2pa-python`` after encoding. Both run on the worker's encoder thread, never on the
device thread, and never on previews. Their packages are imported only when turned on.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# SDXL's message, as diffusers copies it from Stability AI's generative-models.
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = tuple(int(bit) for bit in bin(WATERMARK_MESSAGE)[2:])
WATERMARK_METHOD = "dwtDct"
# The transform refuses images under 256x256's area, and one side under 4 pixels.
MIN_WATERMARK_PIXELS = 256 * 256
MIN_WATERMARK_SIDE = 4

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
AI_GENERATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
CLAIM_GENERATOR = "diffusion-cluster"
# Accepted signing failures when reading back our own manifest: nobody has to trust the
# operator's CA for the signature to be sound.
UNTRUSTED = frozenset({"signingCredential.untrusted"})
# After a timestamp authority fails, sign without it for this long before asking it again:
# an unreachable one must not cost every image its timeout.
TSA_RETRY_SECONDS = 60.0


class Watermarker:
    """Hides SDXL's watermark in images, exactly as diffusers' StableDiffusionXLWatermarker."""

    def __init__(self) -> None:
        from imwatermark import WatermarkEncoder  # type: ignore[import-untyped]

        self._encoder = WatermarkEncoder()
        self._encoder.set_watermark("bits", list(WATERMARK_BITS))
        self._warned = threading.Event()

    def apply(self, image: Image.Image) -> Image.Image:
        """``image`` watermarked, or as it is when too small for the transform (logged once)."""
        if not can_watermark(image.width, image.height):
            if not self._warned.is_set():
                self._warned.set()
                log.warning("images under %d pixels or %d on a side carry no watermark "
                            "(first: %dx%d)", MIN_WATERMARK_PIXELS, MIN_WATERMARK_SIDE,
                            image.width, image.height)
            return image
        # Float BGR in 0..255, as the reference applies it; back to RGB, rounded to bytes.
        bgr = np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1]
        marked = self._encoder.encode(bgr, WATERMARK_METHOD)[:, :, ::-1]
        return Image.fromarray(np.clip(np.rint(marked), 0, 255).astype(np.uint8))


def can_watermark(width: int, height: int) -> bool:
    return width * height >= MIN_WATERMARK_PIXELS and min(width, height) >= MIN_WATERMARK_SIDE


def watermark_match(image: Image.Image) -> int:
    """How many of the watermark's 48 bits ``image`` holds (about half by chance)."""
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bits", len(WATERMARK_BITS))
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # as cv2.imread
    bits = decoder.decode(bgr, WATERMARK_METHOD)
    return sum(int(found) == wanted for found, wanted in zip(bits, WATERMARK_BITS, strict=True))


class C2paSigner:
    """Signs encoded images with a C2PA manifest under the operator's certificate and key.

    One instance per worker, used by the encoder thread only (c2pa's objects are not shared
    between threads here). With a timestamp authority, a signing it fails is done again
    without it (logged), and it is left alone for TSA_RETRY_SECONDS: a network outage must
    not fail jobs, nor stop a worker at start.
    """

    def __init__(self, cert_chain: bytes, private_key: bytes, *, version: str,
                 tsa_url: str | None = None, clock: Any = time.monotonic) -> None:
        import c2pa  # type: ignore[import-untyped]

        self._c2pa = c2pa
        self.version = version
        self.tsa_url = tsa_url
        self._clock = clock
        self._tsa_resting_until = float("-inf")
        alg, pkcs8 = _signing_key(private_key)
        self._context = self._signing_context(alg, cert_chain, pkcs8, None)
        self._timestamped = (self._signing_context(alg, cert_chain, pkcs8, tsa_url)
                             if tsa_url else None)

    def _signing_context(self, alg: Any, chain: bytes, pkcs8: bytes,
                         tsa_url: str | None) -> Any:
        c2pa = self._c2pa
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg, chain, pkcs8, tsa_url))
        # No thumbnail: the image is its own picture, and one would double a noisy image.
        settings = c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}})
        return c2pa.Context(settings=settings, signer=signer)  # takes the signer

    @classmethod
    def from_files(cls, cert_file: str, key_file: str, *, version: str,
                   tsa_url: str | None = None) -> C2paSigner:
        """Load the PEM chain and key; refuse a key file others can read. Checks one signing."""
        with open(key_file, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode  # of the file read, not of a name
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise PermissionError(f"{key_file} is readable by others (mode "
                                      f"{oct(mode & 0o777)}); run chmod 600 on it")
            key = f.read()
        with open(cert_file, "rb") as f:
            chain = f.read()
        import c2pa

        try:
            signer = cls(chain, key, version=version, tsa_url=tsa_url)
            signer.check()
        except c2pa.C2paError as exc:
            raise ValueError(f"cannot sign C2PA manifests with {cert_file} and {key_file}: "
                             f"{str(exc).splitlines()[0]}") from exc
        return signer

    def manifest(self, model: str) -> dict[str, Any]:
        """What the manifest says: made by a trained model, ``model``, with our software."""
        action = {"action": "c2pa.created", "digitalSourceType": AI_GENERATED,
                  "softwareAgent": {"name": model}}
        return {"claim_generator_info": [{"name": CLAIM_GENERATOR, "version": self.version}],
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [action]}}]}

    def sign(self, data: bytes, fmt: str, *, model: str) -> bytes:
        """``data`` (an encoded png, jpeg or webp) with a signed manifest embedded, its
        signing time attested by the timestamp authority when there is one and it answers."""
        if self._timestamped is not None and self._clock() >= self._tsa_resting_until:
            try:
                return self._sign(self._timestamped, data, fmt, model)
            except self._c2pa.C2paError as exc:
                self._tsa_resting_until = self._clock() + TSA_RETRY_SECONDS
                log.warning("C2PA: timestamp authority %s failed (%s); signing without a "
                            "timestamp for %.0f s", self.tsa_url, str(exc).splitlines()[0],
                            TSA_RETRY_SECONDS)
        return self._sign(self._context, data, fmt, model)

    def _sign(self, context: Any, data: bytes, fmt: str, model: str) -> bytes:
        with self._c2pa.Builder.from_json(self.manifest(model), context) as builder:
            out = io.BytesIO()
            builder.sign(MIME_TYPES[fmt], io.BytesIO(data), out)  # also validates the result
            return out.getvalue()

    def check(self) -> None:
        """Sign a small image (without the timestamp authority: the network is not the
        key's fault) and read it back: ValueError, or C2paError, if that fails."""
        image = io.BytesIO()
        Image.new("RGB", (16, 16)).save(image, format="PNG")
        signed = self._sign(self._context, image.getvalue(), "png", "self-test")
        failures = c2pa_failures(signed, "png") - UNTRUSTED
        if failures:
            raise ValueError(f"C2PA manifests signed with this certificate and key do not "
                             f"validate: {', '.join(sorted(failures))}")


def c2pa_failures(data: bytes, fmt: str) -> set[str]:
    """The failure codes of the active manifest's validation (untrusted signer included)."""
    import c2pa

    with c2pa.Reader(MIME_TYPES[fmt], io.BytesIO(data)) as reader:
        results = reader.get_validation_results() or {}
    return {item["code"] for item in results.get("activeManifest", {}).get("failure", [])}


def _signing_key(pem: bytes) -> tuple[Any, bytes]:
    """The c2pa algorithm for a PEM private key, and the key as unencrypted PKCS#8 PEM."""
    import c2pa
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (TypeError, ValueError) as exc:  # TypeError: it is encrypted
        raise ValueError(f"the C2PA key is not an unencrypted PEM private key: {exc}") from exc
    curves = {"secp256r1": c2pa.C2paSigningAlg.ES256, "secp384r1": c2pa.C2paSigningAlg.ES384,
              "secp521r1": c2pa.C2paSigningAlg.ES512}
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in curves:
        alg = curves[key.curve.name]
    elif isinstance(key, rsa.RSAPrivateKey):
        alg = c2pa.C2paSigningAlg.PS256
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        alg = c2pa.C2paSigningAlg.ED25519
    else:
        raise ValueError("C2PA signs with EC P-256/384/521, RSA or Ed25519 keys only")
    return alg, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())


@dataclass(frozen=True)
class Marking:
    """The optional marks a worker adds to every finished image; made once from its flags."""

    watermark: bool = False
    c2pa: C2paSigner | None = None

    def __post_init__(self) -> None:
        if self.watermark:
            _watermarker()  # import the package now: a missing one fails the worker at start

    def pixels(self, image: Image.Image) -> Image.Image:
        """The image with the watermark, if on (before encoding)."""
        return _watermarker().apply(image) if self.watermark else image

    def file(self, data: bytes, fmt: str, *, model: str) -> bytes:
        """The encoded image with a signed manifest, if on (after encoding)."""
        return data if self.c2pa is None else self.c2pa.sign(data, fmt, model=model)


@functools.cache
def _watermarker() -> Watermarker:
    return Watermarker()
