"""What launch.py starts: which GPUs, how many CPU threads, and when the cluster is ready."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
import urllib.request
from collections.abc import Callable

import zmq

from broker import protocol
from broker.connection import CurveKeys
from broker.protocol import MsgType, ProtocolError
from launcher.supervisor import ProcessSpec

__all__ = ["ProcessSpec", "address_in_use", "cpu_worker_threads", "group_gpus",
           "parse_model_counts",
           "place_workers", "visible_gpus", "wait_for_frontend", "wait_until_ready"]


def visible_gpus(limit: int | None = None) -> list[str]:
    """The CUDA device ids this host may use (CUDA_VISIBLE_DEVICES honoured), first ``limit``."""
    if limit == 0:
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip() in ("", "-1"):
        return []
    if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
        return []  # no driver: spare the second it takes to import torch
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ids = [d.strip() for d in listed.split(",")][:count] if listed else \
        [str(i) for i in range(count)]
    return ids[:limit] if limit is not None else ids


def cpu_worker_threads(workers: int) -> int:
    """torch threads per CPU worker, so N workers do not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def wait_until_ready(clients_endpoint: str, workers: int, *, timeout: float,
                     should_stop: Callable[[], bool], curve: CurveKeys | None = None) -> bool:
    """Poll the broker until ``workers`` workers have registered (after their warm-up).

    ``curve``: a frontend's keys, for a broker whose client endpoint requires CURVE."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
    sock.connect(clients_endpoint)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not should_stop():
            sock.send_multipart(protocol.encode(MsgType.STATUS))
            if sock.poll(500):
                try:
                    reply = protocol.decode(sock.recv_multipart())
                except ProtocolError:
                    continue
                ready = [w for w in reply.get("workers", []) if w.get("state") == "ready"]
                if len(ready) >= workers:
                    return True
            time.sleep(0.25)
        return False
    finally:
        sock.close(linger=0)


def wait_for_frontend(url: str, workers: int, *, timeout: float,
                      should_stop: Callable[[], bool]) -> bool:
    """Poll the frontend's /readyz until it answers 200 and sees ``workers`` ready workers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not should_stop():
        try:
            with urllib.request.urlopen(f"{url}readyz", timeout=2) as resp:
                if resp.status == 200 and json.load(resp).get("workers", 0) >= workers:
                    return True
        except (OSError, ValueError):
            pass  # not listening yet, or 503 until its first status poll
        time.sleep(0.1)
    return False


def parse_model_counts(text: str) -> list[tuple[str, int]]:
    """'flux-schnell:4,sdxl:2,tiny' -> [('flux-schnell', 4), ('sdxl', 2), ('tiny', 1)]."""
    placed: list[tuple[str, int]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        # rpartition: a local path or repo id may itself contain ':' only before the count.
        name, sep, count = item.rpartition(":")
        if not sep or not count.isdigit():
            name, count = item, "1"
        if not name or int(count) < 1:
            raise ValueError(f"--models entry {item!r} is not MODEL or MODEL:COUNT")
        placed.append((name, int(count)))
    if not placed:
        raise ValueError("--models names no model")
    return placed


def group_gpus(gpus: list[str], per_worker: int) -> list[str]:
    """The GPUs in groups of ``per_worker`` (--gpus-per-worker), each as one
    CUDA_VISIBLE_DEVICES value ("0,1"); GPUs left over, fewer than a group, stay unused."""
    if per_worker < 1:
        raise ValueError("--gpus-per-worker must be at least 1")
    if gpus and len(gpus) < per_worker:
        raise ValueError(f"--gpus-per-worker {per_worker}, but only {len(gpus)} GPU(s) are "
                         f"visible")
    return [",".join(gpus[i:i + per_worker])
            for i in range(0, len(gpus) - per_worker + 1, per_worker)]


def place_workers(wanted: list[tuple[str, int]], gpus: list[str]) -> list[tuple[str, str | None]]:
    """Give each wanted worker a GPU of its own, in order; None means a CPU worker."""
    total = sum(count for _, count in wanted)
    if gpus and total > len(gpus):
        raise ValueError(f"{total} workers asked for, but only {len(gpus)} GPU(s) are visible")
    devices = iter(gpus) if gpus else None
    return [(model, next(devices) if devices else None)
            for model, count in wanted for _ in range(count)]


def split_address(address: str) -> tuple[str, int] | None:
    """'tcp://HOST:PORT' (ZeroMQ) or 'HOST:PORT' -> (host, port); None for what is not one TCP
    port on an address (ipc://, an ephemeral port '*', an interface name is left as a host)."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "tcp":
        return None
    host, _, port = (rest if sep else address).rpartition(":")
    if not port.isdigit():
        return None
    host = host.strip("[]")
    return ("0.0.0.0" if host in ("", "*") else host), int(port)


def address_in_use(address: str) -> str | None:
    """Why a listener could not bind ``address`` right now ('Address already in use'), or None.

    Binds and closes a socket with SO_REUSEADDR, as waitress and ZeroMQ do, so a port left in
    TIME_WAIT by a cluster that just stopped counts as free. Only an address in use or not ours
    to take is reported; anything else (a name that does not resolve) is left to the program,
    which says so itself. A check, not a reservation: the port can still be taken before the
    program binds it (then the program exits with EXIT_CONFIG).
    """
    parsed = split_address(address)
    if parsed is None:
        return None
    host, port = parsed
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return None
    for family, kind, proto, _, sockaddr in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:
            continue  # e.g. IPv6 off on this host
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return exc.strerror or str(exc)
    return None
