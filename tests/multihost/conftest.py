"""Three "hosts" in network namespaces for the multi-host tests (see test_multihost.py).

Everything this file creates is named ``dcmh-<pytest pid>-...``: namespaces ``...-head``,
``...-a``, ``...-b`` and ``...-c``; the veths and the bridge live inside them, so deleting the
namespaces deletes them too, and nothing is added to the root namespace's network. A run that
crashed leaves namespaces whose pid is dead; the next set-up kills what runs in them and
deletes them.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.cluster import REPO, OutputLog, alive, bound_http_port, cluster_env, wait_until

PREFIX = "dcmh-"
HEARTBEAT = 0.3
SUBNET = "10.213.0"  # a private test subnet that exists only inside our namespaces
HEAD_IP = f"{SUBNET}.1"
WORKER_PORT = 5556  # inside the head namespace every port is free
# host name -> (namespace suffix, address, the head-side veth that is its "cable")
HOSTS = {"host-a": ("a", f"{SUBNET}.2", "veth-a"),
         "host-b": ("b", f"{SUBNET}.3", "veth-b"),
         "host-c": ("c", f"{SUBNET}.4", "veth-c")}
SERVING = ("host-a", "host-b")  # the two hosts whose keys are on the allow-list
STOP_GRACE = 4.0  # seconds between SIGTERM and SIGKILL


def ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def our_namespaces() -> list[str]:
    """Every namespace with our prefix, ours or a crashed run's."""
    listing = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listing.splitlines()
            if line.strip() and line.split()[0].startswith(PREFIX)]


