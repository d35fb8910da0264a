"""A chat model's decoder layers run by the C kernel (`kernels/decoder_layer.c`) in one call per step.

`CausalRunner` uses this for int8 Llama/Qwen models whose Linears the AVX2 kernel computes: a step
(or a chunk of a prompt) goes through every layer in one ctypes call instead of about 60 PyTorch
operators a layer. The embedding, the final norm and the output layer stay in PyTorch. `build`
says why a model cannot run so (fp32 or bf16 weights, fbgemm Linears, another activation), and the
runner then keeps its PyTorch step.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from bot.engine import kernel
from bot.engine.int8 import RowwiseInt8Linear, fuse_linears_

c_int64, c_float, c_int32, c_void_p = ctypes.c_int64, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p


class _Int8Matrix(ctypes.Structure):
    _fields_ = [
        ("packed", c_void_p),
        ("sums128", c_void_p),
        ("scales", c_void_p),
        ("bias", c_void_p),
        ("n", c_int64),
        ("k", c_int64),
        ("kp", c_int64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", c_void_p),
        ("post_norm", c_void_p),
        ("q_norm", c_void_p),
        ("k_norm", c_void_p),
        ("qkv", _Int8Matrix),
        ("o", _Int8Matrix),
        ("gate_up", _Int8Matrix),
        ("down", _Int8Matrix),
        ("keys", c_void_p),
        ("values", c_void_p),
    ]


class _Shape(ctypes.Structure):
    _fields_ = [
        ("hidden", c_int64),
        ("heads", c_int64),
        ("kv_heads", c_int64),
        ("head_dim", c_int64),
        ("intermediate", c_int64),
        ("max_length", c_int64),
        ("eps", c_float),
        ("scaling", c_float),
        ("bf16_cache", c_int32),
        ("threads", c_int32),
    ]


class Unsuitable(ValueError):
    """The model (or its caches) cannot run through the C decoder layers; the message says why."""


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _matrix(linear: Any, name: str) -> _Int8Matrix:
    if not isinstance(linear, RowwiseInt8Linear) or not linear.uses_kernel:
        raise Unsuitable(f"its {name} is not an int8 Linear of the AVX2 kernel")
    packed = linear.packed
    return _Int8Matrix(
        packed.data_ptr(),
        linear.sums128.data_ptr(),
        linear.scales.data_ptr(),
        _pointer(linear.bias),
        linear.out_features,
        linear.in_features,
        packed.shape[1] * kernel.K_STEP,
    )


def _norm(module: Any, name: str, size: int) -> tuple[torch.Tensor, float]:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if weight is None or eps is None or weight.dtype != torch.float32 or tuple(weight.shape) != (size,):
        raise Unsuitable(f"its {name} is not an fp32 RMSNorm of size {size}")
    return weight.detach().contiguous(), float(eps)


def _fused(module: Any, names: list[str], what: str) -> RowwiseInt8Linear:
    fused = fuse_linears_(module, names)  # the fused Linear already there, if it was fused before
    if fused is None:
        raise Unsuitable(f"its {what} projections cannot be fused into one int8 Linear")
    return fused


class NativeLayers:
    """Every decoder layer of one model, wired to the runner's key/value slabs."""

    def __init__(
        self,
        model: Any,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        *,
        heads: int,
        kv_heads: int,
        head_dim: int,
        scaling: float,
        norms_heads: bool,
    ) -> None:
        config = model.config
        body = model.model
        hidden = int(config.hidden_size)
        cache_dtype = keys[0].dtype
        if getattr(config, "hidden_act", None) not in ("silu", "swish"):
            raise Unsuitable(f"its activation is {getattr(config, 'hidden_act', None)!r}, not silu")
        if cache_dtype not in (torch.float32, torch.bfloat16) or keys[0].device.type != "cpu":
            raise Unsuitable("its key/value slabs are not fp32 or bf16 on the CPU")
        if hidden % 8 or head_dim % 8 or head_dim > 512:
            raise Unsuitable("its hidden size or head size is not a multiple of 8 (or a head is over 512)")
        self._keep: list[torch.Tensor] = []  # tensors whose addresses the C structs hold
        layers = []
        eps = None
        for index, (layer, layer_keys, layer_values) in enumerate(zip(body.layers, keys, values, strict=True)):
            attention, mlp = layer.self_attn, layer.mlp
            input_norm, eps = _norm(layer.input_layernorm, f"layer {index}'s input norm", hidden)
            post_norm, _ = _norm(layer.post_attention_layernorm, f"layer {index}'s post-attention norm", hidden)
            q_norm = k_norm = None
            if norms_heads:
                q_norm, _ = _norm(attention.q_norm, "query norm", head_dim)
                k_norm, _ = _norm(attention.k_norm, "key norm", head_dim)
            self._keep += [t for t in (input_norm, post_norm, q_norm, k_norm) if t is not None]
            qkv = _fused(attention, ["q_proj", "k_proj", "v_proj"], "query/key/value")
            gate_up = _fused(mlp, ["gate_proj", "up_proj"], "gate/up")
            layers.append(
                _Layer(
                    input_norm.data_ptr(),
                    post_norm.data_ptr(),
                    _pointer(q_norm),
                    _pointer(k_norm),
                    _matrix(qkv, "q/k/v projection"),
                    _matrix(attention.o_proj, "output projection"),
                    _matrix(gate_up, "gate/up projection"),
                    _matrix(mlp.down_proj, "down projection"),
                    layer_keys.data_ptr(),
                    layer_values.data_ptr(),
                )
            )
        assert eps is not None
        self.layers = (_Layer * len(layers))(*layers)
        self.shape = _Shape(
            hidden,
            heads,
            kv_heads,
            head_dim,
            int(config.intermediate_size),
            int(keys[0].shape[2]),
            eps,
            scaling,
            int(cache_dtype == torch.bfloat16),
            1,
        )
        self.hidden = hidden
        self.head_dim = head_dim
        self.slab_rows = int(keys[0].shape[0])

    def run(
        self, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> None:
        """Run `hidden` [m, hidden] (fp32, contiguous) through every layer in place.

        Row r is a token at `positions[r]` of slab row `rows[r]`; its key and value are written
        there. `cos`/`sin` are its rotary factors [m, head_dim].
        """
        m = hidden.shape[0]
        rows64 = rows.to(torch.int64).contiguous()
        positions64 = positions.to(torch.int64).contiguous()
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        assert hidden.dtype == torch.float32 and hidden.is_contiguous() and hidden.shape[1] == self.hidden
        assert cos.shape == (m, self.head_dim) and sin.shape == (m, self.head_dim)
        if m == 0:
            return
        # the C code writes at these places: never outside the slabs
        if not (int(rows64.min()) >= 0 and int(rows64.max()) < self.slab_rows):
            raise IndexError("a row outside the key/value slabs")
        if not (int(positions64.min()) >= 0 and int(positions64.max()) < self.shape.max_length):
            raise IndexError("a position outside the key/value slabs")
        self.shape.threads = torch.get_num_threads()
        lib = kernel.library()
        assert lib is not None
        failed = lib.decoder_layers(
            ctypes.byref(self.shape),
            self.layers,
            len(self.layers),
            hidden.data_ptr(),
            m,
            rows64.data_ptr(),
            positions64.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
        )
        if failed:
            raise MemoryError("the decoder layers could not allocate their scratch memory")
