"""End to end: hostile and odd input, through the fake Discord, to the real bot.

Each case is a message (or an edit) a real person could produce. Every one must get either one
sensible answer (a model reply, or the hint for an empty mention or a bare attachment) or a
deliberate silence, and nothing the bot posts may ping anyone, carry a traceback, or be refused by
Discord. The `bot_factory` fixture fails a test at teardown on any error log, refused REST call
or loud post; `Hostile.judge` also checks each answer's text and what the model was given.

One test per kind of hostile input, each on a bot of its own; the cases of a test are sent one at
a time, each waited for, so the history each conversation builds up is the same every run.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import pytest

from bot.core.outcomes import BUSY_TEXT, CLOSING_TEXT, EMPTY_REPLY_TEXT, ERROR_TEXT, TIMEOUT_TEXT
from bot.core.types import Conversation, Turn
from cogs.chat import ATTACHMENT_ONLY_TEXT, EMPTY_MENTION_TEXT
from tests.fake_discord import BotFactory, BotHarness, Channel

REPLY, HINT, ATTACHMENT, SILENT, UNREFERENCED = "reply", "hint", "attachment", "silent", "unreferenced"
EDIT = "edit"  # silence: the edited message keeps the one answer (or none) its original got
NOT_AN_ANSWER = {BUSY_TEXT, CLOSING_TEXT, ERROR_TEXT, TIMEOUT_TEXT}
NO_PINGS = {"users": [], "roles": [], "everyone": False}

ZALGO = "h̸̡̪̯ͨ͊̽̅̾̎Ȩ̬̩̾͛ͪ̈́̀́͘ ̶̧̨̱̹̭̯ͧ̾ͬC̷̙̲̝͖ͭ̏ͥͮ͟Oͮ͏̮̪̝͍M̲̖͊̒ͪͩͬ̚̚͜Ȇ̴̟̟͙̞ͩ͌͝S̨̥̫͎̭ͯ̿̔̀ͅ" * 3
RTL = "\u202eolleh\u202c مرحبا كيف حالك שלום מה שלומך"
CODE = "```python\nimport os\nos.system('rm -rf /')\n```\nwhat does this do?\n`inline` ~~strike~~"
MARKDOWN = "**bold** __under__ ||spoiler|| [click me](https://evil.example/steal) <https://example.com> > quote"


@dataclass
class Case:
    name: str
    expect: str  # REPLY, HINT, ATTACHMENT, SILENT, UNREFERENCED or EDIT
    message: dict[str, Any] | None = None
    model_saw: str | None = None  # for REPLY: the user turn the model was given, if worth checking


class Hostile:
    """One bot, the hostile cases sent to it, and the judging of what it did with them."""

    def __init__(self, harness: BotHarness) -> None:
        self.harness = harness
        self.fake = harness.fake
        self.w = harness.fake.world
        self.bot = self.w.bot_user.mention  # `<@id>`, as the bot's own mention
        self.cases: list[Case] = []

    async def run(
        self, name: str, expect: str, send: Awaitable[dict[str, Any] | None], model_saw: str | None = None
    ) -> dict[str, Any] | None:
        """Send one case; wait for its answer if it should get one (in-order, deterministic history)."""
        message = await send
        self.cases.append(Case(name, expect, message, model_saw))
        if expect in (REPLY, HINT, ATTACHMENT) and message is not None:
            await self.fake.wait_reply(message, timeout=30)
        return message

    async def settle(self, channel: Channel) -> None:
        """A barrier: once a later message in `channel` is answered, earlier ones have been handled."""
        author = self.w.carol if channel.guild_id else channel.recipient
        assert author is not None
        probe = await self.fake.send(
            author, channel, f"{self.bot} are you there" if channel.guild_id else "are you there"
        )
        await self.fake.wait_reply(probe, timeout=30)

    def channels(self) -> list[Channel]:
        """The channels the cases were sent in, in the order first used."""
        ids = dict.fromkeys(int(c.message["channel_id"]) for c in self.cases if c.message is not None)
        return [self.w.channels[i] for i in ids]

    async def judge(self, *, cases: int) -> None:
        """Settle every conversation, then check each case's answer (or silence), everything the bot
        posted, and what the model was given. `cases` is how many this test sends: none may go unjudged."""
        assert len(self.cases) == cases, [c.name for c in self.cases]
        channels = self.channels()
        await self._settle_all(channels)
        self._check_answers()
        self._check_posts()
        await self._check_history(channels)

    async def _settle_all(self, channels: list[Channel]) -> None:
        fake = self.fake
        # Silences are only proven once later messages in the same conversations have been answered:
        # the gateway delivers in order and each conversation is answered in order.
        for channel in channels:
            await self.settle(channel)
        unreferenced_in = {c.message["channel_id"] for c in self.cases if c.expect == UNREFERENCED and c.message}
        await fake.wait_for(
            lambda: unreferenced_in <= {m["channel_id"] for m in fake.bot_messages},
            what="the answer to the deleted message",
        )

    def _check_answers(self) -> None:
        """Each case got what it expects: one answer of the right kind, or none."""
        fake = self.fake
        replies_to: dict[str, list[dict[str, Any]]] = {}
        for posted in fake.bot_messages:
            ref = posted.get("message_reference")
            if ref:
                replies_to.setdefault(ref["message_id"], []).append(posted)
        problems: list[str] = []
        for case in self.cases:
            assert case.message is not None
            got = replies_to.get(case.message["id"], [])
            texts = [m["content"] for m in got]
            if case.expect == EDIT:
                continue  # its original's case counts the answers to this message id
            if case.expect == SILENT:
                if got:
                    problems.append(f"{case.name}: expected silence, got {texts}")
                continue
            if case.expect == UNREFERENCED:
                channel = self.w.channels[int(case.message["channel_id"])]
                unreferenced = [m for m in fake.messages_by_bot(channel) if not m.get("message_reference")]
                if len(unreferenced) != 1 or not unreferenced[0]["content"].strip():
                    problems.append(f"{case.name}: expected one answer without a reference, got {unreferenced}")
                continue
            if len(got) != 1:
                problems.append(f"{case.name}: expected one answer, got {len(got)}: {texts}")
                continue
            text = got[0]["content"]
            if case.expect == HINT and text != EMPTY_MENTION_TEXT:
                problems.append(f"{case.name}: expected the empty-mention hint, got {text!r}")
            elif case.expect == ATTACHMENT and text != ATTACHMENT_ONLY_TEXT:
                problems.append(f"{case.name}: expected the attachment notice, got {text!r}")
            elif case.expect == REPLY and (
                text in NOT_AN_ANSWER or text in (EMPTY_MENTION_TEXT, ATTACHMENT_ONLY_TEXT) or not text.strip()
            ):
                problems.append(f"{case.name}: expected a model reply, got {text!r}")
        assert not problems, "\n".join(problems)

    def _check_posts(self) -> None:
        """Nothing the bot posted carries a traceback, is empty or over-long, or could ping anyone."""
        for posted in self.fake.bot_messages:
            assert "Traceback" not in posted["content"] and "Error" not in posted["content"], posted["content"]
            assert 0 < len(posted["content"]) <= 2000
            assert posted["pings"] == NO_PINGS, posted["content"]

    async def _check_history(self, channels: list[Channel]) -> None:
        """What the model saw: the bot's own mentions removed, others readable, null bytes gone."""
        histories = [await self.harness.history.get(Conversation(c.id, c.guild_id)) for c in channels]
        stored = {turn.text for history in histories for turn in history if turn.role == "user"}
        for case in self.cases:
            if case.model_saw is not None:
                assert case.model_saw in stored, f"{case.name}: {case.model_saw!r} not in history"
        assert all("\x00" not in text for text in stored)
        assert not any(text in (EMPTY_REPLY_TEXT,) for text in stored)
        for channel, history in zip(channels, histories, strict=True):
            assert Turn("user", "") not in history, channel.name


