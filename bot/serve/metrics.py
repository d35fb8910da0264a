"""Metrics of the model server (`python -m bot.serve`): replicas report, the driver serves METRICS_PORT.

A Ray Serve application runs its replicas in processes of their own, possibly on other machines, so
no replica can own the metrics port. Each replica counts its replies (`ReplicaCounters`) and sends a
`ReplicaReport` every `REPORT_INTERVAL_S` to one named actor, the `MetricsBoard`, which
`python -m bot.serve` creates before it starts the application. The driver then serves `/metrics`,
`/ready` and `/health` on METRICS_HOST:METRICS_PORT from a thread of its own: every live replica's
numbers, labelled with the replica, under the same names as a bot process's metrics (see
`bot/metrics.py`). A replica silent for `STALE_AFTER_S` (killed, or its node gone) drops out, and
Ray Serve starts a new one, which reports under its own id.

Without the board (an application started by `serve run serve.yaml`), replicas report nothing.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import ray
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.core.engine_api import EngineBusy, EngineClosed, EngineStats, GenerationTimeout
from bot.core.types import ReplyKind
from bot.metrics import LATENCY_BUCKETS, REPLY_KINDS

log = logging.getLogger(__name__)

BOARD_NAME = "chatbot-metrics"
BOARD_NAMESPACE = "chatbot"
REPORT_INTERVAL_S = 1.0
STALE_AFTER_S = 15.0
BOARD_TIMEOUT_S = 5.0  # a scrape that cannot reach the board answers 503 rather than hang


def reply_kind(error: BaseException | None, text: str | None = None) -> ReplyKind:
    """How a reply ended, in the bot's words: the notice the bot would give for it."""
    if error is None:
        return "ok" if text and text.strip() else "empty"
    if isinstance(error, EngineBusy):
        return "busy"
    if isinstance(error, GenerationTimeout):
        return "timeout"
    if isinstance(error, EngineClosed):
        return "closing"
    return "error"


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's numbers at one moment. `buckets` are cumulative counts for LATENCY_BUCKETS and +Inf."""

    replica: str
    replies: dict[str, int]
    buckets: list[int]
    latency_sum: float
    queue_depth: int
    running: int
    tokens_per_second: float | None


@dataclass
class ReplicaCounters:
    """Replies by kind and the latency of answered ones, kept by a replica for its reports."""

    replies: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REPLY_KINDS, 0))
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def count(self, kind: ReplyKind, seconds: float) -> None:
        self.replies[kind] += 1
        if kind == "ok":
            self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def report(self, replica: str, stats: EngineStats) -> ReplicaReport:
        cumulative, total = [], 0
        for count in self.counts:
            total += count
            cumulative.append(total)
        return ReplicaReport(
            replica=replica,
            replies=dict(self.replies),
            buckets=cumulative,
            latency_sum=self.latency_sum,
            queue_depth=stats.queue_depth,
            running=stats.running,
            tokens_per_second=stats.tokens_per_second,
        )


@ray.remote(num_cpus=0)
class MetricsBoard:
    """The newest report of every replica, with when it came (the board's own clock)."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, ReplicaReport]] = {}

    def report(self, report: ReplicaReport) -> None:
        self._reports[report.replica] = (time.monotonic(), report)

    def live(self, stale_after_s: float) -> list[ReplicaReport]:
        now = time.monotonic()
        self._reports = {k: v for k, v in self._reports.items() if now - v[0] <= stale_after_s}
        return [report for _, report in self._reports.values()]


def find_board() -> Any | None:
    """The board `python -m bot.serve` created, from inside a replica; None when there is none."""
    try:
        return ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
    except ValueError:
        return None


class _BoardCollector(Collector):
    def __init__(self, reports: Callable[[], list[ReplicaReport]]) -> None:
        self._reports = reports

    def collect(self) -> Iterator[Metric]:
        reports = self._reports()
        yield GaugeMetricFamily("chatbot_serve_replicas", "Replicas that reported in the last 15 s.", len(reports))
        replies = CounterMetricFamily(
            "chatbot_replies", "Replies the server produced, by replica and kind.", labels=["replica", "kind"]
        )
        latency = HistogramMetricFamily(
            "chatbot_reply_latency_seconds", "Seconds to the finished answer (ok replies).", labels=["replica"]
        )
        queue = GaugeMetricFamily("chatbot_queue_depth", "Requests waiting for a place.", labels=["replica"])
        batch = GaugeMetricFamily("chatbot_batch_size", "Replies being generated.", labels=["replica"])
        speed = GaugeMetricFamily("chatbot_tokens_per_second", "Tokens per second of decoding.", labels=["replica"])
        for r in reports:
            for kind, value in r.replies.items():
                replies.add_metric([r.replica, kind], value)
            bounds = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
            latency.add_metric([r.replica], list(zip(bounds, r.buckets, strict=True)), r.latency_sum)
            queue.add_metric([r.replica], r.queue_depth)
            batch.add_metric([r.replica], r.running)
            speed.add_metric([r.replica], float("nan") if r.tokens_per_second is None else r.tokens_per_second)
        yield from (replies, latency, queue, batch, speed)


def serve_board_metrics(board: Any, host: str, port: int) -> ThreadingHTTPServer:
    """Serve `/metrics`, `/ready` (200 once a replica reports) and `/health` from a daemon thread.

    The caller has checked the port; it stops the server with `shutdown()`.
    """

    def reports() -> list[ReplicaReport]:
        return list(ray.get(board.live.remote(STALE_AFTER_S), timeout=BOARD_TIMEOUT_S))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_BoardCollector(reports))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                if self.path == "/metrics":
                    self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/ready":
                    live = len(reports())
                    status, text = (200, "ready") if live else (503, "not ready: no replica has loaded its model yet")
                    self._answer(status, text.encode(), "text/plain")
                elif self.path == "/health":
                    self._answer(200, b"ok", "text/plain")
                else:
                    self._answer(404, b"not found", "text/plain")
            except (ray.exceptions.RayError, TimeoutError) as exc:
                self._answer(503, f"the replicas' numbers cannot be read: {exc}".encode(), "text/plain")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics: %s", format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
