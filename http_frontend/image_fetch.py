"""Fetch an image a request names by http(s) URL, without letting the URL reach inside.

Off unless the operator turns it on. A URL from a client could name this host, the cluster's
private network or a cloud metadata service (SSRF), so every address its host resolves to
must be public, and the connection goes to the address that was checked, never to the name
again (a second lookup could answer differently: DNS rebinding). No redirect is followed,
the body is capped and the whole fetch has one deadline. Every failure is a 400 naming the
field, code "image_fetch_failed".
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from http_frontend.errors import APIError, invalid

log = logging.getLogger(__name__)

FETCH_FAILED = "image_fetch_failed"
MAX_URL_CHARS = 8192
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Resolved = tuple[socket.AddressFamily, str]  # what getaddrinfo gave: family and IP


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA), no brackets
    port: int
    path: str  # path and query: what the request line carries
    host_header: str


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a fixed address that names ``host`` in Host and TLS SNI."""

    def __init__(self, target: _Target, address: _Resolved, timeout: float,
                 tls: ssl.SSLContext | None) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = address
        self._tls = tls

    def connect(self) -> None:
        # A socket of our own, not create_connection: that would resolve the address again.
        family, address = self._address
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect((address, self.port))
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ImageFetcher:
    """Fetches image URLs for /v1/images/edits: public http(s) addresses only, by default."""

    def __init__(self, *, max_bytes: int, timeout: float = 10.0, allow_private: bool = False,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.allow_private = allow_private  # for tests and closed networks only
        self.tls_context = tls_context or ssl.create_default_context()

    def within(self, *, max_bytes: int, seconds: float) -> ImageFetcher:
        """This fetcher with tighter limits: what is left of one request's budget, so that
        16 URLs of one edit share one size limit and one deadline rather than have 16."""
        return ImageFetcher(max_bytes=max(0, min(self.max_bytes, max_bytes)),
                            timeout=max(0.0, min(self.timeout, seconds)),
                            allow_private=self.allow_private, tls_context=self.tls_context)

    def fetch(self, url: str, param: str) -> bytes:
        """The body of ``url``, or an APIError (400) that says why not."""
        deadline = time.monotonic() + self.timeout
        target = _parse(url, param)
        addresses = self._resolve(target, param, deadline)
        try:
            return self._get(target, addresses, param, deadline)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _failure(param, target, exc, deadline) from None

    def _resolve(self, target: _Target, param: str, deadline: float) -> list[_Resolved]:
        """Every address the host resolves to, refused if any one is not public."""
        addresses = _lookup(target, param, deadline)
        if not self.allow_private:
            for _, address in addresses:
                if not is_public(address):
                    raise invalid(param, f"'{param}': {target.host} resolves to {address}, "
                                         f"which is not a public address; this server fetches "
                                         f"only public URLs", FETCH_FAILED)
        return addresses

    def _get(self, target: _Target, addresses: list[_Resolved], param: str,
             deadline: float) -> bytes:
        tls = self.tls_context if target.scheme == "https" else None
        conn = self._connect(target, addresses, tls, deadline)
        # A socket timeout bounds each read, not their sum: the watchdog ends a trickle.
        fired = threading.Event()
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _abort,
                                   (conn, fired))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("GET", target.path, headers={
                "Host": target.host_header, "User-Agent": "diffusion-cluster",
                "Accept": "image/png, image/jpeg, image/webp", "Connection": "close"})
            resp = conn.getresponse()
            try:
                return self._read(resp, param, fired)
            finally:
                resp.close()  # with "Connection: close" the response holds the socket
        finally:
            watchdog.cancel()
            conn.close()

    def _connect(self, target: _Target, addresses: list[_Resolved],
                 tls: ssl.SSLContext | None, deadline: float) -> _PinnedConnection:
        """A connection to the first of ``addresses`` that answers."""
        error: OSError | None = None
        for address in addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            conn = _PinnedConnection(target, address, remaining, tls)
            try:
                conn.connect()
                return conn
            except OSError as exc:
                conn.close()
                error = exc
        raise error or OSError("no address to connect to")

    def _read(self, resp: http.client.HTTPResponse, param: str,
              fired: threading.Event) -> bytes:
        if 300 <= resp.status < 400:
            location = (resp.getheader("Location") or "")[:200]
            raise invalid(param, f"'{param}': the server answered {resp.status} (a redirect to "
                                 f"{location!r}); redirects are not followed, send the final "
                                 f"URL", FETCH_FAILED)
        if resp.status != 200:
            raise invalid(param, f"'{param}': the server answered {resp.status} "
                                 f"{resp.reason[:100]}", FETCH_FAILED)
        declared = _content_length(resp)
        if declared is not None and declared > self.max_bytes:
            raise self._too_large(param, f"{declared} bytes")
        body = resp.read(self.max_bytes + 1)
        if fired.is_set():  # the watchdog cut the body short
            raise TimeoutError("timed out")
        if len(body) > self.max_bytes:
            raise self._too_large(param, f"more than {self.max_bytes} bytes")
        if declared is not None and len(body) != declared:
            raise invalid(param, f"'{param}': the connection closed after {len(body)} of the "
                                 f"{declared} bytes the server announced", FETCH_FAILED)
        return body

    def _too_large(self, param: str, size: str) -> APIError:
        return invalid(param, f"'{param}': the image is {size}; at most {self.max_bytes} bytes "
                              f"are accepted", "image_too_large")