@pytest.fixture
async def hostile(bot_factory: BotFactory) -> Hostile:
    return Hostile(await bot_factory(history_turns=500))  # keep every turn, to check what the model saw


async def test_a_mention_with_nothing_to_say_gets_the_hint(hostile: Hostile) -> None:
    h, fake, w, bot = hostile, hostile.fake, hostile.w, hostile.bot
    g, dm_bob, dm_carol = w.general, w.dm_with(w.member), w.dm_with(w.carol)
    await h.run("bare mention", HINT, fake.send(w.member, g, bot))
    await h.run("mention and whitespace", HINT, fake.send(w.member, g, f"{bot}   \n\t  \n "))
    await h.run("nickname mention only", HINT, fake.send(w.member, g, f"<@!{w.bot_user.id}>"))
    await h.run("mention and null bytes", HINT, fake.send(w.member, g, f"{bot} \x00\x00\x00"))
    await h.run("twice the bot", HINT, fake.send(w.member, g, f"{bot}{bot} {w.bot_role.mention}"))
    await h.run("thread: bare mention", HINT, fake.send(w.member, w.thread, bot))
    await h.run("DM: whitespace only", HINT, fake.send(w.member, dm_bob, " \n\t \n"))
    await h.run("DM: null bytes only", HINT, fake.send(w.member, dm_bob, "\x00\x00"))
    await h.run("DM: bare mention", HINT, fake.send(w.carol, dm_carol, bot))
    # The same places, with something said: a model reply.
    await h.run("thread: mention", REPLY, fake.mention(w.member, w.thread, "hello there"))
    await h.run("DM: plain", REPLY, fake.send(w.member, dm_bob, "hello there"), "hello there")
    await h.judge(cases=11)


