"""What the scheduler asks of a runner, and the tensors it builds for one step.

A runner (`Seq2SeqRunner`, `CausalRunner`) owns a model's attention slabs and steps it over packed
*blocks*, one per running request (`beams` rows each). The scheduler decides which requests run;
`step_batch` turns their searches into a step's token and position tensors, runs the runner's step
and hands back the logits on the CPU; `move_rows` applies the row order the searches chose.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from bot.engine.decoding import Search


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


class ChunkedRunner(Runner, Protocol):
    """A runner that can read a prompt in over several steps (`CausalRunner`): one block joins at a time."""

    def begin_block(self, input_ids: list[int]) -> int:
        """Start the joining block; returns how many prompt positions are left to read."""

    def prefill_some(self, budget: int | None) -> int:
        """Read up to `budget` more (None: all); returns how many are left (0: it has joined, last)."""

    def cancel_joining(self) -> None: ...


def can_chunk(runner: Runner) -> bool:
    return hasattr(runner, "begin_block")


def step_batch(runner: Runner, searches: Iterable[Search]) -> torch.Tensor:
    """One decoding step over every running block, in block order: each row is fed its newest token
    at its own position. Returns fp32 logits `[rows, vocab]` on the CPU."""
    tokens: list[int] = []
    positions: list[int] = []
    for search in searches:
        tokens += search.next_tokens()
        positions += [search.length - 1] * search.rows
    device = runner.device
    return runner.step(torch.tensor(tokens, device=device), torch.tensor(positions, device=device)).cpu()


def move_rows(runner: Runner, order: list[int], filled: int) -> None:
    """Row i takes the cache of row `order[i]` over the first `filled` positions (beams changing places)."""
    runner.reorder_rows(torch.tensor(order, device=runner.device), filled)
