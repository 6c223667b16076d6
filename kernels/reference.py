"""Plain-torch references for the kernels (torch only; the torch backend runs these).

The sampling reference is `fastjanus.engine.sampling` (cfg_mix, filter_top_k_top_p, sample).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# The backends the decode reference lets SDPA choose from: every one but cuDNN. Measured on an H100 (torch 2.11,
# CUDA 13.0, Janus-Pro-1B bf16, 2 rows): SDPA picked cuDNN for this masked one-query call and spent 2.6 ms of
# host time per call building a plan for each new key length (the length grows every step, so the plan cache
# never hits): 231 ms per eager decode step, against 22.5 ms for the triton backend's eager step.
# bench/results/h100-80gb-hbm3-2026-11-23-* hold the torch-eager baseline measured before this change.
_DECODE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def append_kv(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              lengths: torch.Tensor) -> None:
    """Write k_new/v_new [B, Hkv, D] at slot lengths[b] of k_cache/v_cache [B, Hkv, S, D] (device indices)."""
    rows = torch.arange(k_new.shape[0], device=k_new.device)
    k_cache[rows, :, lengths.long()] = k_new
    v_cache[rows, :, lengths.long()] = v_new


def rope_table(positions: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """cos and sin of every position's rotary angles, [positions, 2, head_dim/2] fp32 (rotate-half layout: the
    same angles serve both halves). Computed once at load; the decode kernel reads row lengths[b], the prefill
    takes rows 0..T−1. The values are those the per-step computation gave (same fp32 ops)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inv_freq  # [P, hd/2]
    return torch.stack((freqs.cos(), freqs.sin()), dim=1).contiguous()


def rope_ref(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B, Hx, D] rotated at positions [B] (one per row), in fp32, rounded to x's dtype once."""
    cs = table[positions.long()]  # [B, 2, D/2]
    c, s = cs[:, 0, None], cs[:, 1, None]  # [B, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale (scale broadcastable to x) in fp32, saturated to ±448 and rounded to nearest even into
    float8_e4m3fn: finite inputs never become NaN. The value stored stands for stored.float() · scale."""
    return (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)


def decode_attention_ref(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, lengths: torch.Tensor, *, rope: torch.Tensor | None = None,
                         sm_scale: float | None = None, bound: int | None = None, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `decode_attention`: rotate q and k_new at position lengths[b] (with a rope table),
    append at slot lengths[b], attend over slots 0..lengths[b].

    bound: an upper limit on lengths + 1 known on the host (the eager loop knows it without a sync); the
    keys beyond it are not read. None reads the whole cache.

    k_scale, v_scale [Hkv] fp32 (float8_e4m3fn caches): the new key/value are appended as
    fp8_quantize(·, scale per kv head), and the attention runs in fp32 over the dequantized cache
    (cache.float() · scale), rounded to q's dtype at the end. The rotated key is rounded to k_new's dtype
    (rope_ref) before it is quantized: give fp32 inputs for the kernel's single rounding.
    """
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if rope is not None:
        q, k_new = rope_ref(q, lengths, rope), rope_ref(k_new, lengths, rope)
    end = S if bound is None else min(bound, S)
    mask = torch.arange(end, device=q.device)[None, :] <= lengths[:, None].long()  # [B, end]
    if k_scale is not None or v_scale is not None:
        ks, vs = k_scale.float()[:, None], v_scale.float()[:, None]  # [Hkv, 1]: per kv head
        append_kv(fp8_quantize(k_new, ks), fp8_quantize(v_new, vs), k_cache, v_cache, lengths)
        k = k_cache[:, :, :end].float() * ks[:, :, None]
        v = v_cache[:, :, :end].float() * vs[:, :, None]
        with sdpa_kernel(_DECODE_SDPA):
            o = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=mask[:, None, None],
                                               scale=sm_scale, enable_gqa=Hkv != H)
        return o[:, :, 0].to(q.dtype)
    append_kv(k_new, v_new, k_cache, v_cache, lengths)
    with sdpa_kernel(_DECODE_SDPA):
        o = F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :end], v_cache[:, :, :end],
                                           attn_mask=mask[:, None, None], scale=sm_scale,
                                           enable_gqa=Hkv != H)  # [B, H, 1, D]
    return o[:, :, 0]


