"""What the broker counts since it started: jobs dispatched, requeued and failed, per model.

Every frontend exports these as Prometheus counters labelled by model, so a model's name
is a label value: only names a worker announced are counted under their own (a frontend
may submit any name), at most ``MAX_MODELS`` of them; any other counts as ``other``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from broker.protocol import BrokerCounters, ErrorCode

OTHER = "other"  # the model label of a job for a model no worker announced
MAX_MODELS = 256  # named models; STATUS_REPLY's maps hold at most MAX_LIST entries


class JobCounters:
    """Owns the broker's job counts; only the broker thread touches it."""

    def __init__(self, *, started: float) -> None:
        self.started = started  # the broker's wall clock at its start: tells a reset apart
        self._known: set[str] = set()
        self._dispatched: Counter[str] = Counter()
        self._requeued: Counter[str] = Counter()
        self._failed: dict[str, Counter[str]] = {}

    def announce(self, models: Iterable[str]) -> None:
        """Count the jobs of ``models`` under their names from now on (a worker serves them)."""
        for model in models:
            if len(self._known) >= MAX_MODELS:
                return
            self._known.add(model)

    def dispatched(self, model: str, jobs: int) -> None:
        self._dispatched[self._label(model)] += jobs

    def requeued(self, model: str) -> None:
        self._requeued[self._label(model)] += 1

    def failed(self, model: str, code: ErrorCode) -> None:
        self._failed.setdefault(self._label(model), Counter())[code.value] += 1

    def snapshot(self) -> BrokerCounters:
        return BrokerCounters(
            started=self.started, dispatched=dict(self._dispatched),
            requeued=dict(self._requeued),
            failed={model: dict(codes) for model, codes in self._failed.items()})

    def _label(self, model: str) -> str:
        return model if model in self._known else OTHER
