"""The AVX2 int8 kernel (`bot.engine.kernel`) and the fbgemm fallback behind the same `RowwiseInt8Linear`.

Both must give a row's result from that row alone (bitwise, whatever else is in the call), stay
close to fp32, and keep all-zero rows at the bias. Shapes include sizes that are not multiples of
the kernel's packing (32 output channels, 4 input bytes), and enough rows to cross its row blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.engine import kernel
from bot.engine.int8 import Int8Embedding, RowwiseInt8Linear

needs_kernel = pytest.mark.skipif(not kernel.available(), reason=f"int8 kernel unavailable: {kernel.status()}")


@pytest.fixture(params=["kernel", "fbgemm"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "kernel":
        if not kernel.available():
            pytest.skip(f"int8 kernel unavailable: {kernel.status()}")
        yield "kernel"
    else:
        with kernel.fbgemm_only():
            yield "fbgemm"


@pytest.mark.parametrize(("n", "k"), [(7, 70), (48, 40), (130, 96), (33, 300)])
def test_rows_are_computed_alone_and_close_to_fp32(backend: str, n: int, k: int) -> None:
    torch.manual_seed(n * k)
    linear = torch.nn.Linear(k, n)
    q = RowwiseInt8Linear(linear.weight, linear.bias)
    assert q.uses_kernel == (backend == "kernel")
    x = torch.randn(70, k) * torch.rand(70, 1) * 10  # rows of very different scales; crosses 32-row blocks
    with torch.inference_mode():
        full = q(x)
        for start, size in ((0, 1), (1, 2), (5, 3), (31, 2), (10, 60)):
            assert torch.equal(q(x[start : start + size].clone()), full[start : start + size])
    reference = linear(x).detach()
    assert ((full - reference).norm() / reference.norm()).item() < 0.03
    with torch.inference_mode():
        assert torch.equal(q(torch.zeros(3, k)), linear.bias.detach().expand(3, n))


@needs_kernel
def test_packing_round_trips_and_embedding_rows_are_the_weights() -> None:
    torch.manual_seed(1)
    rows = torch.randint(-127, 128, (37, 45), dtype=torch.int8)
    packed = kernel.pack(rows)
    assert packed.shape == (2, 12, 32, 4)  # 37 channels padded to 64, 45 bytes to 48
    assert torch.equal(kernel.unpack(packed, 37, 45), rows)
    sums = kernel.sums128(rows)
    assert sums.shape == (64,) and torch.equal(sums[:37], rows.to(torch.int32).sum(1) * 128) and not sums[37:].any()
    ids = torch.tensor([[0, 36], [5, 5]])
    assert torch.equal(kernel.packed_rows(packed, ids, 45), rows[ids])

    weight = torch.randn(37, 45)
    head = RowwiseInt8Linear(weight, None)
    shared, own = Int8Embedding.sharing(head), Int8Embedding(weight)
    assert torch.equal(shared(ids), own(ids))  # the same per-row quantization, read from the output layer
    assert not list(shared.buffers())  # it holds no table of its own


@needs_kernel
def test_the_kernel_matches_exact_integer_arithmetic() -> None:
    """Its sums are exact: equal to int64 matrix products of the same int8 values."""
    torch.manual_seed(2)
    weight = torch.randn(20, 64)
    q = RowwiseInt8Linear(weight, None)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        out = q(x)
    x_scale = x.abs().amax(dim=1) / 127.0
    x_rows = torch.round(x * (127.0 / x.abs().amax(dim=1, keepdim=True))).to(torch.int64)
    sums = x_rows @ q.int8_rows().to(torch.int64).t()
    expected = (sums.float() * x_scale[:, None]) * q.scales[None, :]
    assert torch.allclose(out, expected, rtol=1e-6, atol=0)


@needs_kernel
@pytest.mark.skipif(len(kernel._flag_choices()) < 2, reason="this CPU has no AVX512-VNNI")
def test_every_build_gives_bitwise_the_avx2_builds_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """The VNNI build's offset bytes (x + 128) and per-channel correction, and the AMX build's tiles
    (where the CPU has them), leave the same exact int32 sums, so the same outputs."""
    compiler = kernel._compiler()
    assert compiler is not None
    torch.manual_seed(3)
    builds = {}
    for flags in kernel._flag_choices():
        library = kernel._open(compiler, flags)
        builds[library.int8_kernel_isa().decode()] = library
    assert {"AVX2", "AVX512-VNNI"} <= set(builds)
    # AMX takes 4 rows or more when K is a multiple of 64: in blocks of 32 rows, partial ones, 256-row blocks
    for n, k, m in (
        (7, 70, 1),
        (130, 96, 3),
        (33, 300, 37),
        (64, 32, 4),
        (50, 64, 5),
        (40, 128, 16),
        (70, 192, 33),
        (96, 256, 300),
    ):
        rows = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        packed, sums, scales, bias = kernel.pack(rows), kernel.sums128(rows), torch.rand(n), torch.randn(n)
        x = torch.randn(m, k) * torch.rand(m, 1) * 10
        outs = []
        for library in builds.values():
            out = torch.empty(m, n)
            pointers = (t.data_ptr() for t in (packed, sums, scales, bias))
            kp = packed.shape[1] * kernel.K_STEP
            assert library.int8_linear(x.data_ptr(), m, k, *pointers, n, kp, out.data_ptr(), 2) == 0
            outs.append(out)
        for name, out in zip(list(builds)[1:], outs[1:], strict=True):
            assert torch.equal(outs[0], out), (name, n, k, m)


def test_a_machine_without_the_kernel_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOT_INT8_KERNEL", "off")
    library, why = kernel._load()
    assert library is None and "BOT_INT8_KERNEL=off" in why
    monkeypatch.delenv("BOT_INT8_KERNEL")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(kernel, "_cpu_has_avx2", lambda: True)
    monkeypatch.setattr(kernel, "FLAGS", [*kernel.FLAGS, "-DREBUILD_FOR_TEST"])  # a name not built before
    library, why = kernel._load()
    assert library is None and why.startswith("fbgemm (")


async def test_an_int8_chat_model_on_fbgemm_still_batches_invariantly(tiny_chat_model_dir: Path) -> None:
    import asyncio

    from bot.engine import Engine
    from tests.test_engine_causal import HISTORIES, chat_config

    with kernel.fbgemm_only():
        engine: Any = Engine(chat_config(tiny_chat_model_dir, precision="int8"))
        async with engine:
            assert not any(getattr(m, "uses_kernel", False) for m in engine._model.modules())
            alone = [await engine.reply(h) for h in HISTORIES]
            batched = await asyncio.gather(*(engine.reply(h) for h in HISTORIES))
    assert list(batched) == alone
