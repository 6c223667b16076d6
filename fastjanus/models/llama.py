"""Llama decoder with a preallocated, static-shaped KV cache and per-row lengths held on the device.

Module names follow the official checkpoint (`language_model.model.layers.{i}.self_attn.q_proj`, ...), so a
state dict loads without renaming. Row b of the cache holds `lengths[b]` tokens at slots 0..lengths[b]−1:
prompts of different lengths are right-padded for the prefill (causal attention never lets a real token see
the padding after it) and each row's next token is written at its own slot, so decode needs no mask beyond
the lengths and runs from device state alone (graph-replayable). Rotary position = slot index.

`backend` picks the decode attention: "torch" (SDPA over the masked cache, `kernels.reference`) or "triton"
(flash-decoding, `kernels.decode_attention`). Prefill uses torch SDPA (flash-attn when installed, on CUDA).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlamaConfig
from ..kernels.reference import decode_attention_ref

try:  # optional: only used for the causal prefill on CUDA in fp16/bf16
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


class KVCache:
    """k, v: [layers, rows, kv_heads, max_len, head_dim], allocated once; lengths: [rows] int32, tokens held."""

    def __init__(self, cfg: LlamaConfig, rows: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(rows, device=device, dtype=torch.int32)
        self.max_len = max_len

    @classmethod
    def from_buffers(cls, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> "KVCache":
        """A cache over existing buffers (views of the static KV pool): nothing is allocated."""
        self = cls.__new__(cls)
        self.k, self.v, self.lengths, self.max_len = k, v, lengths, k.shape[3]
        return self

    def view_rows(self, rows: int, start: int = 0) -> "KVCache":
        """Rows start .. start+rows−1, sharing storage (and lengths) with this cache."""
        sl = slice(start, start + rows)
        return KVCache.from_buffers(self.k[:, sl], self.v[:, sl], self.lengths[sl])

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
    """positions [B, T] → cos, sin [B, 1, T, head_dim] (computed in fp32, rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, hd], k/v [B, Hkv, T, hd] → [B, H, T, hd], causal (the prefill)."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        D, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = H, Hkv, hd
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)

    def prefill(self, x, cos, sin, k_cache, v_cache):
        """x [B, T, D] at slots 0..T−1 of every row; writes those cache slots (padding included, never read)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_cache[:, :, :T] = k
        v_cache[:, :, :T] = v
        o = causal_attention(q, k, v)  # [B, H, T, hd]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def decode(self, x, cos, sin, k_cache, v_cache, lengths, attend):
        """x [B, D], one new token per row at slot lengths[b]; attends over slots 0..lengths[b] with
        attend(q, k_new, v_new, k_cache, v_cache, lengths) → [B, H, hd] (see LlamaModel.decode)."""
        B, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(B, self.n_heads, self.head_dim), cos, sin)  # [B, H, hd]
        k = apply_rotary(self.k_proj(x).view(B, self.n_kv, self.head_dim), cos, sin)  # [B, Hkv, hd]
        v = self.v_proj(x).view(B, self.n_kv, self.head_dim)
        o = attend(q, k, v, k_cache, v_cache, lengths)  # [B, H, hd]
        return self.o_proj(o.reshape(B, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def prefill(self, x, cos, sin, k_cache, v_cache):  # [B, T, D]
        x = x + self.self_attn.prefill(self.input_layernorm(x), cos, sin, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, k_cache, v_cache, lengths, attend):  # [B, D]
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, k_cache, v_cache, lengths, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def prefill(self, x: torch.Tensor, cache: KVCache, lengths: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] right-padded embeddings, lengths [B] real tokens per row → normed hidden [B, T, D].

        Fills cache slots 0..T−1 and sets cache.lengths; the caller reads row b's hidden at lengths[b] − 1."""
        B, T, _ = x.shape
        if T > cache.max_len:
            raise ValueError(f"prefill of {T} tokens exceeds the cache's {cache.max_len} slots")
        positions = torch.arange(T, device=x.device)[None]  # [1, T]
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)  # [1, 1, T, hd]
        for i, layer in enumerate(self.layers):
            x = layer.prefill(x, cos, sin, cache.k[i], cache.v[i])
        cache.lengths.copy_(lengths)
        return self.norm(x)

    def decode(self, x: torch.Tensor, cache: KVCache, backend: str = "torch", bound: int | None = None) -> torch.Tensor:
        """x [B, D], one token per row → normed hidden [B, D]; appends to the cache and advances cache.lengths.

        bound (torch backend): a host-side upper limit on every row's new length, so eager attention reads
        only cache[:bound]; None reads the whole cache. Requires lengths < max_len (the caller's plan)."""
        cos, sin = rotary_cos_sin(cache.lengths[:, None], self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        cos, sin = cos[:, :, 0], sin[:, :, 0]  # [B, 1, hd]: the same rotation for every head
        if backend == "triton":  # resolved once per step, not once per layer
            from ..kernels.decode_attention import decode_attention as attend
        else:
            attend = partial(decode_attention_ref, bound=bound)
        for i, layer in enumerate(self.layers):
            x = layer.decode(x, cos, sin, cache.k[i], cache.v[i], cache.lengths, attend)
        cache.lengths += 1
        return self.norm(x)


class LanguageModel(nn.Module):
    """`language_model.*` in the checkpoint: the decoder (`model`) and the text head (`lm_head`)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
