"""Entrypoint: `python -m bot` runs the Discord bot, `python -m bot --console` chats in the terminal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

import aiohttp
import discord

from bot.chat import ChatService
from bot.client import ChatBot
from bot.engine import Engine, EngineConfig, EngineError
from bot.history import HistoryStore
from bot.types import Conversation
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

To try the model without Discord:  python -m bot --console   (or: make console)"""


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
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C still raises KeyboardInterrupt
            pass
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


async def start_engine(engine: Engine, settings: Settings, stop: asyncio.Event) -> None:
    """Load the model; Ctrl-C or SIGTERM during a long first download stops at once."""
    started = time.monotonic()
    loading = await until_stopped(engine.start(), stop)
    if loading is None:
        raise ExitCode("Stopped while loading the model.", code=0, threads_running=True)
    try:
        loading.result()
    except EngineError as exc:
        raise ExitCode(f"Could not load the model {settings.model_name!r}: {exc}") from None
    log.info("engine started in %.1fs", time.monotonic() - started)


@asynccontextmanager
async def services(settings: Settings, stop: asyncio.Event) -> AsyncIterator[tuple[Engine, ChatService]]:
    """The running engine and the chat service over the history store; both closed on exit."""
    history = HistoryStore(settings.history_db, settings.history_turns)
    engine = Engine(EngineConfig.from_settings(settings))
    try:
        await start_engine(engine, settings, stop)
        yield engine, ChatService(engine, history)
    finally:
        await engine.close()
        history.close()


async def run_discord(settings: Settings) -> None:
    if not settings.discord_token:
        raise ExitCode(NO_TOKEN_HELP, code=2)
    stop = stop_event_on_signals()
    try:
        async with services(settings, stop) as (engine, chat), ChatBot(settings=settings, chat=chat) as bot:
            runner = asyncio.create_task(bot.start(settings.discord_token))
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
    except (aiohttp.ClientConnectionError, discord.GatewayNotFound) as exc:
        raise ExitCode(f"Could not reach Discord: {exc}") from None
    finally:
        log.info("stopped")


async def run_console(settings: Settings) -> None:
    stop = stop_event_on_signals()
    async with services(settings, stop) as (_, chat):
        lines = stdin_lines()
        print(f"Chatting with {settings.model_name}. /reset forgets the conversation; /quit or Ctrl-D leaves.")
        while not stop.is_set():
            print("you> ", end="", flush=True)
            read = await until_stopped(lines.get(), stop)
            line = read.result() if read is not None else None
            if line is None or line.strip() in ("/quit", "/exit"):
                print()
                break
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                chat.reset(CONSOLE_CONVERSATION)
                print("bot> (history cleared)")
                continue
            started = time.monotonic()
            reply = await chat.respond(CONSOLE_CONVERSATION, None, text)
            log.debug("console reply in %.2fs", time.monotonic() - started)
            print(f"bot> {reply.text}")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot", description="A Discord chat bot with a local model.")
    parser.add_argument("--console", action="store_true", help="chat in this terminal instead of Discord")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return 2
    discord.utils.setup_logging(level=getattr(logging, settings.log_level), root=True)
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
