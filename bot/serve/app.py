"""This project's engine behind an OpenAI-compatible HTTP API, as a Ray Serve application.

    python -m bot.serve            # Ray on this machine, the app on SERVE_HOST:SERVE_PORT, until Ctrl-C
    serve run serve.yaml           # or `serve deploy serve.yaml` on a running Ray cluster

Each replica runs one `bot.engine.Engine` (continuous batching, BlenderBot or a chat model, int8 on
a CPU), loaded from the same settings as the bot (MODEL_NAME, PRECISION, MAX_BATCH...). Routes:

- `POST /v1/chat/completions`: OpenAI's chat completions, streamed (server-sent events) or not.
  System messages become the prompt's system message (a chat model's; BlenderBot has none; without
  one the server's SYSTEM_PROMPT applies); user messages are user turns, assistant messages the
  bot's. The engine cuts the oldest history to fit its context, token-exactly, so a long
  conversation is never refused. The reply's length and sampling are the server's settings
  (MAX_NEW_TOKENS, SAMPLING); a request's own `max_tokens` and `temperature` are not applied.
- `GET /v1/models`: the one model served (its MODEL_NAME).
- `GET /health`: 200 once the model is loaded, with the answering replica's process id and torch threads.

Errors carry OpenAI's error body (`{"error": {"message", "type", "code"}}`): 400 for a malformed
request, 404 for another model, 429 when the engine's queue is full, 504 when a reply runs past
GENERATION_TIMEOUT_SECONDS, 503 while shutting down. A streamed reply that fails after it started
ends with an error event of the same shape.

The bot never imports this module (nor Ray); `requirements-serve.txt` installs what it needs.
"""

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application

from bot.core.engine_api import EngineError
from bot.core.outcomes import outcome_of
from bot.core.partial import GrowingText
from bot.engine import Engine, EngineConfig
from bot.metrics import Metrics
from bot.serve.metrics import REPORT_INTERVAL_S, find_board, report
from bot.serve.openai_api import (
    BadRequest,
    engine_error,
    error_body,
    error_response,
    next_partial,
    parse_messages,
    sse,
)
from config.settings import SETTING_KEYS, Settings, SettingsError, load_settings

log = logging.getLogger("bot.serve")

APP_NAME = "chat"
DEPLOYMENT_NAME = "ChatEngine"

