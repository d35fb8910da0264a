"""The cogs, built without a live bot or a Discord connection."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
import pytest
from discord import app_commands

from bot.client import answer_command_error
from bot.client.streaming import split_message
from bot.core.chat import ChatService
from bot.core.outcomes import CLOSING_TEXT
from bot.core.types import Conversation, Turn
from bot.engine import Engine
from cogs.admin import Admin, manage_messages_or_dm
from cogs.chat import (
    ATTACHMENT_ONLY_TEXT,
    COOLDOWN_TEXT,
    EMPTY_MENTION_TEXT,
    Chat,
    clean_text,
)
from cogs.everyone import Everyone
from config.settings import Settings
from tests.scripted_engine import ScriptedEngine

BOT_ID = 999
ROLE_ID = 555


@dataclass(eq=False)
class FakeUser:
    id: int
    bot: bool = False
    display_name: str = "someone"
    guild_permissions: discord.Permissions = field(default_factory=discord.Permissions.none)


@dataclass(eq=False)
class FakeRole:
    id: int
    name: str = "role"


@dataclass(eq=False)
class FakeGuild:
    id: int = 100
    self_role: FakeRole | None = field(default_factory=lambda: FakeRole(ROLE_ID, "ChatBot"))


class FakeTyping:
    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel

    async def __aenter__(self) -> None:
        self.channel.events.append("typing")

    async def __aexit__(self, *exc: object) -> None:
        self.channel.events.append("typing-end")


@dataclass(eq=False)
class FakeChannel:
    id: int = 1
    events: list[Any] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)

    def typing(self) -> FakeTyping:
        return FakeTyping(self)

    async def send(self, content: str, **kwargs: Any) -> None:
        self.events.append("send")
        self.sent.append({"content": content, **kwargs})


@dataclass(eq=False)
class FakeReference:
    """discord.MessageReference as discord.py fills it: `resolved` from the gateway's referenced_message."""

    resolved: Any = None
    cached_message: Any = None
    type: discord.MessageReferenceType = discord.MessageReferenceType.reply


@dataclass(eq=False)
class FakeMessage:
    content: str
    author: FakeUser = field(default_factory=lambda: FakeUser(7))
    channel: FakeChannel = field(default_factory=FakeChannel)
    guild: FakeGuild | None = field(default_factory=FakeGuild)
    mentions: list[Any] = field(default_factory=list)
    role_mentions: list[Any] = field(default_factory=list)
    channel_mentions: list[Any] = field(default_factory=list)
    attachments: list[Any] = field(default_factory=list)
    webhook_id: int | None = None
    type: discord.MessageType = discord.MessageType.default
    id: int = 42
    reference: FakeReference | None = None

    def to_reference(self, *, fail_if_not_exists: bool = True) -> tuple[str, int, bool]:
        return ("ref", self.id, fail_if_not_exists)


class FakeBot:
    def __init__(self, chat: ChatService, cooldown: float = 0.0) -> None:
        self.user = FakeUser(BOT_ID, bot=True, display_name="ChatBot")
        self.settings = Settings(discord_token=None, user_cooldown_seconds=cooldown)
        self.chat = chat
        self.accepting = True
        self.tracked: list[asyncio.Task[Any]] = []
        self.latencies = [(1, float("inf")), (0, 0.042)]  # shard 1 has not had a heartbeat answered yet

    def shard_summary(self) -> str:
        return "shards 0, 1 of 2"

    def track(self, task: asyncio.Task[Any]) -> None:
        self.tracked.append(task)


@pytest.fixture
def bot(chat: ChatService) -> FakeBot:
    return FakeBot(chat)


def mention(bot: FakeBot, text: str, **kwargs: Any) -> FakeMessage:
    return FakeMessage(f"<@{BOT_ID}> {text}", mentions=[bot.user], **kwargs)


