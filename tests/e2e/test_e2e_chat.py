"""End to end: the real ChatBot, logged in to a fake Discord on loopback, answering people.

Each test starts the bot (services built as `run_discord` builds them, the tiny random Blenderbot
at fp32 on the CPU, so replies are reproducible and depend on their input), plays users by pushing
gateway events, and checks what the bot does over REST. At teardown the `bot_factory` fixture also
fails the test on unexpected error logs, REST calls Discord would refuse, and any post whose
allowed_mentions could ping someone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.core.outcomes import CLOSING_TEXT, ERROR_TEXT
from bot.core.types import Conversation, Turn
from bot.engine.seq2seq import Seq2SeqRunner
from cogs.chat import ATTACHMENT_ONLY_TEXT, COOLDOWN_TEXT, EMPTY_MENTION_TEXT
from tests.fake_discord import QUIET, BotFactory, BotHarness, FakeDiscord


def conversation(channel) -> Conversation:  # type: ignore[no-untyped-def]
    return Conversation(channel.id, channel.guild_id)


async def settle(fake: FakeDiscord, channel) -> dict:  # type: ignore[no-untyped-def]
    """A barrier: Carol asks something in `channel` and we wait for that answer.

    The gateway delivers events in order and a conversation is answered in order, so once the
    probe's answer is posted, anything the bot was going to say about earlier messages has been
    said. Returns the probe message.
    """
    probe = await fake.send(fake.world.carol, channel, f"{fake.world.bot_user.mention} are you there")
    await fake.wait_reply(probe)
    return probe


async def test_mention_in_channel_gets_a_reply_after_typing(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    message = await fake.mention(w.member, w.general, "hello there")
    reply = await fake.wait_reply(message)

    assert reply["channel_id"] == str(w.general.id)
    assert reply["type"] == 19
    assert reply["message_reference"]["message_id"] == message["id"]
    # The model saw the text without the mention, and the bot posted what the model wrote.
    assert reply["content"] == await harness.engine.reply([Turn("user", "hello there")])
    assert reply["content"].strip()

    typing = fake.typing_calls(w.general)
    post = fake.message_posts(w.general)[0]
    assert typing and typing[0].time <= post.time
    assert post.json["allowed_mentions"] == QUIET
    assert post.json["message_reference"]["fail_if_not_exists"] is False
    assert await harness.history.get(conversation(w.general)) == [
        Turn("user", "hello there", speaker="Bob"),  # in a server, who said it is kept
        Turn("bot", reply["content"]),
    ]

    # Discord echoes the bot's own message back over the gateway; the bot must not answer itself.
    probe = await settle(fake, w.general)
    answered = [m["message_reference"]["message_id"] for m in fake.messages_by_bot(w.general)]
    assert answered == [message["id"], probe["id"]]


async def test_mention_inside_a_thread_is_answered_in_the_thread(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    message = await fake.mention(w.member, w.thread, "do you have any pets")
    reply = await fake.wait_reply(message)
    assert reply["channel_id"] == str(w.thread.id)
    assert fake.typing_calls(w.thread)
    assert len(await harness.history.get(conversation(w.thread))) == 2
    assert await harness.history.get(conversation(w.general)) == []  # the parent channel is another conversation


async def test_dm_is_answered_without_a_mention(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    dm = w.dm_with(w.member)
    message = await fake.send(w.member, dm, "hello there")
    reply = await fake.wait_reply(message)
    assert reply["channel_id"] == str(dm.id)
    assert "guild_id" not in reply
    assert reply["content"] == await harness.engine.reply([Turn("user", "hello there")])
    assert fake.typing_calls(dm)
    assert await harness.history.get(Conversation(dm.id)) == [
        Turn("user", "hello there"),
        Turn("bot", reply["content"]),
    ]


async def test_silence_without_mention_and_for_bots_and_webhooks(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    bot_mention = w.bot_user.mention
    await fake.send(w.member, w.general, "hello there, just chatting with friends")
    await fake.send(w.other_bot, w.general, f"{bot_mention} hello from another bot")
    await fake.send(w.member, w.general, f"{bot_mention} hello from a webhook", webhook=True)
    await fake.send(w.member, w.general, f"{w.member.mention} talking to myself")

    probe = await settle(fake, w.general)
    answered = [m["message_reference"]["message_id"] for m in fake.messages_by_bot(w.general)]
    assert answered == [probe["id"]]
    assert len(fake.typing_calls(w.general)) == 1
    assert len(await harness.history.get(conversation(w.general))) == 2  # only the probe and its answer


async def test_mention_of_the_bots_managed_role_works_and_is_stripped(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    message = await fake.send(w.member, w.general, f"{w.bot_role.mention} hello there")
    reply = await fake.wait_reply(message)
    assert reply["content"] == await harness.engine.reply([Turn("user", "hello there")])
    assert (await harness.history.get(conversation(w.general)))[0] == Turn("user", "hello there", speaker="Bob")


async def test_a_bare_mention_gets_a_hint(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    message = await fake.send(w.member, w.general, w.bot_user.mention)
    reply = await fake.wait_reply(message)
    assert reply["content"] == EMPTY_MENTION_TEXT
    assert await harness.history.get(conversation(w.general)) == []


async def test_history_is_per_channel_and_replies_are_reproducible(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    a, b, c, d = [await fake.add_text_channel(name) for name in ("chan-a", "chan-b", "chan-c", "chan-d")]
    first, second = "hello there", "what do you like to do for fun"

    a1 = await fake.ask(w.member, a, first)
    b1 = await fake.ask(w.carol, b, second)  # B starts while A has history
    a2 = await fake.ask(w.member, a, second)
    b2 = await fake.ask(w.carol, b, first)

    # The same messages in two fresh channels give the same replies...
    c1, c2 = await fake.ask(w.admin, c, first), await fake.ask(w.admin, c, second)
    d1, d2 = await fake.ask(w.member, d, first), await fake.ask(w.member, d, second)
    assert (c1, c2) == (d1, d2) == (a1, a2)
    # ...and the conversation in A did not leak into B: B's replies are a fresh channel's replies.
    fresh = await fake.add_text_channel("fresh")
    assert b1 == await fake.ask(w.admin, fresh, second)
    # History does change replies (otherwise this test would prove nothing)...
    assert a2 != b1
    # ...and B's second reply saw B's own history, nothing of A's.
    assert b2 == await harness.engine.reply([Turn("user", second), Turn("bot", b1), Turn("user", first)])
    assert len(await harness.history.get(conversation(a))) == 4


async def test_nothing_the_bot_posts_can_ping(harness: BotHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    fake, w = harness.fake, harness.fake.world
    # The owner may ping @everyone, so Discord marks their message mention_everyone.
    message = await fake.send(
        w.owner, w.general, f"{w.bot_user.mention} hi @everyone and {w.fans_role.mention} and {w.admin.mention}"
    )
    assert message["mention_everyone"] is True
    reply = await fake.wait_reply(message)
    assert (await harness.history.get(conversation(w.general)))[0] == Turn(
        "user", "hi @everyone and @Fans and @Alice", speaker="The Owner"
    )

    # Even if the model itself writes every kind of mention, nobody is notified.
    loud = f"@everyone @here {w.fans_role.mention} {w.admin.mention} {w.member.mention}"

    async def loud_reply(history: object, on_partial: object = None, **options: object) -> str:
        return loud

    monkeypatch.setattr(harness.engine, "reply", loud_reply)
    message2 = await fake.mention(w.member, w.general, "say something loud")
    reply2 = await fake.wait_reply(message2)
    assert reply2["content"] == loud  # posted as written, just without pings

    for posted in fake.messages_by_bot(w.general):
        assert posted["pings"] == {"users": [], "roles": [], "everyone": False}, posted["content"]
    assert reply["pings"] == reply2["pings"] == {"users": [], "roles": [], "everyone": False}
    for call in fake.message_posts():
        assert call.json["allowed_mentions"] == {"parse": [], "replied_user": False}


async def test_a_long_reply_arrives_split(bot_factory: BotFactory, long_model_dir: Path) -> None:
    harness = await bot_factory(model_dir=long_model_dir, stream_replies=False)  # streamed: test_e2e_streaming.py
    fake, w = harness.fake, harness.fake.world
    message = await fake.mention(w.member, w.general, "hello there")
    first = await fake.wait_reply(message, timeout=60)
    history = await harness.history.get(conversation(w.general))
    full = history[-1].text
    assert len(full) > 2000
    squash = re.compile(r"\s+")
    target = squash.sub("", full)
    await fake.wait_for(
        lambda: squash.sub("", "".join(m["content"] for m in fake.messages_by_bot(w.general))) == target,
        what="every piece of the long reply",
    )
    pieces = fake.messages_by_bot(w.general)
    assert len(pieces) >= 2
    assert pieces[0] == first
    assert all(0 < len(p["content"]) <= 2000 for p in pieces)
    assert all("message_reference" not in p for p in pieces[1:])  # only the first piece is a reply
    assert all(call.status == 200 for call in fake.message_posts(w.general))


async def test_engine_failure_gives_a_short_apology(harness: BotHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    fake, w = harness.fake, harness.fake.world

    def broken_step(self: object, *args: object, **kwargs: object) -> object:
        raise RuntimeError("Traceback (most recent call last): CUDA error: device-side assert triggered")

    harness.allowed_error_logs = lambda record: record.name.startswith("bot.")
    with monkeypatch.context() as patch:
        patch.setattr(Seq2SeqRunner, "step", broken_step)
        reply = await fake.ask(w.member, w.general, "hello there")
    assert reply == ERROR_TEXT
    assert "Traceback" not in reply and "CUDA" not in reply and "Error" not in reply
    assert len(reply) < 200
    assert await harness.history.get(conversation(w.general)) == []  # an apology is not history
    assert any(r.name.startswith("bot.") for r in harness.errors.records)  # but the failure is logged

    # Once the model works again, so does the bot.
    expected = await harness.engine.reply([Turn("user", "hello there")])
    assert await fake.ask(w.member, w.general, "hello there") == expected


async def test_a_channel_where_the_bot_may_not_post_is_not_fatal(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    harness.allowed_failed_calls = lambda call: call.status == 403 and str(w.announcements.id) in call.path
    await fake.mention(w.member, w.announcements, "hello there")
    await fake.wait_for(lambda: fake.message_posts(w.announcements), what="the bot to try to post")
    assert [c.status for c in fake.message_posts(w.announcements)] == [403]
    assert [c.status for c in fake.typing_calls(w.announcements)] == [403]
    assert await fake.ask(w.member, w.general, "hello there")  # still answering elsewhere


async def test_replying_to_the_bot_continues_the_conversation(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    first = await fake.mention(w.member, w.general, "hello there")
    answer = await fake.wait_reply(first)
    # A reply that pings the bot is addressed to it, even without writing the mention...
    follow_up = await fake.send(w.member, w.general, "what do you like to do for fun", reply_to=answer)
    assert follow_up["referenced_message"]["id"] == answer["id"]  # Discord sends the replied-to message along
    reply = await fake.wait_reply(follow_up)
    turns = await harness.history.get(conversation(w.general))
    assert turns[2] == Turn("user", "what do you like to do for fun", speaker="Bob")
    assert reply["content"] == await harness.engine.reply(turns[:3])
    # ...and so is one with the ping switched off (Discord lets the replier turn it off).
    quiet = await fake.send(w.carol, w.general, "do you have any pets", reply_to=reply, ping_author=False)
    assert all(u["id"] != str(w.bot_user.id) for u in quiet["mentions"])
    quiet_reply = await fake.wait_reply(quiet)
    turns = await harness.history.get(conversation(w.general))
    assert turns[4:] == [Turn("user", "do you have any pets", speaker="Carol"), Turn("bot", quiet_reply["content"])]
    # A reply to somebody else's message, without a mention, is not for the bot.
    await fake.send(w.carol, w.general, "same here", reply_to=first, ping_author=False)
    await fake.send(w.carol, w.general, "me too", reply_to=quiet)  # pings Carol herself, not the bot
    probe = await settle(fake, w.general)
    answered = [m["message_reference"]["message_id"] for m in fake.messages_by_bot(w.general)]
    assert answered == [first["id"], follow_up["id"], quiet["id"], probe["id"]]


async def test_a_reply_to_the_bot_is_recognised_without_the_bots_message_cache(harness: BotHarness) -> None:
    """After a restart discord.py's message cache is empty; the `referenced_message` Discord sends is enough."""
    fake, w = harness.fake, harness.fake.world
    first = await fake.mention(w.member, w.general, "hello there")
    answer = await fake.wait_reply(first)
    harness.bot._connection._messages.clear()  # type: ignore[union-attr]
    follow_up = await fake.send(w.member, w.general, "do you have any pets", reply_to=answer, ping_author=False)
    assert (await fake.wait_reply(follow_up))["content"]


