"""Where the model runs and in what precision: device and precision choice, int8 preparation."""

from __future__ import annotations

import functools
import logging
from typing import Any

from bot.engine.errors import EngineError

log = logging.getLogger(__name__)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def resolve_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise EngineError("DEVICE=cuda but no CUDA GPU is available to torch")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise EngineError("DEVICE=mps but Apple's MPS backend is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(requested: str, device: str) -> str:
    import torch

    if requested == "auto":
        if device == "cpu":
            return "int8"
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16"
    if requested == "int8" and device != "cpu":
        raise EngineError(f"PRECISION=int8 works only on the CPU, not on DEVICE={device}")
    if requested == "fp16" and device == "cpu":
        raise EngineError("PRECISION=fp16 is not supported on the CPU; use bf16 or int8")
    return requested


def _can_quantize() -> bool:
    try:
        from bot.engine.int8 import can_quantize
    except Exception:  # noqa: BLE001 - a torch without quantized ops
        return False
    return can_quantize()


def prepare_model(model: Any, device: str, precision: str) -> tuple[Any, str]:
    """Move the model to its device and precision; returns the model and the precision used.

    int8 (CPU only): every nn.Linear, the tied output projection included, becomes a
    `RowwiseInt8Linear` (bot/engine/int8.py): int8 weights per output channel, activations quantized per
    row so a reply does not depend on what else is in the batch. Linears are swapped one at a time
    and the fp32 pages of each are dropped as soon as it is quantized, so the fp32 model is never
    fully resident. A decoder-only model whose output layer shares the embedding matrix (Qwen2.5:
    136M of its 494M parameters) also looks its input embeddings up in int8 rows, so that matrix
    is never kept in fp32 beside its int8 copy; with the AVX2 kernel those rows are the output
    layer's own, so it is kept once.
    """
    import gc

    import torch

    if precision == "int8" and not _can_quantize():
        log.warning("this torch build cannot quantize to int8; falling back to bf16")
        precision = "bf16"
    if precision == "int8":
        from bot.engine.int8 import (
            Int8Embedding,
            RowwiseInt8Linear,
            detach_from_files_,
            file_ranges,
            quantize_linears_,
            release_file_pages,
        )

        with torch.no_grad():
            quantize_linears_(model)
            if not model.config.is_encoder_decoder and model.config.tie_word_embeddings:
                shared = model.get_input_embeddings().weight
                head = model.get_output_embeddings()
                if isinstance(head, RowwiseInt8Linear) and head.uses_kernel:
                    model.set_input_embeddings(Int8Embedding.sharing(head))
                else:
                    model.set_input_embeddings(Int8Embedding(shared))
                release_file_pages(shared, file_ranges())  # its fp32 pages are not needed any more
            detach_from_files_(model)
        gc.collect()  # closes the mapped checkpoint once nothing points into it
    elif precision == "bf16":
        model = model.to(dtype=torch.bfloat16)
    elif precision == "fp16":
        model = model.to(dtype=torch.float16)
    model = model.to(device).eval()
    return model, precision


def limit_heap_fragmentation(threshold: int = 4 << 20) -> None:
    """Give large buffers back to the OS when freed (glibc), so RSS stays near what is in use.

    glibc raises its mmap threshold each time a large block is freed, after which tensors of tens of
    MB come from the engine thread's heap arena, which cannot shrink past its live top: loading the
    int8 model then sits at ~1.4 GB instead of ~0.8 GB. A fixed threshold keeps them as mmaps.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; fixing it also turns off the dynamic raise
    except (OSError, AttributeError):
        pass
