"""Beam search without the work transformers repeats for every beam of one request.

`generate()` copies each request's encoder output once per beam. Every beam of a request therefore
holds the same cross-attention keys and values, yet transformers computes them once per beam on the
first step and copies all of them again on every reorder. These two helpers remove both repeats;
neither changes a result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BeamSharedProjection(nn.Module):
    """A cross-attention key or value projection computed once per request instead of once per beam.

    While `group` is g > 1, the input's rows come in runs of g identical rows (one run per request,
    as `generate()` expands encoder outputs with `repeat_interleave`). The projection runs on the
    first row of each run and the result is repeated, cutting the first decoding step's cost by g.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.group = 1

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        g = self.group
        if g > 1 and states.shape[0] % g == 0:
            return self.inner(states[::g]).repeat_interleave(g, dim=0)
        return self.inner(states)


def share_cross_attention_(model: nn.Module) -> list[BeamSharedProjection]:
    """Wrap every decoder cross-attention key/value projection in place; returns the wrappers."""
    wrappers: list[BeamSharedProjection] = []
    for name, module in list(model.named_modules()):
        if not name.endswith("encoder_attn"):
            continue
        for proj in ("k_proj", "v_proj"):
            inner = getattr(module, proj, None)
            if isinstance(inner, nn.Module) and not isinstance(inner, BeamSharedProjection):
                wrapper = BeamSharedProjection(inner)
                setattr(module, proj, wrapper)
                wrappers.append(wrapper)
    return wrappers


def reorder_self_attention_only(cache: Any, beam_idx: Any) -> Any:
    """Beam search's per-step cache reorder, minus the cross-attention half.

    transformers reorders the whole EncoderDecoderCache after every step, copying the cross-attention
    keys and values (beams x requests x encoder length x d_model x 2 x layers: about 1 GB a step for
    8 requests of 10 beams) although beams only ever move within their request, whose beams all hold
    the same encoder keys and values.
    """
    self_cache = getattr(cache, "self_attention_cache", None)
    if self_cache is not None and hasattr(cache, "cross_attention_cache"):
        self_cache.reorder_cache(beam_idx)
    else:
        cache.reorder_cache(beam_idx)
    return cache
