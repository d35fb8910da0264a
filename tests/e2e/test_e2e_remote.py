"""End to end with a remote engine: the bot (ENGINE_URL) through the fake Discord, the model in the Ray Serve
app (`python -m bot.serve`, tests/serve_app.py), the tiny chat model, greedy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.core.types import Turn
from bot.engine import Engine
from bot.remote import RemoteConfig, RemoteEngine
from tests.conftest import engine_config
from tests.fake_discord import BotFactory
from tests.serve_app import ServeApp

SYSTEM = "You are the test bot of this server."


@pytest.fixture
async def remote(serve_app: ServeApp) -> AsyncIterator[RemoteEngine]:
    async with RemoteEngine(RemoteConfig(url=serve_app.url, system_prompt=SYSTEM, sampling=False)) as engine:
        yield engine


async def test_a_mention_is_answered_by_the_remote_engine(
    bot_factory: BotFactory, remote: RemoteEngine, tiny_chat_model_dir: Path
) -> None:
    harness = await bot_factory(engine=remote, engine_url=remote.config.url, system_prompt=SYSTEM, sampling=False)
    fake, w = harness.fake, harness.fake.world
    first = await fake.ask(w.member, w.general, "hello there")
    second = await fake.ask(w.member, w.general, "what do you like")
    history = [Turn("user", "hello there", "Bob"), Turn("bot", first), Turn("user", "what do you like", "Bob")]
    async with Engine(engine_config(tiny_chat_model_dir, sampling=False, system_prompt=SYSTEM)) as local:
        assert first == await local.reply(history[:1])
        assert second == await local.reply(history)  # the history went to the server, speakers and all
    stats = remote.stats()
    assert stats.replies >= 2 and stats.device == remote.config.url and stats.precision == "remote"
