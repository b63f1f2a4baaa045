"""CURVE authentication for the worker endpoint: key files, and a ZAP handler in the loop.

Key layout (written by ``launch.py keys DIR``)::

    DIR/broker.key, DIR/broker.key_secret        the broker's pair (secret: mode 0600)
    DIR/workers/NAME.key, NAME.key_secret        one pair per worker host
    DIR/workers/*.key                             the allow-list: public keys only matter

The broker answers ZAP requests itself, on its own thread (ZAP is a REP socket on the same
context as the CURVE server), so the allow-list has one owner. It reloads the list when asked
(SIGHUP) and when the directory changes. A refused key is logged in Z85, never a secret.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "diffusion-cluster-workers"
BROKER_KEY = "broker"
WORKERS_DIR = "workers"


def is_loopback(endpoint: str) -> bool:
    """Whether a tcp:// endpoint (or ipc/inproc) is reachable from this host only."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


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

    def __init__(self, context: zmq.Context, key_dir: Path) -> None:
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

    def configure_server(self, sock: zmq.Socket) -> None:
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
