"""End to end: replies streamed into Discord, posted early and edited as the model writes them.

Long, slow or failing answers come from a `ScriptedEngine` that reports its answer word by word
(the tiny model's replies are a few tokens); the real engine streams too where it decodes greedily.
The `bot_factory` fixture also fails a test on any edit or post that could ping someone.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from bot.client.streaming import CUT_OFF_NOTE, EDIT_INTERVAL_SECONDS, split_message
from bot.core.types import Conversation, Turn
from tests.fake_discord import BotFactory, BotHarness, FakeDiscord
from tests.fake_discord.harness import quiet
from tests.scripted_engine import ScriptedEngine


def conversation(channel: Any) -> Conversation:
    return Conversation(channel.id, channel.guild_id)


def streaming_engine(answer: str | None, word_delay: float) -> ScriptedEngine:
    engine = ScriptedEngine()
    engine.can_stream = engine.stream_words = True
    engine.answer = answer
    engine.word_delay = word_delay
    return engine


async def finished(harness: BotHarness) -> None:
    """Wait until the bot has no message handler left: every reply is completely posted and edited."""
    assert await harness.bot.wait_idle(15), "a reply was still being written after 15s"


def assert_spaced(fake: FakeDiscord, messages: list[dict[str, Any]]) -> None:
    """Each message was written (posted, then edited) at most once per interval."""
    for message in messages:
        times = fake.writes_to(message)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(gap >= EDIT_INTERVAL_SECONDS - 1e-3 for gap in gaps), (message["id"], gaps)


async def test_a_long_reply_is_posted_early_edited_as_written_and_continued_past_2000(
    bot_factory: BotFactory,
) -> None:
    # About 3600 characters in 700 words, 4 ms or more apart: past 2000 characters after about 1.5 s,
    # and the last 1600 characters (315 words) take over 1.2 s more, so the second message is posted
    # and then edited at least once before the end.
    story = " ".join(f"This is sentence number {i} of a rather long story." for i in range(70))
    engine = streaming_engine(story, word_delay=0.004)
    harness = await bot_factory(engine=engine)
    fake, w = harness.fake, harness.fake.world
    message = await fake.mention(w.member, w.general, "tell me a story")
    first = await fake.wait_reply(message)
    await finished(harness)

    # Posted as soon as the first sentence was there, long before the story was complete...
    first_post = fake.message_posts(w.general)[0]
    assert first_post.json["content"].startswith("This is sentence number 0 of a rather long story.")
    assert len(first_post.json["content"]) < 500
    assert str(first_post.json["message_reference"]["message_id"]) == message["id"]
    # ...then edited as it grew, each edit extending the one before, at most once per 1.2 s.
    pieces = fake.messages_by_bot(w.general)
    assert len(pieces) == 2
    assert pieces[0] is first
    edits = fake.edits_of(first)
    assert len(edits) >= 2
    shown = [first_post.json["content"]] + [e["content"] for e in edits]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(shown))
    assert_spaced(fake, pieces)
    # Past 2000 characters the first message was finished and the story went on in a second one, which
    # was itself edited; only the first is a reply.
    assert all(0 < len(p["content"]) <= 2000 for p in pieces)
    assert "message_reference" not in pieces[1]
    assert fake.edits_of(pieces[1]), "the second message was posted before the story ended"
    # The end: exactly what the history keeps, cut where split_message cuts it.
    stored = await harness.history.get(conversation(w.general))
    assert stored == [Turn("user", "tell me a story", speaker="Bob"), Turn("bot", story)]
    assert [p["content"] for p in pieces] == split_message(story)
    # The typing indicator was up at every edit: put back right after each post, which hides it.
    for edit in fake.edits_of(pieces[0]) + fake.edits_of(pieces[1]):
        assert fake.typing_shown(w.general, edit["time"]), edit
    assert all(quiet(e["allowed_mentions"]) for e in fake.bot_edits)
    assert all(call.status == 200 for call in fake.message_posts() + fake.message_edits())


async def test_a_reply_that_fails_midway_is_marked_cut_off(bot_factory: BotFactory) -> None:
    engine = streaming_engine("Let me think about that for a moment. " + "word " * 40, word_delay=0.02)
    engine.fail, engine.fail_after_words = RuntimeError("the model fell over"), 20
    harness = await bot_factory(engine=engine)
    harness.allowed_error_logs = lambda record: record.name.startswith("bot.")
    fake, w = harness.fake, harness.fake.world
    message = await fake.mention(w.member, w.general, "a question")
    reply = await fake.wait_reply(message)
    await finished(harness)

    partial = " ".join(engine.answer.split(" ")[:20])  # type: ignore[union-attr]
    assert fake.messages_by_bot(w.general) == [reply]  # no separate notice
    assert reply["content"] == partial + CUT_OFF_NOTE
    assert fake.edits_of(reply)[-1]["content"] == reply["content"]
    assert_spaced(fake, [reply])
    assert await harness.history.get(conversation(w.general)) == []  # an unfinished answer is not history


async def test_replies_in_one_channel_stay_in_order_while_streamed(bot_factory: BotFactory) -> None:
    harness = await bot_factory(engine=streaming_engine(None, word_delay=0.03))  # answers "re: <message>"
    fake, w = harness.fake, harness.fake.world
    long_text = "Tell me a story. " + " ".join(["please"] * 25)
    first = await fake.mention(w.member, w.general, long_text)
    second = await fake.mention(w.carol, w.general, "And then? Go on.")
    reply2 = await fake.wait_reply(second)
    await finished(harness)

    reply1 = fake.messages_by_bot(w.general)[0]
    assert reply1["message_reference"]["message_id"] == first["id"]
    assert reply1["content"] == "re: " + long_text and fake.edits_of(reply1)
    # The second reply was not posted until the first had its last edit of its text (the edit that takes
    # its Regenerate button off, once the second is finished, carries no buttons).
    text_writes = [reply1["posted_at"]] + [e["time"] for e in fake.edits_of(reply1) if e["components"]]
    assert reply2["posted_at"] > text_writes[-1]
    assert reply2["content"] == "re: And then? Go on."


async def test_the_real_model_streams_when_it_decodes_greedily(bot_factory: BotFactory, long_model_dir: Path) -> None:
    harness = await bot_factory(model_dir=long_model_dir)  # greedy, 1000 tokens
    assert harness.chat.can_stream
    fake, w = harness.fake, harness.fake.world
    message = await fake.mention(w.member, w.general, "hello there")
    await fake.wait_reply(message, timeout=60)
    await finished(harness)
    full = (await harness.history.get(conversation(w.general)))[-1].text
    pieces = fake.messages_by_bot(w.general)
    assert [p["content"] for p in pieces] == split_message(full)
    assert_spaced(fake, pieces)
    assert all(call.status == 200 for call in fake.message_posts() + fake.message_edits())


@pytest.mark.parametrize("why", ["STREAM_REPLIES=false", "beam search"])
async def test_without_streaming_a_reply_is_one_post_and_no_edit(bot_factory: BotFactory, why: str) -> None:
    if why == "beam search":
        harness = await bot_factory()  # the tiny model searches with 2 beams, which cannot stream
    else:
        engine = streaming_engine("First sentence here. " + "word " * 60, word_delay=0.005)
        harness = await bot_factory(engine=engine, stream_replies=False)
    assert harness.settings.stream_replies is (why != "STREAM_REPLIES=false")
    assert harness.chat.can_stream is (why != "beam search")
    fake, w = harness.fake, harness.fake.world
    message = await fake.mention(w.member, w.general, "hello there")
    reply = await fake.wait_reply(message)
    await finished(harness)
    assert fake.messages_by_bot(w.general) == [reply]
    assert fake.message_edits() == []
    assert reply["content"] == (await harness.history.get(conversation(w.general)))[-1].text.strip()
    typing = fake.typing_calls(w.general)
    assert len(typing) == 1 and typing[0].time <= reply["posted_at"]
