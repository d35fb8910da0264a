"""A model served by another process, over the OpenAI chat completions API (ENGINE_URL).

`RemoteEngine` answers like the in-process `bot.engine.Engine` (same `reply`, `stats`, `can_stream`,
same exceptions), so `ChatService` gives the same short notices whichever runs the model. The server
can be this project's own `python -m bot.serve`, or any OpenAI-compatible one (vLLM, TGI, Ollama,
llama.cpp's server).

- Messages: the system prompt (SYSTEM_PROMPT) first, then the history as user/assistant messages,
  built by the same `chat_messages` as the local chat prompt ("Alice: hi" in server channels, one
  role after the other). The server applies its model's template; BlenderBot ignores the system
  message.
- Faults map onto the engine's exceptions: 429 and 503 are `EngineBusy`, a timeout (ours:
  GENERATION_TIMEOUT_SECONDS for the whole reply, or the server's 504) is `GenerationTimeout`, an
  unreachable server and anything else are `EngineError`. Nothing is remembered between requests,
  so answers resume as soon as the server is back, without a restart.
- A server that refuses the prompt as longer than its context (a 400 from vLLM, llama.cpp, TGI,
  OpenAI) is asked again with fewer history turns, the oldest dropped first, a bounded number of
  times. This project's server cuts history to fit on its own and never refuses.
- At start the server's model list is read once: one line in the log says which model answers. An
  unreachable server is a warning, not a failure (bot and server may start in any order); a refused
  API key stops the bot, since waiting will not fix it.

Importing this module never imports torch or transformers.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import openai

from bot.core.engine_api import EngineClosed, EngineError, EngineStats, GenerationTimeout, percentile
from bot.core.messages import chat_messages, strip_think, visible_so_far
from bot.core.outcomes import FAILED, received
from bot.core.partial import GrowingText
from bot.core.types import Turn

log = logging.getLogger(__name__)

# How a status the server answered with reads in the log, by the outcome it means.
_STATUS_WORDS = {"busy": "is busy", "timeout": "timed out"}

# Asked again with fewer history turns at most this many times after a "context too long" refusal;
# each retry keeps half the history of the one before (12 turns -> 6 -> 3 -> 1).
CONTEXT_RETRIES = 4
# How long `start` waits for the model list before it carries on without it.
PROBE_TIMEOUT_SECONDS = 5.0
# Replies whose latency `stats` remembers.
LATENCY_WINDOW = 1000
# An OpenAI client wants a key; servers without authentication accept anything.
NO_API_KEY = "no-key"

# How servers word "the prompt is longer than the model's context" (a 400): OpenAI and vLLM
# ("maximum context length"), llama.cpp ("exceeds the available context size"), TGI ("`inputs` tokens
# + `max_new_tokens` must be <="), and other phrasings of the same.
_CONTEXT_TOO_LONG = re.compile(
    r"context[ _](length|size|window)|maximum context|too many tokens|prompt is too long|input is too long"
    r"|`inputs` tokens",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class RemoteConfig:
    url: str  # without /v1
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    fallback_model: str = ""  # MODEL_NAME: for a server that lists no models
    system_prompt: str = ""
    max_new_tokens: int | None = None
    sampling: bool = True  # False: temperature 0
    stream: bool = True
    timeout_seconds: float = 60.0

    @classmethod
    def from_settings(cls, settings: Any) -> RemoteConfig:
        return cls(
            url=settings.engine_url,
            model=settings.engine_model,
            api_key=settings.engine_api_key,
            fallback_model=settings.model_name,
            system_prompt=settings.system_prompt,
            max_new_tokens=settings.max_new_tokens,
            sampling=settings.sampling,
            stream=settings.stream_replies,
            timeout_seconds=settings.generation_timeout_seconds,
        )


class RemoteEngine:
    """An OpenAI-compatible server as the bot's engine; one shared HTTP client, no state between replies."""

    def __init__(self, config: RemoteConfig) -> None:
        self.config = config
        self._client: openai.AsyncOpenAI | None = None
        self._closed = False
        self._asking: set[asyncio.Future[tuple[str, int | None]]] = set()
        self._model = config.model  # found at start (or at the first reply) when not configured
        self._running = 0
        self._replies = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._tokens = 0
        self._token_seconds = 0.0
        self._started_at = time.monotonic()

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the client and read the server's model list once (see the module's docstring)."""
        timeout = self.config.timeout_seconds
        self._client = openai.AsyncOpenAI(
            base_url=self.config.url + "/v1",
            api_key=self.config.api_key or NO_API_KEY,
            max_retries=0,  # a failed reply becomes a notice at once; the user asks again
            timeout=openai.Timeout(timeout, connect=min(timeout, 10.0)),
        )
        self._started_at = time.monotonic()
        try:
            model = await asyncio.wait_for(self._find_model(probe=True), PROBE_TIMEOUT_SECONDS)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise EngineError(f"the engine at {self.config.url} refused ENGINE_API_KEY ({_reason(exc)})") from None
        except (openai.OpenAIError, asyncio.TimeoutError) as exc:
            log.warning(
                "the engine at %s is not answering (%s); the bot runs anyway and answers once it is up",
                self.config.url,
                _reason(exc),
            )
            return
        log.info("remote engine at %s answers with the model %s", self.config.url, model)

    async def close(self) -> None:
        """Stop: replies still waiting for the server raise `EngineClosed` (the bot says it is restarting)."""
        self._closed = True
        for asking in self._asking:
            asking.cancel()
        if self._client is not None:
            await self._client.close()

    def failure(self) -> None:
        """Always None: a server that is down is retried with every message, and nothing here can die."""
        return None

    async def __aenter__(self) -> RemoteEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def can_stream(self) -> bool:
        """Replies stream unless STREAM_REPLIES is off."""
        return self.config.stream

    # ----- replies -----------------------------------------------------------------------------

    async def reply(
        self,
        history: Sequence[Turn],
        on_partial: Callable[[str], None] | None = None,
        *,
        system_prompt: str | None = None,
    ) -> str:
        """The bot's next turn for `history` (oldest first, newest user turn last), from the server.

        `system_prompt` (a persona) is sent instead of SYSTEM_PROMPT when given."""
        if self._closed or self._client is None:
            raise EngineClosed("the remote engine is not running")
        started = time.monotonic()
        self._running += 1

        async def bounded() -> tuple[str, int | None]:
            # The request is made inside the task, so one cancelled before it starts leaves no coroutine unawaited.
            return await asyncio.wait_for(
                self._reply_fitting(list(history), on_partial, system_prompt), self.config.timeout_seconds
            )

        asking = asyncio.ensure_future(bounded())
        self._asking.add(asking)
        try:
            text, tokens = await asking
        except asyncio.TimeoutError:
            raise GenerationTimeout(f"no reply within {self.config.timeout_seconds:g}s") from None
        except asyncio.CancelledError:
            if self._closed and asking.cancelled() and not _being_cancelled():
                raise EngineClosed("the remote engine was closed") from None
            raise
        except Exception as exc:
            # Closing cancels the request, but one already on its way may end otherwise first, e.g. with
            # httpx's "the client has been closed": for the person, the engine closed all the same.
            if self._closed:
                raise EngineClosed("the remote engine was closed") from exc
            raise
        finally:
            self._running -= 1
            self._asking.discard(asking)
        elapsed = time.monotonic() - started
        self._replies += 1
        self._latencies.append(elapsed)
        if tokens is not None:
            self._tokens += tokens
            self._token_seconds += elapsed
        return text

    async def _reply_fitting(
        self, history: list[Turn], on_partial: Callable[[str], None] | None, system_prompt: str | None = None
    ) -> tuple[str, int | None]:
        """Ask; after a "context too long" refusal, ask again with the older half of the history dropped."""
        keep = len(history)
        for attempt in range(CONTEXT_RETRIES + 1):
            turns = history[-keep:]
            try:
                return await self._ask(turns, on_partial, system_prompt)
            except openai.BadRequestError as exc:
                if not _context_too_long(exc) or keep <= 1 or attempt == CONTEXT_RETRIES:
                    raise _engine_error(exc) from None
                keep = max(1, keep // 2)
                log.info("the engine's context is too small for %d turns; asking with the last %d", len(turns), keep)
            except openai.OpenAIError as exc:
                raise _engine_error(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _ask(
        self, turns: Sequence[Turn], on_partial: Callable[[str], None] | None, system_prompt: str | None = None
    ) -> tuple[str, int | None]:
        """One request: the reply's text and its completion tokens (None when the server does not say)."""
        assert self._client is not None
        model = self._model or await self._find_model()
        system = self.config.system_prompt if system_prompt is None else system_prompt
        request: dict[str, Any] = {"model": model, "messages": chat_messages(turns, system_prompt=system)}
        if self.config.max_new_tokens is not None:
            request["max_tokens"] = self.config.max_new_tokens
        if not self.config.sampling:
            request["temperature"] = 0
        try:
            if on_partial is not None and self.config.stream:
                return await self._ask_streaming(request, on_partial)
            completion = await self._client.chat.completions.create(**request)
        except openai.NotFoundError:
            if self.config.model is None:
                self._model = None  # the server may have changed models: look again next time
            raise
        if not completion.choices:
            raise EngineError("the engine answered without a reply")
        text = strip_think(completion.choices[0].message.content or "")
        return text, completion.usage.completion_tokens if completion.usage else None

    async def _ask_streaming(
        self, request: dict[str, Any], on_partial: Callable[[str], None]
    ) -> tuple[str, int | None]:
        assert self._client is not None
        stream = await self._client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
        written, said, tokens = "", GrowingText(), None
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                if not chunk.choices or not chunk.choices[0].delta.content:
                    continue
                written += chunk.choices[0].delta.content
                # As the local engine reports: each text extends the one before, no <think> block shown.
                text = visible_so_far(written).lstrip()
                if text.strip() and said.advance(text) is not None:
                    on_partial(text.rstrip())
        return strip_think(written), tokens

    async def _find_model(self, *, probe: bool = False) -> str:
        """ENGINE_MODEL, else the first model the server lists, else MODEL_NAME.

        `probe` (at start) asks the server even when ENGINE_MODEL names the model, so a refused key or
        a server that is down shows in the log at once rather than at the first reply.
        """
        assert self._client is not None
        if self._model and not probe:
            return self._model
        try:
            page = await self._client.models.list()
            ids = [model.id for model in page.data]
        except openai.NotFoundError:  # a server without /v1/models
            ids = []
        if not self._model:
            self._model = ids[0] if ids else self.config.fallback_model
        elif ids and self._model not in ids:
            log.warning(
                "the engine at %s does not list ENGINE_MODEL %s (it lists %s); asking for it anyway",
                self.config.url,
                self._model,
                ", ".join(ids[:5]),
            )
        return self._model

    async def check_system_prompt(self, text: str) -> None:
        """Always None: the server's tokenizer and context are its own (a server that finds the prompt
        too long refuses it, and the reply is a notice)."""
        return None

    @property
    def uses_system_prompt(self) -> bool:
        """True: the server's model decides (this project's server on BlenderBot ignores the system message)."""
        return True

    def forget_cached_conversations(self) -> int:
        """0: nothing is kept here between replies (what the server caches is the server's to drop)."""
        return 0

    def stats(self) -> EngineStats:
        latencies = list(self._latencies)
        return EngineStats(
            model=self._model or self.config.model or "(not known yet)",
            device=self.config.url,
            precision="remote",
            queue_depth=0,  # the server's queue is its own
            running=self._running,
            replies=self._replies,
            latency_p50_s=percentile(latencies, 0.50),
            latency_p95_s=percentile(latencies, 0.95),
            queue_wait_p50_s=None,
            queue_wait_p95_s=None,
            tokens_per_second=self._tokens / self._token_seconds if self._token_seconds else None,
            uptime_s=time.monotonic() - self._started_at,
        )


