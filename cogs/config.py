"""Slash commands for server admins (Manage Server): where the bot speaks, whom it ignores, which
channels it listens in (`/bot ...`), and its persona (`/persona ...`). The settings themselves live in
`bot.core.guild_settings`; a server's go when the bot leaves it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.client.streaming import split_message
from bot.core.guild_settings import (
    DEFAULT_PACE_S,
    MAX_PACE_S,
    MIN_PACE_S,
    PERSONA_MAX_CHARS,
    SERVER,
    SETTINGS_TTL_S,
    GuildConfig,
    GuildSettings,
    render_persona,
)
from bot.history import HistoryError

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)

Place = app_commands.AppCommandChannel | app_commands.AppCommandThread
TEXTUAL = [
    discord.ChannelType.text,
    discord.ChannelType.news,
    discord.ChannelType.forum,
    discord.ChannelType.category,
]
THREADS = [discord.ChannelType.public_thread, discord.ChannelType.private_thread, discord.ChannelType.news_thread]
BLENDERBOT_NOTE = (
    "Note: this model (BlenderBot) reads no system prompt, so the persona is kept but has no effect "
    "until the bot runs a chat model."
)
SAVE_FAILED = "I couldn't save that (the database did not answer). Nothing changed; try again in a moment."


def manage_server(interaction: discord.Interaction) -> bool:
    """The real check behind `default_permissions(manage_guild=True)`, which is only a hint to Discord's UI."""
    if interaction.guild_id is None:
        raise app_commands.NoPrivateMessage()
    if interaction.permissions.manage_guild:
        return True
    raise app_commands.MissingPermissions(["manage_guild"])


def _where(target: int) -> str:
    return f"<#{target}>"


def describe(config: GuildConfig) -> str:
    """A server's settings, for `/bot show` (cut into messages Discord accepts there)."""
    lines = ["**Where I answer**"]
    if config.allowed:
        lines.append("Only in: " + ", ".join(_where(t) for t in sorted(config.allowed)))
    else:
        lines.append("Everywhere I can read" + (", except as blocked" if config.blocked else ""))
    if config.blocked:
        lines.append("Never in: " + ", ".join(_where(t) for t in sorted(config.blocked)))
    lines.append("Threads follow their parent channel; a channel's own entry wins over its category's.")
    lines.append("**Listening** (every message answered, no mention needed)")
    lines.append(
        ", ".join(f"{_where(c)} (one reply per {p:g}s)" for c, p in sorted(config.listening.items())) or "none"
    )
    lines.append("**Ignored people**")
    people = [f"<@{u}>" for u in sorted(config.blocked_users)] + [f"<@&{r}>" for r in sorted(config.blocked_roles)]
    lines.append(", ".join(people) or "none")
    lines.append("**Persona**")
    lines.append(f"Server: {_quote(config.persona)}" if config.persona else "Server: none (the bot's default)")
    for channel, text in sorted(config.channel_personas.items()):
        lines.append(f"{_where(channel)}: {_quote(text)}")
    return "\n".join(lines)


def _quote(text: str, limit: int = 200) -> str:
    short = text if len(text) <= limit else text[: limit - 1] + "…"
    return "`" + short.replace("`", "'") + "`"


class _Places(app_commands.Transformer):
    """A channel or category option (no threads: a thread follows its parent)."""

    @property
    def type(self) -> discord.AppCommandOptionType:
        return discord.AppCommandOptionType.channel

    @property
    def channel_types(self) -> list[discord.ChannelType]:
        return TEXTUAL

    async def transform(self, interaction: discord.Interaction, value: Place) -> Place:
        return value


class _Listenable(_Places):
    """A channel or thread option."""

    @property
    def channel_types(self) -> list[discord.ChannelType]:
        return [t for t in TEXTUAL if t is not discord.ChannelType.category] + THREADS