def delete_namespace(name: str) -> None:
    """SIGKILL what still runs in the namespace (only what we started there), then delete it."""
    def emptied() -> bool:
        pids = [int(p) for p in ip("netns", "pids", name, check=False).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids

    with contextlib.suppress(AssertionError):  # delete it anyway; `ip` says what is left
        wait_until(emptied, 2.0, f"the processes in {name} to die")
    ip("netns", "del", name, check=False)


def _stale(name: str) -> bool:
    """Whether ``dcmh-<pid>-...`` belongs to a pytest that is gone (a crash, a kill -9)."""
    match = re.match(rf"{PREFIX}(\d+)-", name)
    return bool(match) and (int(match.group(1)) == os.getpid() or not alive(int(match.group(1))))


def remove_leftovers() -> None:
    """Delete the namespaces and temporary folders of earlier runs whose pytest is gone."""
    for name in our_namespaces():
        if _stale(name):
            delete_namespace(name)
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        if folder.is_dir() and _stale(folder.name):
            shutil.rmtree(folder, ignore_errors=True)


def netns_unavailable() -> str | None:
    """Why namespaces, veths and bridges cannot be used here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        result = ip("netns", "add", probe, check=False)
        if result.returncode != 0:
            return f"`ip netns add` does not work here: {result.stderr.strip()}"
        for argv in (("link", "add", "br0", "type", "bridge"),
                     ("link", "add", "v0", "type", "veth", "peer", "name", "v1")):
            result = ip("-n", probe, *argv, check=False)
            if result.returncode != 0:
                return f"`ip link add ... {argv[-1]}` does not work in a namespace: " \
                       f"{result.stderr.strip()}"
    finally:
        delete_namespace(probe)
    return None


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL`` when it exists: children die even if pytest is killed."""
    if shutil.which("setpriv") is None:
        return []
    ok = subprocess.run(["setpriv", "--pdeathsig", "KILL", "true"], capture_output=True,
                        timeout=10).returncode == 0
    return ["setpriv", "--pdeathsig", "KILL"] if ok else []


@dataclass
class Proc:
    name: str
    process: subprocess.Popen
    log: OutputLog

    def stop(self) -> None:
        stop_all([self])


def stop_all(procs: list[Proc]) -> None:
    """SIGTERM each, wait together, then SIGKILL what is left."""
    for proc in procs:
        if proc.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for proc in procs:
        try:
            proc.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.process.kill()
            proc.process.wait(10)


@dataclass
class MultiHost:
    """The head (broker), the frontend (root namespace) and the worker hosts."""

    root: Path
    cache_dir: Path
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-")
    namespaces: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    port: int = 0
    broker: Proc | None = None
    frontend: Proc | None = None
    _wrap: list[str] = field(default_factory=_pdeathsig_prefix)
    serving = SERVING  # the hosts whose keys are on the allow-list

    # ------------------------------------------------------------------ network

    @property
    def head(self) -> str:
        return f"{self.tag}head"

    def ns(self, host: str) -> str:
        return f"{self.tag}{HOSTS[host][0]}"

    def build_network(self) -> None:
        """A bridge in the head namespace; each host hangs on it by its own veth pair."""
        head = self.head
        ip("netns", "add", head)
        self.namespaces.append(head)
        ip("-n", head, "link", "set", "lo", "up")
        ip("-n", head, "link", "add", "br0", "type", "bridge")
        ip("-n", head, "addr", "add", f"{HEAD_IP}/24", "dev", "br0")
        ip("-n", head, "link", "set", "br0", "up")
        for host, (_, address, veth) in HOSTS.items():
            ns = self.ns(host)
            ip("netns", "add", ns)
            self.namespaces.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", head, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            ip("-n", head, "link", "set", veth, "master", "br0")
            ip("-n", head, "link", "set", veth, "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def set_link(self, host: str, up: bool) -> None:
        """Plug or unplug ``host``'s cable: its veth on the head's bridge."""
        ip("-n", self.head, "link", "set", HOSTS[host][2], "up" if up else "down")

    def destroy(self) -> None:
        try:
            stop_all(self.procs)
        finally:
            for name in self.namespaces:
                delete_namespace(name)
            self.namespaces.clear()

    # ------------------------------------------------------------------ processes

    def start(self, name: str, netns: str | None, *argv: str) -> Proc:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        process = subprocess.Popen([*self._wrap, *prefix, sys.executable, *argv], cwd=REPO,
                                   env=cluster_env(self.cache_dir), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        proc = Proc(name, process, OutputLog(process))
        self.procs.append(proc)
        return proc

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def clients_endpoint(self) -> str:
        return f"ipc://{self.root / 'clients.ipc'}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_head(self) -> None:
        self.broker = self.start(
            "broker", self.head, "-m", "broker", "--clients", self.clients_endpoint,
            "--workers", f"tcp://{HEAD_IP}:{WORKER_PORT}", "--curve", str(self.keys),
            "--heartbeat", str(HEARTBEAT))
        # Port 0: the frontend binds a free port and logs it; nothing can take it in between.
        self.frontend = self.start(
            "frontend", None, "-m", "http_frontend", "--broker", self.clients_endpoint,
            "--host", "127.0.0.1", "--port", "0", "--heartbeat", str(HEARTBEAT),
            # The client endpoint requires CURVE too when the broker runs with --curve.
            "--broker-key", str(self.keys / "broker.key"),
            "--key", str(self.keys / "frontends" / "head.key_secret"))
        self.port = bound_http_port(self.frontend.log)

    def start_worker(self, host: str, worker_id: str, key: str | None, *extra: str) -> Proc:
        """A worker on ``host`` with the key pair ``key`` (None: plain TCP, no CURVE)."""
        curve = [] if key is None else [
            "--broker-key", str(self.keys / "broker.key"),
            "--key", str(self.keys / "workers" / f"{key}.key_secret")]
        return self.start(
            worker_id, self.ns(host), "-m", "gpu_worker",
            "--broker", f"tcp://{HEAD_IP}:{WORKER_PORT}", *curve, "--model", "tiny",
            "--device", "cpu", "--threads", "1", "--heartbeat", str(HEARTBEAT),
            "--worker-id", worker_id, *extra)

    def public_key(self, name: str) -> str:
        text = (self.keys / "workers" / f"{name}.key_secret").read_text()
        match = re.search(r'public-key\s*=\s*"([^"]+)"', text)
        assert match, f"no public-key in {name}.key_secret"
        return match.group(1)

    # ------------------------------------------------------------------ HTTP

    def status(self) -> dict[str, Any]:
        try:
            resp = httpx.get(f"{self.url}/v1/cluster", timeout=5)
        except httpx.HTTPError:
            return {}
        return resp.json() if resp.status_code == 200 else {}

    def workers(self) -> list[dict[str, Any]]:
        return self.status().get("workers", [])

    def ready(self) -> set[str]:
        return {w["worker_id"] for w in self.workers() if w["state"] == "ready"}

    def generate(self, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/images/generations", json=body, timeout=timeout)

    def wait_ready(self, hosts: tuple[str, ...] = SERVING, timeout: float = 90) -> None:
        self.wait_until(lambda: set(hosts) <= self.ready(), timeout,
                        f"{', '.join(hosts)} to be ready", self.logs)

    wait_until = staticmethod(wait_until)  # the tests reach helpers through the fixture

    @staticmethod
    def check_image(resp: httpx.Response, width: int, height: int) -> dict[str, Any]:
        """A 200 with one PNG of the asked size; returns the body."""
        assert resp.status_code == 200, resp.text
        body = resp.json()
        raw = base64.b64decode(body["data"][0]["b64_json"])
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(raw)) as image:
            assert image.format == "PNG"
            assert image.size == (width, height)
        return body

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (exit {p.process.poll()}):\n" +
                         "\n".join(p.log.lines[-25:]) for p in self.procs)


@pytest.fixture(scope="module")
def multihost(cache_dir: Path) -> Iterator[MultiHost]:
    """The head and host-a/host-b serving, shared by the module's tests; always torn down."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    remove_leftovers()
    # A short path: an ipc:// endpoint is a Unix socket path (at most ~107 bytes).
    cluster = MultiHost(Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")), cache_dir)
    try:
        subprocess.run([sys.executable, str(REPO / "launch.py"), "keys", str(cluster.keys),
                        "--worker", "host-a", "--worker", "host-b", "--worker", "rogue",
                        "--frontend", "head"],
                       cwd=REPO, env=cluster_env(cache_dir), check=True, capture_output=True,
                       timeout=60)
        # rogue keeps a valid-looking pair, but its public key is not on the allow-list.
        (cluster.keys / "workers" / "rogue.key").unlink()
        cluster.build_network()
        cluster.start_head()
        assert cluster.broker is not None
        cluster.broker.log.wait_for("CURVE self-test passed", 30)
        for host in SERVING:
            cluster.start_worker(host, host, host)
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(cluster.root, ignore_errors=True)