async def test_unusual_characters_get_a_model_reply(hostile: Hostile) -> None:
    h, fake, w = hostile, hostile.fake, hostile.w
    g, dm_bob, dm_alice = w.general, w.dm_with(w.member), w.dm_with(w.admin)
    await h.run("only emoji", REPLY, fake.mention(w.member, g, "😀🔥👍🏽🇺🇳👨‍👩‍👧‍👦"), "😀🔥👍🏽🇺🇳👨‍👩‍👧‍👦")
    await h.run(
        "custom emoji",
        REPLY,
        fake.mention(w.member, g, "<:blobcat:123456789012345678> <a:party:98765432109876543>"),
        ":blobcat: :party:",
    )
    await h.run("zalgo", REPLY, fake.mention(w.member, g, ZALGO))
    await h.run("right to left", REPLY, fake.mention(w.member, g, RTL), RTL)
    await h.run("null bytes inside", REPLY, fake.mention(w.member, g, "hel\x00lo\x00 there"), "hello there")
    await h.run("zero-width only", REPLY, fake.mention(w.member, g, "\u200b\u200d\ufeff"))
    # Half an emoji (a lone UTF-16 surrogate): valid JSON, not valid text; the tokenizer and SQLite refuse it.
    await h.run(
        "lone surrogates",
        REPLY,
        fake.mention(w.member, g, "half \ud83d an emoji \udc00"),
        "half \ufffd an emoji \ufffd",
    )
    await h.run("control characters", REPLY, fake.mention(w.member, g, "\x1b[31mred\x1b[0m \x07 \x08 \r\n ok"))
    await h.run("DM: emoji only", REPLY, fake.send(w.member, dm_bob, "🙃🙃🙃"), "🙃🙃🙃")
    await h.run("DM: zalgo", REPLY, fake.send(w.admin, dm_alice, ZALGO))
    await h.run("DM: right to left", REPLY, fake.send(w.admin, dm_alice, RTL), RTL)
    await h.run("DM: lone surrogate only", REPLY, fake.send(w.member, dm_bob, "\ud83d"), "\ufffd")
    await h.judge(cases=12)


