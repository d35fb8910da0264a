"""Prometheus metrics and readiness (`registry`), and the HTTP endpoint that serves them (`endpoint`)."""

from bot.metrics.endpoint import MetricsPortError, MetricsUnavailable, serve_metrics, serve_metrics_in_thread
from bot.metrics.registry import LATENCY_BUCKETS, Metrics

__all__ = [
    "LATENCY_BUCKETS",
    "Metrics",
    "MetricsPortError",
    "MetricsUnavailable",
    "serve_metrics",
    "serve_metrics_in_thread",
]
