"""The scheduler alone, over a fake runner (no model): admission, refusal, expiry, cancellation,
retirement, faults and chunked prefill, driven one turn of the loop at a time."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import GenerationConfig

from bot.engine.decoding import DecodingPlan
from bot.engine.errors import EngineBusy, EngineClosed, EngineError, GenerationTimeout
from bot.engine.scheduler import Scheduler, Sequence, Status

EOS, WORD, VOCAB = 2, 3, 8
FAIL = 7  # a prompt starting with this token cannot be read in (the runner raises)
PLAN = DecodingPlan(
    num_beams=1,
    max_length=64,
    min_length=0,
    length_penalty=1.0,
    early_stopping=False,
    eos_ids=(EOS,),
    pad_id=0,
    start_id=0,
)


@dataclass
class _Joining:
    tokens: list[int]
    filled: int
    target: int


class FakeRunner:
    """Packed blocks as the real runners keep them (the last block moves into a removed one's place).

    A prompt `[n, ...]` gets a reply of `n` tokens: `n - 1` words, then the end token. Every call is
    recorded in `calls`; `rows_per_step` says how many rows each step ran.
    """

    beams = 1
    device = torch.device("cpu")

    def __init__(self, max_blocks: int = 2, *, chunked: bool = False) -> None:
        self.max_blocks = max_blocks
        self.prompts: list[list[int]] = []  # block -> its prompt
        self.calls: list[tuple[Any, ...]] = []
        self.rows_per_step: list[int] = []
        self.joining: _Joining | None = None
        if not chunked:  # the scheduler reads prompts in chunks only from runners that can
            self.begin_block = None
            del self.begin_block

    @property
    def blocks(self) -> int:
        return len(self.prompts)

    @property
    def rows(self) -> int:
        return self.blocks

    def cache_bytes(self) -> int:
        return 0

    def add_block(self, input_ids: list[int]) -> int:
        self.calls.append(("add", input_ids[0]))
        if input_ids[0] == FAIL:
            raise RuntimeError("cannot read this prompt")
        if self.blocks >= self.max_blocks:
            raise RuntimeError("no free block")
        self.prompts.append(list(input_ids))
        return self.blocks - 1

    def begin_block(self, input_ids: list[int]) -> int:
        self.calls.append(("begin", input_ids[0]))
        self.joining = _Joining(list(input_ids), 0, len(input_ids) - 1)
        return self.joining.target

    def prefill_some(self, budget: int | None) -> int:
        joining = self.joining
        assert joining is not None
        end = joining.target if budget is None else min(joining.target, joining.filled + budget)
        self.calls.append(("chunk", joining.tokens[0], end - joining.filled))
        joining.filled = end
        left = joining.target - joining.filled
        if not left:
            self.prompts.append(joining.tokens)
            self.joining = None
        return left

    def cancel_joining(self) -> None:
        self.calls.append(("cancel",))
        self.joining = None

    def remove_block(self, block: int) -> None:
        self.calls.append(("remove", self.prompts[block][0]))
        self.prompts[block] = self.prompts[-1]
        self.prompts.pop()

    def retain(self, block: int, tokens: list[int], prompt_length: int) -> bool:
        return False

    def reorder_rows(self, order: torch.Tensor, filled: int) -> None:
        raise AssertionError("greedy rows never move")

    def reset(self) -> None:
        self.calls.append(("reset",))
        self.prompts = []
        self.joining = None

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert len(tokens) == len(positions) == self.rows
        self.rows_per_step.append(self.rows)
        logits = torch.zeros(self.rows, VOCAB)
        for row, (prompt, position) in enumerate(zip(self.prompts, positions.tolist(), strict=True)):
            written = position - (len(prompt) - 1)  # reply tokens before this step's
            logits[row, EOS if written + 1 >= prompt[0] else WORD] = 1.0
        return logits


def scheduler(runner: FakeRunner, *, max_queue: int = 8, chunk: int | None = 0) -> Scheduler:
    return Scheduler(
        runner,  # type: ignore[arg-type]
        PLAN,
        GenerationConfig(),
        lambda ids: " ".join(map(str, ids)),
        max_queue=max_queue,
        prefill_chunk_tokens=chunk,
        decoder_start=lambda prompt, plan: (prompt, None),
    )


class Answers:
    """Every sequence's answer, in the order they came."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str | None, BaseException | None]] = []

    def sequence(self, name: str, length: int, *, prompt: int = 3, deadline: float = 1e12) -> Sequence:
        def deliver(text: str | None, error: BaseException | None) -> None:
            self.got.append((name, text, error))

        return Sequence([length, *range(10, 10 + prompt - 1)], deliver, deadline=deadline)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.got]

    def of(self, name: str) -> tuple[str | None, BaseException | None]:
        [(text, error)] = [(t, e) for n, t, e in self.got if n == name]
        return text, error


def rounds(s: Scheduler, n: int) -> None:
    """`n` turns of the loop; each must have work (an idle loop waits for the next request)."""
    for _ in range(n):
        assert s._running or s._joining is not None or s.waiting
        s._go_round()


