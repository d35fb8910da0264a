"""Dropping the fp32 pages of quantized weights (bot/engine/int8.py `release_file_pages`) never loses data.

MADV_DONTNEED is harmless on clean pages of a file mapping (they are read again from the file) but discards a page
this process wrote in a private mapping (it comes back as the file's bytes) and anonymous memory (it comes back as
zeros). Each test maps memory holding known bytes, asks for the drop, and checks the bytes; the positive tests
check through /proc/self/smaps that clean file pages are still handed back.
"""

from __future__ import annotations

import mmap
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bot.engine import pages
from bot.engine.int8 import file_ranges, release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/maps")

PAGE = mmap.PAGESIZE
N_PAGES = 8


def _resident_kb(address: int) -> int:
    """The Rss line of /proc/self/smaps for the mapping holding `address`."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def _file_of(path: Path, byte: int, size: int = N_PAGES * PAGE) -> Path:
    path.write_bytes(bytes([byte]) * size)
    return path


def _mapped(path: Path, *, shared: bool) -> torch.Tensor:
    """The bytes of `path` as a uint8 tensor over an mmap of it, as torch maps a safetensors checkpoint."""
    return torch.from_file(str(path), shared=shared, size=path.stat().st_size, dtype=torch.uint8)


@pytest.fixture
def private_anonymous() -> Iterator[mmap.mmap]:
    mm = mmap.mmap(-1, N_PAGES * PAGE, flags=mmap.MAP_PRIVATE)
    yield mm
    mm.close()


@pytest.fixture(params=["pagemap", "smaps"])
def check_through(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once with the per-page pagemap check and once with the per-mapping smaps fallback."""
    if request.param == "smaps":
        monkeypatch.setattr(pages, "_pagemap_tops", lambda start, end: None)
    return str(request.param)


# --- pages that must be kept ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("written_pages", [range(N_PAGES), range(3, 4)], ids=["all-written", "one-page-written"])
def test_written_pages_of_a_private_file_mapping_are_kept(
    tmp_path: Path, check_through: str, written_pages: range
) -> None:
    tensor = _mapped(_file_of(tmp_path / "weights.bin", 0x11), shared=False)
    for page in written_pages:  # copy-on-write: these pages now exist only in this process
        tensor[page * PAGE : (page + 1) * PAGE] = 0x22
    expected = tensor.clone()

    assert not release_file_pages(tensor, file_ranges())
    assert torch.equal(tensor, expected)  # dropped, the written pages would read back 0x11 from the file


def test_written_private_mapping_of_dev_zero_is_kept(check_through: str) -> None:
    """/dev/zero has an inode and a path, so it passes for a file in /proc/self/maps; its written pages are
    anonymous memory and a drop would turn them back into zeros."""
    with open("/dev/zero", "r+b") as zero:
        mm = mmap.mmap(zero.fileno(), N_PAGES * PAGE, flags=mmap.MAP_PRIVATE)
    tensor = torch.frombuffer(mm, dtype=torch.uint8)
    tensor.fill_(0x33)

    assert not release_file_pages(tensor, file_ranges())
    assert bool((tensor == 0x33).all())
    del tensor
    mm.close()


def test_anonymous_memory_is_kept_even_where_the_given_ranges_say_file(private_anonymous: mmap.mmap) -> None:
    """The ranges passed in may be stale (an address reused after a checkpoint was unmapped); the mappings are
    checked again at the time of the drop."""
    tensor = torch.frombuffer(private_anonymous, dtype=torch.uint8)
    tensor.fill_(0x44)
    start = tensor.data_ptr()
    stale = [(start, start + tensor.numel())]

    assert not release_file_pages(tensor, stale)
    assert bool((tensor == 0x44).all())
    del tensor


def test_nothing_is_dropped_outside_linux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensor = _mapped(_file_of(tmp_path / "weights.bin", 0x11), shared=False)
    tensor.sum()  # resident
    resident = _resident_kb(tensor.data_ptr())
    monkeypatch.setattr(sys, "platform", "darwin")

    assert not pages.can_drop_pages(tensor.data_ptr(), tensor.data_ptr() + tensor.numel())
    assert not release_file_pages(tensor, file_ranges())
    monkeypatch.undo()
    assert _resident_kb(tensor.data_ptr()) == resident


# --- pages that are still dropped -----------------------------------------------------------------------------------


def test_clean_safetensors_weights_are_dropped_and_read_back(tmp_path: Path, check_through: str) -> None:
    """torch maps a checkpoint MAP_PRIVATE and writable (rw-p); untouched, its pages are clean file pages."""
    weight = torch.arange(N_PAGES * PAGE // 4, dtype=torch.float32)
    save_file({"weight": weight}, str(tmp_path / "model.safetensors"))
    mapped = load_file(str(tmp_path / "model.safetensors"))["weight"]
    assert torch.equal(mapped, weight)  # reads every page in
    assert _resident_kb(mapped.data_ptr()) >= (N_PAGES - 1) * PAGE // 1024

    assert release_file_pages(mapped, file_ranges())
    assert _resident_kb(mapped.data_ptr()) <= 2 * PAGE // 1024  # at most the header and the partial last page
    assert torch.equal(mapped, weight)  # read again from the file


def test_clean_read_only_file_mapping_is_dropped(tmp_path: Path, check_through: str) -> None:
    path = _file_of(tmp_path / "weights.bin", 0x55)
    with open(path, "rb") as file:
        mm = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():  # "the given buffer is not writable"
        warnings.simplefilter("ignore")
        tensor = torch.frombuffer(mm, dtype=torch.uint8)
    assert bool((tensor == 0x55).all())
    assert _resident_kb(tensor.data_ptr()) == N_PAGES * PAGE // 1024

    assert release_file_pages(tensor, file_ranges())
    assert _resident_kb(tensor.data_ptr()) == 0
    assert bool((tensor == 0x55).all())
    del tensor
    mm.close()


def test_written_shared_file_mapping_is_dropped_and_keeps_the_writes(tmp_path: Path) -> None:
    """A shared mapping's written pages live in the page cache, so dropping them from this process loses nothing."""
    tensor = _mapped(_file_of(tmp_path / "weights.bin", 0x11), shared=True)
    tensor.fill_(0x66)

    assert release_file_pages(tensor, file_ranges())
    assert _resident_kb(tensor.data_ptr()) == 0
    assert bool((tensor == 0x66).all())


def test_a_written_page_elsewhere_in_the_mapping_does_not_keep_a_clean_tensor(tmp_path: Path) -> None:
    """Per page (pagemap): two weights in one checkpoint, the second written in place; the first still drops."""
    first = torch.full((4 * PAGE // 4,), 1.0)
    second = torch.full((4 * PAGE // 4,), 2.0)
    save_file({"a_first": first, "b_second": second}, str(tmp_path / "model.safetensors"))
    loaded = load_file(str(tmp_path / "model.safetensors"))
    loaded["b_second"].mul_(3.0)
    assert torch.equal(loaded["a_first"], first)

    assert not release_file_pages(loaded["b_second"], file_ranges())
    assert torch.equal(loaded["b_second"], second * 3.0)
    assert release_file_pages(loaded["a_first"], file_ranges())
    assert torch.equal(loaded["a_first"], first)
