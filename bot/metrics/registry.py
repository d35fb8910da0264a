"""Prometheus metrics and readiness: what a bot process (or a model server's replica) counts.

`Metrics` holds its own `CollectorRegistry`, so several bots in one process (the tests) or a serving
app that mounts it never mix their numbers. Counters and the latency histogram are updated where
replies are produced (`bot/core/chat.py`); the gauges are read at scrape time from the sources bound with
`watch_engine` and `watch_gateway`, so nothing polls in the background.

`bot.metrics.endpoint` serves `render()` and `readiness()` over HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.core.outcomes import REPLY_KINDS
from bot.core.types import ReplyKind

# Reply latency buckets (seconds): a CPU reply takes from well under a second to a minute (the timeout).
LATENCY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)

# A readiness check returns None when satisfied, or a short reason why the process is not ready.
ReadinessCheck = Callable[[], str | None]


class EngineLoad(Protocol):
    """The part of `EngineStats` the gauges read."""

    @property
    def queue_depth(self) -> int: ...

    @property
    def running(self) -> int: ...

    @property
    def tokens_per_second(self) -> float | None: ...


class Metrics:
    """The process's metric objects, its scrape-time gauges and its readiness checks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.replies = Counter(
            "chatbot_replies",
            "Replies the chat service produced, by kind: ok (the model's answer) or the notice given instead.",
            ["kind"],
            registry=self.registry,
        )
        for kind in REPLY_KINDS:  # every kind is exported from the start, at 0
            self.replies.labels(kind=kind)
        self.reply_latency = Histogram(
            "chatbot_reply_latency_seconds",
            "Seconds from a message reaching the chat service to the model's finished answer (ok replies only).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.history_errors = Counter(
            "chatbot_history_store_errors",
            "History store operations that failed (the reply still goes out where it can).",
            registry=self.registry,
        )
        self._engine: Callable[[], EngineLoad] | None = None
        self._gateway: Callable[[], Iterable[tuple[int, float]]] | None = None
        self._checks: list[ReadinessCheck] = []
        self.registry.register(_LiveCollector(self))

    # ----- recording ---------------------------------------------------------------------------

    def count_reply(self, kind: ReplyKind, seconds: float | None = None) -> None:
        self.replies.labels(kind=kind).inc()
        if kind == "ok" and seconds is not None:
            self.reply_latency.observe(seconds)

    # ----- scrape-time sources -----------------------------------------------------------------

    def watch_engine(self, stats: Callable[[], EngineLoad]) -> None:
        """Read queue depth, running batch size and tokens/s from `stats()` at each scrape."""
        self._engine = stats

    def watch_gateway(self, latencies: Callable[[], Iterable[tuple[int, float]]]) -> None:
        """Read `(shard id, heartbeat latency in seconds)` pairs (discord.py's `bot.latencies`) at each scrape."""
        self._gateway = latencies

    def add_readiness_check(self, check: ReadinessCheck) -> None:
        self._checks.append(check)

    # ----- output ------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def readiness(self) -> list[str]:
        """Why the process is not ready; empty when it is (and when no check was added there is nothing to wait for)."""
        reasons = []
        for check in self._checks:
            reason = check()
            if reason:
                reasons.append(reason)
        return reasons

    def live_gauges(self) -> Iterator[Metric]:
        """The gauges read now from what is watched (engine load, gateway latency)."""
        if self._engine is not None:
            load = self._engine()
            yield GaugeMetricFamily(
                "chatbot_queue_depth", "Requests waiting for a place in the batch.", load.queue_depth
            )
            yield GaugeMetricFamily("chatbot_batch_size", "Replies being generated in the running batch.", load.running)
            tps = load.tokens_per_second
            yield GaugeMetricFamily(
                "chatbot_tokens_per_second",
                "Tokens generated per second of decoding, since the model loaded (NaN before the first reply).",
                math.nan if tps is None else tps,
            )
        if self._gateway is not None:
            family = GaugeMetricFamily(
                "chatbot_gateway_latency_seconds",
                "Seconds between a gateway heartbeat and its acknowledgement, per shard this process runs.",
                labels=["shard"],
            )
            for shard, latency in self._gateway():
                if math.isfinite(latency):  # no heartbeat answered yet: no sample rather than +Inf
                    family.add_metric([str(shard)], latency)
            yield family


class _LiveCollector(Collector):
    """Yields the gauges read at scrape time (engine load, gateway latency)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics.live_gauges())

    def describe(self) -> Iterable[Metric]:
        return []  # the gauges depend on what is bound; nothing to check against other collectors
