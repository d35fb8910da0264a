"""Listening: when to answer (mention, reply, DM, or any message in a listening channel) and where not
(a server's settings, ALLOW_DMS), cleaning the text, typing, replying, streaming and splitting; the
message's text files and the message it replies to as context; the buttons on the replies (the presses
are handled in cogs/buttons.py)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from discord.ext import commands

from bot.client.attachments import ReadFiles, as_context, is_text_like, read_attachments
from bot.client.reply_buttons import REGENERATE, STOP, ReplyBoard, ReplyRecord
from bot.client.streaming import POST_ERRORS, StreamingReply, split_message
from bot.core.guild_settings import GuildConfig
from bot.core.outcomes import CLOSING, ERROR_TEXT
from bot.core.types import Conversation, Reply

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)

EMPTY_MENTION_TEXT = "Hi! Write something after the mention and I'll answer. In a DM, no mention is needed."
ATTACHMENT_ONLY_TEXT = "I can only read text, not attachments. Tell me in words what you'd like to talk about."
COOLDOWN_TEXT = "You're sending messages faster than I can answer. Wait {seconds:.0f}s, then ask again."
REPLIED_TEXT_LIMIT = 1000  # characters of the replied-to message the model is shown

_USER = re.compile(r"<@!?(\d+)>")
_ROLE = re.compile(r"<@&(\d+)>")
_CHANNEL = re.compile(r"<#(\d+)>")
_EMOJI = re.compile(r"<a?:(\w+):\d+>")
_SPACES = re.compile(r"[ \t\r\f\v]+")


def clean_text(
    content: str,
    *,
    bot_id: int,
    bot_role_id: int | None = None,
    users: Mapping[int, str] | None = None,
    roles: Mapping[int, str] | None = None,
    channels: Mapping[int, str] | None = None,
) -> str:
    """The text the model should see: the bot's own mentions removed, others made readable."""
    users, roles, channels = users or {}, roles or {}, channels or {}

    def user(match: re.Match[str]) -> str:
        uid = int(match.group(1))
        return " " if uid == bot_id else "@" + users.get(uid, "someone")

    def role(match: re.Match[str]) -> str:
        rid = int(match.group(1))
        return " " if rid == bot_role_id else "@" + roles.get(rid, "role")

    # Null bytes out; a lone UTF-16 surrogate (half an emoji, valid JSON but not valid text) becomes
    # U+FFFD, as the tokenizer and SQLite both refuse it.
    text = content.replace("\x00", "").encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    text = _USER.sub(user, text)
    text = _ROLE.sub(role, text)
    text = _CHANNEL.sub(lambda m: "#" + channels.get(int(m.group(1)), "channel"), text)
    text = _EMOJI.sub(lambda m: f":{m.group(1)}:", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line).strip()