async def test_markup_and_special_tokens_get_a_model_reply(hostile: Hostile) -> None:
    h, fake, w = hostile, hostile.fake, hostile.w
    g, dm_bob, dm_alice = w.general, w.dm_with(w.member), w.dm_with(w.admin)
    await h.run("code block", REPLY, fake.mention(w.member, g, CODE))
    await h.run("markdown links", REPLY, fake.mention(w.member, g, MARKDOWN))
    await h.run("special tokens", REPLY, fake.mention(w.member, g, "</s><s><pad><unk><mask> __end__ __start__"))
    await h.run("DM: code block", REPLY, fake.send(w.admin, dm_alice, CODE))
    await h.run("DM: markdown", REPLY, fake.send(w.member, dm_bob, MARKDOWN))
    await h.judge(cases=5)


async def test_the_longest_messages_get_a_model_reply_that_fits(hostile: Hostile) -> None:
    h, fake, w, bot = hostile, hostile.fake, hostile.w, hostile.bot
    g, dm_carol = w.general, w.dm_with(w.carol)
    await h.run(
        "4000 characters (Nitro)", REPLY, fake.send(w.member, g, (f"{bot} " + "hello there " * 400)[:4000], nitro=True)
    )
    await h.run(
        "4000 characters, no spaces", REPLY, fake.send(w.member, g, f"{bot} " + "x" * (4000 - len(bot) - 1), nitro=True)
    )
    await h.run("DM: 4000 characters", REPLY, fake.send(w.carol, dm_carol, "🙂" * 4000, nitro=True))
    await h.judge(cases=3)  # it checks that every post fits in 2000 characters


async def test_mentions_reach_the_model_readable_and_never_ping(hostile: Hostile) -> None:
    h, fake, w, bot = hostile, hostile.fake, hostile.w, hostile.bot
    g, dm_carol, dm_owner = w.general, w.dm_with(w.carol), w.dm_with(w.owner)
    await h.run(
        "@everyone and @here with the bot",
        REPLY,
        fake.send(w.owner, g, f"{bot} @everyone @here wake up"),
        "@everyone @here wake up",
    )
    await h.run("@everyone without the bot", SILENT, fake.send(w.owner, g, "@everyone @here meeting now"))
    await h.run(
        "role and user mentions",
        REPLY,
        fake.send(w.member, g, f"{bot} tell {w.fans_role.mention} and {w.admin.mention} hi"),
        "tell @Fans and @Alice hi",
    )
    await h.run(
        "unknown user and role and channel",
        REPLY,
        fake.mention(
            w.member, g, f"<@123456789012345678> <@&123456789012345678> <#123456789012345678> {w.random.mention}"
        ),
        "@someone @role #channel #random",
    )
    await h.run("DM: mention of the bot", REPLY, fake.send(w.carol, dm_carol, f"{bot} hello there"), "hello there")
    await h.run("DM: @everyone", REPLY, fake.send(w.owner, dm_owner, "@everyone @here hi"), "@everyone @here hi")
    await h.judge(cases=6)


async def test_an_attachment_without_text_gets_the_notice(hostile: Hostile) -> None:
    h, fake, w, bot = hostile, hostile.fake, hostile.w, hostile.bot
    g, dm_bob = w.general, w.dm_with(w.member)
    await h.run("attachment, no text", ATTACHMENT, fake.send(w.member, g, bot, attachments=[fake.attachment()]))
    await h.run(
        "DM: attachment, no text", ATTACHMENT, fake.send(w.member, dm_bob, "", attachments=[fake.attachment("a.pdf")])
    )
    await h.run(
        "DM: attachment with text",
        REPLY,
        fake.send(w.member, dm_bob, "look at this", attachments=[fake.attachment()]),
        "look at this",
    )
    await h.judge(cases=3)


async def test_messages_not_meant_for_the_bot_get_silence(hostile: Hostile) -> None:
    h, fake, w, bot = hostile, hostile.fake, hostile.w, hostile.bot
    g = w.general
    await h.run("no mention at all", SILENT, fake.send(w.member, g, "just talking to my friends here"))
    await h.run("another bot mentions it", SILENT, fake.send(w.other_bot, g, f"{bot} hello bot to bot"))
    await h.run("a webhook mentions it", SILENT, fake.send(w.member, g, f"{bot} hello", webhook=True))
    await h.run(
        "system message with a mention", SILENT, fake.send(w.member, g, f"{bot} pinned a message", message_type=6)
    )
    await h.judge(cases=4)


