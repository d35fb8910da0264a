"""Memory bandwidth and the per-token floor it sets for decoding."""

from __future__ import annotations

import time
from typing import Any


def measure_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Best read (sum) and copy (read + write bytes) bandwidth over `repeats`, all torch threads
    (on a thread that ends with the probe: see `bench.threads`)."""
    from bench.threads import in_own_thread

    return in_own_thread(_measure, size_mb, repeats)


def _measure(size_mb: int, repeats: int) -> dict[str, float]:
    import torch

    x = torch.ones(size_mb * 2**20 // 4)
    y = torch.full_like(x, 2.0)
    out: dict[str, float] = {}
    for name, fn, nbytes in (("read", lambda: x.sum(), x.nbytes), ("copy", lambda: y.copy_(x), 2 * x.nbytes)):
        fn()
        best = min(_timed(fn) for _ in range(repeats))
        out[name] = nbytes / best / 1e9
    out["best"] = max(out["read"], out["copy"])
    return out  # x and y are freed here, with the lambdas that hold them


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decoder_bytes_per_token(config: dict[str, Any], bytes_per_weight: float) -> float:
    """Weights one decoding step must read: per decoder layer self-attention q,k,v,o, cross-attention q,o
    (cross k,v are computed once per reply), two FFN matrices; then the output projection."""
    d, ffn, layers, vocab = config["d_model"], config["decoder_ffn_dim"], config["decoder_layers"], config["vocab_size"]
    params = layers * (6 * d * d + 2 * d * ffn) + vocab * d
    return params * bytes_per_weight


def causal_bytes_per_token(config: dict[str, Any], bytes_per_weight: float) -> float:
    """Weights one decoding step of a decoder-only model reads: per layer the q, k, v, o projections and
    the three MLP matrices; then the output projection (the input embedding reads only one row)."""
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    params = layers * (attention + 3 * hidden * inner) + config["vocab_size"] * hidden
    return params * bytes_per_weight
