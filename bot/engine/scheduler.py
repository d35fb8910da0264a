"""The decode loop: requests join and leave the running batch at every decoding step.

One thread runs it. Between two steps it retires the requests that finished (their answers go out
at once), admits waiting requests up to `max_batch` (each one's encoder pass runs then), and checks
every request's own deadline. Each step then advances every row of every running request by one
token (iteration-level scheduling, as in Orca and TGI).

A fault never ends the loop quietly. One that concerns a single request (its prompt, its search)
fails that request alone; one in the batch's shared state (a step, moving rows, removing a block)
fails the requests of that batch, empties the runner and goes on with the next request. Only when
even that recovery fails does the loop stop for good: every waiting request is then told, `failure`
says why, and new requests are refused at once.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch

from bot.engine.decoding import DecodingPlan, Search, logits_processors, new_search
from bot.engine.errors import EngineBusy, EngineClosed, EngineError, GenerationTimeout

log = logging.getLogger(__name__)

Deliver = Callable[[str | None, BaseException | None], None]
Progress = Callable[[list[int]], None]
# A prompt -> the tokens its search starts from, and the encoder's ids (None without an encoder):
# the model family's `decoder_start` (bot/engine/families.py).
DecoderStart = Callable[[list[int], DecodingPlan], tuple[list[int], list[int] | None]]


@dataclass
class Request:
    """One prompt waiting for its reply. `deliver` is called once, from the engine thread."""

    input_ids: list[int]
    deliver: Deliver
    deadline: float
    abandoned: Callable[[], bool] = lambda: False
    submitted: float = field(default_factory=time.monotonic)
    # Called from the engine thread after each step with the tokens chosen so far, for streaming.
    # Only searches that commit to their tokens as they go (greedy) report progress.
    progress: Progress | None = None
    answered: bool = False  # `deliver` has been called: it never is twice


@dataclass
class _Running:
    request: Request
    search: Search


@dataclass
class LoopCounters:
    """What the loop has done so far; read (not written) by other threads for `/stats`."""

    replies: int = 0
    tokens: int = 0
    step_seconds: float = 0.0
    running: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    queue_waits: deque[float] = field(default_factory=lambda: deque(maxlen=1000))


_STOP = object()


class Runner(Protocol):
    """A model stepped one token at a time over packed rows: `Seq2SeqRunner` or `CausalRunner`."""

    max_blocks: int
    beams: int
    device: torch.device

    @property
    def rows(self) -> int: ...

    def cache_bytes(self) -> int: ...

    def add_block(self, input_ids: list[int]) -> int: ...

    def remove_block(self, block: int) -> None: ...

    def retain(self, block: int, tokens: list[int], prompt_length: int) -> bool:
        """Keep a finished block's keys/values of `tokens` for later prompts; False if not kept."""

    def reorder_rows(self, order: torch.Tensor, filled: int) -> None: ...

    def reset(self) -> None:
        """Drop every block at once (after a fault left the batch in an unknown state)."""

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...


