"""The int8 matrix kernel (`kernels/int8_linear.c`): built with the machine's C compiler, loaded with ctypes.

fbgemm's int8 Linear reads a decoding step's weights at about half the memory bandwidth when there
are only a few rows (one conversation is one row). The kernel streams weights packed 32 output
channels by 4 input bytes and reaches most of it, with exact int32 sums, so a row's result depends
on that row alone; for many rows (beams, batches, prompts) it is level with fbgemm or faster. It is
compiled once per machine into the temporary directory (well under a second; the file is named by a
hash of the source and flags, so an edited source is rebuilt) and needs x86-64 with AVX2 and a C
compiler with OpenMP; where the CPU has AVX512-VNNI it is built with that too (bitwise the same
results, about twice as fast for many rows), and where it has AMX (Sapphire Rapids and later) with
that as well: calls of 4 rows or more then multiply in tiles, 1.5-3x faster again, the same bits.
Without them, or with `BOT_INT8_KERNEL=off`, int8 Linears use fbgemm as before;
`BOT_INT8_KERNEL=avx2` or `=vnni` keeps to fewer instructions; `status()` says which and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from bot.engine.device import cpu_flags

log = logging.getLogger(__name__)

# one library: the int8 Linear and the decoder layers built on it (`bot.engine.native`)
SOURCES = [Path(__file__).with_name("kernels") / name for name in ("int8_linear.c", "decoder_layer.c")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
# where the CPU has AVX512-VNNI (Ice Lake, Zen 4 and later) the byte products take one instruction
VNNI_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
# where it has AMX (Sapphire Rapids and later) prompts, batches and beams multiply in tiles
AMX_FLAGS = ["-mamx-tile", "-mamx-int8"]
GROUP = 32  # output channels packed together (GROUP in the C source)
K_STEP = 4  # input bytes of a channel stored together; rows are padded to a multiple of it

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_status: str | None = None
_refused = 0  # `fbgemm_only` blocks open: Linears made meanwhile use fbgemm


def _cpu_has_avx2() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and "avx2" in cpu_flags()


def _requested() -> str:
    """`BOT_INT8_KERNEL`, lower case: off, avx2 or vnni; anything else is the best this CPU has."""
    return os.environ.get("BOT_INT8_KERNEL", "").lower()


def _flag_choices() -> list[list[str]]:
    """The compiler flags for this CPU, best first (a compiler too old for AMX gets the next).

    `BOT_INT8_KERNEL=avx2` keeps to AVX2 and `BOT_INT8_KERNEL=vnni` to AVX512-VNNI (benchmarks and
    tests compare the builds)."""
    wants = _requested()
    flags = cpu_flags()
    choices = [list(FLAGS)]
    if {"avx512_vnni", "avx512vl", "avx512bw"} <= flags and wants != "avx2":
        choices.insert(0, [*FLAGS, *VNNI_FLAGS])
        if {"amx_tile", "amx_int8"} <= flags and wants != "vnni":
            choices.insert(0, [*FLAGS, *VNNI_FLAGS, *AMX_FLAGS])
    return choices


def _build(compiler: str, flags: list[str]) -> Path:
    text = b"".join(source.read_bytes() for source in SOURCES)
    digest = hashlib.sha256(text + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"discord-bot-kernels-{os.getuid()}"
    target = folder / f"int8_linear-{digest}.so"
    if target.exists():
        return target
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = folder / f"{target.name}.{os.getpid()}.tmp"
    try:
        subprocess.run(
            [compiler, *flags, "-o", str(partial), *map(str, SOURCES)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(partial, target)  # atomic: another process building at once finds a whole file
    finally:
        partial.unlink(missing_ok=True)
    return target


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _open(compiler: str, flags: list[str]) -> ctypes.CDLL:
    """Build (or find) the library for `flags` and load it with its functions' signatures declared."""
    library = ctypes.CDLL(str(_build(compiler, flags)))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    library.int8_linear.restype = ctypes.c_int
    library.int8_linear.argtypes = [p, i64, i64, p, p, p, p, i64, i64, p, ctypes.c_int]
    library.decoder_layers.restype = ctypes.c_int
    library.decoder_layers.argtypes = [p, p, i64, p, i64, p, p, p, p]
    library.int8_kernel_isa.restype = ctypes.c_char_p
    library.int8_row_sums128.restype = None
    library.int8_row_sums128.argtypes = [p, i64, i64, p]
    library.int8_amx_enable.restype = ctypes.c_int
    library.int8_amx_enable()  # where built with AMX: ask Linux for the tile registers (refused: VNNI)
    return library