def window_attention_ref(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, lengths: torch.Tensor, *, rope: torch.Tensor | None = None,
                         sm_scale: float | None = None, bound: int | None = None) -> torch.Tensor:
    """Same contract as `window_attention`: W new tokens per row, token j of row b at slot (and rotary position)
    lengths[b] + j. q [W, B, H, D]; k_new, v_new [W, B, Hkv, D]; caches [B, Hkv, S, D]; lengths [B] → [W, B, H, D].

    Rotates q and k_new at their positions (fp32, rounded once, as `rope_ref`; positions past the rope table
    use its last row), writes k/v at slots lengths[b] + j (slots ≥ S are dropped), and lets token j attend over
    slots 0..lengths[b] + j: the cached prefix and the window causally. Does not advance lengths (the caller
    advances each row by the tokens it accepts). bound: as in `decode_attention_ref`, a host-side limit on
    max(lengths) + W; keys beyond it are not read."""
    W, B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    pos = lengths.long()[None, :] + torch.arange(W, device=q.device)[:, None]  # [W, B]
    if rope is not None:
        p = pos.clamp(max=rope.shape[0] - 1).flatten()
        q = rope_ref(q.flatten(0, 1), p, rope).view(W, B, H, D)
        k_new = rope_ref(k_new.flatten(0, 1), p, rope).view(W, B, Hkv, D)
    ok = pos < S
    rows = torch.arange(B, device=q.device)[None, :].expand(W, B)
    k_cache[rows[ok], :, pos[ok]] = k_new[ok]
    v_cache[rows[ok], :, pos[ok]] = v_new[ok]
    end = S if bound is None else min(bound, S)
    mask = torch.arange(end, device=q.device)[None, None, :] <= pos.t()[:, :, None]  # [B, W, end]
    with sdpa_kernel(_DECODE_SDPA):
        o = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k_cache[:, :, :end], v_cache[:, :, :end],
                                           attn_mask=mask[:, None], scale=sm_scale,
                                           enable_gqa=Hkv != H)  # [B, H, W, D]
    return o.permute(2, 0, 1, 3)


def vq_lookup_ref(codes: torch.Tensor, embedding: torch.Tensor, *, grid: int, conv_weight: torch.Tensor | None = None,
                  conv_bias: torch.Tensor | None = None) -> torch.Tensor:
    """codes [B, grid²] → [B, E, grid, grid] L2-normalised entries, or the 1×1 conv of them [B, C, grid, grid]."""
    z = F.normalize(embedding[codes], dim=-1)  # [B, P, E]
    z = z.view(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
    if conv_weight is not None:
        z = F.conv2d(z, conv_weight, conv_bias)
    return z


def add_rmsnorm_ref(x: torch.Tensor, *, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `add_rmsnorm`: residual ← x + residual in place (when given), out = RMSNorm of it.

    The Llama RMSNorm: normalise in fp32, round to the dtype, then multiply by the weight."""
    r = x if residual is None else residual.add_(x)  # one rounding of the exact sum, as x + residual
    rf = r.float()
    normed = (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps)).to(r.dtype)
    return torch.mul(weight, normed, out=out)


def silu_mul_ref(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `silu_mul`: gate_up [M, 2I] (gate | up) → silu(gate) · up [M, I], in fp32, rounded once."""
    g, u = gate_up.chunk(2, dim=-1)
    y = (F.silu(g.float()) * u.float()).to(gate_up.dtype)
    return out.copy_(y) if out is not None else y


def skinny_gemm_ref(x: torch.Tensor, w: torch.Tensor, *, epilogue: str | None = None,
                    out: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `skinny_gemm`: x [M, K] @ w [N, K].T computed in fp32 and rounded once to the dtype; with
    epilogue "silu_mul" (w the fused [gate; up] weight [2I, K]) silu(y[:, :I]) · y[:, I:] of the fp32 y, rounded
    once. With w_scale (fp32 [N]; w int8 or float8_e4m3fn, per-row symmetric): dequantize, then the same, in
    fp32: x @ (w.float() · w_scale[:, None]).T."""
    assert epilogue in (None, "silu_mul"), f"epilogue must be None or 'silu_mul', got {epilogue!r}"
    wf = w.float() if w_scale is None else w.float() * w_scale.float()[:, None]
    y = F.linear(x.float(), wf)
    if epilogue == "silu_mul":
        y = silu_mul_ref(y)  # fp32 in, fp32 out: no rounding yet
    y = y.to(x.dtype)
    return out.copy_(y) if out is not None else y
