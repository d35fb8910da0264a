"""What every entrypoint does the same way: settings checked, signals, the engine built and started.

`python -m bot` (the Discord bot and the console) and `python -m bot.serve` (the model server) start
from here; nothing in this module imports discord, torch or Ray.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import TypeVar

from bot.core.chat import ChatService
from bot.core.engine_api import EngineError, EngineSettingsError, ServingEngine
from bot.history import HistoryStore, HistoryUnavailable, open_store, redact
from bot.metrics import Metrics
from config.settings import Settings, SettingsError, load_settings

log = logging.getLogger("bot")

T = TypeVar("T")


def load_checked_settings(env: Mapping[str, str] | None = None, *, local_model: bool | None = None) -> Settings:
    """The settings, with MODEL_NAME checked when the model runs in this process (a missing folder is one line).

    `local_model` None: the model runs here unless ENGINE_URL is set. Raises `SettingsError`.
    """
    settings = load_settings(env)
    if local_model is None:
        local_model = not settings.engine_url
    if local_model:
        from bot.engine.loading import ModelLoadError, check_model_name

        try:
            check_model_name(settings.model_name)
        except ModelLoadError as exc:
            raise SettingsError(str(exc)) from None
    return settings


class ExitCode(Exception):
    """Stop with a one-line message and an exit status, without a traceback."""

    def __init__(self, message: str, code: int = 1, *, threads_running: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.threads_running = threads_running


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so both stop the bot the same clean way."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError, RuntimeError):  # Windows: Ctrl-C still raises KeyboardInterrupt
            loop.add_signal_handler(sig, stop.set)
    return stop


async def until_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> asyncio.Future[T] | None:
    """Run `awaitable` until it is done or `stop` is set: its finished task, or None if stopped first."""
    task = asyncio.ensure_future(awaitable)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if task.done():
        return task
    task.cancel()
    return None


def build_engine(settings: Settings) -> ServingEngine:
    """The remote engine when ENGINE_URL is set, else the model in this process.

    Each is imported only when used: a bot with ENGINE_URL never imports torch or transformers.
    """
    if settings.engine_url:
        from bot.remote import RemoteConfig, RemoteEngine

        return RemoteEngine(RemoteConfig.from_settings(settings))
    from bot.engine import Engine, EngineConfig

    return Engine(EngineConfig.from_settings(settings))


async def start_engine(engine: ServingEngine, settings: Settings, stop: asyncio.Event) -> None:
    """Load the model (or reach the remote engine); Ctrl-C or SIGTERM during a long first download stops at once."""
    started = time.monotonic()
    loading = await until_stopped(engine.start(), stop)
    if loading is None:
        raise ExitCode("Stopped while loading the model.", code=0, threads_running=True)
    try:
        loading.result()
    except EngineSettingsError as exc:
        raise ExitCode(f"Configuration error: {exc}", code=2) from None
    except EngineError as exc:
        if settings.engine_url:
            raise ExitCode(f"Could not use the engine at ENGINE_URL: {exc}") from None
        raise ExitCode(f"Could not load the model {settings.model_name!r}: {exc}") from None
    log.info("engine started in %.1fs", time.monotonic() - started)


async def open_history(settings: Settings) -> HistoryStore:
    """The Discord history store HISTORY_DB names (an SQLite file or a PostgreSQL URL); one that cannot be
    used is one line naming the key, never with a password."""
    spec = settings.history_db
    shown = redact(spec) if isinstance(spec, str) else str(spec)
    try:
        return await open_store(spec, settings.history_turns)
    except HistoryUnavailable as exc:
        raise ExitCode(f"Configuration error: HISTORY_DB {shown} {exc}", code=2) from None


@asynccontextmanager
async def services(
    settings: Settings, history: HistoryStore, metrics: Metrics | None = None
) -> AsyncIterator[tuple[ServingEngine, ChatService]]:
    """The engine (not started yet) and the chat service over `history`; both closed on exit."""
    engine = build_engine(settings)
    try:
        yield engine, ChatService(engine, history, metrics=metrics)
    finally:
        await engine.close()
        await history.close()