def _being_cancelled() -> bool:
    """Whether the running task itself is being cancelled (not only something it awaited)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+; on 3.10 close() wins
    return cancelling is not None and cancelling() > 0


def _context_too_long(exc: openai.BadRequestError) -> bool:
    code = exc.code or ""
    return code == "context_length_exceeded" or bool(_CONTEXT_TOO_LONG.search(f"{code} {exc.message}"))


def _engine_error(exc: openai.OpenAIError) -> EngineError:
    """The engine exception for a client error: busy, timed out, or failed (with a one-line reason).

    A server's status, or the type of an error event mid-stream, is read back through the outcomes
    table (`bot.core.outcomes.received`), the same table this project's server answers from.
    """
    if isinstance(exc, openai.APITimeoutError):
        return GenerationTimeout("the engine did not answer in time")
    outcome, message = FAILED, ""
    if isinstance(exc, openai.APIStatusError):
        outcome = received(status=exc.status_code)
        message = f"the engine {_STATUS_WORDS.get(outcome.kind, 'failed')} ({exc.status_code})"
    elif isinstance(exc, openai.APIError) and isinstance(exc.body, dict):  # an error event mid-stream
        outcome = received(error_type=str(exc.body.get("type") or exc.body.get("code") or ""))
        message = exc.message
    if outcome.error is not None and outcome is not FAILED:
        return outcome.error(message)
    if isinstance(exc, openai.APIConnectionError):
        return EngineError(f"the engine is unreachable: {_reason(exc)}")
    return EngineError(_reason(exc))


def _reason(exc: BaseException) -> str:
    """One line saying what went wrong, with the underlying cause of a connection error."""
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    cause = exc.__cause__
    if isinstance(exc, openai.APIConnectionError) and cause is not None and str(cause):
        text = f"{text} ({str(cause).splitlines()[0]})"
    return text
