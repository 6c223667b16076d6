"""Llama decoder with a preallocated, static-shaped KV cache and per-row lengths held on the device.

Module names follow the official checkpoint (`language_model.model.layers.{i}.self_attn.q_proj`, ...), so a
state dict loads without renaming. Row b of the cache holds `lengths[b]` tokens at slots 0..lengths[b]−1:
prompts of different lengths are right-padded for the prefill (causal attention never lets a real token see
the padding after it) and each row's next token is written at its own slot, so decode needs no mask beyond
the lengths and runs from device state alone (graph-replayable). Rotary position = slot index.

After loading, `fuse()` makes the inference layout (`LlamaModel.fuse`): q/k/v and gate/up each become one
weight (the official parameters stay, as views into it, so nothing is stored twice and the state dict keeps
the official names) and the rotary cos/sin of every position is tabulated once. Two consequences: the state
dict's q/k/v (gate/up) share storage, so safetensors' save_file refuses it as is (clone the tensors first);
and the model must not be moved or cast after fuse() (.to() would convert the views and the fused weight
separately: two copies, and the GEMMs would read the fused one). load() fuses after placing the weights.

Rounding: the decode step rotates q and k in fp32 with fp32 cos/sin and rounds once, and SiLU·mul rounds
once; the prefill (and the official code) work in the model dtype with cos/sin rounded to it. In fp32 the
two agree to rounding; in bf16 the decode step is the more accurate of the two.

The decode step (one token per row) runs 9 kernels per layer: RMSNorm fused with the residual add (×2), the
QKV GEMM, attention with the rotary inside (split + merge), o_proj, the gate/up GEMM, SiLU·mul, down.
`backend` picks the implementation of the fused ops: "triton" (`kernels.rmsnorm`, `kernels.activation`,
`kernels.decode_attention`) or "torch" (their references in `kernels.reference`: the same arithmetic in
plain torch, more launches). Prefill uses torch ops and SDPA (flash-attn when installed, on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlamaConfig
from ..kernels import reference as ref
from ..quant import qlinear, weight_scale

try:  # optional: only used for the causal prefill on CUDA in fp16/bf16
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


class KVCache:
    """k, v: [layers, rows, kv_heads, max_len, head_dim], allocated once; lengths: [rows] int32, tokens held.

    With scales (k_scale, v_scale [layers, kv_heads] fp32, `quant.kv_cache_scales`) k and v are e4m3: a stored
    value x stands for x · scale of its layer and head."""

    def __init__(self, cfg: LlamaConfig, rows: int, max_len: int, device, dtype, scales=None):
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim)
        if scales is not None:
            dtype = torch.float8_e4m3fn
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(rows, device=device, dtype=torch.int32)
        self.max_len = max_len
        self.k_scale, self.v_scale = scales if scales is not None else (None, None)

    @classmethod
    def from_buffers(cls, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scales=None) -> "KVCache":
        """A cache over existing buffers (views of the static KV pool): nothing is allocated."""
        self = cls.__new__(cls)
        self.k, self.v, self.lengths, self.max_len = k, v, lengths, k.shape[3]
        self.k_scale, self.v_scale = scales if scales is not None else (None, None)
        return self

    @property
    def scales(self):
        return None if self.k_scale is None else (self.k_scale, self.v_scale)

    def layer_scales(self, i: int) -> dict:
        """The attention kernel's scale arguments for layer i ({} for a cache in the model dtype)."""
        return {} if self.k_scale is None else {"k_scale": self.k_scale[i], "v_scale": self.v_scale[i]}

    def view_rows(self, rows: int, start: int = 0) -> "KVCache":
        """Rows start .. start+rows−1, sharing storage (and lengths) with this cache."""
        sl = slice(start, start + rows)
        return KVCache.from_buffers(self.k[:, sl], self.v[:, sl], self.lengths[sl], self.scales)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the scale, as the reference Llama does (matters in bf16).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] → cos, sin [B, 1, T, head_dim] (computed in fp32, rotate-half layout). The per-call
    computation; the model reads the same values from its table (`rope_cos_sin`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rope_cos_sin(table: torch.Tensor, positions, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions of a `reference.rope_table` → cos, sin [B, 1, T, head_dim] in dtype. positions: an int T
    (0..T−1, B = 1: the prefill) or a [B, T] tensor (per-row positions: JanusFlow's blocks)."""
    # (a SymInt under torch.export: the AOTInductor packages' prompt length is dynamic)
    whole = isinstance(positions, (int, torch.SymInt))
    rows = table[:positions][None] if whole else table[positions]  # [B, T, 2, hd/2] fp32
    c, s = rows[..., 0, :], rows[..., 1, :]
    return torch.cat((c, c), -1).to(dtype)[:, None], torch.cat((s, s), -1).to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, hd], k/v [B, Hkv, T, hd] → [B, H, T, hd], causal (the prefill)."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


@dataclass(frozen=True)
class DecodeOps:
    """The fused ops of a decode step, from one backend (see the module docstring)."""
    add_rmsnorm: Callable  # (x, *, weight, eps, residual=None) → normed; residual ← x + residual in place
    linear: Callable  # (x [B, K], w [N, K], scale [N] | None) → [B, N]; w 8-bit when scale is given
    linear_silu_mul: Callable  # (x [B, D], gate_up weight [2I, D], scale [2I] | None) → silu(gate) · up [B, I]
    # (q, k_new, v_new, k_cache, v_cache, lengths, *, rope, [k_scale, v_scale]) → [B, H, hd]; appends k/v
    attention: Callable
    # the same for W tokens per row (speculative decoding): q [W, B, H, hd] → [W, B, H, hd], token j at slot
    # lengths[b] + j, causal inside the window; writes the window's k/v, does not advance lengths
    window_attention: Callable


def decode_ops(backend: str, bound: int | None = None) -> DecodeOps:
    """bound (torch backend): a host-side upper limit on every row's new length, so eager attention reads only
    cache[:bound]; None reads the whole cache."""
    if backend == "triton":
        from ..kernels import gemm_table
        from ..kernels.decode_attention import decode_attention
        from ..kernels.rmsnorm import add_rmsnorm
        from ..kernels.window_attention import window_attention
        # GEMMs: cuBLAS, or the Triton skinny GEMM where a committed GPU measurement says it is faster
        return DecodeOps(add_rmsnorm, gemm_table.linear, gemm_table.linear_silu_mul, decode_attention,
                         window_attention)
    return DecodeOps(ref.add_rmsnorm_ref, qlinear, lambda x, w, s=None: ref.silu_mul_ref(qlinear(x, w, s)),
                     partial(ref.decode_attention_ref, bound=bound), partial(ref.window_attention_ref, bound=bound))


def _fuse_linears(parts: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight [sum of outs, in] from bias-free Linears, whose weights become views into it (the official
    parameters stay for the state dict, with no second copy). The concatenation briefly holds one layer's
    parts twice: at most 172 MiB (Pro-7B's gate/up in bf16), never the whole model.

    8-bit Linears (`quant.QuantLinear`): the 8-bit weights and their per-row scales are concatenated alike
    (per-row scales commute with stacking rows). Returns (weight, scale or None)."""
    names = ["weight"] + (["weight_scale"] if weight_scale(parts[0]) is not None else [])
    fused = []
    for name in names:
        t = torch.cat([getattr(m, name).detach() for m in parts])
        at = 0
        for m in parts:
            n = getattr(m, name).shape[0]
            setattr(m, name, nn.Parameter(t[at:at + n], requires_grad=False))
            at += n
        fused.append(t)
    return fused[0], (fused[1] if len(fused) > 1 else None)


def _backend(m: nn.Module) -> str:
    return getattr(m, "backend", "torch")  # a QuantLinear's (set by the pipeline); plain Linears ignore it


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        D, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = H, Hkv, hd
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        self.register_buffer("qkv_weight", None, persistent=False)  # [(H + 2·Hkv)·hd, D], made by fuse()
        self.register_buffer("qkv_scale", None, persistent=False)  # [(H + 2·Hkv)·hd] fp32 with 8-bit weights

    def fuse(self) -> None:
        w, s = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        self.register_buffer("qkv_weight", w, persistent=False)
        self.register_buffer("qkv_scale", s, persistent=False)

    def _qkv(self, x: torch.Tensor, linear=None):
        """x [..., D] → q [..., H, hd], k, v [..., Hkv, hd]: views of one GEMM's output."""
        if linear is None:
            linear = partial(qlinear, backend=_backend(self.q_proj))
        qkv = linear(x, self.qkv_weight, self.qkv_scale)
        H, Hkv, hd = self.n_heads, self.n_kv, self.head_dim
        q, k, v = qkv.split((H * hd, Hkv * hd, Hkv * hd), dim=-1)
        return q.unflatten(-1, (H, hd)), k.unflatten(-1, (Hkv, hd)), v.unflatten(-1, (Hkv, hd))

    def prefill(self, x, cos, sin, k_cache, v_cache, k_scale=None, v_scale=None):
        """x [B, T, D] at slots 0..T−1 of every row; writes those cache slots (padding included, never read).
        With scales ([Hkv] fp32) the cache is e4m3 and gets the quantized keys/values; attention here uses the
        unquantized ones."""
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))  # [B, H, T, hd], [B, Hkv, T, hd] ×2
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if k_scale is None:
            k_cache[:, :, :T] = k
            v_cache[:, :, :T] = v
        else:
            k_cache[:, :, :T] = ref.fp8_quantize(k, k_scale[:, None, None])
            v_cache[:, :, :T] = ref.fp8_quantize(v, v_scale[:, None, None])
        o = causal_attention(q, k, v)  # [B, H, T, hd]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def block(self, x, cos, sin, mask, prefix_k=None, prefix_v=None, out_k=None, out_v=None):
        """x [B, T, D], a block of tokens per row attending to prefix_k/v [B, Hkv, P, hd] (already rotated) and to
        the block itself under mask [B, 1, T, P + T] (bool, True = attend): JanusFlow's prompt and its flow
        steps. out_k/out_v [B, Hkv, ≥T, hd]: where to keep the block's rotated K/V (the prompt, computed once)."""
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))  # [B, H, T, hd], [B, Hkv, T, hd] ×2
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if out_k is not None:
            out_k[:, :, :T] = k
            out_v[:, :, :T] = v
        if prefix_k is not None:
            k, v = torch.cat((prefix_k, k), 2), torch.cat((prefix_v, v), 2)  # [B, Hkv, P + T, hd]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def decode(self, x, k_cache, v_cache, lengths, rope, ops: DecodeOps, **kv_scales):
        """x [B, D], one new token per row at slot lengths[b] (its rotary position); attends over slots
        0..lengths[b] and appends the new K/V (rotated) to the cache. kv_scales: k_scale, v_scale of an e4m3
        cache."""
        B, _ = x.shape
        q, k, v = self._qkv(x, ops.linear)  # [B, H, hd], [B, Hkv, hd] ×2 (views of one [B, (H + 2·Hkv)·hd] buffer)
        o = ops.attention(q, k, v, k_cache, v_cache, lengths, rope=rope, **kv_scales)  # [B, H, hd]
        return ops.linear(o.reshape(B, -1), self.o_proj.weight, weight_scale(self.o_proj))

    def window(self, x, k_cache, v_cache, lengths, rope, ops: DecodeOps, window: int):
        """x [W·B, D], window-major (row j·B + b is token j of row b, at slot lengths[b] + j): causal over the
        row's cache and the window before it; writes the window's K/V (see DecodeOps.window_attention)."""
        q, k, v = self._qkv(x, ops.linear)  # [W·B, H, hd], [W·B, Hkv, hd] ×2
        q, k, v = (t.unflatten(0, (window, -1)) for t in (q, k, v))  # [W, B, ·, hd]
        o = ops.window_attention(q, k, v, k_cache, v_cache, lengths, rope=rope)  # [W, B, H, hd]
        return ops.linear(o.reshape(x.shape[0], -1), self.o_proj.weight, weight_scale(self.o_proj))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.register_buffer("gate_up_weight", None, persistent=False)  # [2·I, D], made by fuse()
        self.register_buffer("gate_up_scale", None, persistent=False)  # [2·I] fp32 with 8-bit weights

    def fuse(self) -> None:
        w, s = _fuse_linears([self.gate_proj, self.up_proj])
        self.register_buffer("gate_up_weight", w, persistent=False)
        self.register_buffer("gate_up_scale", s, persistent=False)

    def forward(self, x):  # [..., D], the prefill: torch's rounding (SiLU, then the product) as the official code
        g, u = qlinear(x, self.gate_up_weight, self.gate_up_scale, backend=_backend(self.gate_proj)).chunk(2, dim=-1)
        return self.down_proj(F.silu(g) * u)

    def decode(self, x, ops: DecodeOps):  # [B, D]
        h = ops.linear_silu_mul(x, self.gate_up_weight, self.gate_up_scale)  # [B, I]
        return ops.linear(h, self.down_proj.weight, weight_scale(self.down_proj))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def prefill(self, x, cos, sin, k_cache, v_cache, **kv_scales):  # [B, T, D]
        x = x + self.self_attn.prefill(self.input_layernorm(x), cos, sin, k_cache, v_cache, **kv_scales)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("rope", None, persistent=False)  # [max_positions, 2, hd/2] fp32, made by fuse()

    def fuse(self) -> None:
        """The inference layout, once, after the weights are loaded (see the module docstring)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        dev = self.norm.weight.device
        self.register_buffer("rope", ref.rope_table(self.cfg.max_position_embeddings, self.cfg.head_dim,
                                                    self.cfg.rope_theta, device=dev), persistent=False)

    def prefill(self, x: torch.Tensor, cache: KVCache, lengths: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] right-padded embeddings, lengths [B] real tokens per row → normed hidden [B, T, D].

        Fills cache slots 0..T−1 and sets cache.lengths; the caller reads row b's hidden at lengths[b] − 1."""
        B, T, _ = x.shape
        if T > cache.max_len:
            raise ValueError(f"prefill of {T} tokens exceeds the cache's {cache.max_len} slots")
        cos, sin = rope_cos_sin(self.rope, T, x.dtype)  # [1, 1, T, hd]
        for i, layer in enumerate(self.layers):
            x = layer.prefill(x, cos, sin, cache.k[i], cache.v[i], **cache.layer_scales(i))
        cache.lengths.copy_(lengths)
        return self.norm(x)

    def block(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, prefix=None,
              out=None) -> torch.Tensor:
        """A block of T tokens per row with an explicit attention mask (JanusFlow): x [B, T, D] embeddings at rotary
        positions [B, T] → normed hidden [B, T, D]. mask [B, 1, T, P + T] bool (True = attend) covers the prefix's
        P slots, then the block. prefix: per-layer rotated (k, v) [B, Hkv, P, hd] computed by an earlier block,
        or None (P = 0). out: per-layer (k, v) buffers [B, Hkv, ≥T, hd] that receive this block's rotated K/V.
        Plain torch ops (cuBLAS GEMMs, SDPA with a mask) and no host reads: graph-capturable."""
        cos, sin = rope_cos_sin(self.rope, positions, x.dtype)  # [B, 1, T, hd], rounded like the prefill's
        for i, layer in enumerate(self.layers):
            pk, pv = prefix[i] if prefix is not None else (None, None)
            ok, ov = out[i] if out is not None else (None, None)
            x = x + layer.self_attn.block(layer.input_layernorm(x), cos, sin, mask, pk, pv, ok, ov)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def decode(self, x: torch.Tensor, cache: KVCache, backend: str = "torch", bound: int | None = None) -> torch.Tensor:
        """x [B, D], one token per row → normed hidden [B, D]; appends to the cache and advances cache.lengths.
        x is consumed: it becomes the residual stream, updated in place.

        bound (torch backend): see decode_ops. Requires lengths < max_len (the caller's plan)."""
        ops = decode_ops(backend, bound)
        h = self._layers(x, ops, lambda i, attn, h: attn.decode(h, cache.k[i], cache.v[i], cache.lengths, self.rope,
                                                                 ops, **cache.layer_scales(i)))
        cache.lengths += 1
        return h

    def window(self, x: torch.Tensor, cache: KVCache, window: int, backend: str = "torch",
               bound: int | None = None) -> torch.Tensor:
        """x [W·B, D], W tokens per row, window-major (speculative decoding) → normed hidden [W·B, D]. Token j of
        row b sits at slot lengths[b] + j; writes the window's K/V there but leaves cache.lengths alone: the
        caller advances each row by the tokens it accepts. Requires lengths + W <= max_len (slots past it are
        dropped). bound: as in decode, a host-side limit on max(lengths) + W. No fp8 cache."""
        assert cache.k_scale is None, "the window pass does not support an fp8 KV cache"
        ops = decode_ops(backend, bound)
        return self._layers(x, ops, lambda i, attn, h: attn.window(h, cache.k[i], cache.v[i], cache.lengths,
                                                                   self.rope, ops, window))

    def _layers(self, x: torch.Tensor, ops: DecodeOps, attend) -> torch.Tensor:
        """The decoder stack over rows x [M, D] with attend(i, layer.self_attn, normed [M, D]) → [M, D]; x becomes
        the residual stream, updated in place."""
        eps, layers = self.cfg.rms_norm_eps, self.layers
        residual = x  # [M, D]
        h = ops.add_rmsnorm(x, weight=layers[0].input_layernorm.weight, eps=eps)
        for i, layer in enumerate(layers):
            a = attend(i, layer.self_attn, h)  # [M, D]
            h = ops.add_rmsnorm(a, weight=layer.post_attention_layernorm.weight, eps=eps, residual=residual)
            m = layer.mlp.decode(h, ops)
            # the next layer's input norm, or the final norm after the last layer, fused with this residual add
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            h = ops.add_rmsnorm(m, weight=nxt.weight, eps=eps, residual=residual)
        return h


class LanguageModel(nn.Module):
    """`language_model.*` in the checkpoint: the decoder (`model`) and the text head (`lm_head`)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