async def test_edits_are_never_answered(hostile: Hostile) -> None:
    """An edit is never answered, even one that adds the mention. (An edit that reaches the bot before
    its handler for the original has run is seen by that handler, as discord.py updates the cached
    message in place: the one answer is then to the edited text.)"""
    h, fake, w, bot = hostile, hostile.fake, hostile.w, hostile.bot
    g, dm_owner = w.general, w.dm_with(w.owner)
    plain = await h.run("written without a mention", SILENT, fake.send(w.member, g, "hello everyone"))
    assert plain is not None
    await h.settle(g)
    await h.run("edited to add the mention", EDIT, fake.edit(plain, f"{bot} hello everyone"))
    answered = await h.run("answered, then edited", REPLY, fake.mention(w.member, g, "hello there"))
    assert answered is not None
    await h.run("the edit of an answered message", EDIT, fake.edit(answered, f"{bot} what about pets"))
    dm_edit = await h.run("DM: answered, then edited", REPLY, fake.send(w.owner, dm_owner, "tell me a story"))
    assert dm_edit is not None
    await h.run("DM: the edit", EDIT, fake.edit(dm_edit, "tell me a different story"))
    await h.judge(cases=6)


async def test_replies_to_the_bot_are_answered_and_replies_to_people_are_not(hostile: Hostile) -> None:
    h, fake, w, bot = hostile, hostile.fake, hostile.w, hostile.bot
    g, dm_owner = w.general, w.dm_with(w.owner)
    first = await h.run("start of a reply chain", REPLY, fake.mention(w.carol, g, "do you have any pets"))
    assert first is not None
    answer = await fake.wait_reply(first)
    second = await h.run("reply to the bot (ping on)", REPLY, fake.send(w.carol, g, "what kind", reply_to=answer))
    assert second is not None
    answer2 = await fake.wait_reply(second)
    await h.run(
        "reply to the bot that also mentions it",
        REPLY,
        fake.send(w.carol, g, f"{bot} and {bot} again?", reply_to=answer2),
        "and again?",
    )
    await h.run(
        "reply to the bot, ping off",
        REPLY,
        fake.send(w.carol, g, "never mind", reply_to=answer2, ping_author=False),
        "never mind",
    )
    await h.run("reply to a person, not the bot", SILENT, fake.send(w.member, g, "same here", reply_to=first))
    dm_first = await h.run("DM: start", REPLY, fake.send(w.owner, dm_owner, "what do you like to do for fun"))
    assert dm_first is not None
    dm_answer = await fake.wait_reply(dm_first)
    await h.run("DM: reply to the bot", REPLY, fake.send(w.owner, dm_owner, "me too", reply_to=dm_answer), "me too")
    await h.run(
        "DM: reply to the bot, ping off",
        REPLY,
        fake.send(w.owner, dm_owner, "and also", reply_to=dm_answer, ping_author=False),
        "and also",
    )
    await h.judge(cases=8)


async def test_messages_deleted_around_the_answer_still_get_one(hostile: Hostile) -> None:
    h, fake, w, bot = hostile, hostile.fake, hostile.w, hostile.bot
    g = w.general
    deleted_chan = await fake.add_text_channel("deleted-before-answer")
    # The bot's answer was deleted by a moderator; a reply to it arrives with referenced_message null.
    doomed = await h.run("to be answered then deleted", REPLY, fake.mention(w.carol, g, "tell me about space"))
    assert doomed is not None
    doomed_answer = await fake.wait_reply(doomed)
    await fake.delete(doomed_answer)
    await h.run("reply to a deleted message", REPLY, fake.send(w.carol, g, "why did it vanish", reply_to=doomed_answer))
    # The user's own message is gone before the bot answers: the answer is posted without a reference.
    gone = await h.run(
        "deleted before the answer", UNREFERENCED, fake.send(w.member, deleted_chan, f"{bot} hello there", store=False)
    )
    assert gone is not None
    await fake.delete(gone)
    await h.judge(cases=3)
