"""Run the real bot (services built, and started in the order, as `bot/__main__.py`'s `run_discord` does)
against the fake."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.client import ChatBot
from bot.core.chat import ChatService
from bot.engine import Engine, EngineConfig
from bot.history import HistoryStore, open_store
from config.settings import Settings
from tests.fake_discord.server import FakeDiscord

QUIET = {"parse": [], "replied_user": False}


class _ErrorCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class SettledHistory:
    """The bot's history store, read the way a test means it: `get` first waits (bounded) until the
    replies already posted are stored too, since the bot posts a reply before storing it. A streamed
    reply is seen while it is still being written, so this waits for every reply in progress, for at
    most 5 s (a test that holds a reply in flight reads the history as it is then)."""

    def __init__(self, store: HistoryStore, chat: ChatService) -> None:
        self._store = store
        self._chat = chat

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        for _ in range(500):
            if not (self._chat.settling or self._chat.in_flight):
                break
            await asyncio.sleep(0.01)
        return await self._store.get(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@dataclass
class BotHarness:
    fake: FakeDiscord
    settings: Settings
    history: HistoryStore
    engine: Engine  # or the stand-in a test handed to start_bot (then the test owns it)
    chat: ChatService
    bot: ChatBot
    runner: asyncio.Task[None]
    errors: _ErrorCollector
    # What a test expects to go wrong; anything else fails the test at teardown.
    allowed_error_logs: Callable[[logging.LogRecord], bool] = lambda record: False
    allowed_failed_calls: Callable[[Any], bool] = lambda call: False
    check_mentions: bool = True  # off only where the test itself posts through the bot's client
    owns_engine: bool = True  # the harness built the engine, so it closes it
    stopped: bool = field(default=False)

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            await self.bot.close()
            done, _ = await asyncio.wait({self.runner}, timeout=10)
            if not done:
                self.runner.cancel()
                raise AssertionError("bot.start() did not return within 10s of bot.close()")
        finally:
            if self.owns_engine:
                await self.engine.close()
            await self.history.close()
            logging.getLogger().removeHandler(self.errors)

    def problems(self) -> list[str]:
        """What went wrong that the test did not expect: error logs, failed REST calls, loud posts."""
        found: list[str] = []
        for record in self.errors.records:
            if not self.allowed_error_logs(record):
                found.append(f"error log {record.name}: {record.getMessage()}")
        for call in self.fake.failed_calls():
            if not self.allowed_failed_calls(call):
                found.append(f"{call.method} {call.path} -> {call.status} {call.response}")
        if not self.check_mentions:
            return found
        for call in self.fake.message_posts():
            body = call.json or {}
            if body.get("allowed_mentions") != QUIET:
                found.append(f"posted with allowed_mentions={body.get('allowed_mentions')!r}")
        for call in self.fake.message_edits():
            mentions = (call.json or {}).get("allowed_mentions")
            if not quiet(mentions):
                found.append(f"edited a message with allowed_mentions={mentions!r}")
        for edit in self.fake.bot_edits:
            if edit["pings"] != {"users": [], "roles": [], "everyone": False}:
                found.append(f"an edit could ping {edit['pings']}: {edit['content'][:60]!r}")
        for call in self.fake.calls_to("POST", r"/interactions/\d+/[^/]+/callback"):
            if (call.json or {}).get("type") in (5, 6):  # deferred ("thinking...", or a button's): no text
                continue
            mentions = ((call.json or {}).get("data") or {}).get("allowed_mentions")
            if mentions is None or mentions.get("parse") != [] or mentions.get("replied_user"):
                found.append(f"interaction answered with allowed_mentions={mentions!r}")
        for call in self.fake.calls_to("POST", r"/webhooks/\d+/[^/]+"):  # interaction follow-ups
            mentions = (call.json or {}).get("allowed_mentions")
            if mentions is None or mentions.get("parse") != [] or mentions.get("replied_user"):
                found.append(f"follow-up sent with allowed_mentions={mentions!r}")
        return found


def quiet(allowed_mentions: Any) -> bool:
    """Whether an `allowed_mentions` object lets nothing ping: parse nothing, name no one, no reply ping."""
    return (
        isinstance(allowed_mentions, dict)
        and allowed_mentions.get("parse") == []
        and not allowed_mentions.get("users")
        and not allowed_mentions.get("roles")
        and not allowed_mentions.get("replied_user")
    )


BotFactory = Callable[..., Awaitable[BotHarness]]


def bot_settings(fake: FakeDiscord, model_dir: Path, history_db: Path | str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "discord_token": fake.token,
        "model_name": str(model_dir),
        "device": "cpu",
        "precision": "fp32",  # reproducible replies
        "history_db": history_db,
        "user_cooldown_seconds": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


async def start_bot(
    fake: FakeDiscord, settings: Settings, *, engine: Any = None, ready_timeout: float = 30.0
) -> BotHarness:
    """Start `ChatBot` against the fake in `run_discord`'s order: log in (token, cogs, command sync), load the
    model, connect; wait for on_ready.

    `engine` replaces the real engine on `settings.model_name` with a stand-in (a `ScriptedEngine`,
    for answers a tiny model can't give: long, slow, failing at a chosen word); it is used as it is,
    neither started nor closed here."""
    errors = _ErrorCollector()
    logging.getLogger().addHandler(errors)
    history = await open_store(settings.history_db, settings.history_turns)
    owns_engine = engine is None
    if engine is None:
        engine = Engine(EngineConfig.from_settings(settings))
    chat = ChatService(engine, history)
    bot = ChatBot(settings=settings, chat=chat)
    # discord.py waits guild_ready_timeout (2 s) after the last GUILD_CREATE before on_ready; the fake
    # sends its only guild at once, so a short wait saves two seconds per test and changes nothing else.
    bot._connection.guild_ready_timeout = 0.05
    ready = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    bot.add_listener(on_ready, "on_ready")
    try:
        await bot.__aenter__()
        await bot.login(settings.discord_token or "")
        if owns_engine:
            await engine.start()
    except BaseException:
        await bot.close()
        if owns_engine:
            await engine.close()
        await history.close()
        logging.getLogger().removeHandler(errors)
        raise
    runner = asyncio.create_task(bot.connect())
    settled: Any = SettledHistory(history, chat)
    harness = BotHarness(fake, settings, settled, engine, chat, bot, runner, errors, owns_engine=owns_engine)
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({runner, waiter}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        await harness.stop()
        if runner.done() and runner.exception() is not None:
            raise runner.exception()  # type: ignore[misc]
        raise AssertionError(f"the bot was not ready within {ready_timeout}s")
    return harness