def is_public(address: str) -> bool:
    """Whether ``address`` (an IP, as getaddrinfo gives it) is globally reachable, IPv4 inside
    IPv6 (mapped, 6to4, Teredo, NAT64) included."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        for embedded in _embedded_ipv4(ip):
            if not _global(embedded):
                return False
    return _global(ip)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [v4 for v4 in found if v4 is not None]


def _global(ip: _Address) -> bool:
    # is_global alone passes multicast and, for IPv6, the reserved ::/8 (::127.0.0.1).
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _parse(url: str, param: str) -> _Target:
    def bad(why: str) -> APIError:
        return invalid(param, f"'{param}' is not a URL this server fetches: {why}",
                       FETCH_FAILED)

    if len(url) > MAX_URL_CHARS:
        raise bad(f"it is longer than {MAX_URL_CHARS} characters")
    if any(ord(c) <= 0x20 or c == "\x7f" for c in url):
        raise bad("it holds spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad(str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise bad(f"only http and https URLs are fetched, not {scheme or 'a relative URL'}")
    if "@" in parts.netloc:
        raise bad("it holds a user name or password")
    if not parts.hostname:
        raise bad("it names no host")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise bad("its host name is not valid") from None
    default = 443 if scheme == "https" else 80
    port = port or default
    shown = f"[{host}]" if ":" in host else host
    header = shown if port == default else f"{shown}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, host, port, path, header)


def _lookup(target: _Target, param: str, deadline: float) -> list[_Resolved]:
    """The host's addresses, under the fetch's deadline. getaddrinfo has no timeout of its
    own, so it runs in a daemon thread that is abandoned (the resolver ends it) when late."""
    result: list[list[_Resolved] | BaseException] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            result.append([(family, str(sockaddr[0])) for family, _, _, _, sockaddr in infos
                           if family in (socket.AF_INET, socket.AF_INET6)])
        except (OSError, UnicodeError) as exc:
            result.append(exc)

    thread = threading.Thread(target=lookup, name="image-fetch-dns", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0.0))
    if not result:
        raise invalid(param, f"'{param}': looking up {target.host} timed out", FETCH_FAILED)
    addresses = result[0]
    if isinstance(addresses, BaseException) or not addresses:
        raise invalid(param, f"'{param}': the host {target.host} could not be resolved",
                      FETCH_FAILED)
    return addresses


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    # http.client already parsed it (resp.length) and refuses a negative or malformed one.
    return resp.length if resp.getheader("Content-Length") is not None else None


def _abort(conn: _PinnedConnection, fired: threading.Event) -> None:
    """Cut a fetch that ran past its deadline: its blocked read ends at once."""
    fired.set()
    sock = conn.sock
    if sock is not None:
        try:
            # socket.socket's own shutdown: SSLSocket.shutdown would also drop its TLS state
            # under the reading thread's feet (an AttributeError there, not an OSError).
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _failure(param: str, target: _Target, exc: BaseException, deadline: float) -> APIError:
    """The 400 for a fetch that failed on the network: the cause in words, no traceback."""
    where = f"{target.host}:{target.port}"
    if time.monotonic() >= deadline or isinstance(exc, TimeoutError):
        why = "it timed out"
    elif isinstance(exc, ssl.SSLCertVerificationError):
        why = f"the TLS certificate was not accepted ({exc.verify_message})"
    elif isinstance(exc, ssl.SSLError):
        why = f"the TLS handshake failed ({exc.reason or exc})"
    elif isinstance(exc, ConnectionRefusedError):
        why = "the connection was refused"
    elif isinstance(exc, http.client.HTTPException | ConnectionError):
        why = f"the server did not send a valid HTTP response ({type(exc).__name__})"
    else:
        why = f"{type(exc).__name__}: {str(exc)[:200]}"
    log.info("image fetch from %s failed: %r", where, exc)
    return invalid(param, f"'{param}': fetching from {where} failed: {why}", FETCH_FAILED)
