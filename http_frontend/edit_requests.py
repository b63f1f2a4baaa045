"""Reading an edit request (POST /v1/images/edits) off the wire, in either of OpenAI's forms.

``multipart/form-data``: the image file(s) as ``image`` or ``image[]`` (up to 16), an optional
``mask`` file, and every other field as text, turned here into the JSON types the schema
checks (``n=2`` is the integer 2; a value that is not one is left as text, for the schema to
refuse with its ``param``). ``application/json``: ``images`` (``[{"image_url": ...}]``) and
``mask`` (``{"image_url": ...}``), where a ``data:`` URL carries the bytes; a remote URL is
fetched only when the operator allowed it (``--fetch-image-urls``), because fetching for a
client lets it reach whatever this server can (server-side request forgery), and OpenAI's
``file_id`` needs a Files API this server does not have.

What comes out is bytes, checked for size only: decoding and checking the images is
``edit_inputs``' business, in the service.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import falcon

from http_frontend.edit_inputs import data_url_bytes
from http_frontend.errors import APIError, invalid
from http_frontend.image_fetch import ImageFetcher

MAX_IMAGES = 16  # OpenAI's image[] limit
MAX_FIELD_BYTES = 256 * 1024  # a text field: the prompt is the longest
_INTEGERS = ("n", "steps", "seed", "partial_images", "output_compression", "width", "height")
_NUMBERS = ("guidance", "strength", "timeout")
_BOOLEANS = ("stream", "step_cache")
_JSON_FIELDS = ("loras",)  # a list in a form field: its JSON text
_INTEGER = re.compile(r"-?[0-9]{1,30}")  # ASCII digits only, and never int()'s 4300-digit limit


@dataclass
class EditUpload:
    """An edit request's fields (JSON types), its images' bytes and its mask's, with the
    ``param`` each came as (``image``, ``image[1]``, ``images[0]``, ``mask``)."""

    fields: dict[str, Any] = field(default_factory=dict)
    images: list[tuple[str, bytes]] = field(default_factory=list)
    mask: tuple[str, bytes] | None = None

    def recorded(self) -> dict[str, Any]:
        """The request as its job record keeps it (and an Idempotency-Key compares it):
        the fields, and each image by its size and SHA-256, never its bytes."""
        body = dict(self.fields)
        body["image"] = [_digest(data) for _, data in self.images]
        if self.mask is not None:
            body["mask"] = _digest(self.mask[1])
        return body


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_edit(req: falcon.Request, *, max_body: int, fetcher: ImageFetcher | None
              ) -> EditUpload:
    """The edit request in ``req``, bounded by ``max_body`` bytes; a 4xx for anything else."""
    if req.content_length is not None and req.content_length > max_body:
        raise APIError(413, f"the request body is larger than {max_body} bytes (this "
                            f"server's --max-edit-body-mb)", code="request_too_large")
    media_type = (req.content_type or "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        upload = _read_multipart(req, max_body)
    elif media_type == "application/json":
        from http_frontend.resources import read_json  # one JSON reader for every route

        upload = _read_json_body(read_json(req, max_body), max_body, fetcher)
    else:
        raise APIError(415, f"send an edit as multipart/form-data (image files) or "
                            f"application/json (image URLs), not {media_type or 'no type'}",
                       code="unsupported_media_type")
    if not upload.images:
        raise invalid("image", "'image' is required: the image to edit",
                      "missing_required_parameter")
    return upload


# ---------------------------------------------------------------- multipart


def _read_multipart(req: falcon.Request, max_body: int) -> EditUpload:
    upload = EditUpload()
    read = 0
    try:
        for part in req.get_media():
            name = part.name or ""
            data = part.stream.read(max_body - read + 1)
            read += len(data)
            if read > max_body:
                raise APIError(413, f"the request body is larger than {max_body} bytes "
                                    f"(this server's --max-edit-body-mb)",
                               code="request_too_large")
            _take_part(upload, name, data, part.filename)
    except falcon.MediaMalformedError as exc:
        raise invalid(None, f"the multipart body cannot be read: {exc.description or exc}",
                      "invalid_multipart") from None
    except falcon.HTTPError as exc:  # Falcon's own limits (part count, headers)
        raise invalid(None, f"the multipart body cannot be read: "
                            f"{exc.description or exc.title}", "invalid_multipart") from None
    return upload


def _take_part(upload: EditUpload, name: str, data: bytes, filename: str | None) -> None:
    if name in ("image", "image[]"):
        if len(upload.images) >= MAX_IMAGES:
            raise invalid("image", f"at most {MAX_IMAGES} images may be sent")
        param = "image" if not upload.images else f"image[{len(upload.images)}]"
        upload.images.append((param, data))
    elif name == "mask":
        if upload.mask is not None:
            raise invalid("mask", "send one mask")
        upload.mask = ("mask", data)
    elif filename:
        raise invalid(name[:64] or None, f"a file in the field {name[:64]!r}: only 'image', "
                                         f"'image[]' and 'mask' take files")
    else:
        if len(data) > MAX_FIELD_BYTES:
            raise invalid(name[:64] or None, f"the field {name[:64]!r} is longer than "
                                             f"{MAX_FIELD_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(name[:64] or None, f"the field {name[:64]!r} is not UTF-8 "
                                             f"text") from None
        upload.fields[name] = _typed(name, text)


def _typed(name: str, text: str) -> Any:
    """A form field's text as the JSON value it stands for, where it is one; else the text,
    for the schema to refuse by name."""
    if name in _INTEGERS and _INTEGER.fullmatch(text.strip()):
        return int(text)
    if name in _NUMBERS and len(text) <= 64:
        try:
            return float(text)
        except ValueError:
            return text
    if name in _BOOLEANS and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    if name in _JSON_FIELDS:
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # for the schema to refuse by name
            return text
    return text


# ---------------------------------------------------------------- JSON


def _read_json_body(body: Any, max_body: int, fetcher: ImageFetcher | None) -> EditUpload:
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_json")
    upload = EditUpload(fields={k: v for k, v in body.items() if k not in ("images", "mask")})
    budget = _FetchBudget(fetcher, max_body)
    images = body.get("images")
    if images is None:
        raise invalid("images", "'images' is required: [{\"image_url\": ...}]",
                      "missing_required_parameter")
    if not isinstance(images, list) or not 1 <= len(images) <= MAX_IMAGES:
        raise invalid("images", f"'images' is a list of 1 to {MAX_IMAGES} image references")
    for index, ref in enumerate(images):
        param = f"images[{index}]"
        upload.images.append((param, _referenced(ref, param, max_body, budget)))
    if body.get("mask") is not None:
        upload.mask = ("mask", _referenced(body["mask"], "mask", max_body, budget))
    return upload


class _FetchBudget:
    """One request's fetching: every URL it names shares one size limit (the request's) and
    one deadline (the fetcher's), not one each."""

    def __init__(self, fetcher: ImageFetcher | None, max_bytes: int) -> None:
        self.fetcher = fetcher
        self.bytes_left = max_bytes
        self.deadline = time.monotonic() + (fetcher.timeout if fetcher else 0.0)

    def fetch(self, url: str, param: str) -> bytes:
        assert self.fetcher is not None
        data = self.fetcher.within(max_bytes=self.bytes_left,
                                   seconds=self.deadline - time.monotonic()).fetch(url, param)
        self.bytes_left -= len(data)
        return data


def _referenced(ref: Any, param: str, max_bytes: int, budget: _FetchBudget) -> bytes:
    """The bytes an ImageRefParam names: a data: URL's, or a fetched URL's when allowed."""
    if not isinstance(ref, dict):
        raise invalid(param, f"'{param}' is an object with an 'image_url'")
    if "file_id" in ref and "image_url" not in ref:
        raise invalid(param, "file ids need OpenAI's Files API, which this server does not "
                             "have: send the image as a data: URL, or upload it as "
                             "multipart/form-data", "unsupported_value")
    url = ref.get("image_url")
    if not isinstance(url, str) or not url:
        raise invalid(param, f"'{param}.image_url' must be a URL")
    if url[:5].lower() == "data:":
        return data_url_bytes(url, param, max_bytes=max_bytes)
    if budget.fetcher is None:
        raise invalid(param, "this server does not fetch image URLs (fetching for a client "
                             "would let it reach what this server can): send the image as "
                             "a data: URL, or as multipart/form-data", "unsupported_value")
    return budget.fetch(url, param)
