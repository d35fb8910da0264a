"""Console mode (`python -m bot --console`): chat with the model in this terminal, no Discord needed."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import time

from bot.core.chat import ChatService
from bot.core.partial import GrowingText
from bot.core.types import Conversation
from bot.history import open_store
from bot.launch import services, start_engine, stop_event_on_signals, until_stopped
from config.settings import Settings

log = logging.getLogger("bot")

CONSOLE_CONVERSATION = Conversation(channel_id=0)

CONSOLE_BANNER = (
    "Chatting with {model} in this terminal. Nothing said here is kept after you leave, and Discord's "
    "history is not touched. /help lists the commands; /quit or Ctrl-D leaves."
)
CONSOLE_HELP = "Commands: /help (this list), /reset (forget this conversation), /quit or Ctrl-D (leave)."
CONSOLE_UNKNOWN = "There is no {command} command here. /help lists the commands."
_CONSOLE_COMMAND = re.compile(r"/[A-Za-z][\w-]*")


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
    shown = GrowingText()

    def partial(so_far: str) -> None:
        new = shown.advance(so_far)
        if new:
            sys.stdout.write(new)
            sys.stdout.flush()

    sys.stdout.write("bot> ")
    reply = await chat.respond(CONSOLE_CONVERSATION, None, text, on_partial=partial)
    rest = shown.rest(reply.text)
    if reply.ok and rest is not None:
        print(rest)
    elif shown.shown:  # cut off after some words, or the final text differs from what was shown
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
