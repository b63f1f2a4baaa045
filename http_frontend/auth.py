"""API keys for /v1/*: `Authorization: Bearer KEY`, compared in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path

import falcon

from http_frontend.errors import APIError

PROTECTED_PREFIX = "/v1/"


def load_keys(keys: list[str] | None, keys_file: str | None) -> list[str]:
    """Keys from the command line and a file (one per line, # comments, blanks skipped)."""
    found = [k.strip() for k in keys or () if k.strip()]
    if keys_file:
        for line in Path(keys_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                found.append(line)
    return found


class ApiKeyAuth:
    """Falcon middleware: a request to /v1/* needs one of the keys; the rest stays open."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not req.path.startswith(PROTECTED_PREFIX) or req.method == "OPTIONS":
            return  # health checks, the UI's files and CORS preflights need no key
        if not self._valid(req.get_header("Authorization") or ""):
            raise APIError(401, "a valid API key is required: send it as "
                                "'Authorization: Bearer KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def _valid(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        # Compare against every key, always, so timing says nothing about which one is close.
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        return any(matches)
