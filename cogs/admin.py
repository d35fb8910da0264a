"""Slash commands: reset history (admins), stats and forget-me (everyone)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.types import Conversation

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)


def manage_messages_or_dm(interaction: discord.Interaction) -> bool:
    """The real permission check behind `default_permissions`, which is only a hint to Discord's UI.

    In a server the member needs Manage Messages; in a DM the history is the user's own.
    """
    if interaction.guild_id is None:
        return True
    if interaction.permissions.manage_messages:
        return True
    raise app_commands.MissingPermissions(["manage_messages"])


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}s"


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


class Admin(commands.Cog):
    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    @app_commands.command(name="reset", description="Forget the conversation history here (or in the whole server).")
    @app_commands.describe(scope="This channel only (default), or every channel of this server")
    @app_commands.default_permissions(manage_messages=True)
    @app_commands.allowed_contexts(guilds=True, dms=True, private_channels=False)
    @app_commands.check(manage_messages_or_dm)
    async def reset(self, interaction: discord.Interaction, scope: Literal["channel", "server"] = "channel") -> None:
        if scope == "server":
            if interaction.guild_id is None:
                await interaction.response.send_message(
                    "There is no server here; use `/reset` to clear this DM.", ephemeral=True
                )
                return
            # Manage Messages in this one channel (an override) is not enough to wipe every channel.
            server_permissions = getattr(interaction.user, "guild_permissions", None)
            if server_permissions is None or not server_permissions.manage_messages:
                raise app_commands.MissingPermissions(["manage_messages"])
            removed = self.bot.chat.reset_guild(interaction.guild_id)
            log.info("history of guild %s reset by %s (%d turns)", interaction.guild_id, interaction.user.id, removed)
            await interaction.response.send_message(
                f"Done: I've forgotten every conversation in this server ({removed} messages).", ephemeral=True
            )
            return
        assert interaction.channel_id is not None
        removed = self.bot.chat.reset(Conversation(interaction.channel_id, interaction.guild_id))
        log.info("history of channel %s reset by %s (%d turns)", interaction.channel_id, interaction.user.id, removed)
        await interaction.response.send_message(
            f"Done: I've forgotten this conversation ({removed} messages).", ephemeral=True
        )

    @app_commands.command(name="stats", description="How the bot is doing: model, queue, speed, uptime.")
    @app_commands.allowed_contexts(guilds=True, dms=True, private_channels=False)
    async def stats(self, interaction: discord.Interaction) -> None:
        s = self.bot.chat.engine.stats()
        tps = "n/a" if s.tokens_per_second is None else f"{s.tokens_per_second:.1f}"
        lines = [
            f"**Model:** `{s.model}` on {s.device} ({s.precision})",
            f"**Queue:** {s.queue_depth} waiting",
            f"**Replies served:** {s.replies}",
            f"**Latency:** p50 {_seconds(s.latency_p50_s)}, p95 {_seconds(s.latency_p95_s)}",
            f"**Speed:** {tps} tokens/s",
            f"**Uptime:** {_uptime(s.uptime_s)}",
        ]
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @app_commands.command(name="forget-me", description="Delete everything you have said to me, in every channel.")
    @app_commands.allowed_contexts(guilds=True, dms=True, private_channels=False)
    async def forget_me(self, interaction: discord.Interaction) -> None:
        removed = self.bot.chat.forget_user(interaction.user.id)
        log.info("forgot user %s (%d turns)", interaction.user.id, removed)
        await interaction.response.send_message(
            f"Done: I've deleted {removed} stored messages of our conversations, everywhere.", ephemeral=True
        )

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        name = interaction.command and interaction.command.name
        if isinstance(error, app_commands.MissingPermissions):
            text = "You need the **Manage Messages** permission to do that."
        elif isinstance(error, app_commands.CheckFailure):
            text = "You can't use this command here."
        else:
            original = getattr(error, "original", None)
            if isinstance(original, discord.NotFound) and original.code == 10062:
                # Discord forgets an interaction not answered within 3 seconds (for example one replayed
                # after a gateway RESUME); there is no one left to answer.
                log.warning("/%s expired before it could be answered", name)
                return
            log.error("slash command %s failed", name, exc_info=error)
            text = "Sorry, that didn't work. The error has been logged."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:  # raised here, it would only end as an unretrieved task exception
            log.warning("could not tell the user that /%s failed: %s", name, exc)


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(Admin(bot))