class Chat(commands.Cog):
    """Answers @mentions and replies to the bot in servers, and every message in DMs."""

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        seconds = bot.settings.user_cooldown_seconds
        self.cooldown = (
            commands.CooldownMapping.from_cooldown(1, seconds, commands.BucketType.user) if seconds > 0 else None
        )
        self._noticed_until: dict[int, float] = {}
        self._last_post: dict[int, asyncio.Future[None]] = {}  # per channel: the latest reply's post
        self._listened_at: dict[int, float] = {}  # per listening channel: when its last unaddressed message was taken
        # per channel: the latest answer's start (its files read, its turn taken), so answers keep their order
        self._last_start: dict[int, asyncio.Future[None]] = {}
        self.replies = ReplyBoard(bot.settings.reply_buttons_seconds, self._remove_buttons_later)
        self._session: aiohttp.ClientSession | None = None  # for attachments, opened at the first one
        self._chores: set[asyncio.Task[object]] = set()

    async def cog_unload(self) -> None:
        self.replies.close()
        if self._session is not None:
            await self._session.close()

    def _remove_buttons_later(self, message: discord.Message) -> None:
        task = asyncio.get_running_loop().create_task(self.remove_buttons(message))
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def remove_buttons(self, message: discord.Message) -> None:
        """Take the buttons off one of the bot's messages (superseded or expired); trouble is only logged."""
        try:
            await message.edit(view=None, allowed_mentions=discord.AllowedMentions.none())
        except POST_ERRORS as exc:
            log.info("could not remove the buttons of message %s: %s", message.id, exc)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        self.replies.message_deleted(payload.message_id)

    def take_place(self, channel_id: int) -> tuple[asyncio.Future[None] | None, asyncio.Future[None]]:
        """A place in the channel's line of posts: (the post before it, if still running; its own)."""
        previous = self._last_post.get(channel_id)
        posted = asyncio.get_running_loop().create_future()
        self._last_post[channel_id] = posted
        return previous, posted

    def leave_place(self, channel_id: int, posted: asyncio.Future[None]) -> None:
        if not posted.done():
            posted.set_result(None)
        if self._last_post.get(channel_id) is posted:
            del self._last_post[channel_id]

    def from_a_person(self, message: discord.Message) -> bool:
        """A person's own chat message: not a bot's (this one's included), a webhook's or a system message."""
        me = self.bot.user
        if me is None or message.author.bot or message.webhook_id is not None:
            return False
        return message.author.id != me.id and message.type in (discord.MessageType.default, discord.MessageType.reply)

    def addressed_to_me(self, message: discord.Message) -> bool:
        if not self.from_a_person(message):
            return False
        if message.guild is None:
            return True
        me = self.bot.user
        assert me is not None
        if me in message.mentions or replies_to(message, me.id):
            return True
        own_role = message.guild.self_role
        return own_role is not None and own_role in message.role_mentions

    def replied_context(self, message: discord.Message) -> str | None:
        """`(replying to Alice: "...")` for a reply to somebody else's message (the bot's own are in the
        history already); None for anything else."""
        me = self.bot.user
        reference = message.reference
        if me is None or reference is None or reference.type is not discord.MessageReferenceType.reply:
            return None
        replied = reference.resolved or reference.cached_message
        author = getattr(replied, "author", None)
        if not isinstance(replied, discord.Message) or author is None or author.id == me.id:
            return None
        said = self.text_for_model(replied)
        if not said:
            return None
        if len(said) > REPLIED_TEXT_LIMIT:
            said = said[: REPLIED_TEXT_LIMIT - 1].rstrip() + "\u2026"
        return f'(replying to {author.display_name}: "{said}")'

    async def read_files(self, message: discord.Message) -> ReadFiles:
        settings = self.bot.settings
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return await read_attachments(
            message.attachments,
            max_bytes=settings.attachment_max_bytes,
            timeout=settings.attachment_timeout_seconds,
            session=self._session,
        )

    def text_for_model(self, message: discord.Message) -> str:
        assert self.bot.user is not None
        own_role = message.guild.self_role if message.guild else None
        return clean_text(
            message.content,
            bot_id=self.bot.user.id,
            bot_role_id=own_role.id if own_role else None,
            users={u.id: u.display_name for u in message.mentions},
            roles={r.id: r.name for r in message.role_mentions},
            channels={c.id: getattr(c, "name", "channel") for c in message.channel_mentions},
        )

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if not self.from_a_person(message):
            return
        task = asyncio.current_task()
        if task is not None:
            self.bot.track(task)
        try:
            addressed = self.addressed_to_me(message)
            if message.guild is None:
                if not self.bot.settings.allow_dms:
                    log.debug("DM %s not answered: ALLOW_DMS is off", message.id)
                    return
                await self.answer(message)
                return
            # Read without suspending while the copy is fresh (see GuildSettings.get), so messages keep their order.
            config = await self.bot.chat.guilds.get(message.guild.id)
            if self.for_me_here(message, config, addressed):
                await self.answer(message, config=config, addressed=addressed)
        except Exception:
            log.exception("could not answer message %s in channel %s", message.id, message.channel.id)

    def for_me_here(self, message: discord.Message, config: GuildConfig, addressed: bool) -> bool:
        """Whether to answer a server message under its server's settings: where the bot may speak,
        who it ignores, and, unaddressed, whether the channel listens and its pace allows one more."""
        channel_id, category_id, parent_id = place_of(message.channel)
        if not config.may_speak(channel_id, category_id):
            if addressed:
                log.debug("message %s: the bot may not speak in channel %s; silent", message.id, message.channel.id)
            return False
        roles = [role.id for role in getattr(message.author, "roles", [])]
        if config.ignores(message.author.id, roles):
            if addressed:
                log.debug("message %s: its author is blocked in this server; silent", message.id)
            return False
        if addressed:
            return True
        pace = config.pace(message.channel.id, parent_id)
        if pace is None or self.between_people(message):
            return False
        if not self.text_for_model(message) and not any(self._may_read(a) for a in message.attachments):
            return False  # nothing to answer (an image, a sticker): it must not use up the channel's pace
        now = time.monotonic()
        last = self._listened_at.get(message.channel.id)
        if last is not None and now - last < pace:
            log.debug("message %s: listening channel %s is paced (%gs); skipped", message.id, message.channel.id, pace)
            return False
        if len(self._listened_at) > 10_000:  # forget channels that have been quiet for a while
            self._listened_at = {c: t for c, t in self._listened_at.items() if now - t < 3600}
        self._listened_at[message.channel.id] = now
        return True

    def between_people(self, message: discord.Message) -> bool:
        """A message to somebody else: a reply to another person's message, or one that mentions a person."""
        if message.reference is not None and message.reference.type is discord.MessageReferenceType.reply:
            return True  # a reply to the bot is addressed to it and never gets here
        return any(not user.bot for user in message.mentions)

    async def answer(
        self, message: discord.Message, *, config: GuildConfig | None = None, addressed: bool = True
    ) -> None:
        """Answer `message`. Unaddressed (a listening channel), notices are not posted: the message
        was not for the bot, so a closing bot, an empty text or a cooldown are silent."""
        if not self.bot.accepting:
            if addressed:
                await self.send(message, self.bot.chat.turn_away(CLOSING).text)
            return
        text = self.text_for_model(message)
        files = [a for a in message.attachments if self._may_read(a)]
        if not text and not files:
            if addressed:
                await self.send(message, ATTACHMENT_ONLY_TEXT if message.attachments else EMPTY_MENTION_TEXT)
            return
        if await self.cooling_down(message, quiet=not addressed):
            return
        conversation = Conversation(message.channel.id, message.guild.id if message.guild else None)
        # Answers start in the order their messages came (each after the one before it has read its
        # files and taken its turn with the chat service), and post in that order: a reply waits for
        # the posts of the reply before it in this channel, so a slow typing request (or a reply still
        # being streamed) can never make the answers appear out of order.
        before = self._last_start.get(conversation.channel_id)
        started = asyncio.get_running_loop().create_future()
        self._last_start[conversation.channel_id] = started
        previous, posted = self.take_place(conversation.channel_id)
        try:
            if before is not None and not before.done():
                await asyncio.wait({before})
            read = await self.read_files(message) if message.attachments else ReadFiles()
            context = [self.replied_context(message) if addressed else None, as_context(read.files), text]
            full_text = "\n\n".join(part for part in context if part)
            if not text and not read.files:
                if addressed:
                    await self.send(message, read.note(self.bot.settings.attachment_max_bytes) or ATTACHMENT_ONLY_TEXT)
                return
            await self._answer(
                message, conversation, full_text, read, previous, posted, started, config=config, addressed=addressed
            )
        finally:
            if not started.done():
                started.set_result(None)
            if self._last_start.get(conversation.channel_id) is started:
                del self._last_start[conversation.channel_id]
            self.leave_place(conversation.channel_id, posted)

    def _may_read(self, attachment: discord.Attachment) -> bool:
        """Whether an attachment may be text to read (the download decides): what its name and type say."""
        name = str(getattr(attachment, "filename", attachment))
        return self.bot.settings.attachment_max_bytes > 0 and is_text_like(
            name, getattr(attachment, "content_type", None)
        )

    async def _answer(
        self,
        message: discord.Message,
        conversation: Conversation,
        text: str,
        read: ReadFiles,
        previous: asyncio.Future[None] | None,
        posted: asyncio.Future[None],
        started: asyncio.Future[None],
        *,
        config: GuildConfig | None,
        addressed: bool,
    ) -> None:
        log.debug("message %s in %s: %r", message.id, message.channel.id, text)
        board = self.replies
        record: ReplyRecord | None = None
        note = read.note(self.bot.settings.attachment_max_bytes)
        # In a server the model is told who is speaking (several people share a channel); a DM has one.
        speaker = message.author.display_name if message.guild is not None else None
        persona = None
        if config is not None and message.guild is not None and (config.persona or config.channel_personas):
            _, _, parent_id = place_of(message.channel)
            persona = self.bot.chat.persona_for(
                config,
                message.channel.id,
                parent_id=parent_id,
                server=message.guild.name,
                channel=getattr(message.channel, "name", None) or "",
            )

        if board.enabled:
            record = board.begin(ReplyRecord(conversation, message.author.id, message.id, persona))
        stream = StreamingReply(message, after=previous, buttons=self.buttons_for(record)) if self.streaming else None

        finished = False  # the board was told how the reply ended (a press may already have restarted it)

        async def post(reply: Reply) -> bool:
            """Show the reply (streamed: its last edit); the chat service stores it only when this is True."""
            nonlocal finished
            # The note on skipped files goes under the answer, in its message; the history keeps the answer.
            text = f"{reply.text}\n\n{note}" if note is not None and reply.ok else reply.text
            if stream is not None:
                shown = await stream.finish(text, ok=reply.ok)
                messages: list[discord.Message] | None = stream.posts if shown else None
            else:
                if previous is not None:
                    await asyncio.wait({previous})
                view = None
                if record is not None and reply.ok and len(split_message(text)) == 1:
                    view = board.view_for(record, REGENERATE)
                messages = await self.post_pieces(message, text, view=view)
            if record is not None:
                single = messages is not None and len(messages) == 1 and reply.ok
                board.finished(record, reply.text if single else None, messages[0] if single and messages else None)
                finished = True
            return messages is not None

        # Take this message's place in its conversation's line now, before the first await (the
        # typing request): otherwise a later message whose typing request happens to come back first
        # would be answered first, and messages arriving together (a burst, events replayed after a
        # RESUME) could be answered out of order.
        responding = asyncio.ensure_future(
            self.bot.chat.respond(
                conversation,
                message.author.id,
                text,
                speaker=speaker,
                on_partial=stream.update if stream is not None else None,
                post=post,
                system_prompt=persona,
                stop=record.stop if record is not None and stream is not None else None,
            )
        )
        started.set_result(None)  # the next message's answer may take its turn now
        try:
            async with typing_in(message.channel):  # while streaming, up until the last edit
                await asyncio.wait({responding})
            error = responding.exception()
            if error is not None:  # a bug in the chat service: the reply was not stored, say so once
                log.error("could not answer message %s", message.id, exc_info=error)
                await self.send(message, ERROR_TEXT)
        finally:
            # A cancelled handler (the bot stopping) takes its reply with it: not posted, so not stored.
            responding.cancel()
            if stream is not None:
                stream.cancel()
            if record is not None and not finished:
                board.finished(record, None, None)

    @property
    def streaming(self) -> bool:
        """Replies are shown while written: STREAM_REPLIES is on and the engine can stream (greedy decoding)."""
        return self.bot.settings.stream_replies and self.bot.chat.can_stream

    async def cooling_down(self, message: discord.Message, *, quiet: bool = False) -> bool:
        """True if the author is over the rate; they get one notice per cooldown, not one per message
        (none when `quiet`)."""
        if self.cooldown is None:
            return False
        retry_after = self.cooldown.update_rate_limit(message)
        if not retry_after:
            return False
        now = time.monotonic()
        self._noticed_until = {uid: t for uid, t in self._noticed_until.items() if t > now}
        if message.author.id not in self._noticed_until and not quiet:
            self._noticed_until[message.author.id] = now + retry_after
            await self.send(message, COOLDOWN_TEXT.format(seconds=max(1.0, retry_after)))
        return True

    async def send(self, message: discord.Message, text: str) -> bool:
        """Reply to `message` without pinging anyone; long text arrives in several messages.

        True once every piece is posted; False if Discord refused one past discord.py's retries (the
        rest is not sent, and a reply is then not stored).
        """
        return await self.post_pieces(message, text) is not None

    async def post_pieces(
        self, message: discord.Message, text: str, *, view: discord.ui.View | None = None
    ) -> list[discord.Message] | None:
        """`send`, returning the messages posted (None when Discord refused one); `view` goes on the last."""
        reference = message.to_reference(fail_if_not_exists=False)
        quiet = discord.AllowedMentions.none()
        chunks = split_message(text)
        posted: list[discord.Message] = []
        for index, chunk in enumerate(chunks):
            options: dict[str, Any] = {
                "reference": reference if index == 0 else None,
                "allowed_mentions": quiet,
                "mention_author": False,
            }
            if view is not None and index == len(chunks) - 1:
                options["view"] = view
            try:
                posted.append(await message.channel.send(chunk, **options))
            except POST_ERRORS as exc:
                log.warning("could not post in channel %s: %s", message.channel.id, exc)
                return None
        return posted

    def buttons_for(self, record: ReplyRecord | None) -> Callable[[int, int, str], discord.ui.View | None] | None:
        """What each message of a streamed reply carries: Stop on the newest while it is written, then
        Regenerate on a reply of one message that is still the channel's newest."""
        if record is None:
            return None
        board = self.replies

        def buttons(index: int, count: int, state: str) -> discord.ui.View | None:
            if state == "writing":
                return board.view_for(record, STOP) if index == count - 1 else None
            if state == "done" and count == 1 and not board.superseded(record):
                return board.view_for(record, REGENERATE)
            return None

        return buttons


