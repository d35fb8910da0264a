"""Keys and values of conversations already read, kept so the next prompt prefills only what is new.

A chat model's next prompt in a channel is the previous prompt, the reply, and the new message: if
the keys/values of the previous prompt and reply are still at hand, only the new message needs a
forward pass. This module is that store: a bounded least-recently-used set of *entries*, each the
token ids one finished reply had in its row (prompt and reply, less the last token, whose keys were
never computed) and a copy of the keys/values of those positions.

Keyed by token ids only, never by channel or user: a position's keys and values depend only on the
tokens up to it (causal attention), so an entry serves any prompt that starts with the same tokens,
and its first `n` positions serve a prompt that shares only its first `n` tokens (the system
prompt, for a new conversation). A reset or edited history simply stops matching. Lookup takes the
longest common prefix over every entry (a few dozen entries of a few thousand tokens: microseconds
next to a prefill).

When a reply is kept, entries it supersedes go: those whose whole prompt it starts with (earlier
turns of the same conversation). They would only serve a prompt continuing their own reply's
tokens, which the next prompt re-renders from text anyway.

Memory is bounded in bytes; the least recently used entries go first. The lock makes `clear()`
safe from another thread; everything else runs on the engine thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Entry:
    """One kept row: `tokens` and their keys/values, [2 (keys, values), layers, kv_heads, len, head_dim]."""

    tokens: list[int]
    prompt_length: int  # how many of `tokens` were the prompt (the rest: the reply so far)
    states: torch.Tensor
    pinned: bool = False  # never evicted nor superseded (the system prompt's own prefix)

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()


@dataclass
class PrefixCacheCounters:
    """What the cache has saved so far (read by the bench and `/stats`-style reports)."""

    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0  # positions copied from the cache instead of prefilled
    prefilled_tokens: int = 0  # positions prefilled (what the cache could not supply)
    kept: int = 0
    evicted: int = 0
    superseded: int = 0
    history: list[int] = field(default_factory=list)  # reused tokens of the latest lookups, newest last

    def record(self, reused: int, prefilled: int) -> None:
        self.lookups += 1
        self.hits += reused > 0
        self.reused_tokens += reused
        self.prefilled_tokens += prefilled
        self.history = [*self.history[-99:], reused]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the usual case (a conversation continued), at C speed
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect on slices, still at C speed
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if list(a[lo:mid]) == list(b[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """A byte-bounded LRU of kept rows, looked up by longest common token prefix."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # oldest first
        self._next_id = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self.counters = PrefixCacheCounters()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def entries(self) -> list[Entry]:
        """The entries, least recently used first (for tests and reports)."""
        with self._lock:
            return list(self._entries.values())

    def lookup(self, tokens: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `tokens`, and that length (0 and None: no match).

        The entry becomes the most recently used one.
        """
        with self._lock:
            best: tuple[int, int] | None = None
            for key, entry in self._entries.items():
                length = common_prefix(entry.tokens, tokens)
                if length and (best is None or length > best[1]):
                    best = (key, length)
            if best is None:
                return None, 0
            self._entries.move_to_end(best[0])
            return self._entries[best[0]], best[1]

    def keep(self, tokens: list[int], prompt_length: int, states: torch.Tensor, *, pinned: bool = False) -> bool:
        """Add an entry (its `states` are owned by the cache from now on); False if it does not fit.

        A pinned entry stays until `clear()`: the system prompt's prefix, computed once at startup,
        so every conversation's first positions are the same bits whatever was evicted since.
        """
        entry = Entry(tokens, prompt_length, states, pinned)
        with self._lock:
            room = self.max_bytes - sum(e.nbytes for e in self._entries.values() if e.pinned)
            if entry.nbytes > room or not tokens:
                return False
            for key, old in list(self._entries.items()):
                if not old.pinned and common_prefix(old.tokens, tokens) >= old.prompt_length:
                    self._drop(key)
                    self.counters.superseded += 1
            while self._bytes + entry.nbytes > self.max_bytes:
                self._drop(next(key for key, old in self._entries.items() if not old.pinned))
                self.counters.evicted += 1
            self._entries[self._next_id] = entry
            self._next_id += 1
            self._bytes += entry.nbytes
            self.counters.kept += 1
        return True

    def clear(self, *, keep_pinned: bool = False) -> int:
        """Forget every entry (e.g. when a user asks to be forgotten); returns how many went.

        `keep_pinned` keeps the system prompt's prefix, which holds nobody's words.
        """
        with self._lock:
            gone = [key for key, entry in self._entries.items() if not (keep_pinned and entry.pinned)]
            for key in gone:
                self._drop(key)
            return len(gone)

    def _drop(self, key: int) -> None:
        self._bytes -= self._entries.pop(key).nbytes