# ----- text cleaning and splitting -------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f"<@{BOT_ID}> hello", "hello"),
        (f"<@!{BOT_ID}>   hello   there ", "hello there"),
        (f"hey <@&{ROLE_ID}> what's up", "hey what's up"),
        (f"<@{BOT_ID}>", ""),
        (f"<@{BOT_ID}> ask <@12> and <@&34> in <#56>", "ask @Ann and @mods in #general"),
        ("<@77> who?", "@someone who?"),
        ("nice <:blob:1234> <a:wave:99>", "nice :blob: :wave:"),
        ("null\x00byte", "nullbyte"),
        ("line one\n\n   line two  ", "line one\nline two"),
        ("@everyone look", "@everyone look"),
        ("half \ud83d emoji \udc00 and 😀", "half \ufffd emoji \ufffd and 😀"),  # lone surrogates
    ],
)
def test_clean_text(content: str, expected: str) -> None:
    cleaned = clean_text(
        content, bot_id=BOT_ID, bot_role_id=ROLE_ID, users={12: "Ann"}, roles={34: "mods"}, channels={56: "general"}
    )
    assert cleaned == expected


def test_split_message_respects_limit_and_loses_nothing() -> None:
    text = " ".join(f"word{i}" for i in range(1200))
    chunks = split_message(text, 2000)
    assert len(chunks) > 1 and all(0 < len(c) <= 2000 for c in chunks)
    assert " ".join(chunks) == text
    assert split_message("x" * 4500) == ["x" * 2000, "x" * 2000, "x" * 500]
    assert split_message("short") == ["short"]
    assert split_message("a" * 1500 + "\n" + "b" * 1000) == ["a" * 1500, "b" * 1000]


# ----- when to answer --------------------------------------------------------------------------


async def test_mention_gets_a_quiet_reply_after_typing(bot: FakeBot, scripted_engine: ScriptedEngine) -> None:
    message = mention(bot, "hello")
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert message.channel.events == ["typing", "send", "typing-end"]  # posted within the turn, then stored
    sent = message.channel.sent[0]
    assert sent["content"] == "re: hello"
    assert sent["reference"] == ("ref", 42, False)
    assert sent["mention_author"] is False
    allowed = sent["allowed_mentions"].to_dict()
    assert allowed == {"parse": []}  # Discord reads a missing replied_user as false
    assert scripted_engine.seen == [[Turn("user", "hello", speaker="someone")]]  # a server: who said it


async def test_role_mention_of_the_bot_counts(bot: FakeBot) -> None:
    guild = FakeGuild()
    message = FakeMessage(f"<@&{ROLE_ID}> hi", guild=guild, role_mentions=[guild.self_role])
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert message.channel.sent[0]["content"] == "re: hi"


async def test_dm_needs_no_mention(bot: FakeBot, chat: ChatService) -> None:
    message = FakeMessage("hi there", guild=None, channel=FakeChannel(id=5))
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert message.channel.sent[0]["content"] == "re: hi there"
    assert await chat.history.get(Conversation(5)) == [Turn("user", "hi there"), Turn("bot", "re: hi there")]


@pytest.mark.parametrize(
    "message",
    [
        FakeMessage("no mention here"),
        FakeMessage(f"<@{BOT_ID}> from a bot", author=FakeUser(8, bot=True)),
        FakeMessage(f"<@{BOT_ID}> from a webhook", webhook_id=1),
        FakeMessage("a DM from a bot", guild=None, author=FakeUser(8, bot=True)),
        FakeMessage(f"<@{BOT_ID}> pinned", type=discord.MessageType.pins_add),
    ],
)
async def test_silence(bot: FakeBot, scripted_engine: ScriptedEngine, message: FakeMessage) -> None:
    if "from" in message.content or "pinned" in message.content:
        message.mentions = [bot.user]
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert message.channel.sent == [] and scripted_engine.seen == []


