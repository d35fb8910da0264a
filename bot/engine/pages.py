"""Whether a range of this process's memory can be handed back with madvise(MADV_DONTNEED) without losing data.

MADV_DONTNEED throws away the pages under a range at once. Where a page is a copy of a file page (or a page of
page cache, or of shared memory) that is harmless: the next access maps it again from the file. But a page only
this process holds (private anonymous memory, or the copy a write makes of a page in a private file mapping,
even in a mapping of the very file the data came from) exists nowhere else: the next access reads zeros, or the
file's original bytes, and the data is silently gone. So before dropping, `can_drop_pages` checks that the range
lies entirely in file-backed mappings and that the private ones hold no such page there, per page through
/proc/self/pagemap, or, where that cannot be read, per mapping through the "Anonymous" and "Swap" lines of
/proc/self/smaps. Outside Linux it says no.

torch maps a safetensors checkpoint MAP_PRIVATE with write permission (`rw-p`), so a writable private mapping is
accepted as long as nothing in the range was written.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
from typing import NamedTuple

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE

# /proc/self/pagemap: one little-endian 64-bit entry per page; the flags used here all sit in its top byte.
_PRESENT = 0x80  # bit 63: the page is in memory
_SWAPPED = 0x40  # bit 62: the page is in swap (in a private mapping: an anonymous page, written at some point)
_FILE = 0x20  # bit 61: the page is a file page or shared memory, not private anonymous memory
# Top bytes whose page would lose data: in swap, or in memory but private anonymous.
_LOSSY = bytes(1 if top & _SWAPPED or (top & _PRESENT and not top & _FILE) else 0 for top in range(256))


class Mapping(NamedTuple):
    """One line of /proc/self/maps."""

    start: int
    end: int
    perms: str  # e.g. "r--p", "rw-s"
    inode: int
    path: str

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")

    @property
    def private(self) -> bool:
        return not self.perms.endswith("s")


def mappings() -> list[Mapping]:
    """This process's mappings, in address order (empty where /proc/self/maps cannot be read)."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) < 5:
                    continue
                start, end = (int(v, 16) for v in parts[0].split("-"))
                path = parts[5].rstrip("\n") if len(parts) == 6 else ""
                found.append(Mapping(start, end, parts[1], int(parts[4]), path))
    except (OSError, ValueError):
        return []
    return found


def _covering(start: int, end: int) -> list[Mapping] | None:
    """The mappings that together cover [start, end) without a gap, or None where some of it is not mapped."""
    covering = []
    at = start
    for m in mappings():
        if m.end <= at or m.start >= end:
            continue
        if m.start > at:
            return None
        covering.append(m)
        at = m.end
        if at >= end:
            return covering
    return None


def _pagemap_tops(start: int, end: int) -> bytes | None:
    """The top byte of the pagemap entry of each page in [start, end), or None where pagemap cannot be read."""
    pages = (end - start) // PAGE
    want = pages * 8
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        chunks = []
        got = 0
        while got < want:
            chunk = os.pread(fd, want - got, start // PAGE * 8 + got)
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks)[7::8]


def _smaps_holds_private_pages(m: Mapping) -> bool:
    """Whether /proc/self/smaps says mapping `m` holds anonymous pages (in memory or in swap); True if unsure."""
    try:
        with open("/proc/self/smaps") as smaps:
            inside = False
            fields: dict[str, int] = {}
            for line in smaps:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # the header line of a mapping
                    if inside:
                        break
                    inside = head == f"{m.start:x}-{m.end:x}"
                elif inside and head in ("Anonymous:", "Swap:"):
                    fields[head] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return True
    return len(fields) != 2 or any(fields.values())


def can_drop_pages(start: int, end: int) -> bool:
    """Whether madvise(MADV_DONTNEED) on the page-aligned range [start, end) loses no data.

    True only on Linux, where the whole range is mapped from files and no page of it in a private mapping is
    this process's own copy (written, or anonymous): those pages would come back as the file's bytes or zeros.
    """
    if not sys.platform.startswith("linux"):
        return False
    if start % PAGE or end % PAGE or end <= start:
        return False
    covering = _covering(start, end)
    if covering is None:
        log.debug("not dropping %#x-%#x: not all of it is mapped", start, end)
        return False
    for m in covering:
        if not m.file_backed:
            log.debug("not dropping %#x-%#x: %#x-%#x is not a file mapping", start, end, m.start, m.end)
            return False
        if not m.private:
            continue  # written pages of a shared mapping stay in the page cache (or shared memory)
        lo, hi = max(start, m.start), min(end, m.end)
        tops = _pagemap_tops(lo, hi)
        lossy = (b"\x01" in tops.translate(_LOSSY)) if tops is not None else _smaps_holds_private_pages(m)
        if lossy:
            log.debug("not dropping %#x-%#x: private pages of %s were written", start, end, m.path)
            return False
    return True
