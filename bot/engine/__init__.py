"""The model engine: loading, precision, and one generation thread fed by a batching queue.

PyTorch is not async-aware, so every model call runs on one dedicated thread. The event loop only
submits requests and awaits futures. Requests from different conversations that wait at the same
time are generated in one padded `generate` call; the queue is bounded and refuses work when full.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.engine.prompt import build_input_ids
from bot.types import Turn

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The model could not be loaded or failed to generate."""


class EngineBusy(EngineError):
    """Too many requests are waiting; try again in a moment."""


class EngineClosed(EngineError):
    """The engine has been closed and takes no more work."""


class GenerationTimeout(EngineError):
    """Generation ran past its deadline and was stopped."""


@dataclass(frozen=True)
class EngineConfig:
    model_name: str
    device: str = "auto"
    precision: str = "auto"
    num_beams: int | None = None
    min_new_tokens: int | None = None
    max_new_tokens: int | None = None
    max_batch: int = 8
    batch_window_ms: int = 20
    max_queue: int = 32
    generation_timeout_seconds: float = 60.0

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
            batch_window_ms=settings.batch_window_ms,
            max_queue=settings.max_queue,
            generation_timeout_seconds=settings.generation_timeout_seconds,
        )


@dataclass(frozen=True)
class EngineStats:
    model: str
    device: str
    precision: str
    queue_depth: int
    replies: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    tokens_per_second: float | None
    uptime_s: float


@dataclass
class _Request:
    input_ids: list[int]
    future: asyncio.Future[str]
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.monotonic)


