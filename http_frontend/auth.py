"""API keys for /v1/*: `Authorization: Bearer KEY`, compared in constant time.

A key may carry attributes in the keys file:
``KEY name=alice admin weight=2 class=batch max_queued=20 max_running=2 per_minute=30``.
The name is who owns the jobs made with the key (records store it, never the key); an admin
key sees every identity's jobs. The rest is the key's ``Share`` of the cluster, which the
broker enforces (broker/fair_queue.py, broker/quotas.py): its weight against the other
identities with jobs queued for a model (1 unless set), its priority class (``interactive``
unless set), and its limits. Every request gets ``req.context.identity``: its key's, or, on a
server without keys, an open identity that sees everything (without keys there is nothing to
keep apart: anyone can call the API).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import falcon

from broker.protocol import MAX_WEIGHT, MIN_WEIGHT, PRIORITIES, Quota
from http_frontend.errors import APIError

PROTECTED_PREFIX = "/v1/"
# Image URLs work without a key: an <img> tag or a chat client sends none. Their names are
# unguessable (image_store.new_name) and expire with retention.
OPEN_PREFIXES = ("/v1/images/files/",)
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


@dataclass(frozen=True)
class Share:
    """What an identity may have of the cluster: the JobSpec fields its jobs carry."""

    weight: float = 1.0  # its share of a model's queue against the other identities'
    priority: str = PRIORITIES[0]
    quota: Quota | None = None  # keys with limits only


DEFAULT_SHARE = Share()


@dataclass(frozen=True)
class ApiKey:
    secret: str
    name: str
    admin: bool = False
    share: Share = DEFAULT_SHARE

    def __repr__(self) -> str:  # never print the secret
        return f"ApiKey(name={self.name!r}, admin={self.admin}, share={self.share})"


@dataclass(frozen=True)
class Identity:
    """Who a request is: ``key`` names its API key (None on a server without keys);
    ``sees_all``: may read and cancel every identity's jobs; ``share``: its key's."""

    key: str | None
    sees_all: bool
    share: Share = DEFAULT_SHARE

    def owner(self, user: str | None) -> str | None:
        """The owner a new job is recorded under: the key's name, else the request's
        ``user``."""
        return self.key if self.key is not None else user


OPEN = Identity(key=None, sees_all=True)


def default_name(secret: str) -> str:
    """A stable name for a key given without one: a hash prefix, never the key itself."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def parse_key_line(line: str) -> ApiKey | None:
    """One keys-file line: ``KEY [name=NAME] [admin] [weight=N] [class=CLASS]
    [max_queued=N] [max_running=N] [per_minute=N]``; None for a blank or comment line.
    ValueError names what is wrong (never the key)."""
    words = line.split("#", 1)[0].split()
    if not words:
        return None
    secret, name, admin = words[0], None, False
    share: dict[str, Any] = {}
    limits: dict[str, int] = {}
    given: set[str] = set()
    for position, word in enumerate(words[1:], 2):
        attribute, _, value = word.partition("=")
        if attribute in given and attribute in _VALUED:
            # ``weight=1 ... weight=4`` is a mistake either way: never take one silently.
            raise ValueError(f"word {position}: {attribute}= is given twice")
        given.add(attribute)
        if word == "admin":
            admin = True
        elif attribute == "name" and _NAME.fullmatch(value):
            name = value
        elif attribute == "weight":
            share["weight"] = parse_weight(value, position)
        elif attribute == "class":
            share["priority"] = _priority(value, position)
        elif attribute in _LIMITS:
            limits[attribute] = _limit(attribute, value, position)
        else:  # not shown: it may be a second key pasted on the line
            raise ValueError(f"word {position} is not a key attribute: use name=NAME "
                             f"(letters, digits, . _ @ -, at most 64), admin, weight=N, "
                             f"class={'|'.join(PRIORITIES)}, and limits "
                             f"{'=N, '.join(_LIMITS)}=N")
    if limits:
        share["quota"] = Quota(**limits)
    return ApiKey(secret, name or default_name(secret), admin, Share(**share))


_LIMITS = ("max_queued", "max_running", "per_minute")
_VALUED = ("name", "weight", "class", *_LIMITS)  # the attributes with a value
_MAX_LIMIT = 1_000_000


def parse_weight(text: str, position: int) -> float:
    """A key's ``weight=N``: a number from MIN_WEIGHT to MAX_WEIGHT (NaN and inf refused)."""
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:  # NaN fails the comparison too
        raise ValueError(f"word {position}: weight=N takes a number from {MIN_WEIGHT:g} to "
                         f"{MAX_WEIGHT:g}")
    return weight


def _priority(text: str, position: int) -> str:
    if text not in PRIORITIES:
        raise ValueError(f"word {position}: class= takes {' or '.join(PRIORITIES)}")
    return text


def _limit(attribute: str, text: str, position: int) -> int:
    # ASCII digits only: str.isdigit() also takes "²", which int() then refuses.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= _MAX_LIMIT:
        raise ValueError(f"word {position}: {attribute}=N takes a whole number from 1 to "
                         f"{_MAX_LIMIT}")
    return int(text)


def load_keys(keys: list[str] | None, keys_file: str | None) -> list[ApiKey]:
    """Keys from the command line (no attributes) and a file (one per line, # comments,
    blanks skipped). ValueError for a line that cannot be read, with its number."""
    found = [ApiKey(k.strip(), default_name(k.strip())) for k in keys or () if k.strip()]
    if keys_file:
        for number, line in enumerate(Path(keys_file).read_text().splitlines(), 1):
            try:
                key = parse_key_line(line)
            except ValueError as exc:
                raise ValueError(f"{keys_file} line {number}: {exc}") from None
            if key is not None:
                found.append(key)
    names = [k.name for k in found]
    if len(set(names)) != len(names):
        raise ValueError("two API keys have the same name; each key needs its own")
    return found


class ApiKeyAuth:
    """Falcon middleware: a request to /v1/* needs one of the keys; the rest stays open."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = [(k.secret.encode(), Identity(k.name, k.admin, k.share)) for k in keys]

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not req.path.startswith(PROTECTED_PREFIX) or req.method == "OPTIONS" \
                or req.path.startswith(OPEN_PREFIXES):
            return  # health checks, the UI's files, images and CORS preflights need no key
        identity = self._identity(req.get_header("Authorization") or "")
        if identity is None:
            raise unauthorized("a valid API key is required: send it as "
                               "'Authorization: Bearer KEY'")
        req.context.identity = identity

    def _identity(self, header: str) -> Identity | None:
        given = bearer_token(header)
        if given is None:
            return None
        # Compare against every key, always, so timing says nothing about which one is close.
        found = None
        for secret, identity in self._keys:
            if hmac.compare_digest(given, secret):
                found = identity
        return found


def bearer_token(header: str) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header; None for another scheme."""
    scheme, _, token = header.partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else None


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def check_metrics_token(req: falcon.Request, token: str | None) -> None:
    """A 401 for a /metrics request without ``token`` (--metrics-token); None: open."""
    if token is None:
        return
    given = bearer_token(req.get_header("Authorization") or "")
    if given is None or not hmac.compare_digest(given, token.encode()):
        raise unauthorized("a valid metrics token is required: send it as "
                           "'Authorization: Bearer TOKEN'")


def identity_of(req: falcon.Request) -> Identity:
    """The request's identity (set by ApiKeyAuth); the open one on a server without keys."""
    identity = getattr(req.context, "identity", None)
    return identity if isinstance(identity, Identity) else OPEN
