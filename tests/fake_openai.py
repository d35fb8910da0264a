"""A small OpenAI-compatible server on 127.0.0.1 for the remote engine's tests, told how to misbehave.

`mode` says how the next chat completions are answered:
- "ok": "echo: " + the last message's text (streamed in words when asked to stream);
- "status": an error with `status` (429, 503, 500...) and OpenAI's error body;
- "context": a 400 "maximum context length" refusal while the request has more than `max_messages`
  messages, the answer otherwise;
- "hang": never answers (until the server stops);
- "stream_error": a streamed reply that breaks off with an error event of type `error_type`.

`stop()` takes it off the network (connections are refused) and `start()` brings it back on the
same port.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from aiohttp import web

MODEL_ID = "fake-model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeOpenAI:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "ok"
        self.status = 500
        self.max_messages = 1
        self.error_type = "timeout"
        self.models: list[str] = [MODEL_ID]
        self.requests: list[dict[str, Any]] = []  # chat completion bodies, in order
        self.received = asyncio.Event()  # set at each chat completion request
        self.api_key_wanted: str | None = None
        self._runner: web.AppRunner | None = None
        self._hanging: set[asyncio.Event] = set()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        for hanging in self._hanging:
            hanging.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _refused(self, request: web.Request) -> web.Response | None:
        if self.api_key_wanted is not None and request.headers.get("Authorization") != f"Bearer {self.api_key_wanted}":
            return error(401, "invalid api key", "invalid_request_error")
        return None

    async def _models(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.received.set()
        refused = self._refused(request)
        if refused is not None:
            return refused
        if self.mode == "status":
            return error(self.status, f"status {self.status}", "server_error")
        if self.mode == "hang":
            hanging = asyncio.Event()
            self._hanging.add(hanging)
            await hanging.wait()
            return error(503, "stopped", "server_error")
        if self.mode == "context" and len(body["messages"]) > self.max_messages:
            return error(
                400,
                f"This model's maximum context length is 64 tokens. However, you requested "
                f"{len(body['messages']) * 40} tokens. Please reduce the length of the messages.",
                "invalid_request_error",
            )
        answer = "echo: " + body["messages"][-1]["content"]
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = answer.split(" ")
        for index, word in enumerate(words):
            if self.mode == "stream_error" and index == 2:
                await send(response, {"error": {"message": "broke off", "type": self.error_type, "code": None}})
                return response
            delta = word if index == 0 else " " + word
            await send(response, chunk({"content": delta}))
        await send(response, chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await send(response, {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": MODEL_ID,
                                  "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(words),
                                                           "total_tokens": 5 + len(words)}})  # fmt: skip
        await response.write(b"data: [DONE]\n\n")
        return response


def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL_ID,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(data)}\n\n".encode())


def error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": None}}, status=status)