def reply(to: FakeMessage | None, *, how: str = "resolved", **kwargs: Any) -> FakeMessage:
    """A message replying to `to`, without the reply ping (no mention at all)."""
    if how == "resolved":
        reference = FakeReference(resolved=to)
    elif how == "cached":  # no referenced_message came along, but discord.py's cache has the message
        reference = FakeReference(cached_message=to)
    elif how == "deleted":
        reference = FakeReference(resolved=discord.DeletedReferencedMessage(None))  # type: ignore[arg-type]
    else:
        reference = FakeReference(resolved=to, type=discord.MessageReferenceType.forward)
    return FakeMessage("and what else?", type=discord.MessageType.reply, reference=reference, **kwargs)


@pytest.mark.parametrize("how", ["resolved", "cached"])
async def test_a_reply_to_the_bot_is_answered_without_a_ping(
    bot: FakeBot, scripted_engine: ScriptedEngine, how: str
) -> None:
    bots_message = FakeMessage("re: hello", author=bot.user)  # type: ignore[arg-type]
    message = reply(bots_message, how=how)
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert message.channel.sent[0]["content"] == "re: and what else?"
    assert message.channel.sent[0]["reference"] == ("ref", 42, False)


@pytest.mark.parametrize(
    ("to", "how"),
    [
        (FakeMessage("hello", author=FakeUser(8)), "resolved"),  # somebody else's message
        (FakeMessage("hello", author=FakeUser(8)), "cached"),
        (None, "deleted"),  # the replied-to message is gone: there is no telling whose it was
        (FakeMessage("re: hello", author=FakeUser(BOT_ID, bot=True)), "forward"),  # a forward is not a reply
        (None, "resolved"),  # neither sent along nor cached
    ],
)
async def test_a_reply_to_someone_else_is_not_for_the_bot(
    bot: FakeBot, scripted_engine: ScriptedEngine, to: FakeMessage | None, how: str
) -> None:
    message = reply(to, how=how)
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert message.channel.sent == [] and scripted_engine.seen == []


async def test_own_messages_ignored(bot: FakeBot, scripted_engine: ScriptedEngine) -> None:
    message = FakeMessage("talking to myself", guild=None, author=bot.user)  # type: ignore[arg-type]
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert message.channel.sent == [] and scripted_engine.seen == []


async def test_empty_mention_gets_a_prompt_not_a_model_call(bot: FakeBot, scripted_engine: ScriptedEngine) -> None:
    message = mention(bot, "   ")
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert message.channel.sent[0]["content"] == EMPTY_MENTION_TEXT and scripted_engine.seen == []
    attachment = mention(bot, "", attachments=["cat.png"])
    await Chat(bot).on_message(attachment)  # type: ignore[arg-type]
    assert attachment.channel.sent[0]["content"] == ATTACHMENT_ONLY_TEXT and scripted_engine.seen == []


async def test_long_reply_is_split(bot: FakeBot, scripted_engine: ScriptedEngine) -> None:
    scripted_engine.answer = "lorem ipsum " * 400
    message = mention(bot, "tell me a story")
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    pieces = message.channel.sent
    assert len(pieces) == 3 and all(len(p["content"]) <= 2000 for p in pieces)
    assert pieces[0]["reference"] is not None and pieces[1]["reference"] is None


async def test_engine_failure_is_an_apology_not_a_traceback(bot: FakeBot, scripted_engine: ScriptedEngine) -> None:
    scripted_engine.fail = RuntimeError("boom")
    message = mention(bot, "hi")
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert "Sorry" in message.channel.sent[0]["content"] and "boom" not in message.channel.sent[0]["content"]


async def test_send_failure_is_logged_not_raised(bot: FakeBot, caplog: pytest.LogCaptureFixture) -> None:
    message = mention(bot, "hi")

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise discord.Forbidden(type("R", (), {"status": 403, "reason": "Forbidden"})(), "Missing Permissions")

    message.channel.send = refuse  # type: ignore[method-assign]
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert "could not post" in caplog.text