def place_of(channel: object) -> tuple[int, int | None, int | None]:
    """Where a message was said, for a server's settings: (the channel, its category, a thread's parent).

    A thread follows its parent channel: the first id is the parent's, and the category the parent's.
    """
    if isinstance(channel, discord.Thread):
        parent = channel.parent
        return channel.parent_id, getattr(parent, "category_id", None), channel.parent_id
    return getattr(channel, "id", 0), getattr(channel, "category_id", None), None


def replies_to(message: discord.Message, user_id: int) -> bool:
    """Whether `message` is a reply to a message by `user_id` (pinging them or not).

    Discord sends the replied-to message along (`referenced_message`, which discord.py puts in
    `reference.resolved`); without it, discord.py's message cache may still have it. A forward is
    not a reply, and a reply to a deleted message can't be placed.
    """
    reference = message.reference
    if reference is None or reference.type is not discord.MessageReferenceType.reply:
        return False
    replied = reference.resolved or reference.cached_message
    author = getattr(replied, "author", None)  # a DeletedReferencedMessage has none
    return author is not None and author.id == user_id


@asynccontextmanager
async def typing_in(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Show the typing indicator while the body runs; a channel that refuses it is not an error."""
    typing = channel.typing()
    try:
        await typing.__aenter__()
    except Exception as exc:  # noqa: BLE001 - the indicator is cosmetic; the reply must still be posted
        log.debug("no typing indicator: %s", exc)
        yield
        return
    try:
        yield
    finally:
        await typing.__aexit__(None, None, None)


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(Chat(bot))