async def test_messages_in_one_channel_are_answered_in_order(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    # Sent back to back, before the first is answered.
    first = await fake.mention(w.member, w.general, "hello there")
    second = await fake.mention(w.carol, w.general, "do you have any pets")
    reply2 = await fake.wait_reply(second)
    reply1 = await fake.wait_reply(first)
    posts = fake.messages_by_bot(w.general)
    assert posts.index(reply1) < posts.index(reply2)
    turns = [Turn("user", "hello there"), Turn("bot", reply1["content"]), Turn("user", "do you have any pets")]
    assert reply2["content"] == await harness.engine.reply(turns)  # the second saw the first's answer


async def test_channels_answered_concurrently_get_the_same_replies(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    texts = ["hello there", "do you have any pets", "what do you like to do for fun", "tell me about space"]
    channels = [await fake.add_text_channel(f"busy-{i}") for i in range(len(texts))]
    # All at once: the engine may batch them.
    messages = [await fake.mention(w.member, c, t) for c, t in zip(channels, texts, strict=True)]
    replies = [(await fake.wait_reply(m))["content"] for m in messages]
    # One at a time, in fresh channels.
    for text, reply in zip(texts, replies, strict=True):
        assert await fake.ask(w.carol, await fake.add_text_channel("calm"), text) == reply


async def test_cooldown_warns_once_then_stays_quiet(bot_factory: BotFactory) -> None:
    harness = await bot_factory(user_cooldown_seconds=60)
    fake, w = harness.fake, harness.fake.world
    assert await fake.ask(w.member, w.general, "hello there")
    too_soon = await fake.mention(w.member, w.general, "do you have any pets")
    notice = await fake.wait_reply(too_soon)
    assert notice["content"] == COOLDOWN_TEXT.format(seconds=60)
    await fake.mention(w.member, w.general, "are you ignoring me")
    probe = await settle(fake, w.general)  # Carol has her own cooldown
    answered = [m["message_reference"]["message_id"] for m in fake.messages_by_bot(w.general)]
    assert len(answered) == 3 and answered[1:] == [too_soon["id"], probe["id"]]
    assert len(await harness.history.get(conversation(w.general))) == 4  # only answered messages are history


async def test_an_attachment_without_text_gets_an_explanation(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    message = await fake.send(w.member, w.general, w.bot_user.mention, attachments=[fake.attachment()])
    assert (await fake.wait_reply(message))["content"] == ATTACHMENT_ONLY_TEXT


async def test_while_shutting_down_new_messages_are_told_so(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    harness.bot.stop_accepting()  # what run_discord does first on SIGTERM
    assert await fake.ask(w.member, w.general, "hello there") == CLOSING_TEXT
    assert await harness.history.get(conversation(w.general)) == []
