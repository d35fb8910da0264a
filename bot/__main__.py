"""Entrypoint: `python -m bot` runs the Discord bot, `python -m bot --console` chats in the terminal.

This module only picks the mode, loads the settings and sets up logging; `bot.client.run` is the
Discord mode, `bot.console` the console, and `bot.launch` what they share with the model server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import discord

from bot.client.run import run_discord
from bot.console import run_console
from bot.launch import ExitCode, load_checked_settings
from config.settings import SettingsError

# Libraries whose warnings are not the user's business (see setup_logging).
LIBRARY_LOGGERS = ("huggingface_hub", "transformers")
# The OpenAI client's HTTP libraries log every request at INFO (the remote engine, ENGINE_URL).
HTTP_LOGGERS = ("httpx", "httpx2", "openai")


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
        settings = load_checked_settings()
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
