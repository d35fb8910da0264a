"""Slash commands for moderators: /reset forgets a channel's (or a whole server's) conversations."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.types import Conversation

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
            # Discord drops an interaction not answered within 3 s, and the database may take longer.
            await interaction.response.defer(ephemeral=True, thinking=True)
            removed = await self.bot.chat.reset_guild(interaction.guild_id)
            log.info("history of guild %s reset by %s (%d turns)", interaction.guild_id, interaction.user.id, removed)
            await interaction.followup.send(
                f"Done: I've forgotten every conversation in this server ({removed} messages).", ephemeral=True
            )
            return
        assert interaction.channel_id is not None
        await interaction.response.defer(ephemeral=True, thinking=True)
        removed = await self.bot.chat.reset(Conversation(interaction.channel_id, interaction.guild_id))
        log.info("history of channel %s reset by %s (%d turns)", interaction.channel_id, interaction.user.id, removed)
        await interaction.followup.send(f"Done: I've forgotten this conversation ({removed} messages).", ephemeral=True)


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(Admin(bot))
