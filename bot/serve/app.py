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

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application

from bot.core.engine_api import EngineBusy, EngineClosed, EngineError, GenerationTimeout
from bot.core.types import Turn
from bot.engine import Engine, EngineConfig
from bot.serve.metrics import (
    BOARD_NAME,
    BOARD_NAMESPACE,
    REPORT_INTERVAL_S,
    MetricsBoard,
    ReplicaCounters,
    find_board,
    reply_kind,
    serve_board_metrics,
)
from config.settings import SETTING_KEYS, Settings, SettingsError, load_settings

log = logging.getLogger("bot.serve")

APP_NAME = "chat"
DEPLOYMENT_NAME = "ChatEngine"
# What each message may say about itself; others roles are refused.
ROLES = ("system", "developer", "user", "assistant")

# Ray Serve pickles the deployment class where it is declared: what its methods call must be defined above it.
app = FastAPI(title="Discord chat bot engine", docs_url=None, redoc_url=None, openapi_url=None)


class BadRequest(ValueError):
    """A request the engine cannot answer; the message says why, in one line."""


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    """OpenAI's error shape, which its clients turn into their exceptions (RateLimitError for 429...)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status)


def engine_error(exc: BaseException) -> tuple[int, str, str]:
    """The status, message and error type for what the engine raised."""
    if isinstance(exc, EngineBusy):
        return 429, "the engine is busy; try again in a moment", "engine_busy"
    if isinstance(exc, GenerationTimeout):
        return 504, f"the reply took too long: {exc}", "timeout"
    if isinstance(exc, EngineClosed):
        return 503, "the engine is shutting down", "engine_closed"
    log.error("the engine failed to answer: %s", exc)
    return 500, f"the engine failed: {exc}", "engine_error"


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


async def _next_partial(partials: asyncio.Queue[str], reply: asyncio.Future[str]) -> str | None:
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
        self.counters = ReplicaCounters()
        self._reporting = asyncio.create_task(self._report_forever(find_board()))
        log.info("serving %s", self.model)

    async def _report_forever(self, board: Any | None) -> None:
        """Send this replica's numbers to the metrics board (when `python -m bot.serve` made one)."""
        if board is None:
            return
        context = serve.get_replica_context()
        replica = getattr(getattr(context, "replica_id", None), "unique_id", None) or str(os.getpid())
        while True:
            board.report.remote(self.counters.report(replica, self.engine.stats()))
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def _generate(self, prompt: list[int], on_partial: Callable[[str], None] | None = None) -> str:
        """The engine's reply, counted by how it ended (as the bot's metrics count replies)."""
        started = time.monotonic()
        try:
            text = await self.engine.generate(prompt, on_partial)
        except EngineError as exc:
            self.counters.count(reply_kind(exc), time.monotonic() - started)
            raise
        self.counters.count(reply_kind(None, text), time.monotonic() - started)
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
            prompt = self.engine.encode_prompt(turns, system_prompt=system)
        except ValueError as exc:  # a system message that leaves no room for the conversation
            return error_response(400, f"the messages do not fit the model: {exc}", "invalid_request_error")
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

        sent = ""
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                text = await _next_partial(partials, reply)
                if text is None:
                    break
                if text.startswith(sent) and text != sent:
                    yield chunk({"content": text[len(sent) :]})
                    sent = text
            try:
                final = reply.result()
            except EngineError as exc:
                yield sse(error_body(*engine_error(exc)))
                return
            if final.startswith(sent):
                if final != sent:
                    yield chunk({"content": final[len(sent) :]})
            else:  # cannot happen with the engine's partials (each a prefix of the final text)
                log.warning("a streamed reply's final text does not extend what was sent")
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


def wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def port_problem(host: str, port: int) -> str | None:
    """Why the HTTP proxy could not listen there (checked before Ray starts, which would only retry), or None."""
    try:
        with socket.create_server((host, port)):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def main(argv: list[str] | None = None, *, until: Callable[[], None] = wait_for_stop) -> int:
    """Start Ray on this machine (no dashboard), run the app on SERVE_HOST:SERVE_PORT until stopped."""
    argparse.ArgumentParser(
        prog="python -m bot.serve",
        description="Serve the model over the OpenAI chat completions API (Ray Serve), configured by the bot's "
        "settings (.env, the environment) and SERVE_HOST, SERVE_PORT, SERVE_REPLICAS.",
    ).parse_args(argv)
    try:
        settings = load_settings()
        from bot.engine.loading import ModelLoadError, check_model_name

        try:
            check_model_name(settings.model_name)
        except ModelLoadError as exc:
            raise SettingsError(str(exc)) from None
    except SettingsError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return 2
    problem = port_problem(settings.serve_host, settings.serve_port)
    if problem:
        print(
            f"Cannot serve on SERVE_HOST {settings.serve_host}, SERVE_PORT {settings.serve_port}: {problem}",
            file=sys.stderr,
        )
        return 1
    if settings.metrics_port is not None:
        problem = port_problem(settings.metrics_host, settings.metrics_port)
        if problem:
            print(
                f"Configuration error: METRICS_PORT {settings.metrics_port} on {settings.metrics_host}: {problem}",
                file=sys.stderr,
            )
            return 2
    logging.basicConfig(level=settings.log_level, format="[%(asctime)s] [%(levelname)-8s] %(name)s: %(message)s")
    import ray

    cpus = os.cpu_count() or 1
    ray.init(include_dashboard=False, num_cpus=cpus, logging_level=logging.WARNING, log_to_driver=True)
    metrics_server = None
    try:
        if settings.metrics_port is not None:  # replicas find the board by name when they start
            board = MetricsBoard.options(name=BOARD_NAME, namespace=BOARD_NAMESPACE).remote()  # type: ignore[attr-defined]
            metrics_server = serve_board_metrics(board, settings.metrics_host, settings.metrics_port)
            print(
                f"Metrics at http://{settings.metrics_host}:{settings.metrics_port}/metrics (readiness: /ready)",
                flush=True,
            )
        serve.start(http_options={"host": settings.serve_host, "port": settings.serve_port})
        replicas = settings.serve_replicas
        try:
            serve.run(
                build_app(settings, replicas=replicas, num_cpus=cpus / replicas),  # a share: never unschedulable
                name=APP_NAME,
                route_prefix="/",
            )
        except RuntimeError as exc:
            print(f"Could not start the model server: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 1
        url = f"http://{settings.serve_host}:{settings.serve_port}"
        print(f"Serving {settings.model_name} at {url}/v1 (point the bot at it with ENGINE_URL={url})", flush=True)
        until()
        print("Stopping the model server.", flush=True)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
