"""The Discord client: intents, mention safety, extensions and command sync."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.chat import ChatService
from config.settings import Settings

log = logging.getLogger(__name__)

# The cogs loaded at start, in this order. A cog is a module in cogs/ with an `async def setup(bot)` that
# adds it; it is loaded only once it is listed here. A new slash command goes into the cog for its
# audience (cogs/everyone.py for anyone, cogs/admin.py for moderators) or a new cog listed here.
EXTENSIONS = ("cogs.chat", "cogs.buttons", "cogs.admin", "cogs.config", "cogs.everyone")


class ChatBot(commands.AutoShardedBot):
    """A bot that answers mentions and DMs through a `ChatService` handed in by `main()`.

    It runs the shards SHARD_IDS of SHARD_COUNT (all of them when SHARD_IDS is unset; as many as
    Discord recommends when SHARD_COUNT is unset too). Discord sends a guild's events to shard
    `(guild_id >> 22) % SHARD_COUNT` and every DM to shard 0, so several processes can split a big
    bot between them, and only the one running shard 0 sees DMs.
    """

    def __init__(self, *, settings: Settings, chat: ChatService) -> None:
        # The bot never joins voice, so discord.py's warnings about missing voice libraries are noise.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the Developer Portal too
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            # Nothing the bot posts may ping anyone, whatever the model writes.
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            **_shard_options(settings),
        )
        self.settings = settings
        self.chat = chat
        self.accepting = True
        self._message_tasks: set[asyncio.Task[object]] = set()
        self.tree.error(answer_command_error)

    @property
    def runs_shard_zero(self) -> bool:
        """Whether this process runs shard 0: the one that receives DMs, and syncs the slash commands."""
        return self.settings.shard_ids is None or 0 in self.settings.shard_ids

    def shard_summary(self) -> str:
        """`shards 0, 1 of 2` (or `shards (not connected yet)` before the first connection)."""
        if self.shard_count is None:
            return "shards (not connected yet)"
        ids = sorted(self.shards) or list(self.shard_ids or range(self.shard_count))
        return f"shard{'s' if len(ids) != 1 else ''} {', '.join(map(str, ids))} of {self.shard_count}"

    def gateway_ready(self) -> str | None:
        """A readiness check: None once every shard of this process is connected and ready, else why not."""
        if not self.accepting:
            return "stopping"
        if self.is_closed():
            return "the Discord connection is closed"
        if not self.is_ready():
            return "not connected to the Discord gateway yet"
        down = sorted(shard_id for shard_id, shard in self.shards.items() if shard.is_closed())
        if down:
            return f"shard {', '.join(map(str, down))} disconnected"
        return None

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        if self.runs_shard_zero:
            await self.sync_commands()
        else:  # the commands are the application's, not the shard's: one process registering them is enough
            log.info("slash commands are synced by the process running shard 0")

    async def sync_commands(self) -> None:
        """To DEV_GUILD_ID when set (instant), globally otherwise (may take a while to show)."""
        guild_id = self.settings.dev_guild_id
        try:
            if guild_id is not None:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("synced %d slash commands to guild %s", len(synced), guild_id)
            else:
                synced = await self.tree.sync()
                log.info("synced %d slash commands globally", len(synced))
        except discord.HTTPException as exc:
            # Chat still works without slash commands, so this is not a reason to stop.
            where = f"DEV_GUILD_ID={guild_id} (is the bot in that server?)" if guild_id else "globally"
            log.error(
                "could not register slash commands %s: %s. Invite the bot with the applications.commands "
                "scope (see README).",
                where,
                exc,
            )

    async def on_ready(self) -> None:
        assert self.user is not None
        log.info(
            "logged in as %s (id %s) in %d servers, running %s%s",
            self.user,
            self.user.id,
            len(self.guilds),
            self.shard_summary(),
            "" if self.runs_shard_zero else " (no DMs: Discord sends them to the process running shard 0)",
        )

    async def on_shard_ready(self, shard_id: int) -> None:
        log.info("shard %d of %s connected", shard_id, self.shard_count)

    async def on_message(self, message: discord.Message) -> None:
        """Replaces `commands.Bot`'s prefix-command handling: this bot has slash commands only."""

    # ----- graceful shutdown -------------------------------------------------------------------

    def track(self, task: asyncio.Task[object]) -> None:
        """Remember a message handler so shutdown can wait for it."""
        self._message_tasks.add(task)
        task.add_done_callback(self._message_tasks.discard)

    def stop_accepting(self) -> None:
        self.accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for message handlers in progress; True if none is left."""
        pending = {t for t in self._message_tasks if t is not asyncio.current_task()}
        if not pending:
            return True
        _, still = await asyncio.wait(pending, timeout=timeout)
        return not still


def _shard_options(settings: Settings) -> dict[str, Any]:
    """AutoShardedBot's shard_count and shard_ids; left out, it asks Discord for the count and runs every shard."""
    options: dict[str, Any] = {}
    if settings.shard_count is not None:
        options["shard_count"] = settings.shard_count
    if settings.shard_ids is not None:
        options["shard_ids"] = list(settings.shard_ids)
    return options


# How Discord's client names a permission, where that differs from discord.py's attribute.
PERMISSION_NAMES = {"manage_guild": "Manage Server", "manage_messages": "Manage Messages"}


async def answer_command_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
    """Every slash command's failure, whatever its cog: a short private answer, and the log for the rest."""
    name = interaction.command and interaction.command.name
    if isinstance(error, app_commands.MissingPermissions):
        names = " and ".join(
            f"**{PERMISSION_NAMES.get(p, p.replace('_', ' ').title())}**" for p in error.missing_permissions
        )
        text = f"You need the {names} permission to do that."
    elif isinstance(error, app_commands.NoPrivateMessage):
        text = "This command works only in a server."
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
