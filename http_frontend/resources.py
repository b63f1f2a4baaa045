"""Thin Falcon resources: read the request, call the service, write the answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import falcon

from http_frontend.errors import APIError, invalid
from http_frontend.service import ImageService


def read_json(req: falcon.Request, max_body: int) -> Any:
    """The request body as JSON, bounded, with a clear error for each way it can be wrong."""
    if req.content_length is not None and req.content_length > max_body:
        raise APIError(413, f"the request body is larger than {max_body} bytes",
                       code="request_too_large")
    media_type = (req.content_type or "").split(";")[0].strip().lower()
    if media_type not in ("application/json", ""):
        raise APIError(415, f"send the body as application/json, not {media_type}",
                       code="unsupported_media_type")
    raw = req.bounded_stream.read(max_body + 1)
    if len(raw) > max_body:
        raise APIError(413, f"the request body is larger than {max_body} bytes",
                       code="request_too_large")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise invalid(None, "the request body is not valid UTF-8", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise invalid(None, f"the request body is not valid JSON: {exc.msg} at line "
                            f"{exc.lineno} column {exc.colno}", "invalid_json") from None


class ImageGenerations:
    def __init__(self, service: ImageService, *, max_body: int) -> None:
        self.service = service
        self.max_body = max_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.service.generate(read_json(req, self.max_body))


class Models:
    def __init__(self, service: ImageService) -> None:
        self.service = service

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.service.list_models()


class Cluster:
    def __init__(self, service: ImageService) -> None:
        self.service = service

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.service.cluster()


class Health:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class Ready:
    def __init__(self, service: ImageService) -> None:
        self.service = service

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ready, detail = self.service.readiness()
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = detail


class Index:
    def __init__(self, static_dir: Path) -> None:
        self.index = static_dir / "index.html"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.data = self.index.read_bytes()
