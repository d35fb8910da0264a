"""End to end: conversations as people have them in Discord. Text files read into the question (and a
note for the others), the message a reply answers as context, and the Stop and Regenerate buttons
(who may press them, when they go away, a press after a restart).

The answers come from a `ScriptedEngine`, which records what it was asked; the fake Discord serves the
attachments on loopback and plays the button presses (type 3 interactions).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bot.client.reply_buttons import EXPIRED_TEXT, NOT_YOURS_TEXT
from bot.core.types import Conversation, Turn
from cogs.chat import ATTACHMENT_ONLY_TEXT
from tests.fake_discord import BotFactory, BotHarness, FakeDiscord
from tests.scripted_engine import ScriptedEngine

EPHEMERAL = 1 << 6


def conversation(channel: Any) -> Conversation:
    return Conversation(channel.id, channel.guild_id)


async def started(bot_factory: BotFactory, **settings: Any) -> tuple[BotHarness, ScriptedEngine]:
    engine = ScriptedEngine()
    return await bot_factory(engine=engine, **settings), engine


def regen_id(fake: FakeDiscord, question: dict[str, Any]) -> str:
    return f"regen:{question['author']['id']}:{question['id']}"


def stop_id(question: dict[str, Any]) -> str:
    return f"stop:{question['author']['id']}:{question['id']}"


async def response_to(fake: FakeDiscord, interaction: Any) -> dict[str, Any]:
    found = await fake.wait_for(lambda: interaction.response, what=f"an answer to pressing {interaction.name}")
    assert found is not None
    return found


# ----- files ----------------------------------------------------------------------------------


async def test_a_text_file_is_read_into_the_question(bot_factory: BotFactory) -> None:
    harness, engine = await started(bot_factory)
    fake, w = harness.fake, harness.fake.world
    code = fake.attachment(
        "adder.py", content=b"def add(a, b):\n    return a + b\n", content_type="text/x-python; charset=utf-8"
    )
    table = fake.attachment("prices.csv", content=b"\xef\xbb\xbfitem,price\ntea,3\n", content_type="text/csv")
    message = await fake.send(
        w.member, w.general, f"{w.bot_user.mention} what does this do?", attachments=[code, table]
    )
    reply = await fake.wait_reply(message)
    asked = engine.seen[-1][-1].text
    assert 'attached file "adder.py"' in asked and "return a + b" in asked
    assert 'attached file "prices.csv"' in asked and "tea,3" in asked and "\ufeff" not in asked
    assert asked.endswith("what does this do?")  # the question last: a cut prompt keeps its end
    assert reply["content"] == "re: " + asked
    assert sorted(fake.rest.file_requests) == sorted([int(code["id"]), int(table["id"])])
    history = await harness.history.get(conversation(w.general))
    assert history[0] == Turn("user", asked, "Bob")  # the file stays in the conversation


async def test_a_text_file_alone_is_answered(bot_factory: BotFactory) -> None:
    harness, engine = await started(bot_factory)
    fake, w = harness.fake, harness.fake.world
    notes = fake.attachment("notes.md", content=b"# Plan\n- buy milk\n")  # no content type: the name says text
    message = await fake.send(w.member, w.general, w.bot_user.mention, attachments=[notes])
    reply = await fake.wait_reply(message)
    assert reply["content"] != ATTACHMENT_ONLY_TEXT
    assert engine.seen and "- buy milk" in engine.seen[-1][-1].text


async def test_binary_too_large_and_slow_files_get_a_note(bot_factory: BotFactory) -> None:
    harness, engine = await started(bot_factory, attachment_max_bytes=1000, attachment_timeout_seconds=0.5)
    fake, w = harness.fake, harness.fake.world
    picture = fake.attachment("cat.png")
    big = fake.attachment("big.log", content=b"x" * 5000, content_type="text/plain")
    liar = fake.attachment("small.txt", size=10, content=b"y" * 5000, content_type="text/plain")
    binary = fake.attachment("data.txt", content=b"\x00\x01\x02binary", content_type="text/plain")
    slow = fake.attachment("slow.txt", content=b"late", content_type="text/plain", delay=3.0)
    good = fake.attachment("ok.txt", content=b"fine words", content_type="text/plain")
    message = await fake.send(
        w.member, w.general, f"{w.bot_user.mention} look", attachments=[picture, big, liar, binary, good]
    )
    await fake.wait_reply(message)
    note = await fake.wait_for(
        lambda: next((m for m in fake.messages_by_bot(w.general) if "couldn't read" in m["content"]), None),
        what="the note about the files",
    )
    said = note["content"][note["content"].index("*(I couldn't read") :]  # under the answer, in its message
    for name in ("cat.png", "big.log", "small.txt", "data.txt"):
        assert name in said
    assert "ok.txt" not in said and "1 kB" in said
    history = await harness.history.get(conversation(w.general))
    assert history[-1].text == note["content"][: note["content"].index("\n\n*(I couldn't")]  # the answer alone
    asked = engine.seen[-1][-1].text
    assert "fine words" in asked and "yyyy" not in asked and "xxxx" not in asked
    assert int(big["id"]) not in fake.rest.file_requests  # its size was over the limit: never downloaded
    assert int(picture["id"]) not in fake.rest.file_requests

    # A file that does not come in time is skipped too; alone, the note is the answer.
    started_at = time.monotonic()
    late = await fake.send(w.member, w.general, w.bot_user.mention, attachments=[slow])
    answer = await fake.wait_reply(late)
    assert "slow.txt" in answer["content"] and "couldn't read" in answer["content"]
    assert time.monotonic() - started_at < 2.5
    assert len(engine.seen) == 1


# ----- the replied-to message -------------------------------------------------------------------


async def test_the_message_replied_to_reaches_the_model(bot_factory: BotFactory) -> None:
    harness, engine = await started(bot_factory)
    fake, w = harness.fake, harness.fake.world
    said = await fake.send(w.carol, w.general, "The meeting moved to Friday at 10.")
    question = await fake.send(
        w.member, w.general, f"{w.bot_user.mention} is that right?", reply_to=said, ping_author=False
    )
    await fake.wait_reply(question)
    asked = engine.seen[-1][-1].text
    assert asked == '(replying to Carol: "The meeting moved to Friday at 10.")\n\nis that right?'
    assert engine.seen[-1][-1].speaker == "Bob"


# ----- the buttons --------------------------------------------------------------------------------


async def test_regenerate_replaces_the_answer_in_the_message_and_the_history(bot_factory: BotFactory) -> None:
    harness, engine = await started(bot_factory)
    fake, w = harness.fake, harness.fake.world
    engine.answers = ["A first answer.", "A better answer.", "The moderator's answer."]
    question = await fake.mention(w.member, w.general, "tell me something")
    reply = await fake.wait_reply(question)
    assert fake.buttons_on(reply) == [regen_id(fake, question)]

    press = await fake.press(w.member, reply, regen_id(fake, question))
    assert (await response_to(fake, press))["type"] == 6  # acknowledged at once; the message is edited
    await fake.wait_for(lambda: fake.messages_by_bot(w.general)[0]["content"] == "A better answer.")
    assert len(fake.messages_by_bot(w.general)) == 1  # replaced, not posted again
    assert engine.seen[-1] == [Turn("user", "tell me something", "Bob")]  # asked the same question again
    await fake.wait_for(lambda: fake.buttons_on(reply) == [regen_id(fake, question)])
    assert await harness.history.get(conversation(w.general)) == [
        Turn("user", "tell me something", "Bob"),
        Turn("bot", "A better answer."),
    ]

    # Someone with Manage Messages may press it too.
    mod = await fake.press(w.admin, reply, regen_id(fake, question))
    assert (await response_to(fake, mod))["type"] == 6
    await fake.wait_for(lambda: fake.messages_by_bot(w.general)[0]["content"] == "The moderator's answer.")
    await fake.wait_for(lambda: fake.buttons_on(reply) == [regen_id(fake, question)])
    history = await harness.history.get(conversation(w.general))
    assert [t.text for t in history] == ["tell me something", "The moderator's answer."]


async def test_a_strangers_press_is_refused_privately(bot_factory: BotFactory) -> None:
    harness, engine = await started(bot_factory)
    fake, w = harness.fake, harness.fake.world
    question = await fake.mention(w.member, w.general, "hello")
    reply = await fake.wait_reply(question)
    press = await fake.press(w.carol, reply, regen_id(fake, question))
    response = await response_to(fake, press)
    assert response["type"] == 4 and response["data"]["flags"] & EPHEMERAL
    assert response["data"]["content"] == NOT_YOURS_TEXT
    assert len(engine.seen) == 1 and fake.edits_of(reply) == []
    assert fake.messages_by_bot(w.general)[0]["content"] == "re: hello"


async def test_stop_ends_a_streamed_reply_and_keeps_what_was_written(bot_factory: BotFactory) -> None:
    engine = ScriptedEngine()
    engine.can_stream = engine.stream_words = True
    engine.word_delay = 0.02
    engine.answer = "This is the start of a very long answer. " + " ".join(f"word{i}" for i in range(1000))
    harness = await bot_factory(engine=engine)
    fake, w = harness.fake, harness.fake.world
    question = await fake.mention(w.member, w.general, "talk for a long time")
    reply = await fake.wait_reply(question)
    assert fake.buttons_on(reply) == [stop_id(question)]  # on the first post, while it is written

    # A stranger may not stop it.
    refused = await fake.press(w.carol, reply, stop_id(question))
    assert (await response_to(fake, refused))["data"]["content"] == NOT_YOURS_TEXT
    assert engine.cancelled == 0

    press = await fake.press(w.member, reply, stop_id(question))
    pressed_at = time.monotonic()
    assert (await response_to(fake, press))["type"] == 6
    assert await harness.bot.wait_idle(15)
    assert engine.cancelled == 1
    assert engine.cancelled_at[0] - pressed_at < 1.0  # at once, not at the end of the answer (20 s away)
    shown = fake.messages_by_bot(w.general)
    assert len(shown) == 1
    text = shown[0]["content"]
    assert engine.answer.startswith(text) and len(text) < len(engine.answer) // 2
    assert fake.buttons_on(reply) == [regen_id(fake, question)]  # Stop gone, Regenerate in its place
    history = await harness.history.get(conversation(w.general))
    assert history == [Turn("user", "talk for a long time", "Bob"), Turn("bot", text)]


async def test_buttons_go_away_when_a_newer_reply_supersedes_them(bot_factory: BotFactory) -> None:
    harness, engine = await started(bot_factory)
    fake, w = harness.fake, harness.fake.world
    first_q = await fake.mention(w.member, w.general, "first")
    first = await fake.wait_reply(first_q)
    assert fake.buttons_on(first) == [regen_id(fake, first_q)]
    second_q = await fake.mention(w.carol, w.general, "second")
    second = await fake.wait_reply(second_q)
    await fake.wait_for(lambda: fake.buttons_on(first) == [], what="the first reply's buttons to go")
    assert fake.buttons_on(second) == [regen_id(fake, second_q)]
    # A press that was on its way (an old client) is told the button expired, and changes nothing.
    late = await fake.press(w.member, first, regen_id(fake, first_q), force=True)
    response = await response_to(fake, late)
    assert response["type"] == 7 and response["data"]["components"] == []
    await fake.wait_for(lambda: late.followups, what="the private note")
    assert late.followups[0]["content"] == EXPIRED_TEXT and late.followups[0]["flags"] & EPHEMERAL
    assert len(engine.seen) == 2
    assert [t.text for t in await harness.history.get(conversation(w.general))][-1] == "re: second"


async def test_buttons_expire_after_the_documented_time(bot_factory: BotFactory) -> None:
    harness, _ = await started(bot_factory, reply_buttons_seconds=0.5)
    fake, w = harness.fake, harness.fake.world
    question = await fake.mention(w.member, w.general, "quick")
    reply = await fake.wait_reply(question)
    assert fake.buttons_on(reply) == [regen_id(fake, question)]
    await fake.wait_for(lambda: fake.buttons_on(reply) == [], timeout=5, what="the buttons to expire")


async def test_a_press_after_a_restart_is_answered(bot_factory: BotFactory, tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite3"
    before, _ = await started(bot_factory, history_db=db)
    fake, w = before.fake, before.fake.world
    question = await fake.mention(w.member, w.general, "remember me")
    reply = await fake.wait_reply(question)
    await before.stop()
    after, engine = await started(bot_factory, history_db=db)
    press = await fake.press(w.member, reply, regen_id(fake, question))
    response = await response_to(fake, press)
    assert response["type"] == 7 and response["data"]["components"] == []  # the buttons come off
    await fake.wait_for(lambda: press.followups, what="the private note")
    assert press.followups[0]["content"] == EXPIRED_TEXT and press.followups[0]["flags"] & EPHEMERAL
    assert fake.buttons_on(reply) == [] and engine.seen == []
    assert [t.text for t in await after.history.get(conversation(w.general))] == ["remember me", "re: remember me"]
