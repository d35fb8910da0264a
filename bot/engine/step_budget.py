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
next one to `most` tokens (a 512-token chunk stalled a reply for 1.1 s before that cap). A prompt's
last chunk, smaller than offered because the prompt ended there, does not lower that cap: when it
did, each of 16 prompts sent at once began again at a few tokens a step, and the batch never filled.
"""

from __future__ import annotations

import statistics
from collections import deque

SMOOTHING = 0.2  # weight of the newest per-token cost in its running average
PLAIN_STEPS = 8  # a plain step is the median of this many recent ones


class StepBudget:
    """Prompt tokens per step that keep a step within `limit` times a plain one (with some headroom).

    A plain step costs more with more rows running, and while prompts keep joining (16 messages sent
    at once) no plain step is taken at the new size. So each plain step is kept with its row count,
    and the plain step expected at another count adds what a row costs: a row is one more row in
    every Linear, as a prompt token is, so it is charged what a prompt token is measured to cost.
    Without that, each reply that joined looked like prompt tokens grown dearer, and the budget
    fell to a token or two a step while the batch filled.
    """

    def __init__(self, *, limit: float = 2.0, headroom: float = 0.6, first: int = 4, most: int = 512) -> None:
        self.limit = limit
        self.headroom = headroom  # aim at this share of the allowed extra time: steps are noisy
        self.first = first  # before anything is measured
        self.most = most
        self._plain: deque[tuple[float, int]] = deque(maxlen=PLAIN_STEPS)  # recent (seconds, rows) with no prompt
        self.token_seconds: float | None = None  # what one prompt token (or one more row) adds to a step
        self._given = first  # the largest chunk the next one may double (the last measured one)
        self._offered = first  # what `tokens` last gave

    @property
    def plain_seconds(self) -> float | None:
        """A step with no prompt tokens as measured: the median of the recent ones."""
        return statistics.median(seconds for seconds, _ in self._plain) if self._plain else None

    def expected_plain(self, rows: int) -> float | None:
        """A step with no prompt tokens over `rows` rows: the recent plain steps, each moved by the
        rows it had fewer or more."""
        if not self._plain:
            return None
        per_row = self.token_seconds or 0.0
        smallest = min(seconds for seconds, _ in self._plain)
        expected = statistics.median(seconds + (rows - had) * per_row for seconds, had in self._plain)
        return max(expected, smallest / 2)  # fewer rows cost less, but never next to nothing

    def tokens(self, rows: int = 1) -> int:
        plain = self.expected_plain(rows)
        if plain is None or self.token_seconds is None:
            return self.first
        extra = (self.limit - 1.0) * self.headroom * plain
        fits = int(extra / max(self.token_seconds, 1e-9))
        self._offered = max(1, min(self.most, 2 * self._given, fits))
        return self._offered

    def record(self, seconds: float, tokens: int, rows: int = 1) -> None:
        """One round of the loop: a step over `rows` running rows plus `tokens` prompt tokens."""
        plain = self.expected_plain(rows)
        if tokens <= 0:
            self._plain.append((seconds, rows))
        elif plain is not None:
            # a round that read less than it was offered (the prompt ended) says nothing against the
            # offer: keeping the cap from it made every next prompt start again from a few tokens
            self._given = tokens if tokens >= self._offered else max(self._given, tokens)
            per_token = max(seconds - plain, 0.0) / tokens
            old = self.token_seconds
            self.token_seconds = per_token if old is None else old + SMOOTHING * (per_token - old)