# Ray Serve pickles the deployment class where it is declared: what its methods call must be defined above it.
app = FastAPI(title="Discord chat bot engine", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=10, graceful_shutdown_timeout_s=30)
@serve.ingress(app)
class ChatEngine:
    """One replica: one engine, loaded before the replica takes requests (so /health means loaded)."""

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]  # Ray Serve awaits it
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.settings = settings
        self.model = settings.model_name
        self.created = int(time.time())
        self.engine = Engine(EngineConfig.from_settings(settings))
        await self.engine.start()
        self.metrics = Metrics()  # the same counters as a bot process's, reported to the driver's board
        self.metrics.watch_engine(self.engine.stats)
        self._reporting = asyncio.create_task(self._report_forever(find_board()))
        log.info("serving %s", self.model)

    async def _report_forever(self, board: Any | None) -> None:
        """Send this replica's numbers to the metrics board (when `python -m bot.serve` made one)."""
        if board is None:
            return
        context = serve.get_replica_context()
        replica = getattr(getattr(context, "replica_id", None), "unique_id", None) or str(os.getpid())
        while True:
            board.report.remote(report(replica, self.metrics))
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def _generate(self, prompt: list[int], on_partial: Callable[[str], None] | None = None) -> str:
        """The engine's reply, counted by how it ended (as the bot's metrics count replies)."""
        started = time.monotonic()
        try:
            text = await self.engine.generate(prompt, on_partial)
        except EngineError as exc:
            self.metrics.count_reply(outcome_of(exc).kind)
            raise
        self.metrics.count_reply(outcome_of(None, text).kind, time.monotonic() - started)
        return text

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine is closed, or cannot answer any more (its decode
        loop died or hangs), is replaced."""
        if self.engine.closed:
            raise RuntimeError("the engine is closed")
        failure = self.engine.failure()
        if failure is not None:
            raise RuntimeError(failure)

    async def __del__(self) -> None:  # Ray Serve awaits this when it stops the replica
        self._reporting.cancel()
        await self.engine.close()

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        """Also says which replica answered (its process id) and how many threads its torch computes with."""
        import torch

        return {"status": "ok", "model": self.model, "pid": os.getpid(), "torch_threads": torch.get_num_threads()}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        card = {"id": self.model, "object": "model", "created": self.created, "owned_by": "bot.serve"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the request body must be JSON", "invalid_request_error")
        try:
            if not isinstance(body, Mapping):
                raise BadRequest("the request body must be a JSON object")
            turns, system = parse_messages(body.get("messages"))
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequest("stream must be true or false")
        except BadRequest as exc:
            return error_response(400, str(exc), "invalid_request_error")
        model = body.get("model")
        if model not in (None, "", self.model):
            return error_response(
                404, f"the model {model!r} is not served here; this server has {self.model!r}", "model_not_found"
            )
        try:
            prompt = await self.engine.prompt_for(turns, system_prompt=system)
        except ValueError as exc:  # a system message that leaves no room for the conversation
            return error_response(400, f"the messages do not fit the model: {exc}", "invalid_request_error")
        except EngineError as exc:
            return error_response(*engine_error(exc))
        options = body.get("stream_options")
        usage_wanted = isinstance(options, Mapping) and options.get("include_usage") is True
        if stream:
            return await self._stream(prompt, usage_wanted)
        try:
            text = await self._generate(prompt)
        except EngineError as exc:
            return error_response(*engine_error(exc))
        return JSONResponse(
            {
                **self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": self._usage(prompt, text),
            }
        )

    def _head(self, kind: str, ident: str | None = None) -> dict[str, Any]:
        return {
            "id": ident or f"chatcmpl-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model,
        }

    def _usage(self, prompt: list[int], text: str) -> dict[str, int]:
        """Token counts; the reply's are its text tokenized again (the engine hands back text)."""
        completion = self.engine.count_tokens(text)
        return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}

    async def _stream(self, prompt: list[int], usage_wanted: bool) -> Response:
        """Stream the reply as deltas; an error before the first word is an HTTP error with its status."""
        partials: asyncio.Queue[str] = asyncio.Queue()
        writing = asyncio.Event()

        def on_partial(text: str) -> None:
            partials.put_nowait(text)
            writing.set()

        reply = asyncio.ensure_future(self._generate(prompt, on_partial))
        waiting = asyncio.ensure_future(writing.wait())
        try:
            await asyncio.wait({reply, waiting}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the client went away before the first word
            reply.cancel()
            raise
        finally:
            waiting.cancel()
        error = reply.exception() if reply.done() else None
        if error is not None:
            return error_response(*engine_error(error))
        return StreamingResponse(self._events(reply, partials, prompt, usage_wanted), media_type="text/event-stream")

    async def _events(
        self, reply: asyncio.Future[str], partials: asyncio.Queue[str], prompt: list[int], usage_wanted: bool
    ) -> AsyncIterator[str]:
        head = self._head("chat.completion.chunk")

        def chunk(delta: dict[str, str], finish: str | None = None) -> str:
            return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        sent = GrowingText()
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                text = await next_partial(partials, reply)
                if text is None:
                    break
                new = sent.advance(text)
                if new:
                    yield chunk({"content": new})
            try:
                final = reply.result()
            except EngineError as exc:
                yield sse(error_body(*engine_error(exc)))
                return
            rest = sent.rest(final)
            if rest is None:  # cannot happen with the engine's partials (each a prefix of the final text)
                log.warning("a streamed reply's final text does not extend what was sent")
            elif rest:
                yield chunk({"content": rest})
            yield chunk({}, "stop")
            if usage_wanted:
                yield sse({**head, "choices": [], "usage": self._usage(prompt, final)})
            yield sse("[DONE]")
        finally:
            if not reply.done():  # the client went away: the engine drops the reply at its next step
                reply.cancel()


def build_app(settings: Settings, *, replicas: int | None = None, num_cpus: float | None = None) -> Application:
    """The application for `settings`; `replicas` and `num_cpus` (per replica) unless a config file sets them."""
    options: dict[str, Any] = {
        # Serve holds back requests beyond this per replica; the engine's own queue should decide instead.
        "max_ongoing_requests": settings.max_batch + settings.max_queue + 1,
    }
    if replicas is not None:
        options["num_replicas"] = replicas
    if num_cpus is not None:
        options["ray_actor_options"] = {"num_cpus": num_cpus}
    return ChatEngine.options(**options).bind(settings)  # type: ignore[attr-defined]


def app_builder(args: dict[str, Any]) -> Application:
    """For Ray Serve config files (`import_path: bot.serve:app_builder`): settings from the environment,
    overridden by the application's `args` (the same keys, e.g. `MODEL_NAME: Qwen/Qwen2.5-0.5B-Instruct`)."""
    unknown = sorted(set(args) - set(SETTING_KEYS))
    if unknown:
        raise SettingsError(f"unknown settings in the application's args: {', '.join(unknown)}")
    return build_app(load_settings({**os.environ, **{key: str(value) for key, value in args.items()}}))