def reply(length: int) -> str:
    return " ".join([str(WORD)] * (length - 1) + [str(EOS)])


def test_admits_up_to_max_batch_and_the_rest_wait() -> None:
    runner, answers = FakeRunner(max_blocks=2), Answers()
    s = scheduler(runner)
    seqs = [answers.sequence(name, 3) for name in "abc"]
    for seq in seqs:
        s.submit(seq)
    rounds(s, 1)
    assert [seq.status for seq in seqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING]
    assert [seq.slot for seq in seqs] == [0, 1, None] and s.waiting == 1
    rounds(s, 2)  # a and b finish at their third token
    assert answers.names == ["a", "b"] and answers.of("a") == (reply(3), None)
    rounds(s, 3)
    assert answers.names == ["a", "b", "c"] and runner.rows_per_step == [2, 2, 2, 1, 1, 1]
    assert all(seq.status is Status.FINISHED and seq.slot is None for seq in seqs)
    assert s.counters.replies == 3 and s.counters.running == 0


def test_a_full_queue_refuses_with_engine_busy() -> None:
    answers = Answers()
    s = scheduler(FakeRunner(), max_queue=2)
    s.submit(answers.sequence("a", 2))
    s.submit(answers.sequence("b", 2))
    with pytest.raises(EngineBusy):
        s.submit(answers.sequence("c", 2))


def test_requests_retire_as_they_finish_and_the_last_block_moves_into_the_hole() -> None:
    runner, answers = FakeRunner(max_blocks=3), Answers()
    s = scheduler(runner)
    long, short, middle = answers.sequence("long", 5), answers.sequence("short", 1), answers.sequence("middle", 3)
    for seq in (long, short, middle):
        s.submit(seq)
    rounds(s, 1)  # short's first token is its end token
    assert answers.names == ["short"]
    assert (long.slot, middle.slot) == (0, 1) and runner.prompts == [long.input_ids, middle.input_ids]
    rounds(s, 4)
    assert answers.names == ["short", "middle", "long"]
    assert [c for c in runner.calls if c[0] == "remove"] == [("remove", 1), ("remove", 3), ("remove", 5)]


def test_a_deadline_stops_that_request_alone() -> None:
    runner, answers = FakeRunner(), Answers()
    s = scheduler(runner)
    late, other = answers.sequence("late", 10), answers.sequence("other", 3)
    s.submit(late)
    s.submit(other)
    rounds(s, 1)
    late.deadline = 0.0  # its time runs out mid-reply
    rounds(s, 1)
    text, error = answers.of("late")
    assert text is None and isinstance(error, GenerationTimeout)
    assert late.status is Status.FINISHED and other.slot == 0
    rounds(s, 1)
    assert answers.of("other") == (reply(3), None)


def test_a_request_past_its_deadline_while_waiting_never_runs() -> None:
    runner, answers = FakeRunner(), Answers()
    s = scheduler(runner)
    s.submit(answers.sequence("stale", 3, deadline=0.0))
    s.submit(answers.sequence("fresh", 1))
    rounds(s, 1)
    assert isinstance(answers.of("stale")[1], GenerationTimeout)
    assert answers.of("fresh") == (reply(1), None) and ("add", 3) not in runner.calls


def test_an_abandoned_request_leaves_at_the_next_step_without_an_answer() -> None:
    runner, answers = FakeRunner(), Answers()
    s = scheduler(runner)
    gone, stays = answers.sequence("gone", 10), answers.sequence("stays", 4)
    s.submit(gone)
    s.submit(stays)
    rounds(s, 1)
    gone.abandoned = lambda: True  # its waiter cancelled
    rounds(s, 1)
    assert runner.blocks == 1 and gone.status is Status.FINISHED and answers.names == []
    rounds(s, 2)
    assert answers.names == ["stays"] and runner.rows_per_step == [2, 2, 1, 1]


def test_a_prompt_that_cannot_be_read_fails_alone() -> None:
    runner, answers = FakeRunner(), Answers()
    s = scheduler(runner)
    s.submit(answers.sequence("ok", 2))
    bad = answers.sequence("bad", 2)
    bad.input_ids[0] = FAIL
    s.submit(bad)
    rounds(s, 2)
    text, error = answers.of("bad")
    assert text is None and isinstance(error, EngineError) and "cannot read" in str(error)
    assert answers.of("ok") == (reply(2), None)


def test_a_fault_choosing_one_requests_token_fails_it_alone() -> None:
    runner, answers = FakeRunner(), Answers()
    s = scheduler(runner)
    broken, fine = answers.sequence("broken", 3), answers.sequence("fine", 3)
    s.submit(broken)
    s.submit(fine)
    rounds(s, 1)
    assert broken.search is not None

    def fail(logits: torch.Tensor) -> Any:
        raise RuntimeError("search broke")

    broken.search.advance = fail  # type: ignore[method-assign]
    rounds(s, 2)
    assert isinstance(answers.of("broken")[1], EngineError)
    assert answers.of("fine") == (reply(3), None) and s.failure is None


