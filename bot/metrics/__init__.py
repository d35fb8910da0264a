"""Prometheus metrics and readiness, and the HTTP endpoint that serves them."""

from bot.metrics.registry import LATENCY_BUCKETS, REPLY_KINDS, Metrics, MetricsPortError, serve_metrics

__all__ = ["LATENCY_BUCKETS", "REPLY_KINDS", "Metrics", "MetricsPortError", "serve_metrics"]
