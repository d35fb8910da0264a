"""Slash commands anyone may use: /stats (how the bot is doing) and /forget-me (delete what I said)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}s"


def _latency(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if math.isfinite(seconds) else "n/a"


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


class Everyone(commands.Cog):
    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    @app_commands.command(name="stats", description="How the bot is doing: model, queue, speed, uptime.")
    @app_commands.allowed_contexts(guilds=True, dms=True, private_channels=False)
    async def stats(self, interaction: discord.Interaction) -> None:
        s = self.bot.chat.engine_stats()
        tps = "n/a" if s.tokens_per_second is None else f"{s.tokens_per_second:.1f}"
        lines = [
            f"**Model:** `{s.model}` on {s.device} ({s.precision})",
            f"**Generating now:** {s.running} replies; **waiting:** {s.queue_depth}",
            f"**Wait before generating:** p50 {_seconds(s.queue_wait_p50_s)}, p95 {_seconds(s.queue_wait_p95_s)}",
            f"**Replies served:** {s.replies}",
            f"**Latency:** p50 {_seconds(s.latency_p50_s)}, p95 {_seconds(s.latency_p95_s)}",
            f"**Speed:** {tps} tokens/s",
            f"**Uptime:** {_uptime(s.uptime_s)}",
            f"**This process runs** {self.bot.shard_summary()}; **gateway latency:** "
            + (", ".join(f"shard {i} {_latency(t)}" for i, t in sorted(self.bot.latencies)) or "n/a"),
        ]
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @app_commands.command(name="forget-me", description="Delete everything you have said to me, in every channel.")
    @app_commands.allowed_contexts(guilds=True, dms=True, private_channels=False)
    async def forget_me(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)  # the database may take over 3 s
        removed = await self.bot.chat.forget_user(interaction.user.id)
        log.info("forgot user %s (%d turns)", interaction.user.id, removed)
        await interaction.followup.send(
            f"Done: I've deleted {removed} stored messages of our conversations, everywhere.", ephemeral=True
        )


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(Everyone(bot))
