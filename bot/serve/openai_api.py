"""OpenAI's chat completions API as the model server speaks it: requests in, errors and events out.

Plain functions over JSON values, kept apart from the Ray Serve deployment (`bot.serve.app`) so
they are read, and tested, without Ray. Errors carry OpenAI's body (`{"error": {"message", "type",
"code"}}`), with the status and type of the outcomes table (`bot.core.outcomes`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from bot.core.outcomes import FAILED, outcome_of, server_error
from bot.core.types import Turn

log = logging.getLogger("bot.serve")

# What each message may say about itself; others roles are refused.
ROLES = ("system", "developer", "user", "assistant")


class BadRequest(ValueError):
    """A request the engine cannot answer; the message says why, in one line."""


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    """OpenAI's error shape, which its clients turn into their exceptions (RateLimitError for 429...)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status)


def engine_error(exc: BaseException) -> tuple[int, str, str]:
    """The status, message and error type for what the engine raised (a failure is logged too)."""
    if outcome_of(exc) is FAILED:
        log.error("the engine failed to answer: %s", exc)
    return server_error(exc)


def _text(content: Any, index: int) -> str:
    """A message's text: a string, or OpenAI's list of parts of which only text parts are taken."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{index}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{index}].content must be a string")


def parse_messages(messages: Any) -> tuple[list[Turn], str | None]:
    """OpenAI messages as the engine's turns, and the system prompt they carry (None: none given).

    System (and developer) messages are joined into the system prompt; user messages are user turns
    (a speaker's name, if any, is already in their text), assistant messages the bot's turns.
    """
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    turns: list[Turn] = []
    system: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequest(f"messages[{index}] must be an object with a role and content")
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
        text = _text(message.get("content"), index)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            if not text.strip():
                raise BadRequest(f"messages[{index}] is an empty user message")
            turns.append(Turn("user", text))
        else:
            turns.append(Turn("bot", text))
    if not turns or turns[-1].role != "user":
        raise BadRequest("the last message other than system messages must be a user message")
    return turns, ("\n".join(system) if system else None)


def sse(data: Mapping[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def next_partial(partials: asyncio.Queue[str], reply: asyncio.Future[str]) -> str | None:
    """The next reply-so-far, or None once the reply is settled and every earlier one was taken."""
    while True:
        if not partials.empty():
            return partials.get_nowait()
        if reply.done():
            return None
        getting = asyncio.ensure_future(partials.get())
        await asyncio.wait({getting, reply}, return_when=asyncio.FIRST_COMPLETED)
        if getting.done():
            return getting.result()
        getting.cancel()
