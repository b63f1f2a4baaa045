"""Fetching image URLs (image_fetch): real local HTTP(S) servers, and the SSRF refusals."""

from __future__ import annotations

import datetime
import http.server
import io
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from http_frontend import image_fetch
from http_frontend.errors import APIError
from http_frontend.image_fetch import ImageFetcher, is_public
from tests.openapi_spec import validate

MAX_BYTES = 50_000


def make_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(out, "PNG")
    return out.getvalue()


IMAGE = make_png()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host")))
        name = self.path.partition("?")[0].strip("/").replace("-", "_").replace(".", "_")
        getattr(self, "route_" + name, self.route_missing)()

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
             *, length: int | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def route_image_png(self) -> None:
        self.send(200, IMAGE, {"Content-Type": "image/png"})

    def route_redirect(self) -> None:
        self.send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})

    def route_missing(self) -> None:
        self.send(404, b"no such image")

    def route_big(self) -> None:  # announced too large: refused before the body is read
        self.send(200, b"\x00" * (MAX_BYTES + 1))

    def route_big_unannounced(self) -> None:  # no length, ends when the connection closes
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        for _ in range(10):
            self.wfile.write(b"\x00" * MAX_BYTES)
        self.close_connection = True

    def route_big_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(10):
            self.wfile.write(b"%x\r\n%s\r\n" % (MAX_BYTES // 2, b"\x00" * (MAX_BYTES // 2)))
        self.wfile.write(b"0\r\n\r\n")

    def route_short(self) -> None:  # announces more than it sends, then hangs up
        self.send(200, IMAGE[:20], length=len(IMAGE))
        self.close_connection = True

    def route_long(self) -> None:  # announces less than it sends
        self.send(200, IMAGE + b"trailing junk", length=len(IMAGE))
        self.close_connection = True

    def route_hang(self) -> None:  # never answers
        self.server.release.wait(5)

    def route_trickle(self) -> None:  # answers, then one byte a tenth of a second, forever
        self.send_response(200)
        self.send_header("Content-Length", str(MAX_BYTES))
        self.end_headers()
        while not self.server.release.wait(0.1):
            self.wfile.write(b"\x00")
            self.wfile.flush()

    def route_garbage(self) -> None:
        self.wfile.write(b"this is not HTTP\r\n\r\n")
        self.close_connection = True


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, Handler)
        self.seen: list[tuple[str, str | None]] = []
        self.release = threading.Event()


def start(server: Server) -> Iterator[Server]:
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    yield from start(Server(("127.0.0.1", 0)))


def url(server: Server, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
    return f"{scheme}://{host}:{server.server_address[1]}{path}"


def fetcher(**options) -> ImageFetcher:
    return ImageFetcher(**{"max_bytes": MAX_BYTES, "allow_private": True, **options})


def assert_refused(call, *fragments: str, code: str = "image_fetch_failed",
                   param: str = "image") -> APIError:
    with pytest.raises(APIError) as info:
        call()
    error = info.value
    assert (error.status, error.param, error.code) == (400, param, code), error.message
    for fragment in fragments:
        assert fragment in error.message
    assert "Traceback" not in error.message
    validate(error.body(), "ErrorResponse")
    return error


# ---------------------------------------------------------------------------------------------
# Fetching


def test_fetches_the_image_bytes_exactly(server: Server) -> None:
    assert fetcher().fetch(url(server, "/image.png?v=1"), "image") == IMAGE
    assert server.seen == [("/image.png?v=1", f"127.0.0.1:{server.server_address[1]}")]


def test_a_redirect_is_not_followed(server: Server) -> None:
    assert_refused(lambda: fetcher().fetch(url(server, "/redirect"), "image"),
                   "302", "redirects are not followed", "169.254.169.254")
    assert [path for path, _ in server.seen] == ["/redirect"]


def test_a_404_names_the_status(server: Server) -> None:
    assert_refused(lambda: fetcher().fetch(url(server, "/nothing-here"), "image[2]"),
                   "404", "Not Found", param="image[2]")


def test_an_announced_oversized_body_is_refused(server: Server) -> None:
    assert_refused(lambda: fetcher().fetch(url(server, "/big"), "image"),
                   f"{MAX_BYTES + 1} bytes", f"at most {MAX_BYTES}", code="image_too_large")


@pytest.mark.parametrize("path", ["/big-unannounced", "/big-chunked"])
def test_an_unannounced_oversized_body_is_cut_at_the_limit(server: Server, path: str) -> None:
    assert_refused(lambda: fetcher().fetch(url(server, path), "image"),
                   f"at most {MAX_BYTES}", code="image_too_large")


def test_a_body_up_to_the_limit_is_taken(server: Server) -> None:
    assert fetcher(max_bytes=len(IMAGE)).fetch(url(server, "/image.png"), "image") == IMAGE
    assert_refused(lambda: fetcher(max_bytes=len(IMAGE) - 1).fetch(
        url(server, "/image.png"), "image"), code="image_too_large")


def test_a_body_shorter_than_announced_is_refused(server: Server) -> None:
    assert_refused(lambda: fetcher().fetch(url(server, "/short"), "image"),
                   f"closed after 20 of the {len(IMAGE)} bytes")


def test_a_body_longer_than_announced_is_read_as_announced(server: Server) -> None:
    # HTTP frames the body by Content-Length: what follows it is not the image.
    assert fetcher().fetch(url(server, "/long"), "image") == IMAGE


def test_a_server_that_never_answers_times_out(server: Server) -> None:
    started = time.monotonic()
    assert_refused(lambda: fetcher(timeout=0.5).fetch(url(server, "/hang"), "image"),
                   "timed out")
    assert time.monotonic() - started < 2


def test_the_timeout_is_for_the_whole_fetch(server: Server) -> None:
    # Each byte comes well within the timeout; their sum does not.
    started = time.monotonic()
    assert_refused(lambda: fetcher(timeout=0.5).fetch(url(server, "/trickle"), "image"),
                   "timed out")
    assert time.monotonic() - started < 2


def test_a_response_that_is_not_http_is_refused(server: Server) -> None:
    assert_refused(lambda: fetcher().fetch(url(server, "/garbage"), "image"),
                   "did not send a valid HTTP response")


def test_a_closed_port_is_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert_refused(lambda: fetcher().fetch(f"http://127.0.0.1:{port}/a.png", "image"),
                   "connection was refused", f"127.0.0.1:{port}")


def test_a_name_that_does_not_resolve_is_refused(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(image_fetch.socket, "getaddrinfo", fail)
    assert_refused(lambda: fetcher().fetch("http://no-such-host.invalid/a.png", "image"),
                   "no-such-host.invalid could not be resolved")


def test_a_slow_lookup_times_out(monkeypatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(image_fetch.socket, "getaddrinfo", lambda *a, **k: release.wait(5) and [])
    try:
        assert_refused(lambda: fetcher(timeout=0.3).fetch("http://slow.example/", "image"),
                       "looking up slow.example timed out")
    finally:
        release.set()


# ---------------------------------------------------------------------------------------------
# What is never fetched


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "169.254.169.254",
                                  "10.0.0.1", "192.168.1.1", "172.16.0.1", "100.64.0.1",
                                  "0.0.0.0", "[::ffff:127.0.0.1]", "[::ffff:a9fe:a9fe]",
                                  "[fe80::1]", "[fd00::1]", "224.0.0.1", "[::]",
                                  "[2002:7f00:1::]", "[64:ff9b::a9fe:a9fe]", "2130706433",
                                  "0x7f.1", "127.1"])
def test_local_and_private_addresses_are_refused_without_connecting(server: Server, host: str,
                                                                    monkeypatch) -> None:
    connects = []
    monkeypatch.setattr(image_fetch._PinnedConnection, "connect",
                        lambda self: connects.append(self))
    port = server.server_address[1]
    assert_refused(lambda: ImageFetcher(max_bytes=MAX_BYTES).fetch(
        f"http://{host}:{port}/image.png", "image"), "not a public address")
    assert connects == [] and server.seen == []


def test_the_metadata_address_is_refused_by_default() -> None:
    assert_refused(lambda: ImageFetcher(max_bytes=MAX_BYTES).fetch(
        "http://169.254.169.254/latest/meta-data/", "image"), "169.254.169.254",
        "not a public address")


def fake_dns(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    """Make getaddrinfo answer ``answers``; returns the names looked up, in order."""
    looked_up: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        looked_up.append(host)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in answers[host]]

    monkeypatch.setattr(image_fetch.socket, "getaddrinfo", getaddrinfo)
    return looked_up


def test_a_name_refused_if_any_address_is_private(monkeypatch) -> None:
    fake_dns(monkeypatch, {"mixed.example": ["93.184.216.34", "10.1.2.3"]})
    assert_refused(lambda: ImageFetcher(max_bytes=MAX_BYTES).fetch(
        "https://mixed.example/cat.png", "image"), "mixed.example resolves to 10.1.2.3")


def test_the_checked_address_is_the_one_connected_to(server: Server, monkeypatch) -> None:
    # One lookup, then a connection to its answer with Host naming the name: a DNS server
    # that answers differently the second time (rebinding) never gets asked again.
    looked_up = fake_dns(monkeypatch, {"images.example": ["127.0.0.1"]})
    port = server.server_address[1]
    body = fetcher().fetch(f"http://images.example:{port}/image.png", "image")
    assert body == IMAGE
    assert looked_up == ["images.example"]
    assert server.seen == [("/image.png", f"images.example:{port}")]


@pytest.mark.parametrize(("link", "fragment"), [
    ("ftp://example.com/a.png", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("gopher://example.com/", "only http and https"),
    ("/relative/a.png", "only http and https URLs are fetched, not a relative URL"),
    ("http://user:pass@example.com/a.png", "user name or password"),
    ("http://user@example.com/a.png", "user name or password"),
    ("http:///a.png", "names no host"),
    ("http://example.com:99999/", "Port out of range"),
    ("http://[::1/", "Invalid IPv6 URL"),
    ("http://example.com/a b.png", "spaces or control characters"),
    ("http://example.com/a\r\nX-Evil: 1", "spaces or control characters"),
    ("http://example.com/" + "a" * 9000, "longer than 8192"),
])
def test_urls_that_are_not_fetched(link: str, fragment: str, monkeypatch) -> None:
    looked_up = fake_dns(monkeypatch, {})
    assert_refused(lambda: ImageFetcher(max_bytes=MAX_BYTES).fetch(link, "image_url"),
                   fragment, param="image_url")
    assert looked_up == []


@pytest.mark.parametrize(("address", "public"), [
    ("93.184.216.34", True), ("2606:4700::1111", True), ("8.8.8.8", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("169.254.169.254", False),
    ("::1", False), ("::ffff:10.0.0.1", False),
    ("::ffff:8.8.8.8", False),  # ipaddress calls all of ::ffff:0:0/96 not global: fine here
    ("fe80::1%eth0", False), ("2001:db8::1", False), ("255.255.255.255", False),
    ("240.0.0.1", False), ("198.18.0.1", False), ("ff02::1", False),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo: its client is 127.0.0.1
    ("not an address", False),
])
def test_is_public(address: str, public: bool) -> None:
    assert is_public(address) is public


# ---------------------------------------------------------------------------------------------
# HTTPS: the certificate is checked against the name, though the address was fixed


def certificate(name: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[Server, ssl.SSLContext]]:
    """An HTTPS server for images.example, and a client context that trusts its certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate("images.example", key)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = Server(("127.0.0.1", 0))
    server.socket = served.wrap_socket(server.socket, server_side=True)
    client = ssl.create_default_context(cadata=cert_pem.decode())
    yield from ((s, client) for s in start(server))


def test_https_checks_the_certificate_against_the_name(tls_server, monkeypatch) -> None:
    server, trusted = tls_server
    fake_dns(monkeypatch, {"images.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
    port = server.server_address[1]
    fetch = fetcher(tls_context=trusted).fetch
    assert fetch(f"https://images.example:{port}/image.png", "image") == IMAGE
    assert server.seen == [("/image.png", f"images.example:{port}")]
    assert_refused(lambda: fetch(f"https://other.example:{port}/image.png", "image"),
                   "TLS certificate was not accepted")


def test_https_with_the_default_trust_refuses_a_self_signed_certificate(tls_server,
                                                                        monkeypatch) -> None:
    server, _ = tls_server
    fake_dns(monkeypatch, {"images.example": ["127.0.0.1"]})
    assert_refused(lambda: fetcher().fetch(
        f"https://images.example:{server.server_address[1]}/image.png", "image"),
        "TLS certificate was not accepted")
    assert server.seen == []


def test_https_to_a_plain_http_server_fails_cleanly(server: Server) -> None:
    assert_refused(lambda: fetcher(timeout=2).fetch(url(server, "/image.png", scheme="https"),
                                                    "image"), "TLS")


def test_ipaddress_module_agrees_on_the_literals_above() -> None:
    # urlsplit leaves "2130706433" and "0x7f.1" as names; getaddrinfo reads them as 127.0.0.1.
    for name in ("2130706433", "0x7f.1", "127.1"):
        address = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)[0][4][0]
        assert ipaddress.ip_address(address).is_loopback
