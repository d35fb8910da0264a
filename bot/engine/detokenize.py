"""Streaming a reply's text without decoding the whole reply again at every step.

A reply is reported after each decoding step. Decoding all its tokens each time costs O(n) per
step, O(n^2) per reply; `IncrementalText` decodes only a short window instead, the way TGI and vLLM
do: the tokens since the last committed point, once without and once with the newest ones, and
appends the difference. Decoding the window together with its previous tokens keeps what depends
on a neighbour (a word's leading space, a multi-byte character split across tokens, the
tokenizer's space clean-up) the same as a full decode. A window that ends in the middle of a
character (U+FFFD) waits for the next token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalText:
    """The text of a reply whose token ids only grow, decoded a few tokens at a time."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.text = ""
        self._prefix = 0  # the window starts here: tokens before it are in `text` for good
        self._read = 0  # tokens up to here are in `text`

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def update(self, ids: Sequence[int]) -> str:
        """The text so far of `ids`, which extend the ids of the previous call."""
        if len(ids) <= self._read:
            return self.text
        before = self._decode(ids[self._prefix : self._read])
        now = self._decode(ids[self._prefix :])
        if len(now) > len(before) and not now.endswith(REPLACEMENT) and now.startswith(before):
            self.text += now[len(before) :]
            self._prefix, self._read = self._read, len(ids)
        return self.text