_STOP = object()


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def resolve_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise EngineError("DEVICE=cuda but no CUDA GPU is available to torch")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise EngineError("DEVICE=mps but Apple's MPS backend is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(requested: str, device: str) -> str:
    import torch

    if requested == "auto":
        if device == "cpu":
            return "int8"
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16"
    if requested == "int8" and device != "cpu":
        raise EngineError(f"PRECISION=int8 works only on the CPU, not on DEVICE={device}")
    if requested == "fp16" and device == "cpu":
        raise EngineError("PRECISION=fp16 is not supported on the CPU; use bf16 or int8")
    return requested


def _can_quantize() -> bool:
    try:
        from bot.engine.int8 import can_quantize
    except Exception:  # noqa: BLE001 - a torch without quantized ops
        return False
    return can_quantize()


def prepare_model(model: Any, device: str, precision: str) -> tuple[Any, str]:
    """Move the model to its device and precision; returns the model and the precision used.

    int8 (CPU only): every nn.Linear, the tied output projection included, becomes a
    `RowwiseInt8Linear` (bot/engine/int8.py): int8 weights per output channel, activations quantized per
    row so a reply does not depend on what else is in the batch. Linears are swapped one at a time
    and the fp32 pages of each are dropped as soon as it is quantized, so the fp32 model is never
    fully resident.
    """
    import gc

    import torch

    if precision == "int8" and not _can_quantize():
        log.warning("this torch build cannot quantize to int8; falling back to bf16")
        precision = "bf16"
    if precision == "int8":
        from bot.engine.int8 import detach_from_files_, quantize_linears_

        with torch.no_grad():
            quantize_linears_(model)
            detach_from_files_(model)
        gc.collect()  # closes the mapped checkpoint once nothing points into it
    elif precision == "bf16":
        model = model.to(dtype=torch.bfloat16)
    elif precision == "fp16":
        model = model.to(dtype=torch.float16)
    model = model.to(device).eval()
    if getattr(model.config, "is_encoder_decoder", False):
        from bot.engine.beam_search import reorder_self_attention_only

        model._reorder_cache = reorder_self_attention_only  # generate() prefers the model's own hook
    return model, precision


def _limit_heap_fragmentation(threshold: int = 4 << 20) -> None:
    """Give large buffers back to the OS when freed (glibc), so RSS stays near what is in use.

    glibc raises its mmap threshold each time a large block is freed, after which tensors of tens of
    MB come from the engine thread's heap arena, which cannot shrink past its live top: loading the
    int8 model then sits at ~1.4 GB instead of ~0.8 GB. A fixed threshold keeps them as mmaps.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; fixing it also turns off the dynamic raise
    except (OSError, AttributeError):
        pass


class _Deadline:
    """A stopping criterion that ends the whole batch once its deadline passes or the engine closes."""

    def __init__(self, deadline: float, closing: threading.Event) -> None:
        self.deadline = deadline
        self.closing = closing
        self.expired = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if time.monotonic() >= self.deadline or self.closing.is_set():
            self.expired = True
        return torch.full((input_ids.shape[0],), self.expired, dtype=torch.bool, device=input_ids.device)


class Engine:
    """Owns the tokenizer, the model and the generation thread. Knows nothing of Discord."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        self.precision = config.precision
        self.max_input_tokens = 0
        self._tokenizer: Any = None
        self._model: Any = None
        self._generation_config: Any = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._closing = threading.Event()  # seen by the generation thread mid-batch
        self._started_at = time.monotonic()
        self._latencies: deque[float] = deque(maxlen=1000)
        self._replies = 0
        self._tokens_generated = 0
        self._generate_seconds = 0.0

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the tokenizer and model on the generation thread, then start serving."""
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(loop, loaded), name="engine", daemon=True)
        self._thread.start()
        await loaded
        self._started_at = time.monotonic()

    async def close(self) -> None:
        """Stop the generation thread after the batch in progress; waiting requests are refused."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._drain(EngineClosed("the bot is shutting down"))
        self._queue.put(_STOP)
        # A model still loading cannot be interrupted; its daemon thread ends with the process.
        if self._thread is not None and self._model is not None:
            await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----- requests ----------------------------------------------------------------------------

    def encode_prompt(self, history: Sequence[Turn]) -> list[int]:
        tok = self._tokenizer
        return build_input_ids(
            history,
            lambda text: tok(text, add_special_tokens=False)["input_ids"],
            tok.eos_token_id,
            self.max_input_tokens,
        )

    async def reply(self, history: Sequence[Turn]) -> str:
        """Generate the bot's next turn for `history` (oldest first, newest user turn last)."""
        if self._closed or self._model is None:
            raise EngineClosed("the model is not running")
        if self._queue.qsize() >= self.config.max_queue:
            raise EngineBusy(f"{self.config.max_queue} requests are already waiting")
        loop = asyncio.get_running_loop()
        request = _Request(self.encode_prompt(history), loop.create_future(), loop)
        self._queue.put(request)
        return await request.future

    def stats(self) -> EngineStats:
        latencies = list(self._latencies)
        return EngineStats(
            model=self.config.model_name,
            device=self.device,
            precision=self.precision,
            queue_depth=self._queue.qsize(),
            replies=self._replies,
            latency_p50_s=_percentile(latencies, 0.50),
            latency_p95_s=_percentile(latencies, 0.95),
            tokens_per_second=(self._tokens_generated / self._generate_seconds) if self._generate_seconds else None,
            uptime_s=time.monotonic() - self._started_at,
        )

    # ----- the generation thread ---------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, loaded: asyncio.Future[None]) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - reported to the awaiting coroutine
            error = (
                exc if isinstance(exc, EngineError) else EngineError(f"could not load {self.config.model_name}: {exc}")
            )
            _settle_from_thread(loop, loaded, None, error)
            return
        if self._closed or not _settle_from_thread(loop, loaded, None, None):
            return  # closed while loading: nobody is waiting for this model
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._generate(batch)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one batch
                log.exception("could not finish a batch of %d", len(batch))
                for r in batch:
                    _settle_from_thread(r.loop, r.future, None, EngineError(f"generation failed: {exc}"))

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        started = time.monotonic()
        _limit_heap_fragmentation()
        self.device = resolve_device(self.config.device)
        precision = resolve_precision(self.config.precision, self.device)
        log.info("loading %s on %s (%s)", self.config.model_name, self.device, precision)
        self._tokenizer = AutoTokenizer.from_pretrained(self.config.model_name)
        model = AutoModelForSeq2SeqLM.from_pretrained(self.config.model_name, dtype=torch.float32)
        if not getattr(model.config, "is_encoder_decoder", False):
            raise EngineError(f"{self.config.model_name} is not an encoder-decoder chat model like BlenderBot")
        self._model, self.precision = prepare_model(model, self.device, precision)
        self.max_input_tokens = int(model.config.max_position_embeddings)
        self._generation_config = self._build_generation_config(self._model)
        if self._generation_config.num_beams > 1:
            from bot.engine.beam_search import share_cross_attention_

            for projection in share_cross_attention_(self._model):
                projection.group = self._generation_config.num_beams
        log.info(
            "model ready in %.1fs: %s beams, %s-%s new tokens, batch up to %d",
            time.monotonic() - started,
            self._generation_config.num_beams,
            self._generation_config.min_new_tokens or self._generation_config.min_length,
            self._generation_config.max_new_tokens or self._generation_config.max_length,
            self.config.max_batch,
        )

    def _build_generation_config(self, model: Any) -> Any:
        """The model's own generation_config with the settings' overrides, installed on the model.

        An override of the reply length replaces the model's min/max_length instead of sitting
        beside it (transformers warns on every call when both are set).
        """
        gen = model.generation_config
        gen = gen.__class__.from_dict(gen.to_dict())
        if self.config.num_beams is not None:
            gen.num_beams = self.config.num_beams
        if self.config.min_new_tokens is not None:
            gen.min_new_tokens, gen.min_length = self.config.min_new_tokens, None
        if self.config.max_new_tokens is not None:
            gen.max_new_tokens, gen.max_length = self.config.max_new_tokens, None
        # The decoder has as many positions as the encoder; never ask for more.
        limit = int(model.config.max_position_embeddings) - 1
        if (gen.max_new_tokens or 0) > limit or (gen.max_length or 0) > limit + 1:
            log.warning("reply length capped at %d tokens (the model's positions)", limit)
            if gen.max_new_tokens is not None:
                gen.max_new_tokens = min(gen.max_new_tokens, limit)
            if gen.max_length is not None:
                gen.max_length = min(gen.max_length, limit + 1)
        longest = gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length
        if (gen.min_new_tokens or 0) > longest:
            gen.min_new_tokens = longest
        if gen.num_beams == 1:
            gen.length_penalty = 1.0
            gen.early_stopping = False
        model.generation_config = gen
        return gen

    def _next_batch(self) -> list[_Request] | None:
        """Block for one request, then collect more for up to the batching window."""
        first = self._queue.get()
        if first is _STOP:
            return None
        batch: list[_Request] = [first]
        window_ends = time.monotonic() + self.config.batch_window_ms / 1000
        while len(batch) < self.config.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, window_ends - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # seen again once this batch is done
                break
            batch.append(item)
        return [r for r in batch if not r.future.cancelled()]

    def _generate(self, batch: list[_Request]) -> None:
        if not batch:
            return
        import torch

        started = time.monotonic()
        deadline = _Deadline(started + self.config.generation_timeout_seconds, self._closing)
        pad = self._tokenizer.pad_token_id
        # Every prompt is padded to the same fixed width, alone or batched: attention kernels add up
        # differently for different key lengths, so padding only to the batch's longest prompt would
        # let the other conversations in a batch change a reply. The cost is a little encoder work.
        width = max(self.max_input_tokens, max(len(r.input_ids) for r in batch))
        input_ids = torch.tensor([r.input_ids + [pad] * (width - len(r.input_ids)) for r in batch])
        attention = torch.tensor([[1] * len(r.input_ids) + [0] * (width - len(r.input_ids)) for r in batch])
        try:
            with torch.inference_mode():
                output = self._model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    generation_config=self._generation_config,
                    stopping_criteria=[deadline],
                )
        except Exception as exc:  # noqa: BLE001 - every waiting user gets an answer
            log.exception("generation failed for a batch of %d", len(batch))
            for r in batch:
                r.loop.call_soon_threadsafe(_settle, r.future, None, EngineError(f"generation failed: {exc}"))
            return
        elapsed = time.monotonic() - started
        if deadline.expired:
            error: EngineError
            if self._closing.is_set():
                error = EngineClosed("the bot is shutting down")
            else:
                log.warning("generation stopped after %.1fs (GENERATION_TIMEOUT_SECONDS)", elapsed)
                error = GenerationTimeout(f"stopped after {elapsed:.1f}s")
            for r in batch:
                r.loop.call_soon_threadsafe(_settle, r.future, None, error)
            return
        output = output.cpu()
        texts = self._tokenizer.batch_decode(output, skip_special_tokens=True)
        now = time.monotonic()
        special = set(self._tokenizer.all_special_ids)
        self._tokens_generated += sum(1 for t in output.flatten().tolist() if t not in special)
        self._generate_seconds += elapsed
        for r, text in zip(batch, texts):
            self._latencies.append(now - r.submitted)
            self._replies += 1
            r.loop.call_soon_threadsafe(_settle, r.future, text.strip(), None)

    def _drain(self, error: Exception) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item.loop.call_soon_threadsafe(_settle, item.future, None, error)


def _settle_from_thread(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, error: BaseException | None
) -> bool:
    """Settle a future from the generation thread; False if its event loop is already gone."""
    try:
        loop.call_soon_threadsafe(_settle, future, result, error)
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
