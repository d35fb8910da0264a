"""The real `python -m bot` process with METRICS_PORT: /ready flips once connected and loaded, and /metrics
counts the replies it posted through the fake Discord."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.processes import launch
from tests.fake_discord import FakeDiscord
from tests.test_metrics import free_port


async def get(url: str) -> tuple[int, str] | None:
    """Status and body, or None while nothing listens yet."""
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            return r.status, await r.text()
    except aiohttp.ClientConnectionError:
        return None


async def poll(url: str, done: object, timeout: float) -> tuple[int, str]:
    """GET `url` every 50 ms until `done(status, body)`; the answer that satisfied it."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await get(url)
        if answer is not None and done(*answer):  # type: ignore[operator]
            return answer
        assert time.monotonic() < deadline, f"{url} never satisfied the test; last answer: {answer}"
        await asyncio.sleep(0.05)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_and_readiness_of_a_real_process(
    fake_discord: FakeDiscord, tmp_path: Path, tiny_model_dir: Path
) -> None:
    fake, w = fake_discord, fake_discord.world
    fake.heartbeat_interval_ms = 300  # so both shards have a measured gateway latency soon
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bot = await launch(fake, tmp_path, tiny_model_dir, METRICS_PORT=str(port), SHARD_COUNT="2", TEST_SLOW_LOAD_S="1.5")
    try:
        status, body = await poll(base + "/ready", lambda status, body: True, timeout=60)
        assert status == 503 and "the model is not loaded yet" in body, body  # up before the model loads
        assert (await get(base + "/health")) == (200, "ok\n")
        await poll(base + "/ready", lambda status, body: status == 200, timeout=120)
        assert fake.shard_sessions == {0: (0, 2), 1: (1, 2)}

        assert await fake.ask(w.member, w.general, "hello there", timeout=60)
        assert await fake.ask(w.carol, w.dm_with(w.carol), "and in private", timeout=60)
        _, text = await poll(
            base + "/metrics",
            lambda status, body: all(f'chatbot_gateway_latency_seconds{{shard="{i}"}}' in body for i in (0, 1)),
            timeout=30,
        )
        scrape = samples(text)
        assert scrape[("chatbot_replies_total", (("kind", "ok"),))] == 2
        assert scrape[("chatbot_replies_total", (("kind", "busy"),))] == 0
        assert scrape[("chatbot_reply_latency_seconds_count", ())] == 2
        assert 0 < scrape[("chatbot_reply_latency_seconds_sum", ())] < 60
        assert scrape[("chatbot_queue_depth", ())] == 0 and scrape[("chatbot_batch_size", ())] == 0
        assert scrape[("chatbot_tokens_per_second", ())] > 0
        assert 0 <= scrape[("chatbot_gateway_latency_seconds", (("shard", "1"),))] < 5
        assert scrape[("chatbot_history_store_errors_total", ())] == 0

        bot.process.send_signal(signal.SIGTERM)
        code = await bot.finish(60)
    finally:
        await bot.kill()
    assert code == 0, bot.stderr
    assert "Traceback" not in bot.stderr, bot.stderr
    assert f"metrics on http://127.0.0.1:{port}/metrics" in bot.stderr
    assert "running shards 0, 1 of 2" in bot.stderr
    assert await get(base + "/ready") is None  # the endpoint closes with the bot
