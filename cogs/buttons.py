"""Presses of the buttons on the bot's replies (bot/client/reply_buttons.py): Stop and Regenerate.

Every press arrives through `on_interaction` (the views are never in discord.py's view store), so one
made after a restart is recognised by its custom id and answered: the buttons are taken off the
message and the presser is told, privately, that they expired. Only the person who asked, or someone
with Manage Messages in the channel, may press them; anyone else gets a private refusal.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands

from bot.client.reply_buttons import (
    ALREADY_DONE_TEXT,
    BUSY_WRITING_TEXT,
    EXPIRED_TEXT,
    NOT_YOURS_TEXT,
    NOTHING_TO_REGENERATE_TEXT,
    REGENERATE,
    STOP,
    ReplyRecord,
    parse_custom_id,
)
from bot.client.streaming import POST_ERRORS, StreamingReply
from bot.core.types import Reply
from cogs.chat import Chat

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)
QUIET = discord.AllowedMentions.none()


class Buttons(commands.Cog):
    """Answers the Stop and Regenerate buttons of the chat cog's replies."""

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    @property
    def chat_cog(self) -> Chat:
        cog = self.bot.get_cog("Chat")
        assert isinstance(cog, Chat), "cogs.chat is loaded before cogs.buttons"
        return cog

    @commands.Cog.listener()
    async def on_interaction(self, interaction: discord.Interaction) -> None:
        if interaction.type is not discord.InteractionType.component or interaction.message is None:
            return
        data: dict[str, Any] = dict(interaction.data or {})
        parsed = parse_custom_id(str(data.get("custom_id", "")))
        if parsed is None:
            return
        task = asyncio.current_task()
        if task is not None:
            self.bot.track(task)
        action, asker_id, question_id = parsed
        try:
            await self.pressed(interaction, action, asker_id, question_id)
        except discord.NotFound as exc:  # answered too late (Discord forgets it after 3 s): nobody is waiting
            log.warning("a %s button press expired before it was answered: %s", action, exc)
        except POST_ERRORS as exc:
            log.warning("could not answer a %s button press: %s", action, exc)

    async def pressed(self, interaction: discord.Interaction, action: str, asker_id: int, question_id: int) -> None:
        if not may_press(interaction, asker_id):
            await interaction.response.send_message(NOT_YOURS_TEXT, ephemeral=True, allowed_mentions=QUIET)
            return
        board = self.chat_cog.replies
        record = board.find(question_id)
        message = interaction.message
        assert message is not None
        if action == STOP:
            if record is None:
                await self.expired(interaction)
            elif not record.writing:
                await interaction.response.send_message(ALREADY_DONE_TEXT, ephemeral=True, allowed_mentions=QUIET)
            else:
                await interaction.response.defer()  # the reply's last edit takes the button away
                record.stop.set()
            return
        assert action == REGENERATE
        if record is not None and record.writing:
            await interaction.response.send_message(BUSY_WRITING_TEXT, ephemeral=True, allowed_mentions=QUIET)
            return
        if (
            record is None
            or not board.is_newest(record)
            or record.message is None
            or record.message.id != message.id
            or record.text is None
        ):
            await self.expired(interaction)
            return
        # Marked as being written before the first await, so a second press (a double click) is told
        # to wait instead of starting a second regeneration of the same reply.
        board.regenerating(record)
        try:
            await interaction.response.defer()  # the message is edited as the new answer is written
        except BaseException:
            board.finished(record, record.text, record.message)  # nothing was started: the reply stays
            raise
        await self.regenerate(interaction, record)

    async def expired(self, interaction: discord.Interaction) -> None:
        """The buttons come off the message (UPDATE_MESSAGE), and the presser is told why, privately."""
        await interaction.response.edit_message(view=None, allowed_mentions=QUIET)
        await interaction.followup.send(EXPIRED_TEXT, ephemeral=True, allowed_mentions=QUIET)

    async def regenerate(self, interaction: discord.Interaction, record: ReplyRecord) -> None:
        """A new answer to the same question replaces the reply in its message and in the history
        (`record` is already marked as being written: `ReplyBoard.regenerating`)."""
        chat, board = self.chat_cog, self.chat_cog.replies
        old_message, old_text = record.message, record.text
        assert old_message is not None and old_text is not None
        channel_id = record.conversation.channel_id
        previous, posted = chat.take_place(channel_id)
        stream = StreamingReply(old_message, after=previous, buttons=chat.buttons_for(record), reuse=old_message)

        finished = False  # the board was told how it ended (a new press may already have restarted it)

        async def post(reply: Reply) -> bool:
            nonlocal finished
            finished = True
            if not reply.ok and not stream.streamed:  # a notice, before a word of the new answer: keep the old
                board.finished(record, old_text, old_message)
                await interaction.followup.send(reply.text, ephemeral=True, allowed_mentions=QUIET)
                return False
            shown = await stream.finish(reply.text, ok=reply.ok)
            single = shown and reply.ok and len(stream.posts) == 1
            board.finished(record, reply.text if single else None, stream.posts[0] if single else None)
            return shown

        try:
            reply = await self.bot.chat.regenerate(
                record.conversation,
                record.asker_id,
                old_text,
                on_partial=stream.update if chat.streaming else None,
                post=post,
                system_prompt=record.system_prompt,
                stop=record.stop if chat.streaming else None,
            )
            if reply is None:
                finished = True
                board.finished(record, None, None)
                await chat.remove_buttons(old_message)
                await interaction.followup.send(NOTHING_TO_REGENERATE_TEXT, ephemeral=True, allowed_mentions=QUIET)
        finally:
            stream.cancel()
            if not finished:
                board.finished(record, None, None)
            chat.leave_place(channel_id, posted)


def may_press(interaction: discord.Interaction, asker_id: int) -> bool:
    """The person who asked, or someone with Manage Messages in this channel (never in a DM but the asker)."""
    if interaction.user.id == asker_id:
        return True
    return interaction.guild_id is not None and interaction.permissions.manage_messages


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(Buttons(bot))
