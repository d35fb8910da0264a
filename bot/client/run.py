"""Discord mode (`python -m bot`): log in, load the model, connect, answer until stopped, stop gracefully."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import discord
from aiohttp import web

from bot.client.chatbot import ChatBot
from bot.core.engine_api import ServingEngine
from bot.launch import ExitCode, open_history, services, start_engine, stop_event_on_signals, until_stopped
from bot.metrics import Metrics, MetricsPortError, serve_metrics
from config.settings import Settings

log = logging.getLogger("bot")

NO_TOKEN_HELP = """\
DISCORD_TOKEN is not set, so the bot cannot log in to Discord.

  1. Create an application at https://discord.com/developers/applications
  2. Bot tab: "Reset Token", copy it, and enable "Message Content Intent".
  3. Put it in a file named .env next to this README:  DISCORD_TOKEN=your-token
     (see .env.example and README.md for every setting and the invite link)

To try the model without Discord:  make console   (or: .venv/bin/python -m bot --console)"""


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


async def log_in(bot: ChatBot, token: str, stop: asyncio.Event) -> None:
    """Check the token with Discord, load the cogs and sync the slash commands (discord.py's `login()`).

    This comes before the model loads, so a wrong token is reported before a long first download.
    """
    logging_in = await until_stopped(bot.login(token), stop)
    if logging_in is None:
        raise ExitCode("Stopped while logging in to Discord.", code=0)
    logging_in.result()


async def answer_until_stopped(bot: ChatBot, engine: ServingEngine, settings: Settings, stop: asyncio.Event) -> None:
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
            await answer_until_stopped(bot, engine, settings, stop)
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
