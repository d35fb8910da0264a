"""Int8 weights for the CPU, quantized while loading, with replies that do not depend on batching.

`torch.ao.quantization.quantize_dynamic` quantizes each Linear's input with one scale for the whole
tensor, so a row's result depends on the other rows in the batch (other conversations, other beams),
and a batched reply can differ from the same reply generated alone. `RowwiseInt8Linear` keeps the
same fast fbgemm int8 kernel but makes the scale per row: each row is divided by its own largest
magnitude, and one fixed anchor row pins the tensor's range to exactly [-1, 1], so the kernel always
picks the same quantization parameters and every row is computed from itself alone. Weights are
quantized per output channel (more accurate than quantize_dynamic's per-tensor default).

`quantize_linears_` swaps Linears one at a time and hands the fp32 pages of each weight back to the
kernel as soon as it is quantized (`from_pretrained` maps safetensors lazily, so those pages are clean
file pages that can be dropped and re-read; `bot.engine.pages.can_drop_pages` checks that before each
drop, since dropping a written or anonymous page would lose it), keeping the peak near the int8 size
instead of fp32 + int8. `detach_from_files_` then copies the few fp32 tensors left (embeddings, norms) out of
the mapped file so the mapping itself can be closed.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import warnings

import torch
from torch import nn

from bot.engine.pages import can_drop_pages

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def can_quantize() -> bool:
    engines = torch.backends.quantized.supported_engines
    return "fbgemm" in engines or "x86" in engines


class RowwiseInt8Linear(nn.Module):
    """y = x W^T + b with int8 W (per output channel) and int8 x (per row); batch-invariant."""

    bias: torch.Tensor | None
    _anchor: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        scales = (weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0).double()
        with warnings.catch_warnings():  # "quantized tensor creation functions are deprecated" (torch 2.13)
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(
                weight, scales, torch.zeros(self.out_features, dtype=torch.long), 0, torch.qint8
            )
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        anchor = torch.zeros(1, self.in_features)
        anchor[0, 0] = -1.0
        if self.in_features > 1:
            anchor[0, 1] = 1.0
        self.register_buffer("_anchor", anchor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # faster than vector_norm(inf) on CPU
        buf = torch.empty(rows.shape[0] + 1, self.in_features)
        torch.div(rows, scale, out=buf[:-1])
        buf[-1:].copy_(self._anchor)
        out = torch.ops.quantized.linear_dynamic(buf, self._packed, True)[:-1]
        out = torch.addcmul(self.bias, out, scale) if self.bias is not None else out * scale
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rowwise"


class Int8Embedding(nn.Module):
    """An embedding table kept as int8 rows with one scale per row; looked-up rows come back in fp32."""

    table: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, chunk_rows: int = 8192) -> None:
        super().__init__()
        rows, self.embedding_dim = int(weight.shape[0]), int(weight.shape[1])
        table = torch.empty(rows, self.embedding_dim, dtype=torch.int8)
        scale = torch.empty(rows)
        for start in range(0, rows, chunk_rows):  # in slices, so no fp32 temporary of the whole table
            part = weight[start : start + chunk_rows].detach().float()
            part_scale = part.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            table[start : start + chunk_rows] = torch.round(part / part_scale[:, None]).to(torch.int8)
            scale[start : start + chunk_rows] = part_scale
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids].float() * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.table.shape[0]}, {self.embedding_dim}, int8 rows"


def file_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed mappings (private or shared)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):
                    start, end = (int(v, 16) for v in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


def _in_file(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(lo <= start and end <= hi for lo, hi in ranges)


def release_file_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Drop the resident pages under `tensor` if it lies in a file mapping; the data stays in the file.

    Returns whether it dropped them. `ranges` (from `file_ranges`) is only a first filter: the mappings are
    checked again now (`can_drop_pages`), and nothing is dropped where that could lose data, such as pages of a
    private file mapping that were written (MADV_DONTNEED would bring back the file's bytes) or anonymous memory
    (it would read back as zeros), or where the check cannot be made (outside Linux).
    """
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not _in_file(ranges, start, end):
        return False
    lo = -(-start // _PAGE) * _PAGE  # whole pages inside the tensor only
    hi = end // _PAGE * _PAGE
    if hi <= lo or not can_drop_pages(lo, hi):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) != 0:
        log.debug("madvise(MADV_DONTNEED) on %#x-%#x failed: %s", lo, hi, os.strerror(ctypes.get_errno()))
        return False
    return True


def quantize_linears_(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` by a RowwiseInt8Linear, in place; returns how many."""
    ranges = file_ranges()
    linears = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    linear_weight_ids = {id(m.weight) for _, m in linears}
    # Weights also used elsewhere (the lm_head tied to the embeddings) must keep their pages.
    kept = {p.data_ptr() for p in model.parameters() if id(p) not in linear_weight_ids}
    seen: dict[int, int] = {}
    for _, module in linears:
        seen[module.weight.data_ptr()] = seen.get(module.weight.data_ptr(), 0) + 1
    for name, module in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RowwiseInt8Linear(module.weight, module.bias))
        weight = module.weight
        ptr = weight.data_ptr()
        seen[ptr] -= 1
        if ptr not in kept and seen[ptr] == 0:
            release_file_pages(weight, ranges)
    return len(linears)


def detach_from_files_(model: nn.Module) -> None:
    """Copy parameters and buffers that still live in a mapped file into ordinary memory."""
    ranges = file_ranges()
    for tensor in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        start = tensor.data_ptr()
        if tensor.numel() and _in_file(ranges, start, start + tensor.numel() * tensor.element_size()):
            tensor.data = tensor.data.clone()