async def test_a_reply_discord_refused_is_not_stored(bot: FakeBot, chat: ChatService) -> None:
    """Past discord.py's retries (a long outage) nobody saw the reply, so the history does not hold it."""
    channel = FakeChannel(id=3)
    message = mention(bot, "hi", channel=channel)

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise discord.DiscordServerError(type("R", (), {"status": 503, "reason": "Unavailable"})(), "down")

    channel.send = refuse  # type: ignore[method-assign]
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert await chat.history.get(Conversation(3)) == []
    del channel.send  # Discord is back: the next reply is posted and stored, the refused one never was
    await Chat(bot).on_message(mention(bot, "again", channel=channel))  # type: ignore[arg-type]
    assert await chat.history.get(Conversation(3)) == [
        Turn("user", "again", speaker="someone"),
        Turn("bot", "re: again"),
    ]


async def test_a_reply_that_could_not_be_reached_is_not_stored(bot: FakeBot, chat: ChatService) -> None:
    channel = FakeChannel(id=4)

    async def unreachable(*args: Any, **kwargs: Any) -> None:
        raise OSError("Connection reset by peer")

    channel.send = unreachable  # type: ignore[method-assign]
    await Chat(bot).on_message(mention(bot, "hi", channel=channel))  # type: ignore[arg-type]
    assert await chat.history.get(Conversation(4)) == []


async def test_a_cancelled_handler_posts_nothing_and_stores_nothing(bot: FakeBot, chat: ChatService) -> None:
    """The handler is cancelled while its reply is being posted: either posted and stored, or neither."""
    channel = FakeChannel(id=6)
    posting, never = asyncio.Event(), asyncio.Event()

    async def slow_send(*args: Any, **kwargs: Any) -> None:
        posting.set()
        await never.wait()

    channel.send = slow_send  # type: ignore[method-assign]
    handler = asyncio.create_task(Chat(bot).on_message(mention(bot, "hi", channel=channel)))  # type: ignore[arg-type]
    await asyncio.wait_for(posting.wait(), 5)
    handler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await handler
    await asyncio.sleep(0.05)  # anything still running would store by now
    assert await chat.history.get(Conversation(6)) == []
    assert chat.in_flight == 0


async def test_a_handler_cancelled_after_posting_still_stores(bot: FakeBot, chat: ChatService) -> None:
    channel = FakeChannel(id=8)
    storing, release = asyncio.Event(), asyncio.Event()
    append = chat.history.append

    async def slow_append(*args: Any, **kwargs: Any) -> Any:
        storing.set()
        await release.wait()
        return await append(*args, **kwargs)

    chat.history.append = slow_append  # type: ignore[method-assign]
    handler = asyncio.create_task(Chat(bot).on_message(mention(bot, "hi", channel=channel)))  # type: ignore[arg-type]
    await asyncio.wait_for(storing.wait(), 5)
    assert [s["content"] for s in channel.sent] == ["re: hi"]
    handler.cancel()
    release.set()
    with contextlib.suppress(asyncio.CancelledError):
        await handler
    for _ in range(50):
        if await chat.history.get(Conversation(8)):
            break
        await asyncio.sleep(0.01)
    assert await chat.history.get(Conversation(8)) == [Turn("user", "hi", speaker="someone"), Turn("bot", "re: hi")]


async def test_cooldown_gives_one_notice(chat: ChatService, scripted_engine: ScriptedEngine) -> None:
    bot = FakeBot(chat, cooldown=60)
    cog = Chat(bot)  # type: ignore[arg-type]
    channel = FakeChannel()
    for text in ("first", "second", "third"):
        await cog.on_message(mention(bot, text, channel=channel))  # type: ignore[arg-type]
    contents = [s["content"] for s in channel.sent]
    assert contents[0] == "re: first"
    assert contents[1] == COOLDOWN_TEXT.format(seconds=60) and len(contents) == 2
    assert [h[-1].text for h in scripted_engine.seen] == ["first"]


