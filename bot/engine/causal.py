"""Decoder-only chat models (Llama, Qwen2, Qwen3 families), one decoding step at a time over every row.

The counterpart of `seq2seq.py` for models without an encoder. A *block* is one request, one row
(chat models decode greedily or by sampling, never with beams). When a request joins, its prompt
minus the last token runs through the model alone and unpadded (the prefill); its keys and values
go into the row's slab. A long prompt may be read in chunks between decoding steps (`begin_block`,
`prefill_some`), so that replies already running keep going while it joins. Every step then feeds
each row its newest token, the first time the prompt's last token, so a step is the same batched
pass for a new row and an old one.

A finished row's keys and values can be kept (`prefix_cache.py`): a later prompt that starts with
the same tokens copies those positions in and prefills only the rest.

Batch invariance: a step's row attends over its slab's first positions up to its own position rounded
up to `ATTEND_BUCKET` (rows of the same length together), masked past its position, so what a row
computes never depends on the other rows. An int8 model's q/k/v projections run as one Linear, and
its MLP's gate and up projections as another (`int8.fuse_linears_`), with bitwise the same results.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from bot.engine.int8 import RowwiseInt8Linear, fuse_linears_
from bot.engine.native import NativeLayers, Unsuitable
from bot.engine.prefix_cache import PrefixCache
from bot.engine.slabs import attend, reorder_rows

# A chunk after a past attends in place (`_prefill_in_place`) while its tokens x positions stay
# under this: about 32 tokens at a full 2,048-position context. Measured on 2 cores (Qwen2.5-0.5B
# shape, int8, ~1,300 positions): 16 tokens in place take half the model's own forward (which
# copies the past into a DynamicCache); at 64 they are even; at 133 the forward's flash attention
# is faster than building the scores matrix.
IN_PLACE_SCORES = 32 * 2048

# A decoding step attends over each row's first positions rounded up to a multiple of this (rows
# with the same length attend together), not over the whole slab. The length depends on the row's
# own position only, so batch invariance holds.
ATTEND_BUCKET = 128

# A prompt goes through the C decoder layers at most this many tokens per call, which bounds their
# scratch memory (about 40 KB a token for Qwen2.5-0.5B); the result does not depend on it.
NATIVE_PREFILL_ROWS = 256

log = logging.getLogger(__name__)

# model_type -> whether its attention normalises queries and keys per head (Qwen3)
SUPPORTED = {"llama": False, "qwen2": False, "qwen3": True}


class UnsupportedModel(ValueError):
    """A decoder-only checkpoint this engine does not know how to step."""


def check_supported(config: Any) -> None:
    """Raise `UnsupportedModel` unless this engine can step a model with `config`."""
    if config.model_type not in SUPPORTED:
        families = ", ".join(sorted(SUPPORTED))
        raise UnsupportedModel(f"is a {config.model_type!r} model; this engine steps decoder-only {families} models")
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        raise UnsupportedModel("uses sliding-window attention, which this engine does not support")


@dataclass
class _Chunk:
    """Prompt tokens of block `block` from position `start`, to run with the next step (C layers)."""

    block: int
    tokens: list[int]
    start: int


@dataclass
class _Joining:
    """A block still reading its prompt: positions `[:filled]` of its row are written, of `target`."""

    tokens: list[int]
    filled: int
    target: int


class CausalRunner:
    """Owns the per-row key/value slabs of one decoder-only model."""

    def __init__(
        self,
        model: Any,
        *,
        max_blocks: int,
        max_length: int,
        cache_dtype: torch.dtype,
        prefix_cache: PrefixCache | None = None,
        fuse: bool = True,
        attend_bucket: int | None = ATTEND_BUCKET,
        native: bool = True,
    ) -> None:
        config = model.config
        check_supported(config)
        self.model = model
        self.body = model.model
        self.norms_heads = SUPPORTED[config.model_type]
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.groups = self.heads // self.kv_heads
        self.scaling = self.head_dim**-0.5
        self.beams = 1
        self.max_blocks = max_blocks
        self.max_length = max_length  # positions a row may fill: prompt and reply
        self.device = next(model.parameters()).device
        self.cache_dtype = cache_dtype
        shape = (max_blocks, self.kv_heads, max_length, self.head_dim)
        layers = len(self.body.layers)
        # Zeroed, not empty: masked slots are multiplied by a zero weight, and 0 * NaN would be NaN.
        self.keys = [torch.zeros(shape, dtype=cache_dtype, device=self.device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=cache_dtype, device=self.device) for _ in range(layers)]
        self._slots = torch.arange(max_length, device=self.device)
        self.blocks = 0
        # Kept rows of finished replies (None: every prompt is prefilled whole), and the dtype the
        # model computes in (an int8 model's activations are fp32 even when its slabs are bf16).
        self.prefix_cache = prefix_cache
        self.compute_dtype = self.body.norm.weight.dtype
        self.joining: _Joining | None = None  # a block whose prompt is being read in, chunk by chunk
        # With the C layers, a chunk read while other blocks run waits for the next step and goes
        # through the layers with it, so the weights are read once for both (`prefill_some`).
        self._chunk: _Chunk | None = None
        self.attend_bucket = attend_bucket  # None: every step attends over the whole slab
        # int8: q/k/v and gate/up become one Linear each (bitwise the same results, fewer calls)
        self._fused = [_fuse_layer(layer) if fuse else (None, None) for layer in self.body.layers]
        # int8 with the AVX2 kernel: every layer of a step or a prompt chunk in one C call
        self.native: NativeLayers | None = None
        if native and fuse:
            try:
                self.native = NativeLayers(
                    model,
                    self.keys,
                    self.values,
                    heads=self.heads,
                    kv_heads=self.kv_heads,
                    head_dim=self.head_dim,
                    scaling=self.scaling,
                    norms_heads=self.norms_heads,
                )
            except Unsuitable as why:
                log.debug("steps run in PyTorch: the model %s", why)

    @staticmethod
    def cache_size(config: Any, max_blocks: int, max_length: int, element_size: int = 4) -> int:
        """Bytes of the key/value slabs for these limits."""
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return 2 * int(config.num_hidden_layers) * max_blocks * kv_heads * max_length * head_dim * element_size

    @property
    def rows(self) -> int:
        return self.blocks

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # ----- blocks joining and leaving ----------------------------------------------------------

    @torch.inference_mode()
    def add_block(self, input_ids: list[int]) -> int:
        """Prefill one request's prompt (all but its last token, which the next step feeds) at once."""
        self.begin_block(input_ids)
        self.prefill_some(None)
        return self.blocks - 1

    @torch.inference_mode()
    def begin_block(self, input_ids: list[int]) -> int:
        """Start a block whose prompt `prefill_some` then reads in; returns the positions left to read.

        Positions a kept row already holds (the longest common prefix, see `prefix_cache.py`) are
        copied in at once. The joining block sits in the row after the last block, so steps (over
        rows `[:blocks]`) leave it alone until it has joined; one block joins at a time.
        """
        self._run_chunk()
        if self.blocks >= self.max_blocks:
            raise RuntimeError("no free block")
        if self.joining is not None:
            raise RuntimeError("a block is already joining")
        if not 0 < len(input_ids) < self.max_length:
            raise ValueError(f"a prompt must have 1 to {self.max_length - 1} tokens, got {len(input_ids)}")
        prefix = len(input_ids) - 1
        reused = self._copy_cached(self.blocks, input_ids[:prefix]) if prefix and self.prefix_cache else 0
        if self.prefix_cache is not None:
            self.prefix_cache.counters.record(reused, prefix - reused)
        self.joining = _Joining(list(input_ids), reused, prefix)
        return prefix - reused

    @torch.inference_mode()
    def prefill_some(self, budget: int | None) -> int:
        """Read up to `budget` more tokens of the joining block's prompt (None: all of it).

        Returns how many are left; at 0 the block has joined, as the last block (`blocks - 1`).
        With the C layers and other blocks running, the chunk is read by the next `step`, which
        the scheduler runs next anyway; any other call reads it first.
        """
        self._run_chunk()
        joining = self.joining
        if joining is None:
            raise RuntimeError("no block is joining")
        end = joining.target if budget is None else min(joining.target, joining.filled + budget)
        if end > joining.filled:
            tokens = joining.tokens[joining.filled : end]
            if self.native is not None and self.blocks:
                self._chunk = _Chunk(self.blocks, tokens, joining.filled)
            else:
                self._prefill(self.blocks, tokens, joining.filled)
            joining.filled = end
        left = joining.target - joining.filled
        if not left:
            self.joining = None
            self.blocks += 1
        return left

    def cancel_joining(self) -> None:
        """Forget the joining block (its request failed or gave up)."""
        if self._chunk is not None and self._chunk.block == self.blocks:
            self._chunk = None  # it was the joining block's
        self.joining = None

    def _run_chunk(self) -> None:
        """Read the chunk waiting for a step now, alone."""
        chunk, self._chunk = self._chunk, None
        if chunk is not None:
            try:
                self._prefill(chunk.block, chunk.tokens, chunk.start)
            except BaseException:
                self._lost(chunk)
                raise

    def _lost(self, chunk: _Chunk) -> None:
        """A chunk that failed: a block still joining reads it again (a joined one fails with the batch)."""
        if self.joining is not None and chunk.block == self.blocks:
            self.joining.filled = min(self.joining.filled, chunk.start)

    def _copy_cached(self, block: int, tokens: list[int]) -> int:
        """Copy the longest cached prefix of `tokens` into the row; returns its length."""
        assert self.prefix_cache is not None
        entry, reused = self.prefix_cache.lookup(tokens)
        if entry is None:
            return 0
        for layer, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            keys[block, :, :reused] = entry.states[0, layer, :, :reused]
            values[block, :, :reused] = entry.states[1, layer, :, :reused]
        return reused

    def _prefill(self, block: int, tokens: list[int], start: int) -> None:
        """Run `tokens` (positions `start` on) through the model, attending over the row's first `start`."""
        if self.native is not None:
            self._prefill_native(block, tokens, start)
            return
        if start and len(tokens) * (start + len(tokens)) <= IN_PLACE_SCORES:
            self._prefill_in_place(block, tokens, start)
            return
        ids = torch.tensor([tokens], device=self.device)
        past = None
        if start:
            dtype = self.compute_dtype
            past = DynamicCache(
                ddp_cache_data=[
                    (keys[block : block + 1, :, :start].to(dtype), values[block : block + 1, :, :start].to(dtype))
                    for keys, values in zip(self.keys, self.values, strict=True)
                ]
            )
        end = start + len(tokens)
        cache = self.body(input_ids=ids, cache=past, use_cache=True).cache
        for keys, values, layer in zip(self.keys, self.values, cache.layers, strict=True):
            keys[block, :, start:end] = layer.keys[0, :, start:end]
            values[block, :, start:end] = layer.values[0, :, start:end]

    def _prefill_native(self, block: int, tokens: list[int], start: int) -> None:
        """`_prefill` through the C decoder layers: bitwise the same whatever the chunks (see the C source)."""
        body, native = self.body, self.native
        assert native is not None
        for offset in range(0, len(tokens), NATIVE_PREFILL_ROWS):
            part = torch.tensor(tokens[offset : offset + NATIVE_PREFILL_ROWS], device=self.device)
            positions = torch.arange(start + offset, start + offset + len(part), device=self.device)
            hidden = body.embed_tokens(part).float().contiguous()
            cos, sin = body.rotary_emb(hidden[None], positions[None])
            native.run(hidden, torch.full_like(positions, block), positions, cos[0], sin[0])

    def warm(self, tokens: list[int]) -> bool:
        """Prefill `tokens` (the system prompt's prefix) into the prefix cache, pinned; False if not kept."""
        if self.prefix_cache is None or self.blocks or not 0 < len(tokens) < self.max_length - 1:
            return False
        block = self.add_block([*tokens, tokens[-1]])  # all but the last token are prefilled: `tokens`
        try:
            return self.retain(block, tokens, len(tokens), pinned=True)
        finally:
            self.remove_block(block)

    def _prefill_in_place(self, block: int, tokens: list[int], start: int) -> None:
        """`_prefill` for a chunk after a past: attends over the row's slab where it lies, as `step` does.

        The model's own forward would need the past as a `DynamicCache`: converted, concatenated
        and expanded for grouped-query attention at every chunk, which costs more than a short
        chunk's arithmetic.
        """
        body, count = self.body, len(tokens)
        end = start + count
        hidden = body.embed_tokens(torch.tensor([tokens], device=self.device))[0]  # [count, hidden]
        positions = torch.arange(start, end, device=self.device)
        cos, sin = body.rotary_emb(hidden[None], positions[None])  # [1, count, head_dim]
        cos, sin = cos[0][:, None], sin[0][:, None]
        # query (group g, token t) is row g * count + t; it sees the slots up to its own position
        mask = (self._slots[None, :end] <= positions[:, None]).repeat(self.groups, 1)[None]
        for layer, keys, values in zip(body.layers, self.keys, self.values, strict=True):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            query = attention.q_proj(x).view(count, self.heads, self.head_dim)
            key = attention.k_proj(x).view(count, self.kv_heads, self.head_dim)
            value = attention.v_proj(x).view(count, self.kv_heads, self.head_dim)
            if self.norms_heads:
                query, key = attention.q_norm(query), attention.k_norm(key)
            query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
            keys[block, :, start:end] = key.transpose(0, 1).to(self.cache_dtype)
            values[block, :, start:end] = value.transpose(0, 1).to(self.cache_dtype)
            grouped = query.view(count, self.kv_heads, self.groups, self.head_dim).permute(1, 2, 0, 3)
            grouped = grouped.reshape(self.kv_heads, self.groups * count, self.head_dim)
            out = attend(grouped, keys[block, :, :end], values[block, :, :end], mask, self.scaling)
            out = out.view(self.kv_heads, self.groups, count, self.head_dim).permute(2, 0, 1, 3)
            hidden = hidden + attention.o_proj(out.reshape(count, -1).to(hidden.dtype))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    @torch.inference_mode()
    def retain(self, block: int, tokens: list[int], prompt_length: int, *, pinned: bool = False) -> bool:
        """Keep a finished row's first `len(tokens)` positions in the prefix cache (if there is one)."""
        self._run_chunk()
        if self.prefix_cache is None or not 0 < len(tokens) <= self.max_length:
            return False
        n = len(tokens)
        shape = (2, len(self.keys), self.kv_heads, n, self.head_dim)
        if math.prod(shape) * self.cache_dtype.itemsize > self.prefix_cache.max_bytes:
            return False
        states = torch.empty(shape, dtype=self.cache_dtype, device=self.device)
        for layer, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            states[0, layer] = keys[block, :, :n]
            states[1, layer] = values[block, :, :n]
        return self.prefix_cache.keep(list(tokens), prompt_length, states, pinned=pinned)

    def remove_block(self, block: int) -> None:
        """Drop a finished block: the last block moves into its place, keeping rows packed."""
        self._run_chunk()
        if not 0 <= block < self.blocks:
            raise IndexError(block)
        last = self.blocks - 1
        if block != last:
            for slab in (*self.keys, *self.values):
                slab[block] = slab[last]
        self.blocks = last
        if self.joining is not None:  # the joining row follows the last block down
            filled = self.joining.filled
            for slab in (*self.keys, *self.values):
                slab[last, :, :filled] = slab[last + 1, :, :filled]

    def reset(self) -> None:
        """Drop every block, and the joining one (the slabs' contents are overwritten by the next prompts)."""
        self.blocks = 0
        self.joining = None
        self._chunk = None

    def reorder_rows(self, order: torch.Tensor, filled: int) -> None:
        """Row i takes the cache of row `order[i]` (never needed while every request has one row)."""
        self._run_chunk()
        reorder_rows((*self.keys, *self.values), self.rows, order, filled)

    # ----- one decoding step --------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed each active row its newest token at its position; returns fp32 logits [rows, vocab].

        A prompt chunk waiting for this step (`prefill_some`) goes through the C layers with it.
        """
        if self.native is not None:
            return self._step_native(tokens, positions)
        rows = self.rows
        body = self.body
        row_index = torch.arange(rows, device=self.device)
        hidden = body.embed_tokens(tokens)
        cos, sin = body.rotary_emb(hidden, positions[:, None])  # [rows, 1, head_dim]
        spans = self._attention_spans(positions)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for layer, keys, values, (qkv, gate_up) in zip(body.layers, self.keys, self.values, self._fused, strict=True):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            if qkv is not None:
                query, key, value = qkv(x).split((q_size, kv_size, kv_size), dim=-1)
            else:
                query, key, value = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
            query = query.view(rows, self.heads, self.head_dim)
            key = key.view(rows, self.kv_heads, self.head_dim)
            value = value.view(rows, self.kv_heads, self.head_dim)
            if self.norms_heads:
                query, key = attention.q_norm(query), attention.k_norm(key)
            query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
            keys[row_index, :, positions] = key.to(self.cache_dtype)
            values[row_index, :, positions] = value.to(self.cache_dtype)
            # Grouped-query attention: the query heads of one key/value head are that head's queries.
            query = query.view(rows, self.kv_heads, self.groups, self.head_dim)
            out = self._attend(query, keys, values, spans)  # [rows, kv_heads, groups, head_dim]
            hidden = hidden + attention.o_proj(out.reshape(rows, -1).to(hidden.dtype))
            x = layer.post_attention_layernorm(hidden)
            if gate_up is not None:
                mlp = layer.mlp
                gate, up = gate_up(x).chunk(2, dim=-1)
                hidden = hidden + mlp.down_proj(mlp.act_fn(gate).mul_(up))
            else:
                hidden = hidden + layer.mlp(x)
        return self.model.lm_head(body.norm(hidden)).float()

    def _step_native(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert self.native is not None
        rows, body = self.rows, self.body
        slab_rows = torch.arange(rows, device=self.device)
        chunk, self._chunk = self._chunk, None
        if chunk is not None:  # its tokens ride along: rows after the step's own
            count = len(chunk.tokens)
            tokens = torch.cat((tokens, torch.tensor(chunk.tokens, device=self.device)))
            positions = torch.cat((positions, torch.arange(chunk.start, chunk.start + count, device=self.device)))
            slab_rows = torch.cat((slab_rows, torch.full((count,), chunk.block, device=self.device)))
        hidden = body.embed_tokens(tokens).float().contiguous()
        cos, sin = body.rotary_emb(hidden, positions[:, None])  # [rows, 1, head_dim]
        try:
            self.native.run(hidden, slab_rows, positions, cos[:, 0], sin[:, 0])
        except BaseException:
            if chunk is not None:
                self._lost(chunk)
            raise
        return self.model.lm_head(body.norm(hidden[:rows])).float()

    def _attention_spans(self, positions: torch.Tensor) -> list[tuple[slice | torch.Tensor, int, torch.Tensor]]:
        """Rows that attend together: (their rows, how many slots they read, their mask [n, 1, 1, slots]).

        A row reads its slots up to its position rounded up to `attend_bucket`, a length that depends
        on nothing but that row, so its result is the same whichever rows share its span.
        """
        rows = self.rows
        if self.attend_bucket is None:
            mask = (self._slots[None, :] <= positions[:, None])[:, None, None, :]
            return [(slice(0, rows), self.max_length, mask)]
        bucket = self.attend_bucket
        by_length: dict[int, list[int]] = {}
        for row, position in enumerate(positions.tolist()):
            length = min(self.max_length, (position // bucket + 1) * bucket)
            by_length.setdefault(length, []).append(row)
        spans: list[tuple[slice | torch.Tensor, int, torch.Tensor]] = []
        for length, members in by_length.items():
            index: slice | torch.Tensor
            if members[-1] - members[0] == len(members) - 1:
                index = slice(members[0], members[-1] + 1)
            else:
                index = torch.tensor(members, device=self.device)
            mask = (self._slots[None, :length] <= positions[index, None])[:, None, None, :]
            spans.append((index, length, mask))
        return spans

    def _attend(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        spans: list[tuple[slice | torch.Tensor, int, torch.Tensor]],
    ) -> torch.Tensor:
        if len(spans) == 1:
            index, length, mask = spans[0]
            return attend(query, keys[index, :, :length], values[index, :, :length], mask, self.scaling)
        out: torch.Tensor | None = None
        for index, length, mask in spans:
            part = attend(query[index], keys[index, :, :length], values[index, :, :length], mask, self.scaling)
            if out is None:
                out = torch.empty(query.shape, dtype=part.dtype, device=query.device)
            out[index] = part
        assert out is not None
        return out


def _fuse_layer(layer: Any) -> tuple[RowwiseInt8Linear | None, RowwiseInt8Linear | None]:
    """An int8 layer's q/k/v projections as one Linear, and its MLP's gate/up as one (else None)."""
    qkv = fuse_linears_(layer.self_attn, ["q_proj", "k_proj", "v_proj"])
    mlp = layer.mlp
    gate_up = fuse_linears_(mlp, ["gate_proj", "up_proj"]) if hasattr(mlp, "act_fn") else None
    return qkv, gate_up


def _rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of [rows, heads, head_dim] states (cos/sin: [rows, 1, head_dim])."""
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin
