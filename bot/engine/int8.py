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

from bot.engine import kernel
from bot.engine.pages import can_drop_pages

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
_BUFFERED_ROWS = 64  # input buffers of up to this many rows (decoding steps) are kept between calls


def can_quantize() -> bool:
    engines = torch.backends.quantized.supported_engines
    return "fbgemm" in engines or "x86" in engines


def quantize_rows(weight: torch.Tensor, chunk_rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows [N, K] and fp32 scales [N] (each row's largest magnitude / 127), read in slices.

    In slices, so the output projection (151,936 rows for Qwen2.5) never has an fp32 temporary of
    its own size beside the weights.
    """
    rows = int(weight.shape[0])
    table = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(rows)
    for start in range(0, rows, chunk_rows):
        part = weight[start : start + chunk_rows].detach().float()
        part_scale = part.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        table[start : start + chunk_rows] = torch.round(part / part_scale[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[start : start + chunk_rows] = part_scale
    return table, scales


class RowwiseInt8Linear(nn.Module):
    """y = x W^T + b with int8 W (per output channel) and int8 x (per row); batch-invariant.

    Computed by the AVX2 kernel (`bot.engine.kernel`) where it can be built, else by fbgemm.
    """

    bias: torch.Tensor | None
    scales: torch.Tensor
    sums128: torch.Tensor  # the kernel's per-channel correction (`kernel.sums128`)
    _anchor: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        rows, scales = quantize_rows(weight)
        self._setup(rows, scales, None if bias is None else bias.detach().float().clone())

    def _setup(self, rows: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = (int(v) for v in rows.shape)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("scales", scales.float().contiguous(), persistent=False)
        self.uses_kernel = kernel.available()
        if self.uses_kernel:
            self.packed = kernel.pack(rows)
            self.register_buffer("sums128", kernel.sums128(rows), persistent=False)
            return
        with warnings.catch_warnings():  # "quantized tensor creation functions are deprecated" (torch 2.13)
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                rows, self.scales.double(), torch.zeros(self.out_features, dtype=torch.long), 0
            )
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        anchor = torch.zeros(1, self.in_features)
        anchor[0, 0] = -1.0
        if self.in_features > 1:
            anchor[0, 1] = 1.0
        self.register_buffer("_anchor", anchor, persistent=False)
        self._buffers_by_rows: dict[int, torch.Tensor] = {}

    def int8_rows(self) -> torch.Tensor:
        """The int8 weights [out_features, in_features] (a copy)."""
        if self.uses_kernel:
            return kernel.unpack(self.packed, self.out_features, self.in_features)
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    @classmethod
    def fused(cls, linears: list[RowwiseInt8Linear]) -> RowwiseInt8Linear:
        """One Linear computing `linears` (same input) side by side: their outputs concatenated.

        The int8 weights and per-channel scales are the parts' own, and each row's activation
        scale depends on the input alone, so every output column is bitwise what its part gives.
        """
        if len({m.in_features for m in linears}) != 1:
            raise ValueError("fused Linears must share their input size")
        if len({m.bias is None for m in linears}) != 1:
            raise ValueError("fused Linears must all have a bias or none")
        rows = torch.cat([m.int8_rows() for m in linears])
        scales = torch.cat([m.scales for m in linears])
        biases = [m.bias for m in linears]
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._setup(rows, scales, None if biases[0] is None else torch.cat([b for b in biases if b is not None]))
        return fused

    def _input_buffer(self, rows: int) -> torch.Tensor:
        """[rows + 1, in_features], its last row the anchor: kept per row count (a few sizes recur)."""
        buf = self._buffers_by_rows.get(rows)
        if buf is None:
            if rows > _BUFFERED_ROWS:
                buf = torch.empty(rows + 1, self.in_features)
                buf[-1:].copy_(self._anchor)
                return buf
            if len(self._buffers_by_rows) >= 8:
                self._buffers_by_rows.clear()
            buf = torch.empty(rows + 1, self.in_features)
            buf[-1:].copy_(self._anchor)
            self._buffers_by_rows[rows] = buf
        return buf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).float()
        if self.uses_kernel:
            out = kernel.linear(rows.contiguous(), self.packed, self.sums128, self.scales, self.bias, self.out_features)
            return out.reshape(*shape[:-1], self.out_features)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # faster than vector_norm(inf) on CPU
        if torch.is_inference_mode_enabled():
            buf = self._input_buffer(rows.shape[0])  # reused: the kernel reads it only during this call
        else:
            buf = torch.empty(rows.shape[0] + 1, self.in_features)
            buf[-1:].copy_(self._anchor)
        torch.div(rows, scale, out=buf[:-1])
        out = torch.ops.quantized.linear_dynamic(buf, self._packed, True)[:-1]
        out = torch.addcmul(self.bias, out, scale) if self.bias is not None else out.mul_(scale)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        backend = "AVX2 kernel" if self.uses_kernel else "fbgemm"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rowwise ({backend})"


class FusedPart(nn.Module):
    """Columns `[start:end]` of a fused Linear's output, standing in for the Linear it replaced.

    The parts of one fused Linear are called one after another on the same input (Llama/Qwen
    attention: q, k, v of the hidden states; the MLP: gate and up): the first call computes every
    part at once and the others take their columns of that result, so the model's own forward
    (long prefills) runs the fused Linear once too. An input that is not the very tensor the
    pending result was computed from, or a part asked twice, is computed afresh.
    """

    def __init__(self, shared: _SharedOutput, index: int) -> None:
        super().__init__()
        self.shared = shared
        self.linear = shared.linear  # a submodule of every part (listed once by `named_modules`)
        self.index = index
        self.start, self.end = shared.bounds[index], shared.bounds[index + 1]
        self.in_features = shared.linear.in_features
        self.out_features = self.end - self.start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(self.index, x)[..., self.start : self.end]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.end} of a fused int8 Linear"


class _SharedOutput:
    """The pending output of a fused Linear, until each of its parts has taken its columns."""

    def __init__(self, linear: RowwiseInt8Linear, sizes: list[int]) -> None:
        self.linear = linear
        self.bounds = [0]
        for size in sizes:
            self.bounds.append(self.bounds[-1] + size)
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._taken: set[int] = set()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._input is x and self._output is not None and index not in self._taken:
            out = self._output
        else:
            out = self.linear(x)
            self._input, self._output, self._taken = x, out, set()
        self._taken.add(index)
        if len(self._taken) == len(self.bounds) - 1:  # every part has its columns: let go of both
            self._input = self._output = None
        return out


def fuse_linears_(parent: nn.Module, names: list[str]) -> RowwiseInt8Linear | None:
    """Fuse `parent`'s int8 Linears `names` (which share an input) into one, in place; returns it.

    Each `parent.<name>` becomes a `FusedPart` of the fused Linear, so the model's own forward still
    works (and gives bitwise the same results); the parts' own weights are freed. Returns the
    fused Linear already there if `parent` was fused before, and None unless every one is a
    `RowwiseInt8Linear` of the same input size.
    """
    modules = [getattr(parent, name, None) for name in names]
    if all(isinstance(m, FusedPart) for m in modules):
        parts = [m for m in modules if isinstance(m, FusedPart)]
        if len({id(p.shared) for p in parts}) == 1 and [p.index for p in parts] == list(range(len(names))):
            return parts[0].shared.linear
        return None
    linears = [m for m in modules if type(m) is RowwiseInt8Linear]
    if len(linears) != len(names) or len({m.in_features for m in linears}) != 1:
        return None
    if len({m.bias is None for m in linears}) != 1:
        return None
    fused = RowwiseInt8Linear.fused(linears)
    shared = _SharedOutput(fused, [m.out_features for m in linears])
    for index, name in enumerate(names):
        setattr(parent, name, FusedPart(shared, index))
    return fused


class Int8Embedding(nn.Module):
    """An embedding table kept as int8 rows with one scale per row; looked-up rows come back in fp32.

    `sharing(lm_head)` looks rows up in a tied output projection's own int8 weights (the same
    per-row quantization), so a model whose embeddings and output layer are one matrix keeps one
    int8 copy of it.
    """

    table: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(weight.shape[0]), int(weight.shape[1])
        table, scale = quantize_rows(weight)
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self._shared: RowwiseInt8Linear | None = None

    @classmethod
    def sharing(cls, linear: RowwiseInt8Linear) -> Int8Embedding:
        """The embedding of a tied output projection that the int8 kernel holds (its packed rows)."""
        if not linear.uses_kernel:
            raise ValueError("only the kernel's packed weights can be shared")
        embedding = cls.__new__(cls)
        nn.Module.__init__(embedding)
        embedding.num_embeddings, embedding.embedding_dim = linear.out_features, linear.in_features
        embedding.__dict__["_shared"] = linear  # a plain reference: not a second registered submodule
        return embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._shared is not None:
            rows = kernel.packed_rows(self._shared.packed, ids, self.embedding_dim)
            return rows.float() * self._shared.scales[ids].unsqueeze(-1)
        return self.table[ids].float() * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        shared = ", shared with the output layer" if self._shared is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows{shared}"


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
