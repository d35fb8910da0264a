"""The decoding step's shortcuts change nothing they should not.

Fused int8 Linears (q/k/v as one, gate/up as one) give bitwise the unfused results, in the step and
in the model's own forward; attention over each row's used length (a bucket of its own position)
keeps a row's result independent of the other rows, bitwise, and equal to attention over the
whole slab to float tolerance (the sums run over fewer masked zeros, so not bitwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bot.engine.causal import CausalRunner
from bot.engine.device import prepare_model
from bot.engine.int8 import FusedPart, RowwiseInt8Linear, fuse_linears_
from bot.engine.loading import load_tokenizer_and_model

# with buckets of 8, rows 0 and 2 share one (attend together though not adjacent); all cross into new ones
PROMPTS = [list(range(3, 40)), list(range(5, 14)), list(range(7, 45)), [4, 9, 11], list(range(7, 70))]


def load(model_dir: Path, precision: str) -> Any:
    _, model = load_tokenizer_and_model(str(model_dir))
    return prepare_model(model, "cpu", precision)[0]


def make_runner(model: Any, prompts: list[list[int]], **options: Any) -> CausalRunner:
    r = CausalRunner(model, max_blocks=len(prompts), max_length=128, cache_dtype=torch.float32, **options)
    for prompt in prompts:
        r.add_block(prompt)
    return r


def steps(r: CausalRunner, prompts: list[list[int]], count: int = 6) -> list[torch.Tensor]:
    """Logits of `count` greedy steps over every row, starting from each prompt's last token."""
    tokens = torch.tensor([p[-1] for p in prompts])
    positions = torch.tensor([len(p) - 1 for p in prompts])
    out = []
    for _ in range(count):
        logits = r.step(tokens, positions)
        out.append(logits)
        tokens, positions = logits.argmax(-1), positions + 1
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("inference", [True, False])
def test_a_fused_linear_is_bitwise_its_parts(bias: bool, inference: bool) -> None:
    torch.manual_seed(0)
    parts = [
        RowwiseInt8Linear(nn.Linear(48, n, bias=bias).weight, nn.Linear(48, n).bias if bias else None)
        for n in (48, 16, 16)
    ]
    fused = RowwiseInt8Linear.fused(parts)
    assert fused.out_features == 80
    with torch.inference_mode(inference):
        for rows in (1, 2, 5, 1, 70):
            x = torch.randn(rows, 48) * 3
            assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_fused_parts_compute_once_and_stay_exact_out_of_order() -> None:
    torch.manual_seed(1)
    holder = nn.Module()
    for name, n in (("a", 8), ("b", 12)):
        setattr(holder, name, RowwiseInt8Linear(torch.randn(n, 16), torch.randn(n)))
    a, b = holder.a, holder.b
    fused = fuse_linears_(holder, ["a", "b"])
    assert fused is not None and isinstance(holder.a, FusedPart)
    assert fuse_linears_(holder, ["a", "b"]) is fused  # fusing again finds it
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    calls = []
    fused.register_forward_hook(lambda *_: calls.append(1))
    assert torch.equal(holder.a(x), a(x)) and torch.equal(holder.b(x), b(x))
    assert len(calls) == 1
    # another input, a part asked twice, parts in another order: each is computed afresh
    assert torch.equal(holder.b(y), b(y)) and torch.equal(holder.b(y), b(y)) and torch.equal(holder.a(x), a(x))
    assert torch.equal(holder.a(y), a(y))


def test_fused_int8_model_is_bitwise_the_unfused_one(tiny_chat_model_dir: Path) -> None:
    plain, fused_model = load(tiny_chat_model_dir, "int8"), load(tiny_chat_model_dir, "int8")
    unfused = make_runner(plain, PROMPTS, fuse=False)
    fused = make_runner(fused_model, PROMPTS, native=False)  # fuses at construction, before the prefills
    layer = fused_model.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, FusedPart) and isinstance(layer.mlp.up_proj, FusedPart)
    assert isinstance(plain.model.layers[0].self_attn.k_proj, RowwiseInt8Linear)
    for a, b in zip(steps(unfused, PROMPTS), steps(fused, PROMPTS), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(unfused.keys + unfused.values, fused.keys + fused.values, strict=True):
        assert torch.equal(a, b)
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        assert torch.equal(plain(input_ids=ids).logits, fused_model(input_ids=ids).logits)


def test_fp32_models_are_not_fused(tiny_chat_model_dir: Path) -> None:
    model = load(tiny_chat_model_dir, "fp32")
    make_runner(model, PROMPTS[:1])
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_bucketed_attention_is_batch_invariant_and_equals_the_whole_slab(
    tiny_chat_model_dir: Path, precision: str
) -> None:
    """Bitwise in int8; fp32's own Linears (MKL) are not batch-invariant, so there only the whole-slab check.

    The PyTorch step's (`native=False`): the C layers attend over each row's exact length, no buckets."""
    model = load(tiny_chat_model_dir, precision)
    together = steps(make_runner(model, PROMPTS, attend_bucket=8, native=False), PROMPTS)
    exact = precision == "int8"
    for row, prompt in enumerate(PROMPTS):
        alone = steps(make_runner(model, [prompt], attend_bucket=8, native=False), [prompt])
        for batched, single in zip(together, alone, strict=True):
            if exact:
                assert torch.equal(batched[row : row + 1], single)
            else:
                torch.testing.assert_close(batched[row : row + 1], single, rtol=1e-4, atol=1e-4)
    # reordered rows (spans of non-adjacent rows gathered), still bitwise
    order = [2, 4, 0, 3, 1]
    shuffled = steps(
        make_runner(model, [PROMPTS[i] for i in order], attend_bucket=8, native=False), [PROMPTS[i] for i in order]
    )
    for a, b in zip(together, shuffled, strict=True):
        assert torch.equal(a[order], b) if exact else torch.allclose(a[order], b, rtol=1e-4, atol=1e-4)
    whole = steps(make_runner(model, PROMPTS, attend_bucket=None, native=False), PROMPTS)
    for a, b in zip(together, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