def _load() -> tuple[ctypes.CDLL | None, str]:
    if _requested() in ("0", "off", "false", "no"):
        return None, "fbgemm (BOT_INT8_KERNEL=off)"
    if not _cpu_has_avx2():
        return None, "fbgemm (this CPU has no AVX2)"
    compiler = _compiler()
    if not compiler:
        return None, "fbgemm (no C compiler to build the int8 kernel; install gcc)"
    problem = ""
    for flags in _flag_choices():
        try:
            library = _open(compiler, flags)
        except subprocess.CalledProcessError as error:
            problem = f"building the int8 kernel failed: {error.stderr.strip()[-300:]}"
        except (OSError, subprocess.SubprocessError) as error:
            problem = f"the int8 kernel could not be built or loaded: {error}"
        else:
            return library, f"int8 kernel ({library.int8_kernel_isa().decode()})"
        log.info("%s; trying fewer instructions", problem)
    return None, f"fbgemm ({problem})"


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot be had (built at the first call)."""
    global _library, _status
    with _lock:
        if _status is None:
            _library, _status = _load()
            (log.info if _library is not None else log.warning)("int8 Linears use the %s", _status)
        return _library


def available() -> bool:
    """Whether int8 Linears made now use the kernel."""
    return not _refused and library() is not None


@contextlib.contextmanager
def fbgemm_only() -> Iterator[None]:
    """Int8 Linears made inside use fbgemm (benchmarks compare the two; tests cover the fallback)."""
    global _refused
    with _lock:
        _refused += 1
    try:
        yield
    finally:
        with _lock:
            _refused -= 1


def status() -> str:
    library()
    assert _status is not None
    return _status


def padded(k: int) -> int:
    return -(-k // K_STEP) * K_STEP


def pack(rows: torch.Tensor) -> torch.Tensor:
    """int8 weights [N, K] in the kernel's layout: [ceil(N/32), Kp/4, 32, 4], zero padded."""
    n, k = rows.shape
    kp, np_ = padded(k), -(-n // GROUP) * GROUP
    if (np_, kp) != (n, k):
        padded_rows = torch.zeros(np_, kp, dtype=torch.int8)
        padded_rows[:n, :k] = rows
        rows = padded_rows
    return rows.contiguous().view(np_ // GROUP, GROUP, kp // K_STEP, K_STEP).transpose(1, 2).contiguous()


def sums128(rows: torch.Tensor) -> torch.Tensor:
    """128 times each int8 weight row's sum, int32 [N rounded up to 32] (the VNNI build's correction)."""
    n, k = rows.shape
    rows = rows.contiguous()
    sums = torch.zeros(-(-n // GROUP) * GROUP, dtype=torch.int32)
    lib = library()  # in C: torch's int32 sum would first copy the whole matrix to int32
    assert lib is not None, "the int8 kernel is not available"
    lib.int8_row_sums128(rows.data_ptr(), n, k, sums.data_ptr())
    return sums


def packed_rows(packed: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Rows `index` of the int8 weights `pack` packed (an embedding lookup in the shared table)."""
    rows = packed[torch.div(index, GROUP, rounding_mode="floor"), :, index % GROUP, :]  # [..., Kp/4, 4]
    return rows.flatten(-2)[..., :k]


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The int8 weights [N, K] that `pack` packed."""
    groups, steps = packed.shape[0], packed.shape[1]
    return packed.transpose(1, 2).reshape(groups * GROUP, steps * K_STEP)[:n, :k].contiguous()


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    sums: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
) -> torch.Tensor:
    """x [M, K] fp32 (contiguous) times the packed weights (`sums` from `sums128`): [M, N] fp32."""
    lib = _library or library()  # loaded once; the hot path skips the lock
    assert lib is not None, "the int8 kernel is not available"
    m, k = x.shape
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    failed = lib.int8_linear(
        x.data_ptr(),
        m,
        k,
        packed.data_ptr(),
        sums.data_ptr(),
        scales.data_ptr(),
        None if bias is None else bias.data_ptr(),
        n,
        packed.shape[1] * K_STEP,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("the int8 kernel could not allocate its scratch memory")
    return out
