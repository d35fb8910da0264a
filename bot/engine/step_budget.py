"""How many prompt tokens may join a decoding step while replies are running (`PREFILL_CHUNK_TOKENS=auto`).

On a CPU a step of one conversation reads every weight once and is bound by memory bandwidth, but
a prompt token costs arithmetic: on two cores a few tokens already double a step. A fixed chunk is
either too big for a slow machine (running replies stall) or too small for a fast one (the new
prompt waits longer than it needs to). So the budget is measured: the loop reports each round's
time and how many prompt tokens it read, and the budget is the number of tokens that keep a step
within `limit` times a plain step. The C decoder layers give bitwise the same result whatever
the chunks (`bot/engine/native.py`), so a budget that moves with the machine's load changes no reply.

Two things keep one noisy measurement from stalling the running replies: a plain step is the median
of the last few (the average carried a slow warm-up step for the whole of a join, since no plain
step is taken while a prompt joins), and the budget at most doubles from one round to the next, so
a chunk that happened to cost nothing (a step that was quick for other reasons) does not open the
next one to `most` tokens (a 512-token chunk stalled a reply for 1.1 s before that cap).
"""

from __future__ import annotations

import statistics
from collections import deque

SMOOTHING = 0.2  # weight of the newest per-token cost in its running average
PLAIN_STEPS = 8  # a plain step is the median of this many recent ones


class StepBudget:
    """Prompt tokens per step that keep a step within `limit` times a plain one (with some headroom)."""

    def __init__(self, *, limit: float = 2.0, headroom: float = 0.6, first: int = 4, most: int = 512) -> None:
        self.limit = limit
        self.headroom = headroom  # aim at this share of the allowed extra time: steps are noisy
        self.first = first  # before anything is measured
        self.most = most
        self._plain: deque[float] = deque(maxlen=PLAIN_STEPS)  # recent steps with no prompt tokens
        self.token_seconds: float | None = None  # what one prompt token adds to a step
        self._given = first  # the budget of the last round that read prompt tokens

    @property
    def plain_seconds(self) -> float | None:
        """A step with no prompt tokens: the median of the recent ones."""
        return statistics.median(self._plain) if self._plain else None

    def tokens(self) -> int:
        plain = self.plain_seconds
        if plain is None or self.token_seconds is None:
            return self.first
        extra = (self.limit - 1.0) * self.headroom * plain
        fits = int(extra / max(self.token_seconds, 1e-9))
        return max(1, min(self.most, 2 * self._given, fits))

    def record(self, seconds: float, tokens: int) -> None:
        """One round of the loop: a step over the running replies plus `tokens` prompt tokens."""
        plain = self.plain_seconds
        if tokens <= 0:
            self._plain.append(seconds)
        elif plain is not None:
            self._given = tokens
            per_token = max(seconds - plain, 0.0) / tokens
            old = self.token_seconds
            self.token_seconds = per_token if old is None else old + SMOOTHING * (per_token - old)
