"""How many prompt tokens may join a decoding step while replies are running (`PREFILL_CHUNK_TOKENS=auto`).

On a CPU a step of one conversation reads every weight once and is bound by memory bandwidth, but
a prompt token costs arithmetic: on two cores a few tokens already double a step. A fixed chunk is
either too big for a slow machine (running replies stall) or too small for a fast one (the new
prompt waits longer than it needs to). So the budget is measured: the loop reports each round's
time and how many prompt tokens it read, and the budget is the number of tokens that keep a step
within `limit` times a plain step. The C decoder layers give bitwise the same result whatever
the chunks (`bot/engine/native.py`), so a budget that moves with the machine's load changes no reply.
"""

from __future__ import annotations

SMOOTHING = 0.2  # weight of the newest measurement in the running averages


class StepBudget:
    """Prompt tokens per step that keep a step within `limit` times a plain one (with some headroom)."""

    def __init__(self, *, limit: float = 2.0, headroom: float = 0.7, first: int = 4, most: int = 512) -> None:
        self.limit = limit
        self.headroom = headroom  # aim at this share of the allowed extra time: steps are noisy
        self.first = first  # before anything is measured
        self.most = most
        self.plain_seconds: float | None = None  # a step with no prompt tokens
        self.token_seconds: float | None = None  # what one prompt token adds to a step

    def tokens(self) -> int:
        if self.plain_seconds is None or self.token_seconds is None:
            return self.first
        extra = (self.limit - 1.0) * self.headroom * self.plain_seconds
        return max(1, min(self.most, int(extra / max(self.token_seconds, 1e-9))))

    def record(self, seconds: float, tokens: int) -> None:
        """One round of the loop: a step over the running replies plus `tokens` prompt tokens."""
        if tokens <= 0:
            self.plain_seconds = _average(self.plain_seconds, seconds)
        elif self.plain_seconds is not None:
            per_token = max(seconds - self.plain_seconds, 0.0) / tokens
            self.token_seconds = _average(self.token_seconds, per_token)


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTHING * (new - old)
