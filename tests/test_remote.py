"""The remote engine (bot/remote/) against a fake OpenAI-compatible server: requests, streaming, faults."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from bot.core.chat import ChatService
from bot.core.engine_api import EngineClosed, EngineError
from bot.core.outcomes import BUSY_TEXT, ERROR_TEXT, TIMEOUT_TEXT
from bot.core.types import Conversation, Turn
from bot.remote import CONTEXT_RETRIES, RemoteConfig, RemoteEngine
from tests.fake_openai import MODEL_ID, FakeOpenAI

HERE = Conversation(channel_id=7, guild_id=1)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


def config(fake: FakeOpenAI, **overrides: object) -> RemoteConfig:
    values: dict[str, object] = {"url": fake.url, "system_prompt": "Be brief.", "timeout_seconds": 5.0}
    values.update(overrides)
    return RemoteConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def remote(fake: FakeOpenAI) -> AsyncIterator[RemoteEngine]:
    async with RemoteEngine(config(fake)) as engine:
        yield engine


@pytest.fixture
def remote_chat(chat: ChatService, remote: RemoteEngine) -> ChatService:
    """The chat service (history and all) over the remote engine."""
    chat.engine = remote
    return chat


async def test_the_request_carries_system_prompt_speakers_and_settings(fake: FakeOpenAI) -> None:
    async with RemoteEngine(config(fake, max_new_tokens=40, sampling=False)) as engine:
        history = [Turn("user", "hi", "Alice"), Turn("bot", "hello"), Turn("user", "how are you?", "Bob")]
        assert await engine.reply(history) == "echo: Bob: how are you?"
    (body,) = fake.requests
    assert body["model"] == MODEL_ID  # the first the server lists
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Alice: hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Bob: how are you?"},
    ]
    assert body["max_tokens"] == 40 and body["temperature"] == 0
    assert not body.get("stream")


async def test_engine_model_and_generation_defaults(fake: FakeOpenAI) -> None:
    async with RemoteEngine(config(fake, model="chosen", system_prompt="")) as engine:
        await engine.reply([Turn("user", "hi")])
    (body,) = fake.requests
    assert body["model"] == "chosen"
    assert body["messages"] == [{"role": "user", "content": "hi"}]  # no system prompt, a DM has no speaker
    assert "max_tokens" not in body and "temperature" not in body


async def test_a_server_listing_no_models_gets_model_name(fake: FakeOpenAI) -> None:
    fake.models = []
    async with RemoteEngine(config(fake, fallback_model="org/model")) as engine:
        await engine.reply([Turn("user", "hi")])
    assert fake.requests[0]["model"] == "org/model"


async def test_streaming_reports_growing_text_and_returns_the_whole(remote: RemoteEngine, fake: FakeOpenAI) -> None:
    seen: list[str] = []
    answer = await remote.reply([Turn("user", "one two three")], seen.append)
    assert answer == "echo: one two three"
    assert seen == ["echo:", "echo: one", "echo: one two", "echo: one two three"]
    assert fake.requests[0]["stream"] is True and remote.can_stream
    assert remote.stats().tokens_per_second is not None  # from the usage chunk


async def test_stream_replies_off_asks_in_one_request(fake: FakeOpenAI) -> None:
    async with RemoteEngine(config(fake, stream=False)) as engine:
        seen: list[str] = []
        assert await engine.reply([Turn("user", "a b")], seen.append) == "echo: a b"
        assert not engine.can_stream
    assert seen == [] and not fake.requests[0].get("stream")


@pytest.mark.parametrize(
    ("status", "notice"), [(429, BUSY_TEXT), (503, BUSY_TEXT), (500, ERROR_TEXT), (502, ERROR_TEXT)]
)
async def test_server_errors_become_notices_and_answers_resume(
    remote_chat: ChatService, fake: FakeOpenAI, status: int, notice: str
) -> None:
    fake.mode, fake.status = "status", status
    failed = await remote_chat.respond(HERE, 1, "hello", speaker="Alice")
    assert (failed.text, failed.ok) == (notice, False)
    fake.mode = "ok"
    answered = await remote_chat.respond(HERE, 1, "hello again", speaker="Alice")
    assert (answered.text, answered.ok) == ("echo: Alice: hello again", True)
    # the failed exchange was not stored: the retry's prompt holds only its own message
    assert fake.requests[-1]["messages"][1:] == [{"role": "user", "content": "Alice: hello again"}]


async def test_a_hanging_server_times_out(chat: ChatService, fake: FakeOpenAI) -> None:
    fake.mode = "hang"
    async with RemoteEngine(config(fake, timeout_seconds=0.5)) as engine:
        chat.engine = engine
        started = asyncio.get_running_loop().time()
        reply = await chat.respond(HERE, 1, "hello")
        assert reply.text == TIMEOUT_TEXT
        assert asyncio.get_running_loop().time() - started < 3
        assert engine.stats().running == 0


@pytest.mark.parametrize(("kind", "notice"), [("timeout", TIMEOUT_TEXT), ("engine_busy", BUSY_TEXT), ("x", ERROR_TEXT)])
async def test_a_stream_that_breaks_off_gives_a_notice(
    remote_chat: ChatService, fake: FakeOpenAI, kind: str, notice: str
) -> None:
    fake.mode, fake.error_type = "stream_error", kind
    seen: list[str] = []
    reply = await remote_chat.respond(HERE, 1, "one two three four", on_partial=seen.append)
    assert reply.text == notice and seen  # some words were shown before it broke off


async def test_a_server_that_goes_down_and_comes_back(
    remote_chat: ChatService, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    assert (await remote_chat.respond(HERE, 1, "first")).ok
    await fake.stop()
    with caplog.at_level(logging.ERROR):
        down = await remote_chat.respond(HERE, 1, "second")
    assert (down.text, down.ok) == (ERROR_TEXT, False)
    assert "unreachable" in caplog.text
    await fake.start()
    back = await remote_chat.respond(HERE, 1, "third")
    assert (back.text, back.ok) == ("echo: third", True)


async def test_starting_while_the_server_is_down_warns_and_answers_later(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    await fake.stop()
    engine = RemoteEngine(config(fake))
    with caplog.at_level(logging.WARNING):
        await engine.start()
    assert "is not answering" in caplog.text and "answers once it is up" in caplog.text
    try:
        await fake.start()
        assert await engine.reply([Turn("user", "hi")]) == "echo: hi"
        assert fake.requests[0]["model"] == MODEL_ID  # found at the first reply instead
    finally:
        await engine.close()


async def test_a_refused_api_key_stops_the_start(fake: FakeOpenAI) -> None:
    fake.api_key_wanted = "right"
    with pytest.raises(EngineError, match="refused ENGINE_API_KEY"):
        await RemoteEngine(config(fake, api_key="wrong")).start()
    async with RemoteEngine(config(fake, api_key="right")) as engine:
        assert await engine.reply([Turn("user", "hi")]) == "echo: hi"


async def test_a_refused_key_stops_the_start_with_engine_model_set_too(fake: FakeOpenAI) -> None:
    """ENGINE_MODEL names the model, yet the start still asks the server: a wrong key shows at once."""
    fake.api_key_wanted = "right"
    with pytest.raises(EngineError, match="refused ENGINE_API_KEY"):
        await RemoteEngine(config(fake, api_key="wrong", model="chosen")).start()


async def test_a_context_refusal_is_asked_again_with_the_newest_turns(remote: RemoteEngine, fake: FakeOpenAI) -> None:
    fake.mode, fake.max_messages = "context", 4  # the system message and three turns
    history = [Turn("user" if i % 2 == 0 else "bot", f"turn {i}") for i in range(11)]
    assert await remote.reply(history) == "echo: turn 10"
    sizes = [len(body["messages"]) for body in fake.requests]
    # with the system message: 11 turns, the newest 5, the newest 2 (an answer first opens nothing: 1)
    assert sizes == [12, 6, 2]
    assert all(body["messages"][-1]["content"] == "turn 10" for body in fake.requests)


async def test_context_retries_are_bounded(remote: RemoteEngine, fake: FakeOpenAI) -> None:
    fake.mode, fake.max_messages = "context", 0  # nothing fits
    history = [Turn("user" if i % 2 == 0 else "bot", f"turn {i}") for i in range(21)]
    with pytest.raises(EngineError, match="maximum context length"):
        await remote.reply(history)
    assert [len(body["messages"]) for body in fake.requests] == [22, 10, 6, 2, 2]  # 21, 10, 5, 2, 1 turns
    assert len(fake.requests) == CONTEXT_RETRIES + 1


async def test_a_bad_request_that_is_not_about_context_is_not_retried(remote: RemoteEngine, fake: FakeOpenAI) -> None:
    fake.mode, fake.status = "status", 400
    with pytest.raises(EngineError, match="status 400"):
        await remote.reply([Turn("user", "a"), Turn("bot", "b"), Turn("user", "c")])
    assert len(fake.requests) == 1


async def test_stats(remote: RemoteEngine) -> None:
    await remote.reply([Turn("user", "hi")])
    await remote.reply([Turn("user", "hi")])
    stats = remote.stats()
    assert (stats.model, stats.replies, stats.running, stats.queue_depth) == (MODEL_ID, 2, 0, 0)
    assert stats.latency_p50_s is not None and stats.latency_p95_s is not None
    assert stats.tokens_per_second is not None and stats.tokens_per_second > 0


def test_the_entrypoint_builds_the_remote_engine_only_with_engine_url(fake: FakeOpenAI) -> None:
    from bot.launch import build_engine
    from config.settings import load_settings

    remote = build_engine(load_settings({"ENGINE_URL": fake.url, "ENGINE_MODEL": "m"}, env_file=None))
    assert isinstance(remote, RemoteEngine) and remote.config.url == fake.url and remote.config.model == "m"
    assert not isinstance(build_engine(load_settings({}, env_file=None)), RemoteEngine)


async def test_a_refused_key_stops_the_entrypoint_with_one_line(fake: FakeOpenAI) -> None:
    from bot.launch import ExitCode, build_engine, start_engine
    from config.settings import load_settings

    fake.api_key_wanted = "right"
    settings = load_settings({"ENGINE_URL": fake.url, "ENGINE_API_KEY": "wrong"}, env_file=None)
    engine = build_engine(settings)
    try:
        with pytest.raises(ExitCode, match=r"^Could not use the engine at ENGINE_URL: .*refused ENGINE_API_KEY"):
            await start_engine(engine, settings, asyncio.Event())
    finally:
        await engine.close()


async def test_a_request_that_fails_as_the_engine_closes_is_told_the_engine_closed(
    chat: ChatService, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """A request already on its way when close() cancels it can end with the closed client's error instead
    of the cancellation (found by the scaled soak): that is a closed engine too, not a bug to log."""
    from bot.core.outcomes import CLOSING_TEXT

    engine = RemoteEngine(config(fake))
    await engine.start()
    assert engine._client is not None
    sent = asyncio.Event()

    async def create(**request: object) -> object:
        """On its way (always ready to run), so it sees the client closed before the cancellation arrives."""
        sent.set()
        while not engine._closed:  # noqa: ASYNC110 - polling keeps it ready to run, which an Event would not
            await asyncio.sleep(0)
        raise RuntimeError("Cannot send a request, as the client has been closed.")

    engine._client.chat.completions.create = create  # type: ignore[method-assign]
    chat.engine = engine
    waiting = asyncio.ensure_future(chat.respond(HERE, 1, "hello"))
    await asyncio.wait_for(sent.wait(), 5)
    await engine.close()
    assert (await asyncio.wait_for(waiting, 5)).text == CLOSING_TEXT
    # The bot's own records: asyncio may log here an earlier test's httpx task collected after its loop closed.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("bot")]


async def test_closing_tells_waiting_replies_the_engine_closed(chat: ChatService, fake: FakeOpenAI) -> None:
    from bot.core.outcomes import CLOSING_TEXT

    fake.mode = "hang"
    engine = RemoteEngine(config(fake))
    await engine.start()
    chat.engine = engine
    waiting = asyncio.ensure_future(chat.respond(HERE, 1, "hello"))
    await asyncio.wait_for(fake.received.wait(), 5)
    await engine.close()
    assert (await asyncio.wait_for(waiting, 5)).text == CLOSING_TEXT
    with pytest.raises(EngineClosed):
        await engine.reply([Turn("user", "hi")])


async def test_closing_before_a_request_starts_leaves_nothing_unawaited(fake: FakeOpenAI) -> None:
    import gc
    import warnings

    engine = RemoteEngine(config(fake))
    await engine.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reply = asyncio.ensure_future(engine.reply([Turn("user", "hi")]))
        await asyncio.sleep(0)  # reply() has made its request task, which has not run yet
        await engine.close()
        with pytest.raises(EngineClosed):
            await reply
        del reply  # its traceback holds the request's frames
        await asyncio.sleep(0.05)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
