"""CURVE authentication for the worker endpoint: key files, and a ZAP handler in the loop.

Key layout (written by ``launch.py keys DIR``)::

    DIR/broker.key, DIR/broker.key_secret        the broker's pair (secret: mode 0600)
    DIR/workers/NAME.key, NAME.key_secret        one pair per worker host
    DIR/workers/*.key                             the allow-list: public keys only matter

The broker answers ZAP requests itself, on its own thread (ZAP is a REP socket on the same
context as the CURVE server), so the allow-list has one owner. It reloads the list when asked
(SIGHUP) and when the directory changes. A refused key is logged in Z85, never a secret.
``CurveServer`` puts it all on the broker's worker socket, with the start-up self-test.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from broker import protocol
from broker.protocol import MsgType

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "diffusion-cluster-workers"
BROKER_KEY = "broker"
WORKERS_DIR = "workers"
KEY_CHECK_INTERVAL = 2.0  # seconds between looks at the allow-list directory


def is_loopback(endpoint: str) -> bool:
    """Whether a tcp:// endpoint (or ipc/inproc) is reachable from this host only."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def connectable(endpoint: str) -> str:
    """An address to reach a bound endpoint from this host (wildcards become loopback)."""
    for wildcard, local in (("tcp://0.0.0.0:", "tcp://127.0.0.1:"),
                            ("tcp://*:", "tcp://127.0.0.1:"), ("tcp://[::]:", "tcp://[::1]:")):
        if endpoint.startswith(wildcard):
            return local + endpoint[len(wildcard):]
    return endpoint


def create_keys(directory: Path, workers: list[str], *, force: bool = False) -> list[Path]:
    """Write the broker's key pair (if missing) and one pair per worker name.

    Refuses to overwrite an existing pair unless ``force``. Returns the files written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / WORKERS_DIR).mkdir(exist_ok=True)
    wanted = [(directory, BROKER_KEY)] if force or not (directory / "broker.key").exists() \
        else []
    wanted += [(directory / WORKERS_DIR, name) for name in workers]
    existing = [d / f"{n}.key" for d, n in wanted if (d / f"{n}.key").exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(map(str, existing))} already exist; pass --force "
                              "to replace them (every peer using them must get the new ones)")
    written: list[Path] = []
    for folder, name in wanted:
        public, secret = zmq.auth.create_certificates(folder, name)
        os.chmod(secret, stat.S_IRUSR | stat.S_IWUSR)
        written += [Path(public), Path(secret)]
    return written


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file; refuses one others can read."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path} is readable by others (mode {oct(mode & 0o777)}); "
                              "run chmod 600 on it")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    public, _ = zmq.auth.load_certificate(path)
    return public


class CurveAuthority:
    """Owns the allow-list and answers ZAP requests; only the broker thread calls it."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], key_dir: Path) -> None:
        self.key_dir = key_dir
        self.public, self.secret = load_secret(key_dir / "broker.key_secret")
        self._allowed: set[bytes] = set()
        self._extra: set[bytes] = set()  # keys allowed in memory only (the self-test)
        self._probes: set[bytes] = set()  # the self-test's keys: refusing them is expected
        self._stamp: tuple[float, int] | None = None
        self.socket = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)
        self.reload()

    def close(self) -> None:
        self.socket.close(linger=0)

    def configure_server(self, sock: zmq.Socket[bytes]) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)

    def allow_temporarily(self, public: bytes, *, probe: bool = False,
                          allowed: bool = True) -> None:
        if allowed:
            self._extra.add(public)
        if probe:
            self._probes.add(public)

    def revoke_temporary(self, public: bytes) -> None:
        self._extra.discard(public)
        self._probes.discard(public)

    def _folder_stamp(self) -> tuple[float, int]:
        folder = self.key_dir / WORKERS_DIR
        try:
            return folder.stat().st_mtime, len(list(folder.glob("*.key")))
        except OSError:
            return 0.0, 0

    def reload_if_changed(self) -> None:
        if self._folder_stamp() != self._stamp:
            self.reload()

    def reload(self) -> None:
        """Read the allow-list again: every public key in DIR/workers/."""
        allowed: set[bytes] = set()
        for path in sorted((self.key_dir / WORKERS_DIR).glob("*.key")):
            try:
                allowed.add(load_public(path))
            except (OSError, ValueError) as exc:
                log.warning("skipping unreadable worker key %s: %s", path.name, exc)
        added, removed = len(allowed - self._allowed), len(self._allowed - allowed)
        self._allowed = allowed
        self._stamp = self._folder_stamp()
        log.info("worker allow-list: %d key(s) (%d added, %d removed)", len(allowed), added,
                 removed)

    def handle(self) -> None:
        """Answer one ZAP request waiting on the socket."""
        try:
            frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        self.socket.send_multipart(self._answer(frames))

    def _answer(self, frames: list[bytes]) -> list[Any]:
        if len(frames) < 6:
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"400", b"bad request",
                    b"", b""]
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        peer = address.decode(errors="replace")
        if domain.decode(errors="replace") != ZAP_DOMAIN:
            log.warning("refused %s: ZAP domain %r is not ours", peer, domain)
            return [version, request_id, b"400", b"wrong domain", b"", b""]
        if mechanism != b"CURVE" or len(credentials) != 1:
            log.warning("refused %s: %s without CURVE credentials", peer,
                        mechanism.decode(errors="replace"))
            return [version, request_id, b"400", b"CURVE required", b"", b""]
        key = zmq.utils.z85.encode(credentials[0])
        if key in self._allowed or key in self._extra:
            return [version, request_id, b"200", b"OK", key, b""]
        if key not in self._probes:
            log.warning("refused worker key %s from %s: not on the allow-list", key.decode(),
                        peer)
        return [version, request_id, b"400", b"key not allowed", b"", b""]


