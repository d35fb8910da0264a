"""Fixtures for the end-to-end tests: a fake Discord on loopback and real ChatBots logged in to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import discord.http
import pytest
import yarl
from discord.gateway import DiscordWebSocket

from tests.fake_discord.harness import BotFactory, BotHarness, bot_settings, start_bot
from tests.fake_discord.server import FakeDiscord
from tests.tiny_model import build_tiny_model


@pytest.fixture
async def fake_discord(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    """A fresh fake Discord on 127.0.0.1, with discord.py pointed at it (REST base and gateway)."""
    async with FakeDiscord() as fake:
        monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
        monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
        yield fake


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Blenderbot with 1024 positions that always writes 1000 tokens (well over 2000 characters)."""
    from transformers import GenerationConfig

    out = build_tiny_model(
        tmp_path_factory.mktemp("long-model"),
        max_position_embeddings=1024,
        min_length=1000,
        max_length=1000,
        num_beams=1,
    )
    gen = GenerationConfig.from_pretrained(out)
    gen.no_repeat_ngram_size = 0  # cheaper per token; the length is what matters here
    gen.save_pretrained(out)
    return out


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Generate on one CPU thread during the test.

    On a 2-core machine torch's default of one OpenMP thread per core competes with the event
    loop's thread (and anything else running); OpenMP's spinning barriers then stall for seconds
    at random. One thread keeps these tests fast and their timings steady; replies stay the same.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
async def bot_factory(
    fake_discord: FakeDiscord, tiny_model_dir: Path, tmp_path: Path, one_torch_thread: None
) -> AsyncIterator[BotFactory]:
    """Start real ChatBots against the fake: `await bot_factory(model_dir=..., engine=..., **settings_overrides)`.

    `engine` swaps the real engine for a stand-in such as a `ScriptedEngine` (see `start_bot`).

    At teardown each bot is closed, and the test fails if the bot logged an unexpected error, made
    a REST call Discord would refuse, or posted anything that could ping someone.
    """
    started: list[BotHarness] = []

    async def make(model_dir: Path | None = None, engine: Any = None, **overrides: Any) -> BotHarness:
        db = overrides.pop("history_db", tmp_path / f"history-{len(started)}.sqlite3")  # shared to test restarts
        settings = bot_settings(fake_discord, model_dir or tiny_model_dir, db, **overrides)
        harness = await start_bot(fake_discord, settings, engine=engine)
        started.append(harness)
        return harness

    yield make
    problems: list[str] = []
    for harness in started:
        await harness.stop()
        problems += harness.problems()
    assert not problems, "\n".join(problems)


@pytest.fixture
async def harness(bot_factory: BotFactory) -> BotHarness:
    """One bot with the default test settings (tiny model, fp32 on the CPU, no cooldown)."""
    return await bot_factory()
