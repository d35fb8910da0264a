"""Prometheus metrics and readiness: what a bot process (or a model server) exports over HTTP.

`Metrics` holds its own `CollectorRegistry`, so several bots in one process (the tests) or a serving
app that mounts it never mix their numbers. Counters and the latency histogram are updated where
replies are produced (`bot/core/chat.py`); the gauges are read at scrape time from the sources bound with
`watch_engine` and `watch_gateway`, so nothing polls in the background.

`serve_metrics` starts a small aiohttp app on the running event loop with `/metrics` (Prometheus
text format), `/ready` (200 once every readiness check passes, 503 with the reasons otherwise) and
`/health` (200 while the process answers at all). An app of another kind (such as a Ray Serve
deployment) can reuse `Metrics.render()` and `Metrics.readiness()` for its own routes.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.core.types import ReplyKind

REPLY_KINDS: tuple[ReplyKind, ...] = ("ok", "busy", "timeout", "error", "closing", "empty")

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


class MetricsPortError(Exception):
    """The metrics port could not be opened; the message is one line naming METRICS_PORT."""


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

    def _live(self) -> Iterator[Metric]:
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
        return list(self._metrics._live())

    def describe(self) -> Iterable[Metric]:
        return []  # the gauges depend on what is bound; nothing to check against other collectors


def metrics_app(metrics: Metrics) -> web.Application:
    """`/metrics`, `/ready` and `/health` as an aiohttp app."""

    async def scrape(request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def ready(request: web.Request) -> web.Response:
        reasons = metrics.readiness()
        if reasons:
            return web.Response(status=503, text="not ready: " + "; ".join(reasons) + "\n")
        return web.Response(text="ready\n")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/ready", ready)
    app.router.add_get("/health", health)
    return app


async def serve_metrics(metrics: Metrics, host: str, port: int) -> web.AppRunner:
    """Listen on `host:port` on the running loop; the caller stops it with `await runner.cleanup()`.

    Raises `MetricsPortError` (one line) when the address cannot be used, such as a port in use.
    """
    runner = web.AppRunner(metrics_app(metrics), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            reason = "the port is already in use (another process, or a second bot with the same METRICS_PORT)"
        else:
            reason = exc.strerror or str(exc)
        raise MetricsPortError(f"METRICS_PORT {port} on METRICS_HOST {host} cannot be opened: {reason}") from None
    return runner
