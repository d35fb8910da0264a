"""Entrypoint: `python -m bot` runs the Discord bot, `python -m bot --console` chats in the terminal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from typing import TypeVar

import aiohttp
import discord
from aiohttp import web

from bot.client import ChatBot
from bot.core.chat import ChatService
from bot.core.engine_api import EngineError, EngineSettingsError, ServingEngine
from bot.core.types import Conversation
from bot.history import HistoryStore, HistoryUnavailable, open_store, redact
from bot.metrics import Metrics, MetricsPortError, serve_metrics
from config.settings import Settings, SettingsError, load_settings

log = logging.getLogger("bot")

T = TypeVar("T")

CONSOLE_CONVERSATION = Conversation(channel_id=0)

NO_TOKEN_HELP = """\
DISCORD_TOKEN is not set, so the bot cannot log in to Discord.

  1. Create an application at https://discord.com/developers/applications
  2. Bot tab: "Reset Token", copy it, and enable "Message Content Intent".
  3. Put it in a file named .env next to this README:  DISCORD_TOKEN=your-token
     (see .env.example and README.md for every setting and the invite link)

To try the model without Discord:  make console   (or: .venv/bin/python -m bot --console)"""

CONSOLE_BANNER = (
    "Chatting with {model} in this terminal. Nothing said here is kept after you leave, and Discord's "
    "history is not touched. /help lists the commands; /quit or Ctrl-D leaves."
)
CONSOLE_HELP = "Commands: /help (this list), /reset (forget this conversation), /quit or Ctrl-D (leave)."
CONSOLE_UNKNOWN = "There is no {command} command here. /help lists the commands."
_CONSOLE_COMMAND = re.compile(r"/[A-Za-z][\w-]*")

# Libraries whose warnings are not the user's business (see setup_logging).
LIBRARY_LOGGERS = ("huggingface_hub", "transformers")
# The OpenAI client's HTTP libraries log every request at INFO (the remote engine, ENGINE_URL).
HTTP_LOGGERS = ("httpx", "httpx2", "openai")


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


async def start_metrics(settings: Settings, metrics: Metrics) -> web.AppRunner | None:
    """With METRICS_PORT set, serve /metrics, /ready and /health (the caller stops it); a port in use is one line."""
    if settings.metrics_port is None:
        return None
    try:
        runner = await serve_metrics(metrics, settings.metrics_host, settings.metrics_port)
    except MetricsPortError as exc:
        raise ExitCode(f"Configuration error: {exc}", code=2) from None
    log.info("metrics on http://%s:%d/metrics (readiness: /ready)", settings.metrics_host, settings.metrics_port)
    return runner


def watch(metrics: Metrics, engine: ServingEngine, bot: ChatBot) -> None:
    """What the gauges read at scrape time, and what /ready also waits for: every shard connected."""
    metrics.watch_engine(engine.stats)
    metrics.watch_gateway(lambda: bot.latencies)
    metrics.add_readiness_check(bot.gateway_ready)
    metrics.add_readiness_check(engine.failure)


def build_engine(settings: Settings) -> ServingEngine:
    """The remote engine when ENGINE_URL is set, else the model in this process.

    Each is imported only when used: a bot with ENGINE_URL never imports torch or transformers.
    """
    if settings.engine_url:
        from bot.remote import RemoteConfig, RemoteEngine

        return RemoteEngine(RemoteConfig.from_settings(settings))
    from bot.engine import Engine, EngineConfig

    return Engine(EngineConfig.from_settings(settings))


async def log_in(bot: ChatBot, token: str, stop: asyncio.Event) -> None:
    """Check the token with Discord, load the cogs and sync the slash commands (discord.py's `login()`).

    This comes before the model loads, so a wrong token is reported before a long first download.
    """
    logging_in = await until_stopped(bot.login(token), stop)
    if logging_in is None:
        raise ExitCode("Stopped while logging in to Discord.", code=0)
    logging_in.result()


async def serve(bot: ChatBot, engine: ServingEngine, settings: Settings, stop: asyncio.Event) -> None:
    """Connect to the gateway and answer until the connection ends or Ctrl-C / SIGTERM; then stop gracefully."""
    runner = asyncio.create_task(bot.connect())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        stopper.cancel()
        runner.result()  # raises what ended the connection
        return
    log.info("stopping: finishing replies in progress (up to %.0fs)", settings.shutdown_grace_seconds)
    bot.stop_accepting()
    if not await bot.wait_idle(settings.shutdown_grace_seconds):
        log.warning("abandoning replies still in progress; their users are told")
        await engine.close()
        await bot.wait_idle(5)
    await bot.close()
    await runner


async def run_discord(settings: Settings) -> None:
    """Log in (token check, cogs, command sync), then load the model, then connect and answer."""
    if not settings.discord_token:
        raise ExitCode(NO_TOKEN_HELP, code=2)
    stop = stop_event_on_signals()
    metrics = Metrics()
    model_loaded = asyncio.Event()  # checked by /ready from the moment the endpoint is up
    metrics.add_readiness_check(lambda: None if model_loaded.is_set() else "the model is not loaded yet")
    metrics_server = await start_metrics(settings, metrics)  # a port in use stops the bot before anything else
    try:
        await run_bot(settings, settings.discord_token, metrics, stop, model_loaded)
    finally:
        if metrics_server is not None:
            await metrics_server.cleanup()


async def run_bot(
    settings: Settings, token: str, metrics: Metrics, stop: asyncio.Event, model_loaded: asyncio.Event
) -> None:
    """Open the history, log in, load the model (then set `model_loaded`), answer until stopped; Discord's
    refusals become one line."""
    history = await open_history(settings)
    try:
        async with services(settings, history, metrics) as (engine, chat), ChatBot(settings=settings, chat=chat) as bot:
            watch(metrics, engine, bot)
            await log_in(bot, token, stop)
            await start_engine(engine, settings, stop)
            model_loaded.set()
            await serve(bot, engine, settings, stop)
    except discord.LoginFailure:
        raise ExitCode(
            "Discord rejected the token in DISCORD_TOKEN. Copy a fresh one from the Bot tab of your "
            "application at https://discord.com/developers/applications"
        ) from None
    except discord.PrivilegedIntentsRequired:
        raise ExitCode(
            "Discord refused the Message Content intent. Enable it in the Developer Portal: your "
            "application > Bot > Privileged Gateway Intents > Message Content Intent."
        ) from None
    except discord.ConnectionClosed as exc:
        if exc.code == 4010:
            raise ExitCode(
                f"Discord refused shard {exc.shard_id}: check SHARD_IDS and SHARD_COUNT ({settings.shard_count}).",
                code=2,
            ) from None
        if exc.code == 4011:
            raise ExitCode(
                "Discord requires this bot to be sharded: set SHARD_COUNT to at least what Discord recommends, "
                "or leave it unset to get that number.",
                code=2,
            ) from None
        raise
    except (aiohttp.ClientConnectionError, discord.GatewayNotFound) as exc:
        raise ExitCode(f"Could not reach Discord: {exc}") from None
    except discord.HTTPException as exc:  # e.g. a Discord outage (5xx) while logging in
        raise ExitCode(
            f"Discord answered with an error ({exc.status}): {exc.text or 'no details'}. Try again later."
        ) from None
    finally:
        log.info("stopped")


async def run_console(settings: Settings) -> None:
    """Chat in the terminal. Its history lives in memory only: HISTORY_DB belongs to the Discord bot."""
    stop = stop_event_on_signals()
    history = await open_store(":memory:", settings.history_turns)
    async with services(settings, history) as (engine, chat):
        await start_engine(engine, settings, stop)
        print(CONSOLE_BANNER.format(model=engine.stats().model))
        lines = stdin_lines()
        while not stop.is_set():
            print("you> ", end="", flush=True)
            read = await until_stopped(lines.get(), stop)
            line = read.result() if read is not None else None
            text = (line or "").strip()
            command = console_command(text)
            if line is None or command in ("/quit", "/exit"):
                print()
                break
            if not text:
                continue
            if command is None and settings.stream_replies and chat.can_stream:
                await console_stream(chat, text)
            else:
                print(f"bot> {await console_answer(chat, text, command)}")


def console_command(text: str) -> str | None:
    """`/word` at the start of a line is a console command (lowercased); anything else is for the model."""
    first = text.split(maxsplit=1)[0] if text else ""
    return first.lower() if _CONSOLE_COMMAND.fullmatch(first) else None


async def console_answer(chat: ChatService, text: str, command: str | None) -> str:
    """What the console prints after `bot> `: a command's result, or the model's reply."""
    if command == "/help":
        return CONSOLE_HELP
    if command == "/reset":
        await chat.reset(CONSOLE_CONVERSATION)
        return "(history cleared)"
    if command is not None:
        return CONSOLE_UNKNOWN.format(command=command)
    started = time.monotonic()
    reply = await chat.respond(CONSOLE_CONVERSATION, None, text)
    log.debug("console reply in %.2fs", time.monotonic() - started)
    return reply.text


async def console_stream(chat: ChatService, text: str) -> None:
    """Print the model's reply as it is written, then whatever of the final answer is not on screen yet."""
    shown = ""

    def partial(so_far: str) -> None:
        nonlocal shown
        if so_far.startswith(shown):
            sys.stdout.write(so_far[len(shown) :])
            sys.stdout.flush()
            shown = so_far

    sys.stdout.write("bot> ")
    reply = await chat.respond(CONSOLE_CONVERSATION, None, text, on_partial=partial)
    if reply.ok and reply.text.startswith(shown):
        print(reply.text[len(shown) :])
    elif shown:  # cut off after some words, or the final text differs from what was shown
        print(("\n" + reply.text) if reply.ok else f" ... \n(cut off) {reply.text}")
    else:
        print(reply.text)


def stdin_lines() -> asyncio.Queue[str | None]:
    """Lines typed on stdin, read by a daemon thread so a blocked read never holds up exit."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return lines


def setup_logging(level: int, *, local_model: bool = True) -> None:
    """One handler on the root logger, coloured only on a terminal; libraries speak only of errors.

    discord.py colours whenever it runs in Docker, even into a file, so the choice is made here.
    huggingface_hub logs through a handler of its own and the root logger as well (every line twice),
    and warns of each retry; transformers warns about things a user cannot act on. The bot's own
    message says what failed to load, so these stay quiet unless LOG_LEVEL=DEBUG.
    """
    colour = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
    plain = logging.Formatter("[{asctime}] [{levelname:<8}] {name}: {message}", "%Y-%m-%d %H:%M:%S", style="{")
    if colour:
        discord.utils.setup_logging(level=level, root=True)
    else:
        discord.utils.setup_logging(level=level, root=True, formatter=plain)
    library_level = "warning" if level <= logging.DEBUG else "error"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", library_level)  # read when transformers is first imported
    os.environ.setdefault("HF_HUB_VERBOSITY", library_level)
    for name in HTTP_LOGGERS:  # one line per reply; LOG_LEVEL=DEBUG shows them
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    if not local_model:
        return  # a remote engine: the Hugging Face libraries are never imported
    from huggingface_hub.utils import logging as hub_logging  # importing it adds its own handler

    hub_logging.get_logger().handlers.clear()  # its records reach the root handler anyway
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level.upper())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot", description="A Discord chat bot with a local model.")
    parser.add_argument("--console", action="store_true", help="chat in this terminal instead of Discord")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        if not settings.engine_url:
            from bot.engine.loading import ModelLoadError, check_model_name

            try:
                check_model_name(settings.model_name)
            except ModelLoadError as exc:
                raise SettingsError(str(exc)) from None
    except SettingsError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(getattr(logging, settings.log_level), local_model=not settings.engine_url)
    try:
        asyncio.run(run_console(settings) if args.console else run_discord(settings))
    except ExitCode as exc:
        print(str(exc), file=sys.stderr)
        if exc.threads_running:
            # The loading thread cannot be interrupted, and torch aborts if the interpreter is torn
            # down under it. Nothing else is open (the history database is already closed).
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(exc.code)
        return exc.code
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
