"""End to end: hostile and odd input, through the fake Discord, to the real bot.

Each case is a message (or an edit) a real person could produce. Every one must get either one
sensible answer (a model reply, or the hint for an empty mention or a bare attachment) or a
deliberate silence, and nothing the bot posts may ping anyone, carry a traceback, or be refused by
Discord. The `bot_factory` fixture fails the test at teardown on any error log, refused REST call
or loud post; this test also checks each answer's text.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bot.core.chat import BUSY_TEXT, CLOSING_TEXT, EMPTY_REPLY_TEXT, ERROR_TEXT, TIMEOUT_TEXT
from bot.core.types import Conversation, Turn
from cogs.chat import ATTACHMENT_ONLY_TEXT, EMPTY_MENTION_TEXT
from tests.fake_discord import BotFactory

REPLY, HINT, ATTACHMENT, SILENT, UNREFERENCED = "reply", "hint", "attachment", "silent", "unreferenced"
EDIT = "edit"  # silence: the edited message keeps the one answer (or none) its original got
NOT_AN_ANSWER = {BUSY_TEXT, CLOSING_TEXT, ERROR_TEXT, TIMEOUT_TEXT}

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


async def test_hostile_messages_get_an_answer_or_a_deliberate_silence(bot_factory: BotFactory) -> None:
    harness = await bot_factory(history_turns=500)  # keep every turn, to check what the model saw
    fake, w = harness.fake, harness.fake.world
    bot = w.bot_user.mention
    nick = f"<@!{w.bot_user.id}>"
    deleted_chan = await fake.add_text_channel("deleted-before-answer")
    dm_bob, dm_carol, dm_alice, dm_owner = (w.dm_with(u) for u in (w.member, w.carol, w.admin, w.owner))
    cases: list[Case] = []

    async def run(
        name: str, expect: str, send: Callable[[], Awaitable[dict[str, Any] | None]], model_saw: str | None = None
    ) -> dict[str, Any] | None:
        message = await send()
        case = Case(name, expect, message, model_saw)
        cases.append(case)
        if expect in (REPLY, HINT, ATTACHMENT) and message is not None:
            await fake.wait_reply(message, timeout=30)  # one at a time: in-order, deterministic history
        return message

    async def settle(channel: Any) -> None:
        """A barrier: once a later message in `channel` is answered, earlier ones have been handled."""
        probe = await fake.send(
            w.carol if channel.guild_id else channel.recipient,
            channel,
            f"{bot} are you there" if channel.guild_id else "are you there",
        )
        await fake.wait_reply(probe, timeout=30)

    # ----- in a server channel ------------------------------------------------------------------
    g = w.general
    await run("bare mention", HINT, lambda: fake.send(w.member, g, bot))
    await run("mention and whitespace", HINT, lambda: fake.send(w.member, g, f"{bot}   \n\t  \n "))
    await run("nickname mention only", HINT, lambda: fake.send(w.member, g, nick))
    await run("mention and null bytes", HINT, lambda: fake.send(w.member, g, f"{bot} \x00\x00\x00"))
    await run("twice the bot", HINT, lambda: fake.send(w.member, g, f"{bot}{bot} {w.bot_role.mention}"))
    await run("only emoji", REPLY, lambda: fake.mention(w.member, g, "😀🔥👍🏽🇺🇳👨‍👩‍👧‍👦"), "😀🔥👍🏽🇺🇳👨‍👩‍👧‍👦")
    await run(
        "custom emoji",
        REPLY,
        lambda: fake.mention(w.member, g, "<:blobcat:123456789012345678> <a:party:98765432109876543>"),
        ":blobcat: :party:",
    )
    await run(
        "4000 characters (Nitro)",
        REPLY,
        lambda: fake.send(w.member, g, (f"{bot} " + "hello there " * 400)[:4000], nitro=True),
    )
    await run(
        "4000 characters, no spaces",
        REPLY,
        lambda: fake.send(w.member, g, f"{bot} " + "x" * (4000 - len(bot) - 1), nitro=True),
    )
    await run("zalgo", REPLY, lambda: fake.mention(w.member, g, ZALGO))
    await run("right to left", REPLY, lambda: fake.mention(w.member, g, RTL), RTL)
    await run("null bytes inside", REPLY, lambda: fake.mention(w.member, g, "hel\x00lo\x00 there"), "hello there")
    await run("zero-width only", REPLY, lambda: fake.mention(w.member, g, "\u200b\u200d\ufeff"))
    await run("code block", REPLY, lambda: fake.mention(w.member, g, CODE))
    # Half an emoji (a lone UTF-16 surrogate): valid JSON, not valid text; the tokenizer and SQLite refuse it.
    await run(
        "lone surrogates",
        REPLY,
        lambda: fake.mention(w.member, g, "half \ud83d an emoji \udc00"),
        "half \ufffd an emoji \ufffd",
    )
    await run("markdown links", REPLY, lambda: fake.mention(w.member, g, MARKDOWN))
    await run("special tokens", REPLY, lambda: fake.mention(w.member, g, "</s><s><pad><unk><mask> __end__ __start__"))
    await run("control characters", REPLY, lambda: fake.mention(w.member, g, "\x1b[31mred\x1b[0m \x07 \x08 \r\n ok"))
    await run(
        "@everyone and @here with the bot",
        REPLY,
        lambda: fake.send(w.owner, g, f"{bot} @everyone @here wake up"),
        "@everyone @here wake up",
    )
    await run("@everyone without the bot", SILENT, lambda: fake.send(w.owner, g, "@everyone @here meeting now"))
    await run(
        "role and user mentions",
        REPLY,
        lambda: fake.send(w.member, g, f"{bot} tell {w.fans_role.mention} and {w.admin.mention} hi"),
        "tell @Fans and @Alice hi",
    )
    await run(
        "unknown user and role and channel",
        REPLY,
        lambda: fake.mention(
            w.member, g, f"<@123456789012345678> <@&123456789012345678> <#123456789012345678> {w.random.mention}"
        ),
        "@someone @role #channel #random",
    )
    await run("attachment, no text", ATTACHMENT, lambda: fake.send(w.member, g, bot, attachments=[fake.attachment()]))
    await run("no mention at all", SILENT, lambda: fake.send(w.member, g, "just talking to my friends here"))
    await run("another bot mentions it", SILENT, lambda: fake.send(w.other_bot, g, f"{bot} hello bot to bot"))
    await run("a webhook mentions it", SILENT, lambda: fake.send(w.member, g, f"{bot} hello", webhook=True))
    await run(
        "system message with a mention",
        SILENT,
        lambda: fake.send(w.member, g, f"{bot} pinned a message", message_type=6),
    )

    # Edited after sending: an edit is never answered, even one that adds the mention. (An edit that
    # reaches the bot before its handler for the original has run is seen by that handler, as
    # discord.py updates the cached message in place: the one answer is then to the edited text.)
    plain = await run("written without a mention", SILENT, lambda: fake.send(w.member, g, "hello everyone"))
    assert plain is not None
    await settle(g)
    await run("edited to add the mention", EDIT, lambda: fake.edit(plain, f"{bot} hello everyone"))
    answered = await run("answered, then edited", REPLY, lambda: fake.mention(w.member, g, "hello there"))
    assert answered is not None
    await run("the edit of an answered message", EDIT, lambda: fake.edit(answered, f"{bot} what about pets"))

    # Reply chains.
    first = await run("start of a reply chain", REPLY, lambda: fake.mention(w.carol, g, "do you have any pets"))
    assert first is not None
    answer = await fake.wait_reply(first)
    second = await run("reply to the bot (ping on)", REPLY, lambda: fake.send(w.carol, g, "what kind", reply_to=answer))
    assert second is not None
    answer2 = await fake.wait_reply(second)
    await run(
        "reply to the bot that also mentions it",
        REPLY,
        lambda: fake.send(w.carol, g, f"{bot} and {bot} again?", reply_to=answer2),
        "and again?",
    )
    await run(
        "reply to the bot, ping off",
        REPLY,
        lambda: fake.send(w.carol, g, "never mind", reply_to=answer2, ping_author=False),
        "never mind",
    )
    await run("reply to a person, not the bot", SILENT, lambda: fake.send(w.member, g, "same here", reply_to=first))
    # The bot's answer was deleted by a moderator; a reply to it arrives with referenced_message null.
    doomed = await run("to be answered then deleted", REPLY, lambda: fake.mention(w.carol, g, "tell me about space"))
    assert doomed is not None
    doomed_answer = await fake.wait_reply(doomed)
    await fake.delete(doomed_answer)
    await run(
        "reply to a deleted message", REPLY, lambda: fake.send(w.carol, g, "why did it vanish", reply_to=doomed_answer)
    )
    # The user's own message is gone before the bot answers: the answer is posted without a reference.
    await run(
        "deleted before the answer",
        UNREFERENCED,
        lambda: fake.send(w.member, deleted_chan, f"{bot} hello there", store=False),
    )
    await fake.delete(cases[-1].message)  # type: ignore[arg-type]

    # In a thread.
    await run("thread: bare mention", HINT, lambda: fake.send(w.member, w.thread, bot))
    await run("thread: mention", REPLY, lambda: fake.mention(w.member, w.thread, "hello there"))

    # ----- in DMs -------------------------------------------------------------------------------
    await run("DM: plain", REPLY, lambda: fake.send(w.member, dm_bob, "hello there"), "hello there")
    await run("DM: whitespace only", HINT, lambda: fake.send(w.member, dm_bob, " \n\t \n"))
    await run("DM: null bytes only", HINT, lambda: fake.send(w.member, dm_bob, "\x00\x00"))
    await run("DM: emoji only", REPLY, lambda: fake.send(w.member, dm_bob, "🙃🙃🙃"), "🙃🙃🙃")
    await run(
        "DM: attachment, no text",
        ATTACHMENT,
        lambda: fake.send(w.member, dm_bob, "", attachments=[fake.attachment("a.pdf")]),
    )
    await run(
        "DM: attachment with text",
        REPLY,
        lambda: fake.send(w.member, dm_bob, "look at this", attachments=[fake.attachment()]),
        "look at this",
    )
    await run(
        "DM: mention of the bot", REPLY, lambda: fake.send(w.carol, dm_carol, f"{bot} hello there"), "hello there"
    )
    await run("DM: bare mention", HINT, lambda: fake.send(w.carol, dm_carol, bot))
    await run("DM: 4000 characters", REPLY, lambda: fake.send(w.carol, dm_carol, "🙂" * 4000, nitro=True))
    await run("DM: zalgo", REPLY, lambda: fake.send(w.admin, dm_alice, ZALGO))
    await run("DM: right to left", REPLY, lambda: fake.send(w.admin, dm_alice, RTL), RTL)
    await run("DM: code block", REPLY, lambda: fake.send(w.admin, dm_alice, CODE))
    await run("DM: @everyone", REPLY, lambda: fake.send(w.owner, dm_owner, "@everyone @here hi"), "@everyone @here hi")
    dm_first = await run("DM: start", REPLY, lambda: fake.send(w.owner, dm_owner, "what do you like to do for fun"))
    assert dm_first is not None
    dm_answer = await fake.wait_reply(dm_first)
    await run(
        "DM: reply to the bot", REPLY, lambda: fake.send(w.owner, dm_owner, "me too", reply_to=dm_answer), "me too"
    )
    await run(
        "DM: reply to the bot, ping off",
        REPLY,
        lambda: fake.send(w.owner, dm_owner, "and also", reply_to=dm_answer, ping_author=False),
        "and also",
    )
    dm_edit = await run("DM: answered, then edited", REPLY, lambda: fake.send(w.owner, dm_owner, "tell me a story"))
    assert dm_edit is not None
    await run("DM: the edit", EDIT, lambda: fake.edit(dm_edit, "tell me a different story"))
    await run("DM: lone surrogate only", REPLY, lambda: fake.send(w.member, dm_bob, "\ud83d"), "\ufffd")
    await run("DM: markdown", REPLY, lambda: fake.send(w.member, dm_bob, MARKDOWN))

    # ----- settle, then judge ---------------------------------------------------------------------
    # Silences are only proven once later messages in the same conversations have been answered:
    # the gateway delivers in order and each conversation is answered in order.
    for channel in (g, w.thread, deleted_chan, dm_bob, dm_carol, dm_alice, dm_owner):
        await settle(channel)
    await fake.wait_for(
        lambda: any(m["channel_id"] == str(deleted_chan.id) for m in fake.bot_messages),
        what="the answer to the deleted message",
    )

    assert len(cases) >= 30
    replies_to: dict[str, list[dict[str, Any]]] = {}
    for posted in fake.bot_messages:
        ref = posted.get("message_reference")
        if ref:
            replies_to.setdefault(ref["message_id"], []).append(posted)
    problems: list[str] = []
    for case in cases:
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
            unreferenced = [m for m in fake.messages_by_bot(deleted_chan) if not m.get("message_reference")]
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

    for posted in fake.bot_messages:
        assert "Traceback" not in posted["content"] and "Error" not in posted["content"], posted["content"]
        assert 0 < len(posted["content"]) <= 2000
        assert posted["pings"] == {"users": [], "roles": [], "everyone": False}, posted["content"]

    # What the model saw: the bot's own mentions removed, others readable, null bytes gone.
    stored = {
        turn.text
        for channel in (g, w.thread, dm_bob, dm_carol, dm_alice, dm_owner)
        for turn in await harness.history.get(Conversation(channel.id, channel.guild_id))
        if turn.role == "user"
    }
    for case in cases:
        if case.model_saw is not None:
            assert case.model_saw in stored, f"{case.name}: {case.model_saw!r} not in history"
    assert all("\x00" not in text for text in stored)
    assert not any(text in (EMPTY_REPLY_TEXT,) for text in stored)
    assert Turn("user", "") not in await harness.history.get(Conversation(g.id, g.guild_id))
