"""Metrics of the model server (`python -m bot.serve`): replicas report, the driver serves METRICS_PORT.

A Ray Serve application runs its replicas in processes of their own, possibly on other machines, so
no replica can own the metrics port. Each replica counts its replies in a `Metrics` of its own (the
same class, names and buckets as a bot process) and sends a `ReplicaReport` of its samples every
`REPORT_INTERVAL_S` to one named actor, the `MetricsBoard`, which `python -m bot.serve` creates
before it starts the application. The driver serves the board on METRICS_HOST:METRICS_PORT through
the same endpoint as a bot process (`bot.metrics.endpoint`): every live replica's samples, labelled
with the replica. A replica silent for `STALE_AFTER_S` (killed, or its node gone) drops out, and
Ray Serve starts a new one, which reports under its own id.

Without the board (an application started by `serve run serve.yaml`), replicas report nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.metrics import Metrics, MetricsUnavailable

BOARD_NAME = "chatbot-metrics"
BOARD_NAMESPACE = "chatbot"
REPORT_INTERVAL_S = 1.0
STALE_AFTER_S = 15.0
BOARD_TIMEOUT_S = 5.0  # a scrape that cannot reach the board answers 503 rather than hang
# The families of a replica's `Metrics` that mean something on a server (it keeps no history).
REPORTED = (
    "chatbot_replies",
    "chatbot_reply_latency_seconds",
    "chatbot_queue_depth",
    "chatbot_batch_size",
    "chatbot_tokens_per_second",
)

Sample = tuple[str, dict[str, str], float]


@dataclass(frozen=True)
class Family:
    """One metric family as plain, picklable values."""

    name: str
    documentation: str
    kind: str
    samples: list[Sample]


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's numbers at one moment."""

    replica: str
    families: list[Family]


def report(replica: str, metrics: Metrics) -> ReplicaReport:
    """What `metrics` holds now, in the families the server exports."""
    families = [
        Family(
            family.name, family.documentation, family.type, [(s.name, dict(s.labels), s.value) for s in family.samples]
        )
        for family in metrics.registry.collect()
        if family.name in REPORTED
    ]
    return ReplicaReport(replica, families)


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


def merged(reports: list[ReplicaReport]) -> Iterator[Metric]:
    """Every replica's families as one family each, every sample labelled with its replica."""
    families: dict[str, Metric] = {}
    for r in reports:
        for family in r.families:
            metric = families.setdefault(family.name, Metric(family.name, family.documentation, family.kind))
            for name, labels, value in family.samples:
                metric.add_sample(name, {"replica": r.replica, **labels}, value)
    yield GaugeMetricFamily("chatbot_serve_replicas", "Replicas that reported in the last 15 s.", len(reports))
    yield from families.values()


class BoardMetrics:
    """The board as the metrics endpoint serves it: `/metrics` from the live reports, `/ready` once one came."""

    def __init__(self, board: Any) -> None:
        self._board = board
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_BoardCollector(self))

    def reports(self) -> list[ReplicaReport]:
        try:
            return list(ray.get(self._board.live.remote(STALE_AFTER_S), timeout=BOARD_TIMEOUT_S))
        except (ray.exceptions.RayError, TimeoutError) as exc:
            raise MetricsUnavailable(f"the replicas' numbers cannot be read: {exc}") from None

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def readiness(self) -> list[str]:
        return [] if self.reports() else ["no replica has loaded its model yet"]


class _BoardCollector(Collector):
    def __init__(self, board: BoardMetrics) -> None:
        self._board = board

    def collect(self) -> Iterator[Metric]:
        return merged(self._board.reports())
