"""Defaults every program of a cluster must agree on, in one place. Imports nothing.

The broker, the workers, the frontend and launch.py read these; a peer that disagrees (another
heartbeat interval, say) is misconfigured, so no program keeps a literal of its own.
"""

from __future__ import annotations

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats, both ways
HEARTBEAT_LIVENESS = 3  # missed heartbeats after which a peer is dead

CLIENTS_ENDPOINT = "tcp://127.0.0.1:5555"  # the broker's endpoint for HTTP frontends
WORKERS_ENDPOINT = "tcp://127.0.0.1:5556"  # the broker's endpoint for GPU workers
MAX_QUEUE = 256  # queued jobs per model before submissions get 429
# Bytes per frame a frontend may send the broker: an edit's input images are frames of their
# own, re-encoded by the frontend at the size they run at (a 2048x2048 PNG of noise: 12 MiB).
MAX_CLIENT_FRAME = 32 << 20
# Bytes of edit images the broker holds for its jobs, all together (--max-input-mb).
MAX_INPUT_BYTES = 2 << 30

HTTP_HOST = "127.0.0.1"
HTTP_PORT = 8000
REQUEST_TIMEOUT = 300.0  # seconds an HTTP request may take, queueing included

LOG_LEVEL = "INFO"
