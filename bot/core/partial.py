"""Reporting a reply while it is written: only text that extends what was already shown goes out."""

from __future__ import annotations


class GrowingText:
    """The reply so far as the reader has it; a new text counts only when it extends it.

    The engine, the remote engine, the console and the model server all stream the same way: each
    report is the whole text so far, and one that does not start with what was shown (a token that
    changed an earlier character's decoding) is skipped rather than shown and taken back.
    """

    def __init__(self) -> None:
        self.shown = ""

    def advance(self, text: str) -> str | None:
        """The part of `text` not shown yet, now counted as shown; None when `text` adds nothing to it."""
        if text == self.shown or not text.startswith(self.shown):
            return None
        new = text[len(self.shown) :]
        self.shown = text
        return new

    def rest(self, final: str) -> str | None:
        """What of the finished text is not shown yet ("" when all is), or None when it does not extend it."""
        return final[len(self.shown) :] if final.startswith(self.shown) else None