class Config(commands.Cog):
    """`/bot` and `/persona`: a server's settings, for members with Manage Server."""

    server = app_commands.Group(
        name="bot",
        description="Where the bot answers in this server, and whom it ignores.",
        default_permissions=discord.Permissions(manage_guild=True),
        allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=False, private_channel=False),
    )
    persona = app_commands.Group(
        name="persona",
        description="Who the bot is in this server or channel (a chat model's system prompt).",
        default_permissions=discord.Permissions(manage_guild=True),
        allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=False, private_channel=False),
    )

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return manage_server(interaction)

    @property
    def settings(self) -> GuildSettings:
        return self.bot.chat.guilds

    async def _change(
        self, interaction: discord.Interaction, changes: list[tuple[str, int, str | None]], done: str
    ) -> None:
        """Apply `changes` (kind, target, value or None to delete) and say `done`, privately."""
        assert interaction.guild_id is not None
        await interaction.response.defer(ephemeral=True, thinking=True)  # the database may take over 3 s
        try:
            await self.settings.set(interaction.guild_id, changes)  # all or none: one transaction
        except HistoryError as exc:
            log.warning("could not change the settings of server %s: %s", interaction.guild_id, exc)
            await interaction.followup.send(SAVE_FAILED, ephemeral=True)
            return
        log.info("settings of server %s changed by %s: %s", interaction.guild_id, interaction.user.id, changes)
        await interaction.followup.send(done, ephemeral=True)

    # ----- /bot ----------------------------------------------------------------------------------

    @server.command(name="show", description="This server's settings for the bot.")
    async def show(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        await interaction.response.defer(ephemeral=True, thinking=True)
        config = await self.settings.get(interaction.guild_id)
        for piece in split_message(describe(config)):  # many places and personas outgrow one message
            await interaction.followup.send(piece, ephemeral=True)

    @server.command(name="allow", description="Answer in this channel or category (then only in allowed places).")
    @app_commands.describe(channel="A channel or a category")
    async def allow(self, interaction: discord.Interaction, channel: app_commands.Transform[Place, _Places]) -> None:
        await self._change(
            interaction,
            [("block", channel.id, None), ("allow", channel.id, "")],
            f"Allowed: I answer in {_where(channel.id)}. Once anything is allowed, I answer only in allowed "
            "places (threads follow their channel).",
        )

    @server.command(name="block", description="Never answer in this channel or category.")
    @app_commands.describe(channel="A channel or a category")
    async def block(self, interaction: discord.Interaction, channel: app_commands.Transform[Place, _Places]) -> None:
        await self._change(
            interaction,
            [("allow", channel.id, None), ("block", channel.id, "")],
            f"Blocked: I stay silent in {_where(channel.id)} (and its threads), even when mentioned.",
        )

    @server.command(name="unlist", description="Take a channel or category off the allow and block lists.")
    @app_commands.describe(channel="A channel or a category")
    async def unlist(self, interaction: discord.Interaction, channel: app_commands.Transform[Place, _Places]) -> None:
        await self._change(
            interaction,
            [("allow", channel.id, None), ("block", channel.id, None)],
            f"{_where(channel.id)} is on neither list now.",
        )

    @server.command(name="listen", description="Answer every message in a channel or thread, no mention needed.")
    @app_commands.describe(
        channel="A channel or thread (default: this one)",
        pace=f"At most one reply per this many seconds (default {DEFAULT_PACE_S:g})",
        on="Listen (default) or stop listening",
    )
    async def listen(
        self,
        interaction: discord.Interaction,
        channel: app_commands.Transform[Place, _Listenable] | None = None,
        pace: app_commands.Range[float, MIN_PACE_S, MAX_PACE_S] = DEFAULT_PACE_S,
        on: bool = True,
    ) -> None:
        target = channel.id if channel is not None else interaction.channel_id
        assert target is not None
        if not on:
            await self._change(interaction, [("listen", target, None)], f"I answer only mentions in {_where(target)}.")
            return
        await self._change(
            interaction,
            [("listen", target, f"{pace:g}")],
            f"Listening in {_where(target)}: I answer every message there (not bots, not replies between "
            f"people), at most one per {pace:g}s. Mentions are always answered.",
        )

    @server.command(name="ignore", description="Never answer this member, or the members of this role.")
    @app_commands.describe(who="A member or a role", on="Ignore (default) or answer again")
    async def ignore(
        self, interaction: discord.Interaction, who: discord.Member | discord.User | discord.Role, on: bool = True
    ) -> None:
        kind = "block_role" if isinstance(who, discord.Role) else "block_user"
        mention = f"<@&{who.id}>" if kind == "block_role" else f"<@{who.id}>"
        if on:
            await self._change(interaction, [(kind, who.id, "")], f"I ignore {mention} in this server now.")
        else:
            await self._change(interaction, [(kind, who.id, None)], f"I answer {mention} again.")

    # ----- /persona ------------------------------------------------------------------------------

    @persona.command(name="set", description="Who the bot is here: {server}, {channel} and {date} are filled in.")
    @app_commands.describe(
        text="The persona, e.g. 'You are a pirate in {server}.' ({server}, {channel}, {date} are filled in)",
        scope="The whole server (default), or this channel only",
    )
    async def persona_set(
        self,
        interaction: discord.Interaction,
        text: app_commands.Range[str, 1, PERSONA_MAX_CHARS],
        scope: Literal["server", "channel"] = "server",
    ) -> None:
        assert interaction.guild is not None and interaction.channel_id is not None
        rendered = render_persona(
            text, server=interaction.guild.name, channel=getattr(interaction.channel, "name", None) or "channel"
        )
        problem = await self.bot.chat.check_persona(rendered)
        if problem is not None:
            await interaction.response.send_message(
                f"That persona is too long for the model: {problem}. Nothing changed.", ephemeral=True
            )
            return
        target = SERVER if scope == "server" else interaction.channel_id
        where = "this server" if scope == "server" else f"{_where(target)} (and its threads)"
        done = f"Persona set for {where}. It applies from the next message, here and in every process."
        if not self.bot.chat.uses_personas:
            done += "\n" + BLENDERBOT_NOTE
        await self._change(interaction, [("persona", target, text)], done)

    @persona.command(name="show", description="The persona in force here, and where it comes from.")
    async def persona_show(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None and interaction.channel_id is not None
        await interaction.response.defer(ephemeral=True, thinking=True)
        config = await self.settings.get(interaction.guild_id)
        parent_id = (
            getattr(interaction.channel, "parent_id", None) if isinstance(interaction.channel, discord.Thread) else None
        )
        template, source = config.persona_for(interaction.channel_id, parent_id)
        if template is None:
            text = "No persona is set here: the bot's default (SYSTEM_PROMPT) applies."
        else:
            text = f"In force here (from {source}): {_quote(template, 1500)}"
        if not self.bot.chat.uses_personas:
            text += "\n" + BLENDERBOT_NOTE
        await interaction.followup.send(text, ephemeral=True)

    @persona.command(name="clear", description="Remove the persona of this server or of this channel.")
    @app_commands.describe(scope="The whole server's (default), or this channel's")
    async def persona_clear(
        self, interaction: discord.Interaction, scope: Literal["server", "channel"] = "server"
    ) -> None:
        assert interaction.channel_id is not None
        target = SERVER if scope == "server" else interaction.channel_id
        where = "this server" if scope == "server" else _where(target)
        await self._change(interaction, [("persona", target, None)], f"The persona of {where} is cleared.")

    # ----- leaving a server ----------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_guild_remove(self, guild: discord.Guild) -> None:
        """The bot was removed from a server (or the server deleted): its settings go too."""
        try:
            removed = await self.settings.forget(guild.id)
        except HistoryError as exc:
            log.warning("could not delete the settings of server %s after leaving it: %s", guild.id, exc)
            return
        log.info("left server %s: deleted its %d settings", guild.id, removed)


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(Config(bot))


__all__ = ["SETTINGS_TTL_S", "Config", "describe", "manage_server"]
