"""Flash-decoding attention: one new query per row against the static KV cache, appending the new K/V.

Cache layout (one layer): k_cache, v_cache [B, Hkv, S, D]; row b holds lengths[b] tokens at slots
0..lengths[b]−1 (prompts of different lengths share a batch; nothing is padded on the left).
The new token's key/value go to slot lengths[b]; the query attends over slots 0..lengths[b].

Pass 1, grid [B·Hkv, splits]: program (b, kv head, s) covers slots [s·split_len, (s+1)·split_len) ∩ [0, lengths[b])
for all GROUP query heads that share the kv head, with an online softmax in fp32 (exp2, the scale folded
into q). The program whose range holds slot lengths[b] also folds in the new token, taken from k_new/v_new
rather than from the cache, and writes it to the cache: no program reads that slot, so there is no race and
no separate append launch. Pass 2, grid [B·H], merges the splits' (max, sum, acc) into the output.

The grid depends only on B, Hkv and the cache capacity S, never on the lengths, so it replays in a CUDA Graph.
Torch reference: `reference.decode_attention_ref`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_attention_split_kernel(
        q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, len_ptr, part_o_ptr, part_ml_ptr,
        stride_qb, stride_qh, stride_nb, stride_nh, stride_cb, stride_ch, stride_cs, qk_scale, split_len, num_splits,
        capacity,
        H_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    b = pid // H_KV
    hk = pid % H_KV
    L = tl.load(len_ptr + b)  # tokens already cached in row b; the new one goes to slot L
    g = tl.arange(0, GROUP_P)
    gmask = g < GROUP
    heads = hk * GROUP + g  # [GP] query heads served by this kv head
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    q = q.to(tl.float32) * qk_scale  # [GP, D], scores come out in log2 units

    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)
    lo = s * split_len
    hi = tl.minimum(lo + split_len, L)
    kv_base = b.to(tl.int64) * stride_cb + hk * stride_ch  # int64: rows·heads·slots·D can pass 2^31
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        off = kv_base + n[:, None] * stride_cs + d[None, :]
        k = tl.load(k_cache_ptr + off, mask=nmask[:, None], other=0.0).to(tl.float32)  # [BN, D]
        v = tl.load(v_cache_ptr + off, mask=nmask[:, None], other=0.0).to(tl.float32)
        sc = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GP, BN]
        sc = tl.where(nmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))  # finite: every block holds at least one live slot
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new

    # this split holds slot L: fold in the new token and append it (L == capacity, a broken caller
    # precondition, would write into the next head's slot 0, so it is skipped instead)
    if (L // split_len == s) & (L < capacity):
        nb = b * stride_nb + hk * stride_nh + d
        kn = tl.load(k_new_ptr + nb)
        vn = tl.load(v_new_ptr + nb)
        sn = tl.sum(q * kn.to(tl.float32)[None, :], axis=1)  # [GP]
        m_new = tl.maximum(m, sn)
        alpha = tl.exp2(m - m_new)  # m may be −inf (empty split): exp2(−inf) = 0
        pn = tl.exp2(sn - m_new)
        l = l * alpha + pn
        acc = acc * alpha[:, None] + pn[:, None] * vn.to(tl.float32)[None, :]
        m = m_new
        tl.store(k_cache_ptr + kv_base + L * stride_cs + d, kn)
        tl.store(v_cache_ptr + kv_base + L * stride_cs + d, vn)

    # partials: o [B, H, splits, D], (m, l) [B, H, splits, 2]; an empty split stores (−inf, 0, 0)
    row = (b * (H_KV * GROUP) + heads) * num_splits + s  # [GP]
    tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
    tl.store(part_ml_ptr + row * 2, m, mask=gmask)
    tl.store(part_ml_ptr + row * 2 + 1, l, mask=gmask)


@triton.jit
def _decode_attention_merge_kernel(part_o_ptr, part_ml_ptr, out_ptr, stride_ob, stride_oh, num_splits,
                                   H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)  # b·H + h
    b = pid // H
    h = pid % H
    s = tl.arange(0, BLOCK_S)
    smask = s < num_splits
    d = tl.arange(0, HEAD_DIM)
    row = pid * num_splits + s
    m = tl.load(part_ml_ptr + row * 2, mask=smask, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)  # finite: the split holding the new token is never empty
    wgt = tl.exp2(m - m_max)  # [S], 0 for empty splits
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(wgt[:, None] * o, axis=0) / tl.sum(wgt * l, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def default_splits(batch_kv_heads: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Enough splits that B·Hkv·splits fills the GPU about 4 times over, each split at least one block.

    On the CPU (the interpreter, where every program costs ~20 ms of Python) two splits: enough to exercise
    the merge, no more."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2 * batch_kv_heads
    max_splits = triton.cdiv(capacity, block_n)
    return max(1, min(max_splits, triton.cdiv(target, batch_kv_heads)))


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, lengths: torch.Tensor, *, sm_scale: float | None = None,
                     out: torch.Tensor | None = None, num_splits: int | None = None,
                     block_n: int | None = None) -> torch.Tensor:
    """q [B, H, D]; k_new, v_new [B, Hkv, D]; k_cache, v_cache [B, Hkv, S, D]; lengths [B] int32 → out [B, H, D].

    Writes k_new/v_new into the caches at slot lengths[b]; does not advance `lengths` (the caller does,
    once per step for all layers). Requires lengths[b] < S.
    """
    B, H, D = q.shape
    Bc, Hkv, S, Dc = k_cache.shape
    assert (Bc, Dc) == (B, D) and v_cache.shape == k_cache.shape, \
        f"cache {list(k_cache.shape)} / {list(v_cache.shape)} does not match q {list(q.shape)}"
    assert k_new.shape == (B, Hkv, D) and v_new.shape == (B, Hkv, D), f"k_new/v_new must be [{B}, {Hkv}, {D}]"
    assert H % Hkv == 0, f"{H} query heads are not a multiple of {Hkv} kv heads"
    assert D in (16, 32, 64, 128, 256), f"head dim {D} is not supported (power of two 16..256)"
    assert q.dtype == k_new.dtype == v_new.dtype == k_cache.dtype == v_cache.dtype, "q, k/v and caches share a dtype"
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name}: the head dim must be contiguous"
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must have the same strides"
    assert k_new.stride() == v_new.stride(), "k_new and v_new must have the same strides"
    assert lengths.shape == (B,) and lengths.dtype == torch.int32, f"lengths must be int32 [{B}]"
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    group = H // Hkv
    group_p = max(triton.next_power_of_2(group), 1)
    if block_n is None:
        # keep the [GP, BLOCK_N, D] product tile near 8K elements per program
        block_n = max(16, min(64, 8192 // (group_p * D)))
    if num_splits is None:
        num_splits = default_splits(B * Hkv, S, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(S, num_splits), block_n) * block_n
    num_splits = triton.cdiv(S, split_len)
    scale = (1.0 / math.sqrt(D) if sm_scale is None else sm_scale) * _LOG2E
    part_o = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(B, H, num_splits, 2, dtype=torch.float32, device=q.device)
    _decode_attention_split_kernel[(B * Hkv, num_splits)](
        q, k_new, v_new, k_cache, v_cache, lengths, part_o, part_ml,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), scale, split_len, num_splits, S,
        H_KV=Hkv, GROUP=group, GROUP_P=group_p, HEAD_DIM=D, BLOCK_N=block_n, num_warps=4)
    _decode_attention_merge_kernel[(B * H,)](
        part_o, part_ml, out, out.stride(0), out.stride(1), num_splits,
        H=H, HEAD_DIM=D, BLOCK_S=max(triton.next_power_of_2(num_splits), 2), num_warps=4)
    return out
