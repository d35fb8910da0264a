"""Metrics: replies counted by kind, latency observed, gauges read at scrape time, and the HTTP endpoint."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.core.chat import ChatService
from bot.core.outcomes import REPLY_KINDS
from bot.core.types import Conversation
from bot.engine import EngineBusy, EngineClosed, GenerationTimeout
from bot.history import HistoryError
from bot.metrics import Metrics, MetricsPortError, serve_metrics
from tests.scripted_engine import ScriptedEngine

A = Conversation(1, 100)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed back from the text format: (name, sorted labels) -> value."""
    text = metrics.render()[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def replies(metrics: Metrics, kind: str) -> float:
    return samples(metrics)[("chatbot_replies_total", (("kind", kind),))]


async def test_every_kind_is_exported_from_the_start() -> None:
    metrics = Metrics()
    assert [replies(metrics, kind) for kind in REPLY_KINDS] == [0.0] * 7
    assert samples(metrics)[("chatbot_reply_latency_seconds_count", ())] == 0
    assert samples(metrics)[("chatbot_history_store_errors_total", ())] == 0


async def test_replies_are_counted_by_kind_and_answers_timed(
    chat: ChatService, scripted_engine: ScriptedEngine
) -> None:
    metrics = chat.metrics
    await chat.respond(A, 7, "hi")
    await chat.respond(A, 7, "again")
    for error in (EngineBusy("full"), GenerationTimeout("slow"), EngineClosed("bye"), RuntimeError("boom")):
        scripted_engine.fail = error
        await chat.respond(A, 7, "hi")
    scripted_engine.fail, scripted_engine.answer = None, "   "
    await chat.respond(A, 7, "hi")
    counted = {kind: replies(metrics, kind) for kind in REPLY_KINDS}
    assert counted == {"ok": 2, "busy": 1, "timeout": 1, "closing": 1, "error": 1, "empty": 1, "stopped": 0}
    scrape = samples(metrics)
    assert scrape[("chatbot_reply_latency_seconds_count", ())] == 2  # answers only, not notices
    assert 0 < scrape[("chatbot_reply_latency_seconds_sum", ())] < 5
    assert scrape[("chatbot_reply_latency_seconds_bucket", (("le", "+Inf"),))] == 2


async def test_history_errors_are_counted(chat: ChatService, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise HistoryError("disk I/O error")

    monkeypatch.setattr(chat.history, "append", broken)
    assert (await chat.respond(A, 7, "hi")).ok  # the answer still goes out
    monkeypatch.setattr(chat.history, "snapshot", broken)
    reply = await chat.respond(A, 7, "hi")
    assert not reply.ok and reply.kind == "error"
    assert samples(chat.metrics)[("chatbot_history_store_errors_total", ())] == 2
    assert replies(chat.metrics, "ok") == 1 and replies(chat.metrics, "error") == 1


@dataclass
class Load:
    queue_depth: int
    running: int
    tokens_per_second: float | None


async def test_gauges_are_read_at_scrape_time() -> None:
    metrics = Metrics()
    assert not any(name.startswith(("chatbot_queue", "chatbot_gateway")) for name, _ in samples(metrics))
    load = Load(queue_depth=3, running=5, tokens_per_second=None)
    latencies = [(0, 0.05), (1, float("inf"))]
    metrics.watch_engine(lambda: load)
    metrics.watch_gateway(lambda: latencies)
    scrape = samples(metrics)
    assert scrape[("chatbot_queue_depth", ())] == 3 and scrape[("chatbot_batch_size", ())] == 5
    assert scrape[("chatbot_tokens_per_second", ())] != scrape[("chatbot_tokens_per_second", ())]  # NaN: none yet
    assert scrape[("chatbot_gateway_latency_seconds", (("shard", "0"),))] == 0.05
    assert ("chatbot_gateway_latency_seconds", (("shard", "1"),)) not in scrape  # no heartbeat answered yet
    load.queue_depth, load.tokens_per_second = 0, 41.5
    latencies[1] = (1, 0.2)
    scrape = samples(metrics)
    assert scrape[("chatbot_queue_depth", ())] == 0 and scrape[("chatbot_tokens_per_second", ())] == 41.5
    assert scrape[("chatbot_gateway_latency_seconds", (("shard", "1"),))] == 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[Metrics, str]]:
    metrics = Metrics()
    port = free_port()
    runner = await serve_metrics(metrics, "127.0.0.1", port)
    try:
        yield metrics, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_http_metrics_ready_and_health(endpoint: tuple[Metrics, str]) -> None:
    metrics, base = endpoint
    loaded = False
    metrics.add_readiness_check(lambda: None if loaded else "the model is not loaded yet")
    metrics.add_readiness_check(lambda: None)
    metrics.count_reply("ok", 1.5)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            body = await r.text()
        assert 'chatbot_replies_total{kind="ok"} 1.0' in body
        assert 'chatbot_reply_latency_seconds_bucket{le="2.0"} 1.0' in body
        async with http.get(base + "/ready") as r:
            assert r.status == 503 and "the model is not loaded yet" in await r.text()
        loaded = True
        async with http.get(base + "/ready") as r:
            assert r.status == 200 and (await r.text()).strip() == "ready"
        async with http.get(base + "/health") as r:
            assert r.status == 200
        async with http.get(base + "/nothing") as r:
            assert r.status == 404


async def test_a_port_in_use_is_one_line(endpoint: tuple[Metrics, str]) -> None:
    port = int(endpoint[1].rsplit(":", 1)[1])
    with pytest.raises(MetricsPortError) as err:
        await serve_metrics(Metrics(), "127.0.0.1", port)
    message = str(err.value)
    assert message.startswith(f"METRICS_PORT {port} on METRICS_HOST 127.0.0.1 cannot be opened")
    assert "already in use" in message and "\n" not in message