class CurveServer:
    """CURVE on the broker's worker socket: the ZAP answers, refused handshakes, allow-list
    reloads and the start-up self-test.

    The broker polls ``sockets`` along with its own and hands the events to ``handle``. Only
    the broker thread calls it, but ``request_reload`` is safe from a signal handler.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], key_dir: Path,
                 server: zmq.Socket[bytes]) -> None:
        self.key_dir = key_dir
        self._ctx = context
        self._server = server
        self.authority = CurveAuthority(context, key_dir)
        self.authority.configure_server(server)
        # Peers refused before ZAP (no CURVE at all, a wrong server key) show up only here.
        self._monitor = server.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self._refused = protocol.DropLog(log, "refused a worker connection on")
        self._reload_requested = threading.Event()
        self._next_key_check = 0.0
        self._self_testing = False

    @property
    def sockets(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        """The sockets the broker's poller must watch for us."""
        return self.authority.socket, self._monitor

    def handle(self, events: Mapping[zmq.Socket[bytes], int]) -> None:
        """Answer a ZAP request and log a refused handshake, whichever ``events`` holds."""
        if self.authority.socket in events:
            self.authority.handle()
        if self._monitor in events:
            self._log_handshake_failure()

    def request_reload(self) -> None:
        """Re-read the allow-list at the next ``check_keys``."""
        self._reload_requested.set()

    def check_keys(self, now: float) -> None:
        """Reload the allow-list if asked, or every KEY_CHECK_INTERVAL if its folder changed."""
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self.authority.reload()
        elif now >= self._next_key_check:
            self.authority.reload_if_changed()
        self._next_key_check = now + KEY_CHECK_INTERVAL

    def close(self) -> None:
        self._server.disable_monitor()
        self._monitor.close(linger=0)
        self.authority.close()

    def self_test(self, poll: Callable[[float], None], *, timeout: float) -> None:
        """Prove that an allowed key gets in and an unknown one does not.

        ``poll`` runs the broker's loop for up to so many seconds: it answers the probes. A
        misconfiguration (a ZAP domain mismatch, an unreadable key) would otherwise refuse
        every worker silently. Raises RuntimeError naming what failed.
        """
        endpoint = connectable(self._server.getsockopt_string(zmq.LAST_ENDPOINT))
        allowed, stranger = zmq.curve_keypair(), zmq.curve_keypair()
        self.authority.allow_temporarily(allowed[0], probe=True)
        self.authority.allow_temporarily(stranger[0], probe=True, allowed=False)
        self._self_testing = True
        try:
            let_in = self._probe(endpoint, *allowed, poll=poll, timeout=timeout)
            kept_out = not self._probe(endpoint, *stranger, poll=poll,
                                       timeout=min(timeout, 1.0))
            poll(0.05)  # take the stranger's refusal events while still testing
        finally:
            self._self_testing = False
            self.authority.revoke_temporary(allowed[0])
            self.authority.revoke_temporary(stranger[0])
        if not let_in:
            raise RuntimeError("CURVE self-test failed: a key on the allow-list could not "
                               f"connect to {endpoint}; check the keys in {self.key_dir} "
                               "and the ZAP domain")
        if not kept_out:
            raise RuntimeError("CURVE self-test failed: a key NOT on the allow-list got in")
        log.info("CURVE self-test passed: allowed keys get in, others do not")

    def _probe(self, endpoint: str, public: bytes, secret: bytes, *,
               poll: Callable[[float], None], timeout: float) -> bool:
        """Connect as a worker would and see whether the broker answers at all."""
        probe = self._ctx.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        probe.setsockopt(zmq.CURVE_SERVERKEY, self.authority.public)
        probe.setsockopt(zmq.CURVE_PUBLICKEY, public)
        probe.setsockopt(zmq.CURVE_SECRETKEY, secret)
        try:
            probe.connect(endpoint)
            probe.send_multipart(protocol.encode(MsgType.HEARTBEAT))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                poll(0.02)
                if probe.poll(0):
                    return True  # any answer (RECONNECT: it does not know us) means we got in
            return False
        finally:
            probe.close(linger=0)

    def _log_handshake_failure(self) -> None:
        try:
            event = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        if self._self_testing:
            return  # the self-test's stranger is refused on purpose
        self._refused(bytes(event.get("endpoint") or b"?").decode(errors="replace"),
                      "its CURVE handshake failed (no CURVE, a wrong broker key, or a key not "
                      "on the allow-list)")
