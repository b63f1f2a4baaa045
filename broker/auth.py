"""CURVE authentication for both broker endpoints: key files, and a ZAP handler in the loop.

Key layout (written by ``launch.py keys DIR``)::

    DIR/broker.key, DIR/broker.key_secret        the broker's pair (secret: mode 0600)
    DIR/workers/NAME.key, NAME.key_secret        one pair per worker host
    DIR/frontends/NAME.key, NAME.key_secret      one pair per HTTP frontend
    DIR/workers/*.key, DIR/frontends/*.key       the allow-lists: public keys only matter

Each endpoint has a ZAP domain and an allow-list folder of its own (a ``PeerKind``), so a
worker's key never opens the client endpoint, nor a frontend's the worker endpoint: a stolen
worker host cannot submit or cancel jobs, and a frontend cannot take jobs or send results.

The broker answers ZAP requests itself, on its own thread (ZAP is a REP socket on the same
context as the CURVE servers, and a context has one), so the allow-lists have one owner. It
reloads them when asked (SIGHUP) and when a folder changes. A refused key is logged in Z85,
never a secret. ``CurveServer`` puts it all on the broker's sockets, with the start-up
self-test.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from broker import protocol
from broker.protocol import MsgType

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "diffusion-cluster-workers"  # the worker endpoint's, as before frontends had one
BROKER_KEY = "broker"
WORKERS_DIR = "workers"
FRONTENDS_DIR = "frontends"
KEY_CHECK_INTERVAL = 2.0  # seconds between looks at the allow-list directories
# A refused peer's ZeroMQ dials again every 100 ms or so: each key's refusal is logged at
# most this often, while another key's refusal still shows at once.
REFUSAL_LOG_INTERVAL = 10.0
REFUSALS_REMEMBERED = 1024
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass(frozen=True)
class PeerKind:
    """Who may use one endpoint: its ZAP domain and its allow-list folder (DIR/folder/)."""

    name: str  # in logs: "worker", "frontend"
    domain: str
    folder: str
    probe: MsgType  # what the self-test sends: a message the endpoint answers a stranger


WORKERS = PeerKind("worker", ZAP_DOMAIN, WORKERS_DIR, MsgType.HEARTBEAT)  # RECONNECT
FRONTENDS = PeerKind("frontend", "diffusion-cluster-frontends", FRONTENDS_DIR,
                     MsgType.STATUS)  # STATUS_REPLY


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


def create_keys(directory: Path, workers: Sequence[str], *, frontends: Sequence[str] = (),
                force: bool = False) -> list[Path]:
    """Write the broker's key pair (if missing), one pair per worker name and one per
    frontend name.

    Refuses to overwrite an existing pair unless ``force``. Returns the files written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for kind_dir in (WORKERS_DIR, FRONTENDS_DIR):
        (directory / kind_dir).mkdir(exist_ok=True)
    wanted = [(directory, BROKER_KEY)] if force or not (directory / "broker.key").exists() \
        else []
    wanted += [(directory / WORKERS_DIR, name) for name in workers]
    wanted += [(directory / FRONTENDS_DIR, name) for name in frontends]
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
    """Owns the allow-lists and answers ZAP requests; only the broker thread calls it."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], key_dir: Path,
                 kinds: Sequence[PeerKind]) -> None:
        self.key_dir = key_dir
        self.public, self.secret = load_secret(key_dir / "broker.key_secret")
        self._kinds = {kind.domain: kind for kind in kinds}
        # Per ZAP domain: public key -> its file's name (the ZAP user id, and for the logs).
        self._allowed: dict[str, dict[bytes, str]] = {kind.domain: {} for kind in kinds}
        self._extra: dict[str, set[bytes]] = {kind.domain: set() for kind in kinds}  # self-test
        self._probes: set[bytes] = set()  # the self-test's keys: refusing them is expected
        self._refusal_logged: dict[bytes, float] = {}  # key -> when its refusal was logged
        self._stamp: tuple[tuple[float, int], ...] | None = None
        self.socket = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)
        self.reload()

    def close(self) -> None:
        self.socket.close(linger=0)

    def configure_server(self, sock: zmq.Socket[bytes], kind: PeerKind) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, kind.domain)

    def allow_temporarily(self, kind: PeerKind, public: bytes) -> None:
        """Let ``public`` in as a ``kind`` until ``revoke_temporary`` (the self-test)."""
        self._extra[kind.domain].add(public)

    def expect_refusal(self, public: bytes) -> None:
        """Refuse ``public`` without a word: the self-test knocks with it on purpose."""
        self._probes.add(public)

    def revoke_temporary(self, public: bytes) -> None:
        for extra in self._extra.values():
            extra.discard(public)
        self._probes.discard(public)

    def _folder_stamp(self) -> tuple[tuple[float, int], ...]:
        return tuple(_stamp(self.key_dir / kind.folder) for kind in self._kinds.values())

    def reload_if_changed(self) -> None:
        if self._folder_stamp() != self._stamp:
            self.reload()

    def reload(self) -> None:
        """Read the allow-lists again: every public key in each kind's folder."""
        self._stamp = self._folder_stamp()
        for kind in self._kinds.values():
            allowed = _read_keys(self.key_dir / kind.folder, kind)
            before = self._allowed[kind.domain]
            log.info("%s allow-list: %d key(s) (%d added, %d removed)", kind.name,
                     len(allowed), len(allowed.keys() - before.keys()),
                     len(before.keys() - allowed.keys()))
            self._allowed[kind.domain] = allowed
            if not allowed:
                log.warning("no %s key in %s: no %s can connect (`launch.py keys %s --%s "
                            "NAME` makes one)", kind.name, self.key_dir / kind.folder,
                            kind.name, self.key_dir, kind.name)

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
        kind = self._kinds.get(domain.decode(errors="replace"))
        if kind is None:
            log.warning("refused %s: ZAP domain %r is not ours", peer, domain)
            return [version, request_id, b"400", b"wrong domain", b"", b""]
        if mechanism != b"CURVE" or len(credentials) != 1:
            log.warning("refused %s: %s without CURVE credentials", peer,
                        mechanism.decode(errors="replace"))
            return [version, request_id, b"400", b"CURVE required", b"", b""]
        key = zmq.utils.z85.encode(credentials[0])
        name = self._allowed[kind.domain].get(key)
        if name is None and key in self._extra[kind.domain]:
            name = "self-test"
        if name is not None:
            return [version, request_id, b"200", b"OK", name.encode(), b""]
        if key not in self._probes:
            self._log_refusal(kind, key, peer)
        return [version, request_id, b"400", b"key not allowed", b"", b""]

    def _log_refusal(self, kind: PeerKind, key: bytes, peer: str) -> None:
        now = time.monotonic()
        if now - self._refusal_logged.get(key, float("-inf")) < REFUSAL_LOG_INTERVAL:
            return
        if len(self._refusal_logged) >= REFUSALS_REMEMBERED:
            self._refusal_logged.clear()  # bounded, whatever a peer making keys sends
        self._refusal_logged[key] = now
        log.warning("refused %s key %s from %s: %s", kind.name, key.decode(), peer,
                    self._why_not(kind, key))

    def _why_not(self, kind: PeerKind, key: bytes) -> str:
        """Why a key is not let in as ``kind``: another kind's key says so (a likely mix-up,
        or a stolen key tried on the other door)."""
        for other in self._kinds.values():
            name = self._allowed[other.domain].get(key)
            if other is not kind and name is not None:
                return (f"it is {other.name} key {name!r} ({other.folder}/), which does not "
                        f"open the {kind.name} endpoint")
        return f"not on the allow-list ({kind.folder}/)"