async def test_shutting_down_says_so(bot: FakeBot, scripted_engine: ScriptedEngine) -> None:
    bot.accepting = False
    message = mention(bot, "hi")
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert message.channel.sent[0]["content"] == CLOSING_TEXT and scripted_engine.seen == []
    assert bot.chat.metrics.registry.get_sample_value("chatbot_replies_total", {"kind": "closing"}) == 1


# ----- admin commands --------------------------------------------------------------------------


class FakeResponse:
    """An interaction's response; `sent` also gets what follow-ups send after a deferral."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bool]] = []
        self.deferred: bool | None = None  # None: not deferred; else whether ephemeral

    def is_done(self) -> bool:
        return bool(self.sent) or self.deferred is not None

    async def send_message(self, text: str, *, ephemeral: bool = False) -> None:
        assert not self.is_done(), "an interaction is answered once"
        self.sent.append((text, ephemeral))

    async def defer(self, *, ephemeral: bool = False, thinking: bool = False) -> None:
        assert not self.is_done(), "an interaction is answered once"
        self.deferred = ephemeral


class FakeFollowup:
    def __init__(self, response: FakeResponse) -> None:
        self.response = response

    async def send(self, text: str, *, ephemeral: bool = False) -> None:
        assert self.response.is_done(), "a follow-up comes after the response"
        self.response.sent.append((text, ephemeral))


@dataclass(eq=False)
class FakeInteraction:
    guild_id: int | None = 100
    channel_id: int = 1
    permissions: discord.Permissions = field(default_factory=discord.Permissions.none)
    user: FakeUser = field(default_factory=lambda: FakeUser(7))
    response: FakeResponse = field(default_factory=FakeResponse)
    command: Any = None

    @property
    def followup(self) -> FakeFollowup:
        return FakeFollowup(self.response)


def test_reset_permission_is_a_hint_and_a_check() -> None:
    assert Admin.reset.default_permissions == discord.Permissions(manage_messages=True)
    assert manage_messages_or_dm in Admin.reset.checks
    assert manage_messages_or_dm(FakeInteraction(permissions=discord.Permissions(manage_messages=True)))  # type: ignore[arg-type]
    assert manage_messages_or_dm(FakeInteraction(guild_id=None))  # type: ignore[arg-type]
    with pytest.raises(app_commands.MissingPermissions):
        manage_messages_or_dm(FakeInteraction())  # type: ignore[arg-type]
    assert Everyone.stats.default_permissions is None and Everyone.forget_me.default_permissions is None


async def _seed(chat: ChatService) -> None:
    for channel in (1, 2):
        await chat.respond(Conversation(channel, 100), 7, f"hi {channel}")
    await chat.respond(Conversation(3, 200), 7, "elsewhere")


async def test_reset_channel_and_server(bot: FakeBot, chat: ChatService) -> None:
    await _seed(chat)
    cog = Admin(bot)  # type: ignore[arg-type]
    interaction = FakeInteraction(channel_id=1)
    await Admin.reset.callback(cog, interaction, "channel")  # type: ignore[arg-type]
    assert interaction.response.sent == [("Done: I've forgotten this conversation (2 messages).", True)]
    assert await chat.history.get(Conversation(1)) == [] and await chat.history.get(Conversation(2))
    moderator = FakeUser(7, guild_permissions=discord.Permissions(manage_messages=True))
    interaction = FakeInteraction(channel_id=2, user=moderator)
    await Admin.reset.callback(cog, interaction, "server")  # type: ignore[arg-type]
    assert "every conversation in this server (2 messages)" in interaction.response.sent[0][0]
    assert await chat.history.get(Conversation(3)) != []


async def test_server_reset_in_a_dm_is_explained(bot: FakeBot) -> None:
    interaction = FakeInteraction(guild_id=None)
    await Admin.reset.callback(Admin(bot), interaction, "server")  # type: ignore[arg-type]
    assert "no server here" in interaction.response.sent[0][0] and interaction.response.sent[0][1]


async def test_refusal_is_ephemeral(bot: FakeBot) -> None:
    interaction = FakeInteraction()
    await answer_command_error(interaction, app_commands.MissingPermissions(["manage_messages"]))  # type: ignore[arg-type]
    assert interaction.response.sent == [("You need the **Manage Messages** permission to do that.", True)]


async def test_stats_and_forget_me(chat: ChatService, tiny_engine: Engine, tiny_model_dir: Path) -> None:
    real = ChatService(tiny_engine, chat.history)
    await real.respond(Conversation(1, 100), 7, "hello")
    bot = FakeBot(real)
    interaction = FakeInteraction()
    await Everyone.stats.callback(Everyone(bot), interaction)  # type: ignore[arg-type]
    text, ephemeral = interaction.response.sent[0]
    assert ephemeral and str(tiny_model_dir) in text and "Replies served:** 1" in text and "p95" in text
    assert "**Generating now:** 0 replies; **waiting:** 0" in text and "**Wait before generating:** p50" in text
    assert "**This process runs** shards 0, 1 of 2; **gateway latency:** shard 0 42 ms, shard 1 n/a" in text
    interaction = FakeInteraction()
    await Everyone.forget_me.callback(Everyone(bot), interaction)  # type: ignore[arg-type]
    assert "deleted 2 stored messages" in interaction.response.sent[0][0]


async def test_replies_posted_in_order_even_if_typing_is_slow(bot: FakeBot, scripted_engine: ScriptedEngine) -> None:
    channel = FakeChannel()
    slow_typing = asyncio.Event()

    class SlowFirstTyping(FakeTyping):
        async def __aenter__(self) -> None:
            if not channel.events:
                channel.events.append("slow typing")
                await slow_typing.wait()

    channel.typing = lambda: SlowFirstTyping(channel)  # type: ignore[method-assign]
    cog = Chat(bot)  # type: ignore[arg-type]
    first = asyncio.create_task(cog.on_message(mention(bot, "one", channel=channel)))  # type: ignore[arg-type]
    second = asyncio.create_task(cog.on_message(mention(bot, "two", channel=channel)))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)  # "two" has been answered by now, but must not be posted before "one"
    # A reply does not wait for a slow typing indicator, only for the reply before it in its channel.
    assert [s["content"] for s in channel.sent] == ["re: one", "re: two"][: len(channel.sent)]
    slow_typing.set()
    await asyncio.gather(first, second)
    assert [s["content"] for s in channel.sent] == ["re: one", "re: two"]
    assert cog._last_post == {}


async def test_server_reset_needs_server_wide_permission(bot: FakeBot, chat: ChatService) -> None:
    await _seed(chat)

    # Manage Messages in this channel only (an override), not in the server.
    interaction = FakeInteraction(permissions=discord.Permissions(manage_messages=True), user=FakeUser(7))
    assert manage_messages_or_dm(interaction)  # type: ignore[arg-type]
    with pytest.raises(app_commands.MissingPermissions):
        await Admin.reset.callback(Admin(bot), interaction, "server")  # type: ignore[arg-type]
    assert await chat.history.get(Conversation(2)) != []
    admin = FakeInteraction(user=FakeUser(7, guild_permissions=discord.Permissions(manage_messages=True)))
    await Admin.reset.callback(Admin(bot), admin, "server")  # type: ignore[arg-type]
    assert await chat.history.get(Conversation(2)) == []


async def test_failing_chat_service_still_answers(bot: FakeBot, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(bot.chat, "respond", broken)
    message = mention(bot, "hi")
    await Chat(bot).on_message(message)  # type: ignore[arg-type]
    assert message.channel.sent[0]["content"].startswith("Sorry")
