"""The model engine: loading, precision, and a decode loop that batches requests step by step.

PyTorch is not async-aware, so every model call runs on one dedicated thread (`scheduler.py`). The
event loop only submits requests and awaits futures. Requests join the running batch at the next
decoding step and leave it as soon as their reply is complete; the queue of requests waiting for a
place is bounded and refuses work when full.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bot.core.engine_api import EngineStats, percentile
from bot.core.partial import GrowingText
from bot.core.types import Turn
from bot.engine.detokenize import IncrementalText
from bot.engine.errors import EngineBusy, EngineClosed, EngineError, EngineSettingsError, GenerationTimeout
from bot.engine.families import ModelFamily
from bot.engine.loading import ModelLoadError, load_tokenizer_and_model, one_line

__all__ = [
    "Engine",
    "EngineBusy",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "EngineSettingsError",
    "EngineStats",
    "GenerationTimeout",
]

log = logging.getLogger(__name__)

# Attention caches of an int8 model stay fp32 up to this size (greedy decoding, small batches), and
# are bf16 beyond it (10 beams x 8 replies: 0.7 GB as fp32), which keeps serving under 1.5 GB RSS.
FP32_CACHE_LIMIT_BYTES = 256 << 20
# A reply is awaited this long past its own deadline before the engine is taken for stuck: the decode
# loop stops a late reply itself at the next step boundary, so only a step that never ends gets here.
STUCK_GRACE_SECONDS = 30.0
# How long `close()` waits for the decode loop to finish its step.
CLOSE_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class EngineConfig:
    model_name: str
    device: str = "auto"
    precision: str = "auto"
    num_beams: int | None = None
    min_new_tokens: int | None = None
    max_new_tokens: int | None = None
    max_batch: int = 8
    max_queue: int = 32
    generation_timeout_seconds: float = 60.0
    # Chat-template (decoder-only) models only:
    system_prompt: str = ""
    context_tokens: int | None = None  # None: the model's own limit, capped at families.DEFAULT_CONTEXT_TOKENS
    sampling: bool = True  # False: always greedy, whatever the model's generation_config says
    # Keys/values of finished conversations kept for their next prompt (bot/engine/prefix_cache.py), in
    # MB: None, as much as the attention slabs take (max_batch full context windows); 0, none.
    prefix_cache_mb: int | None = None
    # While replies are being written, a new prompt is read in at most this many tokens per decoding
    # step, so they keep streaming while it joins; 0: every prompt is read in at once; None (auto):
    # as many as keep a step within twice a plain one, measured as it runs (bot/engine/step_budget.py).
    prefill_chunk_tokens: int | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> EngineConfig:
        return cls(
            model_name=settings.model_name,
            device=settings.device,
            precision=settings.precision,
            num_beams=settings.num_beams,
            min_new_tokens=settings.min_new_tokens,
            max_new_tokens=settings.max_new_tokens,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            generation_timeout_seconds=settings.generation_timeout_seconds,
            system_prompt=settings.system_prompt,
            context_tokens=settings.context_tokens,
            sampling=settings.sampling,
            prefix_cache_mb=settings.prefix_cache_mb,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
        )


class Engine:
    """Owns the tokenizer, the model and the decode-loop thread. Knows nothing of Discord."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        self.precision = config.precision
        self.max_input_tokens = 0
        self._tokenizer: Any = None
        self._family: ModelFamily | None = None  # what the loaded kind of model does its own way
        self._model: Any = None
        self._generation_config: Any = None
        self._scheduler: Any = None  # a bot.engine.scheduler.Scheduler once loaded
        self._thread: threading.Thread | None = None
        # Prompts are rendered and cut here, off the event loop: one thread, so the tokenizer is
        # never encoding for two callers at once.
        self._prompts = ThreadPoolExecutor(1, thread_name_prefix="prompts")
        self._closed = False
        self._started_at = time.monotonic()

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the tokenizer and model on the engine thread, then start serving."""
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(loop, loaded), name="engine", daemon=True)
        self._thread.start()
        await loaded
        self._started_at = time.monotonic()

    @property
    def closed(self) -> bool:
        """Whether `close()` has been called: the engine takes no more work."""
        return self._closed

    def failure(self) -> str | None:
        """Why the engine cannot answer any more; None while it can (and while it loads or is closed).

        The decode loop recovers from faults on its own; this says when it could not (it stopped,
        or one step has run past every reply's deadline), for `/ready` and the model server's health.
        """
        scheduler = self._scheduler
        if scheduler is None or self._closed:
            return None
        if scheduler.failure is not None:
            return scheduler.failure
        if self._thread is not None and not self._thread.is_alive():
            return "the engine thread stopped; restart the bot"
        busy = scheduler.counters.running or scheduler.waiting
        stalled = time.monotonic() - scheduler.beat
        if busy and stalled > self.config.generation_timeout_seconds + STUCK_GRACE_SECONDS:
            return f"the decode loop has not moved for {stalled:.0f}s"
        return None

    async def close(self) -> None:
        """Stop the decode loop at the next step; running and waiting requests are told it closed."""
        if self._closed:
            return
        self._closed = True
        self._prompts.shutdown(wait=False, cancel_futures=True)
        if self._scheduler is not None:
            self._scheduler.stop()
        # A model still loading cannot be interrupted; its daemon thread ends with the process. So does
        # a step that never ends: closing waits for it a bounded time.
        if self._thread is not None and self._scheduler is not None:
            await asyncio.to_thread(self._thread.join, CLOSE_WAIT_SECONDS)
            if self._thread.is_alive():
                log.warning("the decode loop did not stop within %.0fs; leaving it behind", CLOSE_WAIT_SECONDS)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----- requests ----------------------------------------------------------------------------

    def encode_prompt(self, history: Sequence[Turn], *, system_prompt: str | None = None) -> list[int]:
        """The prompt's token ids: BlenderBot's format, or the model's chat template, cut to fit.

        `system_prompt` replaces SYSTEM_PROMPT for this prompt (a chat model's; BlenderBot has none).
        """
        if self._family is None:
            raise EngineClosed("the model is not loaded")
        return self._family.encode(history, system_prompt)

    def forget_cached_conversations(self) -> int:
        """Drop every conversation's kept keys/values (`/forget-me`: nothing derived from a user's words
        stays in memory until evicted); the system prompt's prefix stays. Safe from any thread; returns
        how many entries went."""
        runner = self._scheduler.runner if self._scheduler is not None else None
        cache = getattr(runner, "prefix_cache", None)
        return 0 if cache is None else cache.clear(keep_pinned=True)

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is to this model, without special tokens (the server's usage counts)."""
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    @property
    def can_stream(self) -> bool:
        """Whether replies come out word by word (greedy decoding); beam search settles only at the end."""
        return self._scheduler is not None and self._scheduler.plan.num_beams == 1

    async def reply(
        self,
        history: Sequence[Turn],
        on_partial: Callable[[str], None] | None = None,
        *,
        system_prompt: str | None = None,
    ) -> str:
        """Generate the bot's next turn for `history` (oldest first, newest user turn last).

        With `on_partial`, and when the engine can stream, it is called on the event loop with the
        reply so far each time the model has written more; each text extends the one before.
        `system_prompt` (a server's persona) replaces SYSTEM_PROMPT for this reply (BlenderBot has none).
        """
        return await self.generate(await self.prompt_for(history, system_prompt=system_prompt), on_partial)

    # ----- personas (bot.core.guild_settings): begin -----

    @property
    def uses_system_prompt(self) -> bool:
        """Whether the model reads a system prompt: a chat model does, BlenderBot does not."""
        return self._family is not None and self._family.reads_system_prompt

    async def check_system_prompt(self, text: str) -> str | None:
        """Why `text` cannot be a chat model's system prompt (it leaves the conversation under
        families.ROOMY_CONVERSATION_TOKENS of the prompt), with the numbers; None when it fits, and for BlenderBot.

        Tokenized on the engine's prompt thread, as prompts are: off the event loop, and never at the same
        time as a prompt (the tokenizer is not shared between threads)."""
        family = self._family
        if family is None:
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._prompts, family.system_prompt_problem, text)
        except RuntimeError:  # closed meanwhile: the executor takes no more work
            raise EngineClosed("the model is not running") from None

    # ----- personas: end -----

    async def prompt_for(self, history: Sequence[Turn], *, system_prompt: str | None = None) -> list[int]:
        """`encode_prompt` on the engine's prompt thread: rendering a long conversation and cutting it
        token-exactly takes several renders, which would hold up every other conversation's event loop."""
        if self._closed or self._scheduler is None:
            raise EngineClosed("the model is not running")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._prompts, functools.partial(self.encode_prompt, history, system_prompt=system_prompt)
            )
        except RuntimeError as exc:  # closed meanwhile: the executor takes no more work
            if self._closed:
                raise EngineClosed("the model is not running") from None
            raise EngineError(str(exc)) from exc

    async def generate(self, prompt_ids: list[int], on_partial: Callable[[str], None] | None = None) -> str:
        """`reply` for a prompt already encoded by `encode_prompt` (the server counts its tokens)."""
        from bot.engine.scheduler import Request

        if self._closed or self._scheduler is None:
            raise EngineClosed("the model is not running")
        failure = self.failure()
        if failure is not None:
            raise EngineError(failure)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()

        def deliver(text: str | None, error: BaseException | None) -> None:
            _settle_from_thread(loop, future, text, error)

        now = time.monotonic()
        self._scheduler.submit(
            Request(
                prompt_ids,
                deliver,
                deadline=now + self.config.generation_timeout_seconds,
                abandoned=future.cancelled,
                submitted=now,
                progress=None if on_partial is None else self._progress(loop, future, on_partial),
            )
        )
        # Bounded even if the loop never answers (a step that hangs): the loop stops a late reply
        # itself, so this only fires when it cannot, and cancelling the future drops the request.
        limit = self.config.generation_timeout_seconds + STUCK_GRACE_SECONDS
        try:
            return await asyncio.wait_for(future, limit)
        except asyncio.TimeoutError:
            log.error("the engine gave no answer within %.0fs; its decode loop seems stuck", limit)
            raise GenerationTimeout(f"no answer from the decode loop within {limit:.0f}s") from None

    def _progress(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[str], on_partial: Callable[[str], None]
    ) -> Callable[[list[int]], None]:
        """A progress callback for the engine thread: decodes on the event loop, reports new text only.

        Each report decodes only the newest tokens (`IncrementalText`), not the whole reply again.
        """
        said = GrowingText()
        decoded = IncrementalText(self._tokenizer)
        family = self._family
        assert family is not None

        def report(tokens: list[int]) -> None:
            if future.done():
                return  # the final answer (or an error) is already out
            text = family.visible(decoded.update(tokens)).lstrip()
            # (IncrementalText holds back a character still split across tokens.)
            if not text.strip() or said.advance(text) is None:
                return
            on_partial(text.rstrip())

        def progress(tokens: list[int]) -> None:  # on the engine thread
            _call_soon(loop, report, tokens)

        return progress

    def stats(self) -> EngineStats:
        scheduler = self._scheduler
        counters = scheduler.counters if scheduler is not None else None
        latencies = list(counters.latencies) if counters else []
        waits = list(counters.queue_waits) if counters else []
        return EngineStats(
            model=self.config.model_name,
            device=self.device,
            precision=self.precision,
            queue_depth=scheduler.waiting if scheduler is not None else 0,
            running=counters.running if counters else 0,
            replies=counters.replies if counters else 0,
            latency_p50_s=percentile(latencies, 0.50),
            latency_p95_s=percentile(latencies, 0.95),
            queue_wait_p50_s=percentile(waits, 0.50),
            queue_wait_p95_s=percentile(waits, 0.95),
            tokens_per_second=(counters.tokens / counters.step_seconds) if counters and counters.step_seconds else None,
            uptime_s=time.monotonic() - self._started_at,
        )

    # ----- the engine thread -------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, loaded: asyncio.Future[None]) -> None:
        try:
            scheduler = self._load()
        except BaseException as exc:  # noqa: BLE001 - reported to the awaiting coroutine
            error = exc if isinstance(exc, EngineError) else EngineError(one_line(exc) or type(exc).__name__)
            _settle_from_thread(loop, loaded, None, error)
            return
        self._scheduler = scheduler
        if self._closed or not _settle_from_thread(loop, loaded, None, None):
            return  # closed while loading: nobody is waiting for this model
        scheduler.run()  # never raises: a loop that cannot go on says so in `scheduler.failure`

    def _load(self) -> Any:
        from bot.engine.decoding import DecodingPlan
        from bot.engine.device import limit_heap_fragmentation, prepare_model, resolve_device, resolve_precision
        from bot.engine.families import family_for
        from bot.engine.scheduler import Scheduler

        started = time.monotonic()
        limit_heap_fragmentation()
        self.device = resolve_device(self.config.device)
        precision = resolve_precision(self.config.precision, self.device)
        log.info("loading %s on %s (%s)", self.config.model_name, self.device, precision)
        try:
            self._tokenizer, model = load_tokenizer_and_model(self.config.model_name)
        except ModelLoadError as exc:
            raise EngineError(str(exc)) from None
        model, self.precision = prepare_model(model, self.device, precision)
        self._model = model
        family = family_for(self._tokenizer, model.config, self.config)
        positions = family.context_positions()
        self._generation_config = gen = family.generation_config(model, positions)
        plan = DecodingPlan.from_generation_config(gen, positions)
        self.max_input_tokens = family.limits(plan)
        runner = family.build_runner(model, plan, self._cache_dtype)
        self._family = family
        scheduler = Scheduler(
            runner,
            plan,
            gen,
            family.text,
            max_queue=self.config.max_queue,
            prefill_chunk_tokens=self.config.prefill_chunk_tokens,
            decoder_start=family.decoder_start,
        )
        log.info(
            "model ready in %.1fs: %s, %s-%s new tokens, prompts up to %d tokens, up to %d replies at once "
            "(%.0f MB of attention caches, up to %.0f MB of finished conversations kept)",
            time.monotonic() - started,
            f"{plan.num_beams} beams" if plan.num_beams > 1 else ("sampling" if plan.sample else "greedy"),
            max(plan.min_length - 1, 0),
            plan.max_length - 1,
            self.max_input_tokens,
            self.config.max_batch,
            runner.cache_bytes() / 1e6,
            getattr(getattr(runner, "prefix_cache", None), "max_bytes", 0) / 1e6,
        )
        return scheduler

    def _cache_dtype(self, fp32_bytes: int) -> Any:
        import torch

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        if dtype is not None:
            return dtype
        # int8: fp32 caches are faster on the CPU, bf16 ones half the size
        return torch.float32 if fp32_bytes <= FP32_CACHE_LIMIT_BYTES else torch.bfloat16


def _settle_from_thread(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, error: BaseException | None
) -> bool:
    """Settle a future from the engine thread; False if its event loop is already gone."""
    return _call_soon(loop, _settle, future, result, error)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> bool:
    """Run `callback(*args)` on `loop` from another thread; False if the loop is already gone."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop was closed, e.g. the bot stopped while the model was loading
        return False
    return True


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Complete a future on its own loop, unless its waiter has given up."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
