"""The Ray Serve app (bot/serve/) through the OpenAI client, and the remote engine against it.

One server for the whole session (tests/serve_app.py): the tiny chat model, greedy, fp32, so a
reply through the server equals the in-process engine's reply to the same conversation.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from bot.core.engine_api import EngineBusy, EngineClosed, EngineError, GenerationTimeout
from bot.core.types import Turn
from bot.engine import Engine
from bot.remote import RemoteConfig, RemoteEngine
from tests.conftest import engine_config
from tests.serve_app import ServeApp, replica_processes

SYSTEM = "You are the test bot."
HISTORY = [Turn("user", "hello there", "Alice"), Turn("bot", "hi"), Turn("user", "what do you like", "Bob")]
MESSAGES: list[Any] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Alice: hello there"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "Bob: what do you like"},
]


@pytest.fixture
async def client(serve_app: ServeApp) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=serve_app.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
async def local_engine(tiny_chat_model_dir: Path) -> AsyncIterator[Engine]:
    """The same model in this process, set up as the server's."""
    async with Engine(engine_config(tiny_chat_model_dir, sampling=False, system_prompt=SYSTEM)) as engine:
        yield engine


async def post(serve_app: ServeApp, body: Any) -> tuple[int, Any]:
    url = serve_app.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(url, data=body) as response:
        return response.status, await response.json(content_type=None)


async def test_health_and_models(serve_app: ServeApp, client: openai.AsyncOpenAI) -> None:
    async with aiohttp.ClientSession() as session, session.get(serve_app.url + "/health") as response:
        assert response.status == 200
        health = await response.json()
    assert health["status"] == "ok" and health["model"] == serve_app.model
    assert health["pid"] in {p.pid for p in replica_processes(serve_app.pid)}
    assert health["torch_threads"] >= 1
    models = await client.models.list()
    assert [model.id for model in models.data] == [serve_app.model]


async def test_a_completion_is_the_engines_reply(client: openai.AsyncOpenAI, local_engine: Engine) -> None:
    completion = await client.chat.completions.create(model="", messages=MESSAGES)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.content == await local_engine.reply(HISTORY)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(local_engine.encode_prompt(HISTORY))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


async def test_streamed_deltas_add_up_to_the_reply(client: openai.AsyncOpenAI, serve_app: ServeApp) -> None:
    whole = await client.chat.completions.create(model=serve_app.model, messages=MESSAGES)
    stream = await client.chat.completions.create(
        model=serve_app.model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    deltas, finishes, usage = [], [], None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            deltas.append(choice.delta.content or "")
            finishes.append(choice.finish_reason)
    assert "".join(deltas) == whole.choices[0].message.content
    assert len([d for d in deltas if d]) > 1  # it did come in pieces
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"messages": []}', "messages must be a non-empty list"),
        ('{"model": ""}', "messages must be a non-empty list"),
        ('{"messages": [{"role": "tool", "content": "x"}]}', "messages[0].role must be one of"),
        ('{"messages": [{"role": "user", "content": "  "}]}', "messages[0] is an empty user message"),
        ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content must be a string"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', "last message"),
        ('{"messages": [{"role": "system", "content": "a"}]}', "must be a user message"),
        ('{"messages": [{"role": "user", "content": "a"}], "stream": "yes"}', "stream must be true or false"),
        ("[1]", "must be a JSON object"),
        ("not json", "must be JSON"),
    ],
)
async def test_bad_requests_are_400_with_a_reason(serve_app: ServeApp, body: str, message: str) -> None:
    status, answer = await post(serve_app, body)
    assert status == 400
    assert message in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"


async def test_a_system_message_longer_than_the_context_is_400(serve_app: ServeApp) -> None:
    body = {"messages": [{"role": "system", "content": "word " * 2000}, {"role": "user", "content": "hi"}]}
    status, answer = await post(serve_app, json.dumps(body))
    assert status == 400 and "do not fit the model" in answer["error"]["message"]


async def test_bad_requests_through_the_client(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="non-empty"):
        await client.chat.completions.create(model="", messages=[])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        await client.chat.completions.create(model="another", messages=MESSAGES)


async def test_a_full_queue_is_429(client: openai.AsyncOpenAI, serve_app: ServeApp) -> None:
    """The server runs one reply and queues one (MAX_BATCH=1, MAX_QUEUE=1): the rest are refused."""

    async def ask() -> str:
        try:
            await client.chat.completions.create(model=serve_app.model, messages=MESSAGES)
        except openai.RateLimitError as exc:
            return str(exc.body["type"])  # type: ignore[index]
        return "ok"

    outcomes = await asyncio.gather(*(ask() for _ in range(12)))
    assert "engine_busy" in outcomes and "ok" in outcomes and set(outcomes) == {"ok", "engine_busy"}


async def test_the_remote_engine_answers_as_the_local_one(serve_app: ServeApp, local_engine: Engine) -> None:
    config = RemoteConfig(url=serve_app.url, system_prompt=SYSTEM, sampling=False)
    async with RemoteEngine(config) as remote:
        assert await remote.reply(HISTORY) == await local_engine.reply(HISTORY)
        seen: list[str] = []
        assert await remote.reply(HISTORY, seen.append) == await local_engine.reply(HISTORY)
        assert seen and all(later.startswith(earlier) for earlier, later in itertools.pairwise(seen))
        assert remote.stats().model == serve_app.model and remote.stats().replies == 2


async def scrape(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def sample(text: str, name: str, **labels: str) -> float:
    """The sum over replicas of one sample in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_metrics_count_the_replicas_replies(serve_app: ServeApp, client: openai.AsyncOpenAI) -> None:
    """METRICS_PORT on the driver: every replica's numbers, under the names a bot process uses."""
    status, body = await scrape(serve_app.metrics_url + "/ready")
    assert status == 200, body  # the replica reported in, so its model is loaded
    _, before = await scrape(serve_app.metrics_url + "/metrics")
    await client.chat.completions.create(model=serve_app.model, messages=MESSAGES)
    for _ in range(50):  # replicas report once a second
        _, after = await scrape(serve_app.metrics_url + "/metrics")
        if sample(after, "chatbot_replies_total", kind="ok") > sample(before, "chatbot_replies_total", kind="ok"):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"the reply was never counted:\n{after}")
    assert sample(after, "chatbot_serve_replicas") == 1
    assert sample(after, "chatbot_reply_latency_seconds_count") >= 1
    assert sample(after, "chatbot_queue_depth") == 0
    assert (await scrape(serve_app.metrics_url + "/health"))[0] == 200


def test_engine_errors_map_to_statuses() -> None:
    from bot.serve.openai_api import engine_error

    assert engine_error(EngineBusy("full"))[:1] == (429,)
    assert engine_error(GenerationTimeout("late"))[:1] == (504,)
    assert engine_error(EngineClosed("closed"))[:1] == (503,)
    assert engine_error(EngineError("broken"))[:1] == (500,)


def test_parse_messages_turns_and_system_prompt() -> None:
    from bot.serve.openai_api import parse_messages

    turns, system = parse_messages(
        [*MESSAGES[:2], {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, *MESSAGES[2:]]
    )
    assert turns == [Turn("user", "Alice: hello there"), Turn("bot", "hi"), Turn("user", "Bob: what do you like")]
    assert system == f"{SYSTEM}\nBe brief."
    assert parse_messages([{"role": "user", "content": "hi"}]) == ([Turn("user", "hi")], None)