class Scheduler:
    """Admits, steps and retires requests on one `Runner`; `run()` is the thread's body."""

    def __init__(
        self,
        runner: Runner,
        plan: DecodingPlan,
        generation_config: Any,
        decode: Callable[[list[int]], str],
        *,
        max_queue: int,
        prefill_chunk_tokens: int = 0,
        decoder_start: DecoderStart,
    ) -> None:
        self.runner = runner
        self.decoder_start = decoder_start
        # While replies are running, a new prompt is read in at most this many tokens per step
        # (0: at once when it joins); only runners that can (`begin_block`, the causal one) do.
        self.prefill_chunk_tokens = prefill_chunk_tokens if hasattr(runner, "begin_block") else 0
        self._joining: tuple[Request, float] | None = None  # the request being read in, and when it was
        self.plan = plan
        self.generation_config = generation_config
        self.decode = decode
        self.max_queue = max_queue
        self.counters = LoopCounters()
        self.closing = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._running: list[_Running] = []
        self._seeds = random.Random()  # each sampled reply draws from a generator of its own
        self.failure: str | None = None  # why the loop stopped for good; None while it runs
        self.beat = time.monotonic()  # when the loop last went round (a stuck step shows here)
        self._gate = threading.Lock()  # a request is queued before the loop dies, or refused after

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, request: Request) -> None:
        with self._gate:
            if self.failure is not None:
                raise EngineError(self.failure)
            if self.closing.is_set():
                raise EngineClosed("the bot is shutting down")
            if self._queue.qsize() >= self.max_queue:
                raise EngineBusy(f"{self.max_queue} requests are already waiting")
            self._queue.put(request)

    def stop(self) -> None:
        """Finish at the next step boundary; running and waiting requests are told the bot is closing."""
        self.closing.set()
        self._queue.put(_STOP)

    # ----- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.closing.is_set():
                try:
                    self._go_round()
                except Exception as exc:  # noqa: BLE001 - the batch's requests are told; the loop goes on
                    self._recover(exc)
        except BaseException as exc:  # noqa: BLE001 - even recovering failed: stop, and tell everyone
            self._die(exc)
            return
        closed = EngineClosed("the bot is shutting down")
        self._drop_joining(closed)
        self._fail_running(closed)
        self._fail_waiting(closed)

    def _go_round(self) -> None:
        """One turn of the loop: admit (waiting for work when idle), step, expire."""
        self.beat = time.monotonic()
        if not self._running and self._joining is None and not self._admit(block=True):
            return
        self.beat = time.monotonic()
        self._admit(block=False)
        if self._running:
            self._step()
        self._expire()

    def _recover(self, exc: Exception) -> None:
        """A fault in the batch's shared state: its requests fail, the runner starts empty."""
        log.error(
            "the decode loop failed; %d replies in the batch are told, the loop goes on",
            len(self._running),
            exc_info=exc,
        )
        error = EngineError(f"generation failed: {exc}")
        running, self._running = self._running, []
        self.counters.running = 0
        for entry in running:
            self._finish(entry.request, None, error)
        if self._joining is not None:
            self._finish(self._joining[0], None, error)
            self._joining = None
        self.runner.reset()  # if this fails too, the loop cannot go on (see `run`)

    def _die(self, exc: BaseException) -> None:
        """The loop cannot go on: refuse new requests, fail every request it holds, say why once."""
        reason = f"the model stopped working ({type(exc).__name__}: {exc}); restart the bot"
        log.critical("the decode loop stopped: %s", reason, exc_info=exc)
        with self._gate:
            self.failure = reason
            self.closing.set()
        error = EngineError(reason)
        for entry in self._running:
            self._finish(entry.request, None, error)
        self._running = []
        if self._joining is not None:
            self._finish(self._joining[0], None, error)
            self._joining = None
        self.counters.running = 0
        self._fail_waiting(error)

    def _admit(self, *, block: bool) -> bool:
        """Move waiting requests into the batch while there is room; False if the loop must stop.

        With `prefill_chunk_tokens` and replies running, prompts are read in at most that many
        tokens per step, all joining requests together: one that does not fit in what is left
        stays joining (`_read_joining`) and is read on over the next steps, before any other.
        """
        budget = self.prefill_chunk_tokens if self._running else 0
        if self._joining is not None:
            budget = self._read_joining(budget)
        while len(self._running) < self.runner.max_blocks and self._joining is None:
            try:
                item = self._queue.get() if block else self._queue.get_nowait()
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            if item.abandoned():
                continue
            now = time.monotonic()
            if now >= item.deadline:
                self._finish(item, None, GenerationTimeout("waited past the deadline"))
                continue
            try:
                if self.prefill_chunk_tokens and self._running:
                    cast(Any, self.runner).begin_block(item.input_ids)
                    self._joining = (item, now)
                    budget = self._read_joining(budget)
                    continue
                slot = self.runner.add_block(item.input_ids)
            except Exception as exc:
                log.exception("could not start a reply")
                self._finish(item, None, EngineError(f"generation failed: {exc}"))
                continue
            self._start(item, slot, now)
        return True

    def _read_joining(self, budget: int) -> int:
        """Read up to `budget` more tokens of the joining request's prompt (all the rest when nothing
        else runs); start it once read. Returns what is left of the budget."""
        assert self._joining is not None
        item, admitted = self._joining
        runner = cast(Any, self.runner)
        left = runner.joining.target - runner.joining.filled
        take = left if not self._running else min(left, budget)
        try:
            if take or not left:
                left = runner.prefill_some(take)
        except Exception as exc:
            log.exception("could not read a prompt in")
            runner.cancel_joining()
            self._joining = None
            self._finish(item, None, EngineError(f"generation failed: {exc}"))
            return budget - take
        if not left:
            self._joining = None
            self._start(item, self.runner.rows - 1, admitted)
        return budget - take

    def _drop_joining(self, error: BaseException) -> None:
        if self._joining is not None:
            cast(Any, self.runner).cancel_joining()
            self._finish(self._joining[0], None, error)
            self._joining = None

    def _start(self, item: Request, slot: int, admitted: float) -> None:
        """A request whose prompt is read in starts decoding (or fails alone, if its search cannot start)."""
        try:
            search = self._new_search(item)
        except Exception as exc:
            log.exception("could not start a reply's search")
            self.runner.remove_block(slot)
            self._finish(item, None, EngineError(f"generation failed: {exc}"))
            return
        self._running.append(_Running(item, search))
        self.counters.running = len(self._running)
        self.counters.queue_waits.append(admitted - item.submitted)

    def _new_search(self, request: Request) -> Search:
        prefix, encoder_ids = self.decoder_start(request.input_ids, self.plan)
        processors = logits_processors(self.generation_config, self.plan, encoder_ids, len(prefix))
        generator = torch.Generator().manual_seed(self._seeds.randrange(2**63)) if self.plan.sample else None
        return new_search(self.plan, processors, prefix, generator)

    def _step(self) -> None:
        started = time.monotonic()
        running = self._running
        try:
            tokens = [t for r in running for t in r.search.next_tokens()]
            positions = [r.search.length - 1 for r in running for _ in range(r.search.rows)]
            logits = self.runner.step(
                torch.tensor(tokens, device=self.runner.device), torch.tensor(positions, device=self.runner.device)
            ).cpu()
        except Exception as exc:
            log.exception("a decoding step failed for %d requests", len(running))
            self._fail_running(EngineError(f"generation failed: {exc}"))
            return
        beams = self.runner.beams
        order = list(range(self.runner.rows))
        moved = False
        done: list[int] = []
        outcomes: list[tuple[Request, str | None, BaseException | None]] = []
        for i, entry in enumerate(running):
            try:
                rows, finished = entry.search.advance(logits[i * beams : (i + 1) * beams])
                if finished:
                    tokens_out = entry.search.result()
                    self.counters.tokens += len(tokens_out)
                    self._retain(i, entry, tokens_out)
                    outcomes.append((entry.request, self.decode(tokens_out).strip(), None))
                    done.append(i)
            except Exception as exc:
                log.exception("choosing the next token failed")
                outcomes.append((entry.request, None, EngineError(f"generation failed: {exc}")))
                done.append(i)
                continue
            if rows is not None:
                order[i * beams : (i + 1) * beams] = [i * beams + r for r in rows]
                moved = True
            if entry.request.progress is not None and entry.search.streams and i not in done:
                entry.request.progress(entry.search.result())
        try:
            if moved:
                filled = max(r.search.length for r in running)
                self.runner.reorder_rows(torch.tensor(order, device=self.runner.device), filled)
            self._retire(done)
        finally:  # finished answers go out even if the batch failed after them (`run` recovers it)
            self.counters.step_seconds += time.monotonic() - started
            for request, text, error in outcomes:  # answers go out as soon as the step is over
                self._finish(request, text, error)

    def _retain(self, block: int, entry: _Running, reply: list[int]) -> None:
        """Offer a finished row to the runner's prefix cache: its prompt and reply, less the last token
        (whose keys no step computed). Never fails the reply: a row not kept is only a slower next turn."""
        prompt = entry.request.input_ids
        try:
            self.runner.retain(block, (prompt + reply)[: entry.search.length - 1], len(prompt))
        except Exception:
            log.exception("could not keep a finished conversation's keys and values")

    def _expire(self) -> None:
        """Stop requests past their own deadline, or whose waiter has gone; the others keep running."""
        now = time.monotonic()
        if self._joining is not None:
            joining = self._joining[0]
            if joining.abandoned():
                cast(Any, self.runner).cancel_joining()
                self._joining = None
            elif now >= joining.deadline:
                self._drop_joining(GenerationTimeout(f"stopped after {now - joining.submitted:.1f}s"))
        late: list[int] = []
        for i, entry in enumerate(self._running):
            if entry.request.abandoned():
                late.append(i)
            elif now >= entry.request.deadline:
                waited = now - entry.request.submitted
                log.warning("a reply was stopped after %.1fs (GENERATION_TIMEOUT_SECONDS)", waited)
                self._finish(entry.request, None, GenerationTimeout(f"stopped after {waited:.1f}s"))
                late.append(i)
        self._retire(late)

    def _retire(self, indexes: Sequence[int]) -> None:
        """Remove these requests from the batch. Highest first: the runner moves its last block into
        each hole, and that block is never one still to be removed."""
        for i in sorted(indexes, reverse=True):
            self.runner.remove_block(i)
            self._running[i] = self._running[-1]
            self._running.pop()
        self.counters.running = len(self._running)

    def _fail_running(self, error: EngineError) -> None:
        for entry in self._running:
            self._finish(entry.request, None, error)
        self._retire(range(len(self._running)))

    def _fail_waiting(self, error: EngineError) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._finish(item, None, error)

    def _finish(self, request: Request, text: str | None, error: BaseException | None) -> None:
        if request.answered:
            return
        request.answered = True
        if error is None:
            self.counters.replies += 1
            self.counters.latencies.append(time.monotonic() - request.submitted)
        request.deliver(text, error)