def _stamp(folder: Path) -> tuple[float, int]:
    try:
        return folder.stat().st_mtime, len(list(folder.glob("*.key")))
    except OSError:
        return 0.0, 0


def _read_keys(folder: Path, kind: PeerKind) -> dict[bytes, str]:
    """Public key -> file name for every readable ``*.key`` in ``folder`` (none if missing)."""
    allowed: dict[bytes, str] = {}
    for path in sorted(folder.glob("*.key")):
        try:
            allowed[load_public(path)] = f"{kind.folder}/{path.stem}"
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable %s key %s: %s", kind.name, path.name, exc)
    return allowed


@dataclass
class _Probe:
    """One self-test connection: who knocks on which endpoint, and whether it may get in."""

    what: str
    endpoint: str
    kind: PeerKind  # the endpoint's
    pair: tuple[bytes, bytes]
    let_in: bool
    sock: zmq.Socket[bytes] | None = None
    got_in: bool = False


class CurveServer:
    """CURVE on the broker's sockets: the ZAP answers, refused handshakes, allow-list
    reloads and the start-up self-test.

    ``workers`` is the worker socket; ``frontends``, when given, the client socket. The
    broker polls ``sockets`` along with its own and hands the events to ``handle``. Only the
    broker thread calls it, but ``request_reload`` is safe from a signal handler.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], key_dir: Path,
                 workers: zmq.Socket[bytes], frontends: zmq.Socket[bytes] | None = None
                 ) -> None:
        self.key_dir = key_dir
        self._ctx = context
        self._servers: dict[PeerKind, zmq.Socket[bytes]] = {WORKERS: workers}
        if frontends is not None:
            self._servers[FRONTENDS] = frontends
        self.authority = CurveAuthority(context, key_dir, list(self._servers))
        # Peers refused before ZAP (no CURVE at all, a wrong server key) show up only here.
        self._monitors: dict[zmq.Socket[bytes], PeerKind] = {}
        self._refused: dict[PeerKind, protocol.DropLog] = {}
        for kind, server in self._servers.items():
            self.authority.configure_server(server, kind)
            self._monitors[server.get_monitor_socket(HANDSHAKE_FAILED)] = kind
            self._refused[kind] = protocol.DropLog(log, f"refused a {kind.name} connection on")
        self._reload_requested = threading.Event()
        self._next_key_check = 0.0
        self._self_testing = False

    @property
    def sockets(self) -> tuple[zmq.Socket[bytes], ...]:
        """The sockets the broker's poller must watch for us."""
        return (self.authority.socket, *self._monitors)

    def handle(self, events: Mapping[zmq.Socket[bytes], int]) -> None:
        """Answer a ZAP request and log a refused handshake, whichever ``events`` holds."""
        if self.authority.socket in events:
            self.authority.handle()
        for monitor, kind in self._monitors.items():
            if monitor in events:
                self._log_handshake_failure(monitor, kind)

    def request_reload(self) -> None:
        """Re-read the allow-lists at the next ``check_keys``."""
        self._reload_requested.set()

    def check_keys(self, now: float) -> None:
        """Reload the allow-lists if asked, or every KEY_CHECK_INTERVAL if a folder changed."""
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self.authority.reload()
        elif now >= self._next_key_check:
            self.authority.reload_if_changed()
        self._next_key_check = now + KEY_CHECK_INTERVAL

    def close(self) -> None:
        for server in self._servers.values():
            server.disable_monitor()
        for monitor in self._monitors:
            monitor.close(linger=0)
        self.authority.close()

    def self_test(self, poll: Callable[[float], None], *, timeout: float) -> None:
        """Prove, on every CURVE endpoint, that a key of its kind gets in, and that an
        unknown key and a key of the other kind do not.

        ``poll`` runs the broker's loop for up to so many seconds: it answers the probes. A
        misconfiguration (a ZAP domain mismatch, an unreadable key) would otherwise refuse
        every peer silently. The probes knock at once; those that must stay out are given
        ``min(timeout, 1)`` seconds to get in. Raises RuntimeError naming what failed.
        """
        pairs = {kind: zmq.curve_keypair() for kind in self._servers}
        stranger = zmq.curve_keypair()
        probes = self._probes(pairs, stranger)
        for kind, pair in pairs.items():
            self.authority.allow_temporarily(kind, pair[0])
        for pair in [*pairs.values(), stranger]:
            self.authority.expect_refusal(pair[0])
        self._self_testing = True
        try:
            self._knock(probes, poll, timeout=timeout)
            poll(0.05)  # take the refused probes' events while still testing
        finally:
            self._self_testing = False
            for probe in probes:
                if probe.sock is not None:
                    probe.sock.close(linger=0)
            for pair in [*pairs.values(), stranger]:
                self.authority.revoke_temporary(pair[0])
        for probe in probes:
            if probe.let_in and not probe.got_in:
                raise RuntimeError(f"CURVE self-test failed: {probe.what} could not connect "
                                   f"to {probe.endpoint}; check the keys in {self.key_dir} "
                                   "and the ZAP domain")
            if not probe.let_in and probe.got_in:
                raise RuntimeError(f"CURVE self-test failed: {probe.what} got in at "
                                   f"{probe.endpoint}")
        log.info("CURVE self-test passed: allowed keys get in, others do not")

    def _probes(self, pairs: Mapping[PeerKind, tuple[bytes, bytes]],
                stranger: tuple[bytes, bytes]) -> list[_Probe]:
        probes = []
        for kind, server in self._servers.items():
            endpoint = connectable(server.getsockopt_string(zmq.LAST_ENDPOINT))
            probes.append(_Probe(f"a {kind.name} key on the allow-list", endpoint, kind,
                                 pairs[kind], let_in=True))
            probes.append(_Probe(f"a key NOT on the {kind.name} allow-list", endpoint, kind,
                                 stranger, let_in=False))
            probes += [_Probe(f"a {other.name} key on the {kind.name} endpoint", endpoint,
                              kind, pair, let_in=False)
                       for other, pair in pairs.items() if other is not kind]
        return probes

    def _knock(self, probes: list[_Probe], poll: Callable[[float], None], *,
               timeout: float) -> None:
        """Connect every probe at once and note which get an answer."""
        for probe in probes:
            probe.sock = self._connect(probe)
        start = time.monotonic()
        deadline = start + timeout
        refusal_wait = start + min(timeout, 1.0)
        while time.monotonic() < deadline:
            poll(0.02)
            for probe in probes:
                assert probe.sock is not None
                probe.got_in = probe.got_in or bool(probe.sock.poll(0))
            if time.monotonic() >= refusal_wait and \
                    all(p.got_in for p in probes if p.let_in):
                return

    def _connect(self, probe: _Probe) -> zmq.Socket[bytes]:
        """A DEALER that knocks as a peer of the probe's endpoint would: any answer means it
        got in (RECONNECT from the worker endpoint, STATUS_REPLY from the client one)."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.authority.public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, probe.pair[0])
        sock.setsockopt(zmq.CURVE_SECRETKEY, probe.pair[1])
        sock.connect(probe.endpoint)
        sock.send_multipart(protocol.encode(probe.kind.probe))
        return sock

    def _log_handshake_failure(self, monitor: zmq.Socket[bytes], kind: PeerKind) -> None:
        try:
            event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        if self._self_testing:
            return  # the self-test's strangers are refused on purpose
        self._refused[kind](bytes(event.get("endpoint") or b"?").decode(errors="replace"),
                            "its CURVE handshake failed (no CURVE, a wrong broker key, or a "
                            f"key not on the {kind.name} allow-list)")
