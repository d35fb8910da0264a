"""The C decoder layers (`bot/engine/native.py`) against the PyTorch step they replace.

They must give the PyTorch step's logits and keys/values to float tolerance (the sums run in
another order), keep every row independent of the others bitwise, and give bitwise the same
keys/values whatever chunks a prompt is read in, so a prompt reusing a kept prefix computes what
it would have computed alone. Checked for the Qwen2 test model, Qwen3 (per-head norms) and Llama
with biases, with fp32 and bf16 slabs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bot.engine import kernel
from bot.engine.causal import CausalRunner
from bot.engine.device import prepare_model
from tests.test_engine_step import PROMPTS, load, steps

pytestmark = pytest.mark.skipif(not kernel.available(), reason=f"no int8 kernel here: {kernel.status()}")


def make(model: Any, prompts: list[list[int]], dtype: torch.dtype = torch.float32, **options: Any) -> CausalRunner:
    r = CausalRunner(model, max_blocks=max(len(prompts), 1), max_length=128, cache_dtype=dtype, **options)
    for prompt in prompts:
        r.add_block(prompt)
    return r


def tiny_model(kind: str) -> Any:
    """A random tiny Qwen3 (per-head query/key norms) or Llama (with biases), int8."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    common: dict[str, Any] = {
        "vocab_size": 120,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "initializer_range": 0.3,
    }
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, tie_word_embeddings=True, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(attention_bias=True, mlp_bias=True, tie_word_embeddings=False, **common))
    return prepare_model(model.eval(), "cpu", "int8")[0]


@pytest.fixture(scope="module")
def tiny_int8(tiny_chat_model_dir: Path) -> Any:
    return load(tiny_chat_model_dir, "int8")


def test_c_layers_equal_the_pytorch_step(tiny_int8: Any) -> None:
    native, python = make(tiny_int8, PROMPTS), make(tiny_int8, PROMPTS, native=False)
    assert native.native is not None and python.native is None
    for a, b in zip(steps(native, PROMPTS), steps(python, PROMPTS), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    for a, b in zip(native.keys + native.values, python.keys + python.values, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_slabs_hold_the_fp32_keys_rounded(tiny_int8: Any) -> None:
    """A first token's layer-0 key/value is computed before any slab is read: bitwise fp32's, rounded.

    (Later layers read the rounded values back, so they differ by more than rounding; this tiny
    model's random weights amplify that too much for a useful tolerance.)
    """
    prompts = [[5], [9], [17]]
    half, full = make(tiny_int8, prompts, torch.bfloat16), make(tiny_int8, prompts)
    steps(half, prompts, 1), steps(full, prompts, 1)
    for slab_half, slab_full in ((half.keys[0], full.keys[0]), (half.values[0], full.values[0])):
        assert torch.equal(slab_half[:, :, 0], slab_full[:, :, 0].to(torch.bfloat16))


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_c_layers_equal_the_pytorch_step_for_other_families(kind: str) -> None:
    model = tiny_model(kind)
    prompts = [list(range(3, 30)), list(range(40, 49))]
    native, python = make(model, prompts), make(model, prompts, native=False)
    assert native.native is not None
    for a, b in zip(steps(native, prompts), steps(python, prompts), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_row_is_computed_from_itself_alone(tiny_int8: Any, dtype: torch.dtype) -> None:
    together = steps(make(tiny_int8, PROMPTS, dtype), PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        alone = steps(make(tiny_int8, [prompt], dtype), [prompt])
        for batched, single in zip(together, alone, strict=True):
            assert torch.equal(batched[row : row + 1], single)
    order = [2, 4, 0, 3, 1]
    shuffled = steps(make(tiny_int8, [PROMPTS[i] for i in order], dtype), [PROMPTS[i] for i in order])
    for a, b in zip(together, shuffled, strict=True):
        assert torch.equal(a[order], b)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_a_prompt_read_in_chunks_is_bitwise_the_prompt_read_at_once(tiny_int8: Any, chunk: int) -> None:
    prompt = PROMPTS[4]
    whole = make(tiny_int8, [prompt])
    chunked = make(tiny_int8, [])
    chunked.begin_block(prompt)
    while chunked.prefill_some(chunk):
        pass
    filled = len(prompt) - 1
    for a, b in zip(whole.keys + whole.values, chunked.keys + chunked.values, strict=True):
        assert torch.equal(a[:, :, :filled], b[:, :, :filled])
    for a, b in zip(steps(whole, [prompt]), steps(chunked, [prompt]), strict=True):
        assert torch.equal(a, b)


def test_models_the_c_layers_cannot_run_keep_the_pytorch_step(tiny_chat_model_dir: Path) -> None:
    assert make(load(tiny_chat_model_dir, "fp32"), PROMPTS[:1]).native is None
    with kernel.fbgemm_only():
        fbgemm = load(tiny_chat_model_dir, "int8")
    assert make(fbgemm, PROMPTS[:1]).native is None
    assert make(fbgemm, PROMPTS[:1], fuse=False).native is None


def test_positions_outside_the_slabs_are_refused(tiny_int8: Any) -> None:
    r = make(tiny_int8, PROMPTS[:1])
    with pytest.raises(IndexError, match="position outside"):
        r.step(torch.tensor([5]), torch.tensor([128]))


def test_a_chunk_riding_along_a_step_is_bitwise_the_prompt_read_alone(tiny_int8: Any) -> None:
    running, prompt = PROMPTS[0], PROMPTS[4]
    mixed = make(tiny_int8, [running, [1]])
    mixed.remove_block(1)
    token, position = running[-1], len(running) - 1
    mixed.begin_block(prompt)
    rides = 0
    while mixed.prefill_some(5):
        assert mixed._chunk is not None  # waiting for the step
        token, position, rides = (
            int(mixed.step(torch.tensor([token]), torch.tensor([position])).argmax()),
            position + 1,
            rides + 1,
        )
    assert rides > 3 and mixed._chunk is not None  # the last chunk rides along the joined block's first step
    alone = make(tiny_int8, [prompt])
    together = steps(mixed, [[*([0] * position), token], prompt])
    for a, b in zip(together, steps(alone, [prompt]), strict=True):
        assert torch.equal(a[1:], b)
    filled = len(prompt) - 1
    for a, b in zip(alone.keys + alone.values, mixed.keys + mixed.values, strict=True):
        assert torch.equal(a[0, :, :filled], b[1, :, :filled])


def test_a_step_that_fails_with_a_chunk_reads_the_chunk_again(tiny_int8: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    running, prompt = PROMPTS[0], PROMPTS[4]
    r = make(tiny_int8, [running, [1]])
    r.remove_block(1)
    r.begin_block(prompt)
    assert r.prefill_some(4) == len(prompt) - 1 - 4
    assert r.prefill_some(4) == len(prompt) - 1 - 8  # the first chunk was read alone, the second waits
    native = r.native
    assert native is not None

    def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(native, "run", broken)
    with pytest.raises(RuntimeError, match="boom"):
        r.step(torch.tensor([running[-1]]), torch.tensor([len(running) - 1]))
    monkeypatch.undo()
    assert r.joining is not None and r.joining.filled == 4  # the lost chunk is read again
    assert r.prefill_some(None) == 0
    r.remove_block(0)  # reads the waiting chunk first; the joined block moves to row 0
    alone = make(tiny_int8, [prompt])
    filled = len(prompt) - 1
    for a, b in zip(alone.keys + alone.values, r.keys + r.values, strict=True):
        assert torch.equal(a[0, :, :filled], b[0, :, :filled])
