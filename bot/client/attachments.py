"""Text files attached to a message: which can be read, downloading them within bounds, and the note
for the rest.

A text-like file (a `text/*` or JSON/XML/YAML/TOML/JavaScript content type, or a name ending in one
of `TEXT_SUFFIXES`) is downloaded from its attachment URL and decoded as UTF-8. The files of one
message may hold `max_bytes` in all: a file whose `size` does not fit what is left is not downloaded
at all, and a download is cut off (and the file skipped) as soon as it delivers more than the `size`
it claimed, so the whole stays within `max_bytes` whatever the URL serves. All of one message's
downloads share one `timeout`. A binary file, one that is too large, or one that cannot be fetched
in time is skipped, with a reason for the note.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset(
    [
        ".txt",
        ".md",
        ".markdown",
        ".rst",
        ".log",
        ".csv",
        ".tsv",
        ".json",
        ".jsonl",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
        ".conf",
        ".env",
        ".xml",
        ".html",
        ".htm",
        ".css",
        ".py",
        ".pyi",
        ".js",
        ".mjs",
        ".ts",
        ".tsx",
        ".jsx",
        ".java",
        ".kt",
        ".c",
        ".h",
        ".cpp",
        ".hpp",
        ".cc",
        ".cs",
        ".go",
        ".rs",
        ".rb",
        ".php",
        ".pl",
        ".lua",
        ".sh",
        ".bash",
        ".zsh",
        ".ps1",
        ".bat",
        ".sql",
        ".r",
        ".swift",
        ".scala",
        ".hs",
        ".ex",
        ".exs",
        ".erl",
        ".clj",
        ".dart",
        ".vue",
        ".svelte",
        ".tex",
        ".srt",
        ".vtt",
        ".diff",
        ".patch",
    ]
)
TEXT_TYPES = frozenset(
    [
        "application/json",
        "application/xml",
        "application/x-yaml",
        "application/yaml",
        "application/toml",
        "application/javascript",
        "application/x-sh",
        "application/sql",
        "application/x-python",
    ]
)
CHUNK_BYTES = 16 * 1024

NOT_TEXT = "not a text file"
TOO_LARGE = "too large"
UNREACHABLE = "could not be downloaded"


@dataclass
class ReadFiles:
    """What a message's attachments gave: the files read (name, text), and those skipped (name, reason)."""

    files: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def note(self, max_bytes: int) -> str | None:
        """A short note for the person about the files skipped; None when every file was read."""
        if not self.skipped:
            return None
        which = ", ".join(f"**{name}** ({reason})" for name, reason in self.skipped)
        return (
            f"*(I couldn't read {which}. I read text files, such as .txt, .md, .py, .json or .csv, "
            f"up to {size_text(max_bytes)} per message.)*"
        )


def size_text(count: int) -> str:
    return f"{count // 1000} kB" if count >= 1000 else f"{count} bytes"


def is_text_like(filename: str, content_type: str | None) -> bool:
    """Whether a file looks like text by its content type or, failing that, its name."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind.startswith("text/") or kind in TEXT_TYPES:
        return True
    return PurePosixPath(filename.lower()).suffix in TEXT_SUFFIXES


def decode_text(data: bytes) -> str | None:
    """The file's text (UTF-8, a byte-order mark dropped); None for something that is not text."""
    if b"\x00" in data:
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return text.replace("\r\n", "\n")


def as_context(files: Sequence[tuple[str, str]]) -> str:
    """The files as the model reads them, before the person's own words."""
    return "\n\n".join(f'(attached file "{name}":)\n{text.strip()}' for name, text in files)


async def read_attachments(
    attachments: Sequence[Any],
    *,
    max_bytes: int,
    timeout: float,
    session: aiohttp.ClientSession,
) -> ReadFiles:
    """Read the text files among `attachments` (discord.Attachment: filename, size, content_type, url)."""
    result = ReadFiles()
    left = max_bytes
    wanted: list[Any] = []
    for attachment in attachments:
        name = str(getattr(attachment, "filename", attachment))
        if max_bytes <= 0 or not is_text_like(name, getattr(attachment, "content_type", None)):
            result.skipped.append((name, NOT_TEXT))
        elif int(getattr(attachment, "size", 0)) > left:
            result.skipped.append((name, TOO_LARGE))
        else:
            left -= int(attachment.size)
            wanted.append(attachment)
    if not wanted:
        return result

    async def fetch(attachment: Any) -> tuple[str, str | None, str]:
        data = await _download(session, str(attachment.url), int(attachment.size))
        if data is None:
            return attachment.filename, None, TOO_LARGE
        text = decode_text(data)
        return attachment.filename, text, NOT_TEXT

    try:
        fetched = await asyncio.wait_for(asyncio.gather(*(fetch(a) for a in wanted), return_exceptions=True), timeout)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        log.info("attachments took longer than %.1fs to download; skipped", timeout)
        result.skipped += [(a.filename, UNREACHABLE) for a in wanted]
        return result
    for attachment, outcome in zip(wanted, fetched, strict=True):
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, (aiohttp.ClientError, OSError, ValueError)):
                raise outcome
            log.info("could not download attachment %s: %s", attachment.filename, outcome)
            result.skipped.append((attachment.filename, UNREACHABLE))
            continue
        name, text, reason = outcome
        if text is None:
            result.skipped.append((name, reason))
        else:
            result.files.append((name, text))
    return result


async def _download(session: aiohttp.ClientSession, url: str, limit: int) -> bytes | None:
    """The file at `url`; None as soon as it delivers more than `limit` bytes."""
    async with session.get(url) as response:
        response.raise_for_status()
        parts: list[bytes] = []
        got = 0
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            got += len(chunk)
            if got > limit:
                return None
            parts.append(chunk)
    return b"".join(parts)
