"""The decode loop: requests join and leave the running batch at every decoding step.

One thread runs it. Each request is one `Sequence`, from its submission to its answer: its prompt,
its search, its block in the runner, its deadline and its status. Between two steps the scheduler
retires the sequences that finished (their answers go out at once), admits waiting ones up to
`max_batch` (each one's encoder pass or prefill runs then), and expires those past their own
deadline or whose waiter has gone. Each step (`runner.step_batch`) then advances every row of every
running sequence by one token (iteration-level scheduling, as in Orca and TGI).

A fault never ends the loop quietly. One that concerns a single request (its prompt, its search)
fails that request alone; one in the batch's shared state (a step, moving rows, removing a block)
fails the requests of that batch, empties the runner and goes on with the next request. Only when
even that recovery fails does the loop stop for good: every waiting request is then told, `failure`
says why, and new requests are refused at once.
"""

from __future__ import annotations

import enum
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from bot.engine.decoding import DecodingPlan, Search, logits_processors, new_search
from bot.engine.errors import EngineBusy, EngineClosed, EngineError, GenerationTimeout
from bot.engine.runner import ChunkedRunner, Runner, can_chunk, move_rows, step_batch
from bot.engine.step_budget import StepBudget

__all__ = ["LoopCounters", "Request", "Runner", "Scheduler", "Sequence", "Status"]

log = logging.getLogger(__name__)

Deliver = Callable[[str | None, BaseException | None], None]
Progress = Callable[[list[int]], None]
# A prompt -> the tokens its search starts from, and the encoder's ids (None without an encoder):
# the model family's `decoder_start` (bot/engine/families.py).
DecoderStart = Callable[[list[int], DecodingPlan], tuple[list[int], list[int] | None]]


class Status(enum.Enum):
    WAITING = "waiting"  # in the queue
    JOINING = "joining"  # its prompt is being read in, a chunk per step
    RUNNING = "running"  # decoding, in block `slot` of the runner
    FINISHED = "finished"  # answered (a reply or an error), or dropped once its waiter had gone


@dataclass(eq=False)
class Sequence:
    """One request, from its submission to its answer. `deliver` is called once, from the engine thread.

    The caller fills the first fields; the scheduler the rest as the sequence moves through it.
    """

    input_ids: list[int]
    deliver: Deliver
    deadline: float
    abandoned: Callable[[], bool] = lambda: False
    submitted: float = field(default_factory=time.monotonic)
    # Called from the engine thread after each step with the tokens chosen so far, for streaming.
    # Only searches that commit to their tokens as they go (greedy) report progress.
    progress: Progress | None = None
    answered: bool = False  # `deliver` has been called: it never is twice
    status: Status = Status.WAITING
    admitted: float | None = None  # when it left the queue
    search: Search | None = None  # its token choices, once its prompt is read in
    slot: int | None = None  # its block in the runner while running (blocks stay packed: it can move)
    # Prompt positions copied from the runner's prefix cache rather than read (known when it joins in
    # chunks: `begin_block` says how many are left; `add_block` does not say).
    cached: int | None = None

    @property
    def running_search(self) -> Search:
        assert self.search is not None, "a running sequence has its search"
        return self.search


