"""End to end: the order of a start. Log in first (the token, the cogs, the slash commands), then load the
model, then connect to the gateway, so a wrong token is reported before a long first model download."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from types import SimpleNamespace

import discord
import pytest

import bot.client.run as entry
from bot.client import ChatBot
from bot.engine import Engine, EngineError
from tests.e2e.processes import launch
from tests.fake_discord import FakeDiscord, bot_settings


class EngineStartSpy:
    """Replaces `Engine.start`: notes what Discord had seen by then, and fails instead of loading a model."""

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake
        self.calls_seen: list[tuple[str, str, int]] | None = None
        self.identifies_seen: int | None = None

    async def start(self) -> None:
        self.calls_seen = [(c.method, c.path, c.status) for c in self.fake.calls]
        self.identifies_seen = self.fake.identifies
        raise EngineError("not loading a model in this test")


@pytest.fixture
def spy(fake_discord: FakeDiscord, monkeypatch: pytest.MonkeyPatch) -> EngineStartSpy:
    spy = EngineStartSpy(fake_discord)

    async def start(engine: Engine) -> None:
        await spy.start()

    monkeypatch.setattr(Engine, "start", start)
    monkeypatch.setattr(entry, "stop_event_on_signals", asyncio.Event)  # leave the test's signal handlers alone
    return spy


async def test_a_wrong_token_is_reported_before_the_model_loads(
    fake_discord: FakeDiscord, spy: EngineStartSpy, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = bot_settings(fake_discord, tiny_model_dir, tmp_path / "h.sqlite3", discord_token="wrong-token")
    with pytest.raises(entry.ExitCode, match=r"^Discord rejected the token in DISCORD_TOKEN"):
        await entry.run_discord(settings)
    assert spy.calls_seen is None  # the model load never started
    assert [(c.path, c.status) for c in fake_discord.calls] == [("/users/@me", 401)]


async def test_a_discord_error_while_logging_in_is_one_line(
    fake_discord: FakeDiscord,
    spy: EngineStartSpy,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def outage(bot: object, token: str) -> None:
        raise discord.DiscordServerError(SimpleNamespace(status=503, reason="Service Unavailable"), "upstream down")

    monkeypatch.setattr(ChatBot, "login", outage)
    settings = bot_settings(fake_discord, tiny_model_dir, tmp_path / "h.sqlite3")
    with pytest.raises(
        entry.ExitCode, match=r"^Discord answered with an error \(503\): upstream down\. Try again later\.$"
    ):
        await entry.run_discord(settings)
    assert spy.calls_seen is None  # the model load never started


async def test_logs_in_and_syncs_commands_before_the_model_loads_and_connects_after(
    fake_discord: FakeDiscord, spy: EngineStartSpy, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = bot_settings(fake_discord, tiny_model_dir, tmp_path / "h.sqlite3")
    with pytest.raises(entry.ExitCode, match=r"^Could not load the model .*: not loading a model in this test$"):
        await entry.run_discord(settings)
    assert spy.calls_seen is not None and spy.calls_seen[0] == ("GET", "/users/@me", 200)
    # The cogs were loaded and their slash commands synced before the model started to load...
    assert any(method == "PUT" and path.endswith("/commands") for method, path, _ in spy.calls_seen)
    assert {name for _, name in fake_discord.commands} == {"reset", "stats", "forget-me", "bot", "persona"}
    # ...and the gateway was never opened, since the model did not load.
    assert spy.identifies_seen == 0 and fake_discord.identifies == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_while_the_model_loads_after_login_exits_cleanly(
    fake_discord: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, sig: signal.Signals
) -> None:
    bot = await launch(fake_discord, tmp_path, tiny_model_dir, TEST_SLOW_LOAD_S="60")
    try:
        await bot.wait_stderr("loading ", timeout=60)  # the engine's "loading MODEL on cpu (fp32)"
        bot.process.send_signal(sig)
        code = await bot.finish(15)
    finally:
        await bot.kill()
    stderr = bot.stderr
    assert code == 0, stderr
    assert "Stopped while loading the model." in stderr
    assert "Traceback" not in stderr and "Unclosed" not in stderr, stderr
    assert ("/users/@me", 200) in [(c.path, c.status) for c in fake_discord.calls]
    assert fake_discord.identifies == 0
