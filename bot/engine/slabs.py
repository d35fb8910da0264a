"""Per-row key/value slabs: attention of one new token per row over a fixed-length, masked slab, and
moving rows between slabs. Both model families (`seq2seq.py`, `causal.py`) keep their caches so."""

from __future__ import annotations

import torch

from bot.engine.device import cpu_flags


def attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Softmax attention of `query` over `keys`/`values` where `mask` is True, in the keys' dtype.

    Written out rather than through `scaled_dot_product_attention`, whose CPU kernels are several
    times slower at these shapes (a few queries per row, short key slabs), bf16 most of all. The
    scores and the softmax are fp32 whatever the cache's dtype.
    """
    if keys.dtype == torch.bfloat16 and keys.device.type == "cpu" and not _fast_bf16():
        keys, values = keys.float(), values.float()  # upcasting a row's slab costs less than bf16 matmuls here
    scores = torch.matmul(query.to(keys.dtype), keys.transpose(-1, -2)).float() * scaling
    weights = torch.softmax(scores.masked_fill_(~mask, float("-inf")), dim=-1)
    return torch.matmul(weights.to(values.dtype), values)


def _fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it bf16 matmuls are several
    times slower than fp32 ones (measured on an AVX2-only EPYC: 245 us against under 50 us per call)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def reorder_rows(slabs: tuple[torch.Tensor, ...], rows: int, order: torch.Tensor, filled: int) -> None:
    """In every slab, row i takes the first `filled` positions of row `order[i]` (beams changing places)."""
    for slab in slabs:
        slab[:rows, :, :filled] = slab[order, :, :filled]