# The name callers submit by (`Engine.generate`, the benchmarks).
Request = Sequence


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
        prefill_chunk_tokens: int | None = 0,
        decoder_start: DecoderStart,
    ) -> None:
        self.runner = runner
        self.decoder_start = decoder_start
        # While replies are running, a new prompt is read in at most this many tokens per step
        # (0: at once when it joins; None: as many as keep a step within 2x a plain one, measured
        # by `StepBudget`); only runners that can (`begin_block`, the causal one) do.
        self.prefill_chunk_tokens = prefill_chunk_tokens if can_chunk(runner) else 0
        self.step_budget = StepBudget()
        self._read_this_round = 0  # prompt tokens read in since the round began
        self._joining: Sequence | None = None  # the sequence whose prompt is being read in
        self.plan = plan
        self.generation_config = generation_config
        self.decode = decode
        self.max_queue = max_queue
        self.counters = LoopCounters()
        self.closing = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._running: list[Sequence] = []  # in block order: `_running[i].slot == i`
        self._seeds = random.Random()  # each sampled reply draws from a generator of its own
        self.failure: str | None = None  # why the loop stopped for good; None while it runs
        self.beat = time.monotonic()  # when the loop last went round (a stuck step shows here)
        self._gate = threading.Lock()  # a request is queued before the loop dies, or refused after

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, request: Sequence) -> None:
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
        self.beat = began = time.monotonic()
        self._read_this_round = 0
        self._admit(block=False)
        if self._running:
            rows = self.runner.rows
            self._step()
            if self.prefill_chunk_tokens is None:
                self.step_budget.record(time.monotonic() - began, self._read_this_round, rows)
        self._expire()

    def _recover(self, exc: Exception) -> None:
        """A fault in the batch's shared state: its sequences fail, the runner starts empty."""
        log.error(
            "the decode loop failed; %d replies in the batch are told, the loop goes on",
            len(self._running),
            exc_info=exc,
        )
        error = EngineError(f"generation failed: {exc}")
        running, self._running = self._running, []
        self.counters.running = 0
        for seq in running:
            self._finish(seq, None, error)
        if self._joining is not None:
            self._finish(self._joining, None, error)
            self._joining = None
        self.runner.reset()  # if this fails too, the loop cannot go on (see `run`)

    def _die(self, exc: BaseException) -> None:
        """The loop cannot go on: refuse new requests, fail every sequence it holds, say why once."""
        reason = f"the model stopped working ({type(exc).__name__}: {exc}); restart the bot"
        log.critical("the decode loop stopped: %s", reason, exc_info=exc)
        with self._gate:
            self.failure = reason
            self.closing.set()
        error = EngineError(reason)
        for seq in self._running:
            self._finish(seq, None, error)
        self._running = []
        if self._joining is not None:
            self._finish(self._joining, None, error)
            self._joining = None
        self.counters.running = 0
        self._fail_waiting(error)

    # ----- admitting ----------------------------------------------------------------------------

    def _admit(self, *, block: bool) -> bool:
        """Move waiting sequences into the batch while there is room; False if the loop must stop.

        With `prefill_chunk_tokens` and replies running, prompts are read in at most that many
        tokens per step, all joining sequences together: one that does not fit in what is left
        stays joining (`_read_joining`) and is read on over the next steps, before any other.
        """
        budget = self._chunk_budget() if self._running else 0
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
            seq = cast(Sequence, item)
            if seq.abandoned():
                seq.status = Status.FINISHED
                continue
            now = time.monotonic()
            if now >= seq.deadline:
                self._finish(seq, None, GenerationTimeout("waited past the deadline"))
                continue
            seq.admitted = now
            try:
                if self.prefill_chunk_tokens != 0 and self._running:
                    left = cast(ChunkedRunner, self.runner).begin_block(seq.input_ids)
                    seq.cached = len(seq.input_ids) - 1 - left
                    seq.status = Status.JOINING
                    self._joining = seq
                    budget = self._read_joining(budget)
                    continue
                slot = self.runner.add_block(seq.input_ids)
            except Exception as exc:
                log.exception("could not start a reply")
                self._finish(seq, None, EngineError(f"generation failed: {exc}"))
                continue
            self._start(seq, slot)
        return True

    def _chunk_budget(self) -> int:
        fixed = self.prefill_chunk_tokens
        return self.step_budget.tokens(self.runner.rows) if fixed is None else fixed

    def _read_joining(self, budget: int) -> int:
        """Read up to `budget` more tokens of the joining sequence's prompt (all the rest when nothing
        else runs); start it once read. Returns what is left of the budget."""
        assert self._joining is not None
        seq = self._joining
        runner = cast(Any, self.runner)
        left = runner.joining.target - runner.joining.filled
        take = left if not self._running else min(left, budget)
        try:
            if take or not left:
                left = runner.prefill_some(take)
                self._read_this_round += take
        except Exception as exc:
            log.exception("could not read a prompt in")
            runner.cancel_joining()
            self._joining = None
            self._finish(seq, None, EngineError(f"generation failed: {exc}"))
            return budget - take
        if not left:
            self._joining = None
            self._start(seq, self.runner.rows // self.runner.beams - 1)
        return budget - take

    def _drop_joining(self, error: BaseException) -> None:
        if self._joining is not None:
            cast(ChunkedRunner, self.runner).cancel_joining()
            self._finish(self._joining, None, error)
            self._joining = None

    def _start(self, seq: Sequence, slot: int) -> None:
        """A sequence whose prompt is read in starts decoding (or fails alone, if its search cannot start)."""
        try:
            seq.search = self._new_search(seq)
        except Exception as exc:
            log.exception("could not start a reply's search")
            self.runner.remove_block(slot)
            self._finish(seq, None, EngineError(f"generation failed: {exc}"))
            return
        seq.slot, seq.status = slot, Status.RUNNING
        self._running.append(seq)
        self.counters.running = len(self._running)
        assert seq.admitted is not None
        self.counters.queue_waits.append(seq.admitted - seq.submitted)

    def _new_search(self, seq: Sequence) -> Search:
        prefix, encoder_ids = self.decoder_start(seq.input_ids, self.plan)
        processors = logits_processors(self.generation_config, self.plan, encoder_ids, len(prefix))
        generator = torch.Generator().manual_seed(self._seeds.randrange(2**63)) if self.plan.sample else None
        return new_search(self.plan, processors, prefix, generator)

    # ----- stepping -----------------------------------------------------------------------------

    def _step(self) -> None:
        started = time.monotonic()
        running = self._running
        try:
            logits = step_batch(self.runner, (seq.running_search for seq in running))
        except Exception as exc:
            log.exception("a decoding step failed for %d requests", len(running))
            self._fail_running(EngineError(f"generation failed: {exc}"))
            return
        beams = self.runner.beams
        order = list(range(self.runner.rows))
        moved = False
        done: list[int] = []
        outcomes: list[tuple[Sequence, str | None, BaseException | None]] = []
        for i, seq in enumerate(running):
            search = seq.running_search
            try:
                rows, finished = search.advance(logits[i * beams : (i + 1) * beams])
                if finished:
                    tokens_out = search.result()
                    self.counters.tokens += len(tokens_out)
                    self._retain(i, seq, tokens_out)
                    outcomes.append((seq, self.decode(tokens_out).strip(), None))
                    done.append(i)
            except Exception as exc:
                log.exception("choosing the next token failed")
                outcomes.append((seq, None, EngineError(f"generation failed: {exc}")))
                done.append(i)
                continue
            if rows is not None:
                order[i * beams : (i + 1) * beams] = [i * beams + r for r in rows]
                moved = True
            if seq.progress is not None and search.streams and i not in done:
                seq.progress(search.result())
        try:
            if moved:
                move_rows(self.runner, order, max(seq.running_search.length for seq in running))
            self._retire(done)
        finally:  # finished answers go out even if the batch failed after them (`run` recovers it)
            self.counters.step_seconds += time.monotonic() - started
            for seq, text, error in outcomes:  # answers go out as soon as the step is over
                self._finish(seq, text, error)

    def _retain(self, block: int, seq: Sequence, reply: list[int]) -> None:
        """Offer a finished row to the runner's prefix cache: its prompt and reply, less the last token
        (whose keys no step computed). Never fails the reply: a row not kept is only a slower next turn."""
        prompt = seq.input_ids
        try:
            self.runner.retain(block, (prompt + reply)[: seq.running_search.length - 1], len(prompt))
        except Exception:
            log.exception("could not keep a finished conversation's keys and values")

    # ----- expiring and retiring ------------------------------------------------------------------

    def _expire(self) -> None:
        """Stop sequences past their own deadline, or whose waiter has gone; the others keep running."""
        now = time.monotonic()
        if self._joining is not None:
            joining = self._joining
            if joining.abandoned():
                cast(ChunkedRunner, self.runner).cancel_joining()
                joining.status = Status.FINISHED
                self._joining = None
            elif now >= joining.deadline:
                self._drop_joining(GenerationTimeout(f"stopped after {now - joining.submitted:.1f}s"))
        late: list[int] = []
        for i, seq in enumerate(self._running):
            if seq.abandoned():
                late.append(i)
            elif now >= seq.deadline:
                waited = now - seq.submitted
                log.warning("a reply was stopped after %.1fs (GENERATION_TIMEOUT_SECONDS)", waited)
                self._finish(seq, None, GenerationTimeout(f"stopped after {waited:.1f}s"))
                late.append(i)
        self._retire(late)

    def _retire(self, indexes: Iterable[int]) -> None:
        """Remove these sequences from the batch. Highest first: the runner moves its last block into
        each hole, and that block is never one still to be removed; the sequence moves with it."""
        for i in sorted(indexes, reverse=True):
            self.runner.remove_block(i)
            gone = self._running[i]
            gone.slot = None
            gone.status = Status.FINISHED
            last = self._running.pop()
            if last is not gone:
                last.slot = i
                self._running[i] = last
        self.counters.running = len(self._running)

    def _fail_running(self, error: EngineError) -> None:
        for seq in self._running:
            self._finish(seq, None, error)
        self._retire(range(len(self._running)))

    def _fail_waiting(self, error: EngineError) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._finish(item, None, error)

    def _finish(self, seq: Sequence, text: str | None, error: BaseException | None) -> None:
        seq.status = Status.FINISHED
        if seq.answered:
            return
        seq.answered = True
        if error is None:
            self.counters.replies += 1
            self.counters.latencies.append(time.monotonic() - seq.submitted)
        seq.deliver(text, error)