def test_a_failed_step_fails_the_batch_and_the_next_request_runs() -> None:
    runner, answers = FakeRunner(), Answers()
    s = scheduler(runner)
    s.submit(answers.sequence("a", 3))
    s.submit(answers.sequence("b", 3))
    real = runner.step
    runner.step = lambda *args: (_ for _ in ()).throw(RuntimeError("step broke"))  # type: ignore[method-assign]
    rounds(s, 1)
    assert all(isinstance(error, EngineError) for _, _, error in answers.got) and answers.names == ["a", "b"]
    assert runner.blocks == 0
    runner.step = real  # type: ignore[method-assign]
    s.submit(answers.sequence("c", 1))
    rounds(s, 1)
    assert answers.of("c") == (reply(1), None)


def test_a_fault_while_expiring_is_recovered_by_the_loop() -> None:
    runner, answers = FakeRunner(), Answers()
    s = scheduler(runner)
    s.submit(answers.sequence("a", 5))
    calls = [0]
    real = s._expire

    def expire() -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("expire broke")
        real()

    s._expire = expire  # type: ignore[method-assign]
    s.submit(answers.sequence("b", 1))
    thread = threading.Thread(target=s.run)
    thread.start()
    try:
        for _ in range(200):
            if len(answers.got) == 2:
                break
            threading.Event().wait(0.01)
    finally:
        s.stop()
        thread.join(5)
    assert isinstance(answers.of("a")[1], EngineError) and ("reset",) in runner.calls
    assert answers.of("b") == (reply(1), None) and s.failure is None


def test_stop_tells_running_and_waiting_requests() -> None:
    runner, answers = FakeRunner(max_blocks=1), Answers()
    s = scheduler(runner)
    s.submit(answers.sequence("running", 50))
    s.submit(answers.sequence("waiting", 50))
    rounds(s, 1)
    s.stop()
    s.run()  # ends at once: the loop is closing
    assert sorted(answers.names) == ["running", "waiting"]
    assert all(isinstance(error, EngineClosed) for _, _, error in answers.got)
    with pytest.raises(EngineClosed):
        s.submit(answers.sequence("late", 1))


def test_a_long_prompt_joins_in_chunks_while_the_batch_keeps_stepping() -> None:
    runner, answers = FakeRunner(max_blocks=3, chunked=True), Answers()
    s = scheduler(runner, chunk=4)
    first = answers.sequence("first", 6)
    s.submit(first)
    rounds(s, 1)  # nothing else runs: read at once
    assert runner.calls == [("add", 6)]
    joining = answers.sequence("joining", 2, prompt=11)  # 10 positions to read, 4 a step
    s.submit(joining)
    rounds(s, 1)
    assert joining.status is Status.JOINING and s._joining is joining and joining.cached == 0
    assert runner.rows_per_step[-1] == 1  # the batch stepped while it joined
    rounds(s, 2)
    assert joining.status is Status.RUNNING and joining.slot == 1
    chunks = [c[2] for c in runner.calls if c[0] == "chunk" and c[1] == 2]
    assert chunks == [4, 4, 2]
    rounds(s, 2)
    assert answers.names == ["joining", "first"]
    assert answers.of("joining") == (reply(2), None) and answers.of("first") == (reply(6), None)


def test_auto_chunks_follow_the_measured_step_budget() -> None:
    runner, answers = FakeRunner(max_blocks=3, chunked=True), Answers()
    s = scheduler(runner, chunk=None)
    s.step_budget.first = 3
    s.submit(answers.sequence("first", 8))
    rounds(s, 2)  # plain steps, measured
    assert s.step_budget.plain_seconds is not None and s.step_budget.token_seconds is None
    s.submit(answers.sequence("joining", 2, prompt=11))
    rounds(s, 1)
    assert s.step_budget.token_seconds is not None  # the round with 3 prompt tokens was measured too
    s.step_budget.tokens = lambda rows=1: 5  # type: ignore[method-assign]
    rounds(s, 2)
    chunks = [c[2] for c in runner.calls if c[0] == "chunk" and c[1] == 2]
    assert chunks == [3, 5, 2]


def test_a_joining_request_past_its_deadline_fails_alone() -> None:
    runner, answers = FakeRunner(max_blocks=3, chunked=True), Answers()
    s = scheduler(runner, chunk=2)
    s.submit(answers.sequence("first", 5))
    rounds(s, 1)
    joining = answers.sequence("joining", 2, prompt=11)
    s.submit(joining)
    rounds(s, 1)
    assert s._joining is joining
    joining.deadline = 0.0
    rounds(s, 1)
    assert isinstance(answers.of("joining")[1], GenerationTimeout) and ("cancel",) in runner.calls
    assert s._joining is None and runner.joining is None
    rounds(s, 2)
    assert answers.of("first") == (reply(5), None)
