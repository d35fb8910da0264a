"""BlenderBot's encoder and decoder, run one decoding step at a time over every active row.

A *block* is one request: `beams` consecutive rows (one per beam; one row when decoding greedily)
that share one encoder output. Blocks join and leave between steps; the rows of the blocks still
running stay packed at the front of fixed-size cache slabs, so one step is one batched forward pass
over exactly the rows that are running.

Batch invariance: every row attends over a slab of the same fixed length (masked past its own
position), and cross-attention over a slab of the model's full encoder length, so the shapes a row
is computed with never depend on which other requests share the step. With the row-wise int8 or
fp32 Linears, a reply is then the same alone or batched.
"""

from __future__ import annotations

from typing import Any

import torch

from bot.engine.slabs import attend, reorder_rows


class UnsupportedModel(ValueError):
    """The checkpoint is an encoder-decoder this engine does not know how to step."""


class Seq2SeqRunner:
    """Owns the per-row self-attention slabs and per-block cross-attention slabs of one model."""

    def __init__(self, model: Any, *, max_blocks: int, beams: int, max_length: int, cache_dtype: torch.dtype) -> None:
        config = model.config
        if config.model_type != "blenderbot":
            raise UnsupportedModel(
                f"is a {config.model_type!r} model; this engine steps BlenderBot models (model_type 'blenderbot')"
            )
        self.model = model
        self.decoder = model.get_decoder()
        self.encoder = model.get_encoder()
        self.heads = int(config.decoder_attention_heads)
        self.head_dim = int(config.d_model) // self.heads
        self.scaling = self.head_dim**-0.5
        self.beams = beams
        self.max_blocks = max_blocks
        self.max_length = max_length  # decoder positions a row may fill (the start token included)
        self.source_length = int(config.max_position_embeddings)
        self.device = next(model.parameters()).device
        self.cache_dtype = cache_dtype
        layers = len(self.decoder.layers)
        rows = max_blocks * beams
        shape = (rows, self.heads, max_length, self.head_dim)
        cross = (max_blocks, self.heads, self.source_length, self.head_dim)
        # Zeroed, not empty: masked slots are multiplied by a zero weight, and 0 * NaN would be NaN.
        self.keys = [torch.zeros(shape, dtype=cache_dtype, device=self.device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=cache_dtype, device=self.device) for _ in range(layers)]
        self.cross_keys = [torch.zeros(cross, dtype=cache_dtype, device=self.device) for _ in range(layers)]
        self.cross_values = [torch.zeros(cross, dtype=cache_dtype, device=self.device) for _ in range(layers)]
        self.cross_mask = torch.zeros((max_blocks, 1, 1, self.source_length), dtype=torch.bool, device=self.device)
        self._slots = torch.arange(max_length, device=self.device)
        self.blocks = 0

    @staticmethod
    def cache_size(config: Any, max_blocks: int, beams: int, max_length: int, element_size: int = 4) -> int:
        """Bytes of the self- and cross-attention slabs for these limits."""
        per_position = 2 * int(config.d_model) * int(config.decoder_layers) * element_size
        return per_position * (max_blocks * beams * max_length + max_blocks * int(config.max_position_embeddings))

    @property
    def rows(self) -> int:
        return self.blocks * self.beams

    def cache_bytes(self) -> int:
        slabs = self.keys + self.values + self.cross_keys + self.cross_values
        return sum(t.numel() * t.element_size() for t in slabs)

    # ----- blocks joining and leaving ----------------------------------------------------------

    @torch.inference_mode()
    def add_block(self, input_ids: list[int]) -> int:
        """Run the encoder for one request and store its cross-attention keys and values once.

        The encoder sees the prompt alone and unpadded, so its output cannot depend on anything else.
        Returns the new block's index.
        """
        if self.blocks >= self.max_blocks:
            raise RuntimeError("no free block")
        if not 0 < len(input_ids) <= self.source_length:
            raise ValueError(f"a prompt must have 1 to {self.source_length} tokens, got {len(input_ids)}")
        block = self.blocks
        ids = torch.tensor([input_ids], device=self.device)
        states = self.encoder(input_ids=ids).last_hidden_state  # [1, S, d_model]
        length = states.shape[1]
        for layer, keys, values in zip(self.decoder.layers, self.cross_keys, self.cross_values, strict=True):
            attention = layer.encoder_attn
            keys[block, :, :length] = self._heads(attention.k_proj(states))[0]
            values[block, :, :length] = self._heads(attention.v_proj(states))[0]
            keys[block, :, length:] = 0
            values[block, :, length:] = 0
        self.cross_mask[block] = False
        self.cross_mask[block, 0, 0, :length] = True
        self.blocks += 1
        return block

    def retain(self, block: int, tokens: list[int], prompt_length: int) -> bool:
        """BlenderBot keeps nothing between replies: each prompt's encoder pass is short."""
        return False

    def remove_block(self, block: int) -> None:
        """Drop a finished block: the last block moves into its place, keeping rows packed.

        Moving one block costs one block's copy, where shifting every later block down would cost
        them all; a row's result does not depend on where in the batch it sits.
        """
        if not 0 <= block < self.blocks:
            raise IndexError(block)
        last = self.blocks - 1
        if block != last:
            b = self.beams
            for slab in (*self.keys, *self.values):
                slab[block * b : (block + 1) * b] = slab[last * b : (last + 1) * b]
            for slab in (*self.cross_keys, *self.cross_values, self.cross_mask):
                slab[block] = slab[last]
        self.blocks = last

    def reset(self) -> None:
        """Drop every block (the slabs' contents are overwritten by the next prompts)."""
        self.blocks = 0

    def reorder_rows(self, order: torch.Tensor, filled: int) -> None:
        """Row i takes the self-attention cache of row `order[i]` (beams moving within their block)."""
        reorder_rows((*self.keys, *self.values), self.rows, order, filled)

    # ----- one decoding step --------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed each active row its newest token at its position; returns fp32 logits [rows, vocab]."""
        rows = self.rows
        decoder = self.decoder
        row_index = torch.arange(rows, device=self.device)
        hidden = decoder.embed_tokens(tokens) + decoder.embed_positions.weight[positions]
        self_mask = (self._slots[None, :] <= positions[:, None])[:, None, None, :]  # [rows, 1, 1, slots]
        for layer, keys, values, cross_keys, cross_values in zip(
            decoder.layers, self.keys, self.values, self.cross_keys, self.cross_values, strict=True
        ):
            attention = layer.self_attn
            x = layer.self_attn_layer_norm(hidden)
            query = self._heads(attention.q_proj(x))  # [rows, heads, head_dim]
            keys[row_index, :, positions] = self._heads(attention.k_proj(x)).to(self.cache_dtype)
            values[row_index, :, positions] = self._heads(attention.v_proj(x)).to(self.cache_dtype)
            out = attend(query[:, :, None], keys[:rows], values[:rows], self_mask, self.scaling)  # [rows, heads, 1, hd]
            hidden = hidden + attention.out_proj(out.reshape(rows, -1).to(hidden.dtype))

            attention = layer.encoder_attn
            x = layer.encoder_attn_layer_norm(hidden)
            query = self._heads(attention.q_proj(x))
            # The beams of one block share its encoder keys and values: they are that block's queries.
            query = query.view(self.blocks, self.beams, self.heads, self.head_dim).transpose(1, 2)
            out = attend(
                query,
                cross_keys[: self.blocks],
                cross_values[: self.blocks],
                self.cross_mask[: self.blocks],
                self.scaling,
            )  # [blocks, heads, beams, hd]
            out = out.transpose(1, 2).reshape(rows, -1)
            hidden = hidden + attention.out_proj(out.to(hidden.dtype))

            x = layer.final_layer_norm(hidden)
            hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(x)))
        hidden = decoder.layer_norm(hidden)
        logits = self.model.lm_head(hidden) + self.model.final_logits_bias
        return logits.float()

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        """[..., d_model] -> [..., heads, head_dim]; for a [1, S, d] encoder output, [1, heads, S, hd]."""
        split = states.view(*states.shape[:-1], self.heads, self.head_dim)
        return split.transpose(1, 2) if states.dim() == 3 else split
