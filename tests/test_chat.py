"""ChatService with a scripted engine: locking, ordering, storage and every failure path."""

import asyncio

import pytest

from bot.core.chat import ChatService
from bot.core.outcomes import BUSY_TEXT, CLOSING_TEXT, EMPTY_REPLY_TEXT, ERROR_TEXT, STOPPED_TEXT, TIMEOUT_TEXT
from bot.core.types import Conversation, Reply, Turn
from bot.engine import EngineBusy, EngineClosed, GenerationTimeout
from tests.scripted_engine import ScriptedEngine

A = Conversation(1, 100)
B = Conversation(2, 100)


async def test_stores_both_turns_and_sends_history(chat: ChatService, scripted_engine: ScriptedEngine) -> None:
    first = await chat.respond(A, 7, "hi")
    assert first.ok and first.text == "re: hi"
    await chat.respond(A, 7, "again")
    assert scripted_engine.seen[-1] == [Turn("user", "hi"), Turn("bot", "re: hi"), Turn("user", "again")]


async def test_conversations_never_mix(chat: ChatService, scripted_engine: ScriptedEngine) -> None:
    await chat.respond(A, 7, "secret in A")
    await chat.respond(B, 8, "hello B")
    assert scripted_engine.seen[-1] == [Turn("user", "hello B")]


async def test_same_conversation_strictly_in_order(chat: ChatService, scripted_engine: ScriptedEngine) -> None:
    scripted_engine.gate = asyncio.Event()
    first = asyncio.create_task(chat.respond(A, 7, "one"))
    second = asyncio.create_task(chat.respond(A, 7, "two"))
    other = asyncio.create_task(chat.respond(B, 7, "other"))
    await asyncio.sleep(0.01)
    assert [h[-1].text for h in scripted_engine.seen] == ["one", "other"]  # "two" waits for "one"
    scripted_engine.gate.set()
    await asyncio.gather(first, second, other)
    assert scripted_engine.seen[-1] == [Turn("user", "one"), Turn("bot", "re: one"), Turn("user", "two")]
    assert chat._locks == {}


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (EngineBusy("full"), BUSY_TEXT),
        (GenerationTimeout("slow"), TIMEOUT_TEXT),
        (EngineClosed("bye"), CLOSING_TEXT),
        (RuntimeError("CUDA out of memory"), ERROR_TEXT),
    ],
)
async def test_failures_become_notices_and_store_nothing(
    chat: ChatService, scripted_engine: ScriptedEngine, error: Exception, text: str
) -> None:
    scripted_engine.fail = error
    reply = await chat.respond(A, 7, "hi")
    assert reply.text == text and not reply.ok
    assert "Traceback" not in reply.text and "CUDA" not in reply.text
    assert await chat.history.get(A) == []


async def test_blank_model_output_gets_a_notice(chat: ChatService, scripted_engine: ScriptedEngine) -> None:
    scripted_engine.answer = "   "
    reply = await chat.respond(A, 7, "hi")
    assert reply.text == EMPTY_REPLY_TEXT and not reply.ok
    assert await chat.history.get(A) == []


async def test_forget_me_also_drops_the_engines_kept_conversations(
    chat: ChatService, scripted_engine: ScriptedEngine
) -> None:
    await chat.respond(A, 7, "a")
    await chat.forget_user(7)
    assert scripted_engine.forgotten == 1


async def test_reset_forget_and_in_flight(chat: ChatService) -> None:
    await chat.respond(A, 7, "a")
    await chat.respond(B, 8, "b")
    assert await chat.forget_user(8) == 2 and await chat.history.get(B) == []
    assert await chat.reset(A) == 2 and await chat.history.get(A) == []
    assert chat.in_flight == 0


@pytest.mark.parametrize("clear", ["reset", "reset_guild", "forget_user"])
async def test_clearing_during_a_reply_is_not_undone(
    chat: ChatService, scripted_engine: ScriptedEngine, clear: str
) -> None:
    scripted_engine.gate = asyncio.Event()
    replying = asyncio.create_task(chat.respond(A, 7, "secret"))
    await asyncio.sleep(0.01)
    await {
        "reset": lambda: chat.reset(A),
        "reset_guild": lambda: chat.reset_guild(100),
        "forget_user": lambda: chat.forget_user(7),
    }[clear]()
    scripted_engine.gate.set()
    reply = await replying
    assert reply.text == "re: secret"  # the user still gets the answer...
    assert await chat.history.get(A) == []  # ...but the cleared history stays cleared
    await chat.respond(A, 7, "after")
    assert len(await chat.history.get(A)) == 2  # later replies are stored again


async def test_database_trouble_is_a_notice_or_a_plain_answer(
    chat: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.history import HistoryError

    async def broken(*args: object, **kwargs: object) -> None:
        raise HistoryError("SQLite: disk I/O error")

    monkeypatch.setattr(chat.history, "append", broken)
    assert (await chat.respond(A, 7, "hi")).text == "re: hi"  # answered, even though it could not be stored
    monkeypatch.setattr(chat.history, "snapshot", broken)
    reply = await chat.respond(A, 7, "hi")
    assert reply.text == ERROR_TEXT and not reply.ok


async def test_partial_replies_reach_the_caller_and_only_the_whole_is_stored(
    chat: ChatService, scripted_engine: ScriptedEngine
) -> None:
    scripted_engine.can_stream = scripted_engine.stream_words = True
    scripted_engine.answer = "one two three four"
    assert chat.can_stream
    partials: list[str] = []
    reply = await chat.respond(Conversation(5), 1, "count", on_partial=partials.append)
    assert partials == ["one", "one two", "one two three", "one two three four"]
    assert reply == Reply("one two three four")
    assert await chat.history.get(Conversation(5)) == [Turn("user", "count"), Turn("bot", "one two three four")]


async def test_a_reply_cut_off_mid_stream_is_a_notice_and_stores_nothing(
    chat: ChatService, scripted_engine: ScriptedEngine
) -> None:
    scripted_engine.can_stream = scripted_engine.stream_words = True
    scripted_engine.answer, scripted_engine.fail, scripted_engine.fail_after_words = "a b c d", GenerationTimeout(), 2
    partials: list[str] = []
    reply = await chat.respond(Conversation(6), 1, "go", on_partial=partials.append)
    assert partials == ["a", "a b"]
    assert reply == Reply(TIMEOUT_TEXT, ok=False)
    assert await chat.history.get(Conversation(6)) == []


async def test_speaker_reaches_the_engine_and_is_stored(chat: ChatService, scripted_engine: ScriptedEngine) -> None:
    await chat.respond(A, 7, "hi", speaker="Alice")
    await chat.respond(A, 8, "and me", speaker="Bob")
    assert scripted_engine.seen[-1] == [
        Turn("user", "hi", "Alice"),
        Turn("bot", "re: hi"),
        Turn("user", "and me", "Bob"),
    ]
    assert (await chat.history.get(A))[-2:] == [Turn("user", "and me", "Bob"), Turn("bot", "re: and me")]
    await chat.respond(Conversation(9), 7, "in a DM")  # no speaker: none stored
    assert (await chat.history.get(Conversation(9)))[0] == Turn("user", "in a DM", None)


async def test_stopped_before_the_first_word_says_so(chat: ChatService, scripted_engine: ScriptedEngine) -> None:
    scripted_engine.gate = asyncio.Event()  # the engine has not written a word yet
    stop = asyncio.Event()
    replying = asyncio.create_task(chat.respond(A, 7, "a long question", stop=stop))
    await asyncio.sleep(0.05)
    stop.set()
    reply = await asyncio.wait_for(replying, 5)
    assert reply == Reply(STOPPED_TEXT, ok=False) and reply.kind == "stopped"
    assert await chat.history.get(A) == []
