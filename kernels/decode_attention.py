"""Flash-decoding attention: one new query per row against the static KV cache, appending the new K/V, with
the rotary embedding applied inside (so a decode step launches no rotary kernels and recomputes no cos/sin).

Cache layout (one layer): k_cache, v_cache [B, Hkv, S, D]; row b holds lengths[b] tokens at slots
0..lengths[b]−1 (prompts of different lengths share a batch; nothing is padded on the left).
The new token's key/value go to slot lengths[b]; the query attends over slots 0..lengths[b].
q, k_new and v_new may be views of one fused QKV projection output (any row and head strides).

Rotary (rope = [P, 2, D/2] fp32 table of cos and sin per position, rotate-half layout): q and k_new are
rotated in fp32 at position lengths[b], read on the device; the rotated key is rounded to the cache dtype
when it is stored, exactly as the torch reference (`reference.rope_ref`) does.

Pass 1, grid [B·Hkv, splits]: the splits are sized from the live length of each row, read on the device:
split_len = ⌈(lengths[b] + 1) / splits⌉ rounded up to BLOCK_N, so a short row spreads its few blocks over the
programs and the programs past its end do nothing (their loop is empty and they store nothing). Program
(b, kv head, s) serves all GROUP query heads that share the kv head, so K and V are read once per step; the
GQA group, padded to 16 rows, is the M dimension of tensor-core dot products (QK and PV, in the cache dtype
with fp32 accumulation; fp32 caches use exact fp32 dots). Online softmax in fp32 (exp2, the scale folded into
q). The program whose range holds slot lengths[b] folds in the new token from k_new/v_new (not from the
cache) and writes it to the cache: no program reads that slot, so there is no race and no separate append
launch. Pass 2, grid [B·H], merges the live splits' (max, sum, acc); with one split (many rows × heads
fill the GPU without splitting) pass 1 writes the output and pass 2 is not launched.

FP8 cache (k_scale, v_scale given): k_cache/v_cache are float8_e4m3fn with fp32 scales per kv head, the value
standing for stored · scale[hk]. The K/V tiles are loaded as fp8 (half the bytes of bf16: attention reads the
whole cache every step) and widened in registers to q's dtype, the dot operand (e4m3 is exact in fp16 and bf16).
k_scale[hk] is folded into the fp32 q before its one rounding to the dot dtype; v_scale[hk] multiplies each
split's fp32 accumulator before it is stored (the output with one split, the partials otherwise: the merge is
unchanged). The new token's rotated key and its value are quantized in fp32 as `reference.fp8_quantize` does
(x / scale, correctly rounded; saturated to ±448; round to nearest even, done in fp32 arithmetic so that the
final conversion is exact: Triton 3.9's interpreter rounds fp32 → e4m3 wrongly), stored, and folded into the
softmax by their quantized values, so this step sees what later steps read. fp8 e4m3 conversions need sm_89+
(Ada, Hopper) on NVIDIA GPUs.

The grid depends only on B, Hkv and the split count, never on the lengths, so it replays in a CUDA Graph.
Torch reference: `reference.decode_attention_ref` (with `reference.rope_ref` for the rotary).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import interpreted

_LOG2E = 1.4426950408889634


@triton.jit
def _rotate(x, x_ptrs_partner, pmask, rope_ptr, pos, d, HALF: tl.constexpr):
    """x [R, D] fp32 rotated by the rotary angle of position `pos` (rotate-half layout): for d < D/2,
    x·cos − x[d + D/2]·sin; for d ≥ D/2, x·cos + x[d − D/2]·sin. The partner values are loaded again from
    memory (x_ptrs_partner) instead of shuffled in registers: the same cache lines, a few bytes."""
    i = d % HALF
    c = tl.load(rope_ptr + pos * (2 * HALF) + i)  # [D]
    s = tl.load(rope_ptr + pos * (2 * HALF) + HALF + i)
    partner = tl.load(x_ptrs_partner, mask=pmask, other=0.0).to(tl.float32)
    sign = tl.where(d < HALF, -1.0, 1.0)
    return x * c[None, :] + (sign * s)[None, :] * partner


@triton.jit
def _e4m3_round(x):
    """fp32 x saturated to ±448 and rounded to nearest even onto the float8_e4m3fn grid, still in fp32 (so the
    conversion that follows is exact): |x| + c − c with c = 2^23 · ulp, where ulp = 2^(e − 3) for |x| in
    [2^e, 2^(e+1)), e >= −6, and 2^−9 (the subnormal spacing) below 2^−6. The sign (of zero too) is kept."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    a = tl.abs(x)
    e = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased fp32 exponent
    c = ((tl.maximum(e, 127 - 6) + 20) << 23).to(tl.float32, bitcast=True)  # 2^(max(e − 127, −6) − 3 + 23)
    r = (a + c) - c
    return tl.where(x.to(tl.int32, bitcast=True) < 0, -r, r)


@triton.jit
def _live_split_len(L, num_splits, BLOCK_N: tl.constexpr):
    """Slots per split for a row holding L cached tokens plus the new one: ⌈(L+1)/splits⌉ in whole blocks."""
    per = (L + 1 + num_splits - 1) // num_splits
    return ((per + BLOCK_N - 1) // BLOCK_N) * BLOCK_N


@triton.jit
def _decode_attention_split_kernel(
        q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, len_ptr, rope_ptr, k_scale_ptr, v_scale_ptr,
        part_o_ptr, part_ml_ptr, out_ptr, stride_qb, stride_qh, stride_nb, stride_nh, stride_cb, stride_ch, stride_cs,
        stride_ob, stride_oh,
        qk_scale, num_splits, capacity, rope_rows,
        H_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_ROPE: tl.constexpr, FP8: tl.constexpr, DOT_F32: tl.constexpr,
        ONE_SPLIT: tl.constexpr):
    DOT_TY: tl.constexpr = q_ptr.dtype.element_ty  # the dot operands' dtype (the caches' too, unless FP8)
    pid = tl.program_id(0)
    s = tl.program_id(1)
    b = pid // H_KV
    hk = pid % H_KV
    L = tl.load(len_ptr + b)  # tokens already cached in row b; the new one goes to slot L
    pos = tl.minimum(L, rope_rows - 1)  # = L under the caller's precondition L < capacity <= rope rows
    split_len = _live_split_len(L, num_splits, BLOCK_N)
    lo = s * split_len
    g = tl.arange(0, GROUP_P)
    # a split past the row's end (lo > L): empty loop, nothing stored, dropped by the merge
    gmask = (g < GROUP) & (g * 0 + lo <= L)
    heads = hk * GROUP + g  # [GP] query heads served by this kv head (rows ≥ GROUP are padding)
    d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)  # [GP, D]
    if HAS_ROPE:
        q = _rotate(q, q_rows + ((d + HEAD_DIM // 2) % HEAD_DIM)[None, :], gmask[:, None], rope_ptr, pos, d,
                    HALF=HEAD_DIM // 2)
    if FP8:
        ks = tl.load(k_scale_ptr + hk)
        vs = tl.load(v_scale_ptr + hk)
        q = q * (qk_scale * ks)  # scores of the stored (unscaled) keys come out in log2 units
    else:
        q = q * qk_scale  # scores come out in log2 units
    q_dot = q.to(DOT_TY)  # the tensor cores' operand (a no-op for fp32)
    if DOT_F32:
        q_dot = q_dot.to(tl.float32)

    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)
    hi = tl.minimum(tl.minimum(lo + split_len, L), capacity)  # capacity: never past the row, even if L is
    kv_base = b.to(tl.int64) * stride_cb + hk * stride_ch  # int64: rows·heads·slots·D can pass 2^31
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        off = kv_base + n[:, None] * stride_cs + d[None, :]
        k = tl.load(k_cache_ptr + off, mask=nmask[:, None], other=0.0)  # [BN, D], fp8 widened in registers
        v = tl.load(v_cache_ptr + off, mask=nmask[:, None], other=0.0)
        if DOT_F32:
            sc = tl.dot(q_dot, tl.trans(k.to(tl.float32)), input_precision="ieee")  # [GP, BN]
        else:
            sc = tl.dot(q_dot, tl.trans(k.to(DOT_TY)))
        sc = tl.where(nmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))  # finite: every block holds at least one live slot
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p.to(DOT_TY).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(DOT_TY), v.to(DOT_TY))  # [GP, D], fp32 accumulation
        acc = acc * alpha[:, None] + pv
        m = m_new

    # this split holds slot L: fold in the new token and append it (L == capacity, a broken caller
    # precondition, would write into the next head's slot 0, so it is skipped instead)
    if (L // split_len == s) & (L < capacity):
        nb = b * stride_nb + hk * stride_nh
        kn = tl.load(k_new_ptr + nb + d).to(tl.float32)  # [D]
        if HAS_ROPE:
            kn = tl.sum(_rotate(kn[None, :], k_new_ptr + nb + ((d + HEAD_DIM // 2) % HEAD_DIM)[None, :],
                                d[None, :] >= 0, rope_ptr, pos, d, HALF=HEAD_DIM // 2), axis=0)
        vn = tl.load(v_new_ptr + nb + d).to(tl.float32)
        if FP8:  # quantized as reference.fp8_quantize does (IEEE division, then saturate and round)
            kn = _e4m3_round(tl.math.div_rn(kn, ks + tl.zeros_like(kn)))
            vn = _e4m3_round(tl.math.div_rn(vn, vs + tl.zeros_like(vn)))
        # what the cache holds, so later steps see the same key and value (exact for FP8: already on the grid)
        kn = kn.to(k_cache_ptr.dtype.element_ty)
        vn = vn.to(v_cache_ptr.dtype.element_ty)
        sn = tl.sum(q * kn.to(tl.float32)[None, :], axis=1)  # [GP]
        m_new = tl.maximum(m, sn)
        alpha = tl.exp2(m - m_new)  # m may be −inf (no cached slot in this split): exp2(−inf) = 0
        pn = tl.exp2(sn - m_new)
        l = l * alpha + pn
        acc = acc * alpha[:, None] + pn[:, None] * vn.to(tl.float32)[None, :]
        m = m_new
        tl.store(k_cache_ptr + kv_base + L * stride_cs + d, kn)
        tl.store(v_cache_ptr + kv_base + L * stride_cs + d, vn)

    if FP8:
        acc = acc * vs  # the stored values stand for stored · v_scale (l is unchanged)
    if ONE_SPLIT:  # the whole row in this program: the output itself, and no merge launch
        o = acc / l[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:  # partials of the live splits: o [B, H, splits, D], (m, l) [B, H, splits, 2]
        row = (b * (H_KV * GROUP) + heads) * num_splits + s  # [GP]
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
        tl.store(part_ml_ptr + row * 2, m, mask=gmask)
        tl.store(part_ml_ptr + row * 2 + 1, l, mask=gmask)


@triton.jit
def _decode_attention_merge_kernel(part_o_ptr, part_ml_ptr, len_ptr, out_ptr, stride_ob, stride_oh, num_splits,
                                   H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)  # b·H + h
    b = pid // H
    h = pid % H
    L = tl.load(len_ptr + b)
    split_len = _live_split_len(L, num_splits, BLOCK_N)
    n_live = (L + split_len) // split_len  # ⌈(L+1)/split_len⌉ splits hold a slot; the rest stored nothing
    s = tl.arange(0, BLOCK_S)
    smask = s < n_live
    d = tl.arange(0, HEAD_DIM)
    row = pid * num_splits + s
    m = tl.load(part_ml_ptr + row * 2, mask=smask, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)  # finite: the split holding the new token is live and never empty
    wgt = tl.where(smask, tl.exp2(m - m_max), 0.0)  # [S]
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(wgt[:, None] * o, axis=0) / tl.sum(wgt * l, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def default_splits(batch_kv_heads: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Enough splits that B·Hkv·splits fills the GPU about 4 times over, each split at least one block. With one
    split (many rows × heads) the split kernel writes the output and the merge is not launched.

    On the CPU (the interpreter, where every program costs ~15 ms of Python) one split: the fewest programs
    and launches. The kernel tests pass num_splits explicitly to test the merge."""
    if device.type != "cuda":
        return 1
    return gpu_splits(batch_kv_heads, capacity, block_n, torch.cuda.get_device_properties(device).multi_processor_count)


def gpu_splits(batch_kv_heads: int, capacity: int, block_n: int, sms: int) -> int:
    """default_splits' rule for a GPU with `sms` SMs (the kernel counter applies it on the CPU too)."""
    return max(1, min(triton.cdiv(capacity, block_n), triton.cdiv(4 * sms, batch_kv_heads)))


def check_layout(q, k_new, v_new, k_cache, v_cache, lengths, rope, B: int, D: int) -> None:
    """The layout both attention launchers need: head dims contiguous, K and V alike, int32 lengths [B], and a
    contiguous fp32 [P, 2, D/2] rope table (or None)."""
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name}: the head dim must be contiguous"
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must have the same strides"
    assert k_new.stride() == v_new.stride(), "k_new and v_new must have the same strides"
    assert lengths.shape == (B,) and lengths.dtype == torch.int32, f"lengths must be int32 [{B}]"
    if rope is not None:
        assert rope.dim() == 3 and rope.shape[1:] == (2, D // 2) and rope.dtype == torch.float32 \
            and rope.is_contiguous(), f"rope must be a contiguous fp32 [P, 2, {D // 2}] table, got " \
            f"{rope.dtype} {list(rope.shape)}"


def tiling(q: torch.Tensor, batch_kv_heads: int, S: int, block_n: int | None, num_splits: int | None,
           sm_scale: float | None) -> tuple[int, int, float]:
    """(block_n, num_splits, the softmax scale in log2 units) of both attention launchers, defaults filled in.

    [BN, D] K and V tiles of 16 KiB each (bf16/fp16 at D = 128, BN = 64; fp32 gets half the slots), staged twice
    through shared memory (num_stages=2): 64 KiB, inside every GPU's per-block limit (99 KiB on sm_86/89); three
    stages of fp32 tiles would pass A100's 163 KiB. Sized by q's dtype, the dot operand's, also for fp8 caches:
    their tiles are widened to it in registers."""
    D = q.shape[-1]
    if block_n is None:
        block_n = max(16, min(64, 16384 // (D * q.element_size())))
    assert block_n >= 16 and block_n & (block_n - 1) == 0, f"block_n must be a power of two >= 16, got {block_n}"
    if num_splits is None:
        num_splits = default_splits(batch_kv_heads, S, block_n, q.device)
    num_splits = max(1, min(num_splits, triton.cdiv(S, block_n)))
    return block_n, num_splits, (1.0 / math.sqrt(D) if sm_scale is None else sm_scale) * _LOG2E


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, lengths: torch.Tensor, *, rope: torch.Tensor | None = None,
                     sm_scale: float | None = None, out: torch.Tensor | None = None, num_splits: int | None = None,
                     block_n: int | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D]; k_new, v_new [B, Hkv, D]; k_cache, v_cache [B, Hkv, S, D]; lengths [B] int32 → out [B, H, D].

    rope: [P, 2, D/2] fp32 cos/sin table (`reference.rope_table`), P > max lengths; q and k_new are then
    rotated at position lengths[b] inside the kernel. None: they are used as given.
    Writes (the rotated) k_new and v_new into the caches at slot lengths[b]; does not advance `lengths` (the
    caller does, once per step for all layers). Requires lengths[b] < S.

    k_scale, v_scale: contiguous fp32 [Hkv] scales of float8_e4m3fn caches (both or neither); q, k_new, v_new
    (fp32, fp16 or bf16, one dtype) are then the dot dtype, the new key/value are stored as
    `reference.fp8_quantize(·, scale)` and out is in q's dtype. Without scales every tensor shares one dtype.
    """
    B, H, D = q.shape
    Bc, Hkv, S, Dc = k_cache.shape
    assert (Bc, Dc) == (B, D) and v_cache.shape == k_cache.shape, \
        f"cache {list(k_cache.shape)} / {list(v_cache.shape)} does not match q {list(q.shape)}"
    assert k_new.shape == (B, Hkv, D) and v_new.shape == (B, Hkv, D), f"k_new/v_new must be [{B}, {Hkv}, {D}]"
    assert H % Hkv == 0, f"{H} query heads are not a multiple of {Hkv} kv heads"
    assert D in (16, 32, 64, 128, 256), f"head dim {D} is not supported (power of two 16..256)"
    fp8 = k_scale is not None or v_scale is not None
    if fp8:
        assert k_scale is not None and v_scale is not None, "give both k_scale and v_scale, or neither"
        assert q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.dtype == k_new.dtype == v_new.dtype, \
            f"with an fp8 cache q, k_new, v_new share fp32, fp16 or bf16, got {q.dtype}/{k_new.dtype}/{v_new.dtype}"
        assert k_cache.dtype == v_cache.dtype == torch.float8_e4m3fn, \
            f"with scales the caches must be float8_e4m3fn, got {k_cache.dtype}/{v_cache.dtype}"
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            assert t.shape == (Hkv,) and t.dtype == torch.float32 and t.is_contiguous(), \
                f"{name} must be a contiguous fp32 [{Hkv}] tensor (one scale per kv head), got {t.dtype} " \
                f"{list(t.shape)}"
    else:
        assert k_cache.dtype != torch.float8_e4m3fn and v_cache.dtype != torch.float8_e4m3fn, \
            "float8_e4m3fn caches need k_scale and v_scale"
        assert q.dtype == k_new.dtype == v_new.dtype == k_cache.dtype == v_cache.dtype, \
            "q, k/v and caches share a dtype"
    check_layout(q, k_new, v_new, k_cache, v_cache, lengths, rope, B, D)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    group = H // Hkv
    group_p = max(triton.next_power_of_2(group), 16)  # tl.dot needs M >= 16: padded rows are masked
    block_n, num_splits, scale = tiling(q, B * Hkv, S, block_n, num_splits, sm_scale)
    one = num_splits == 1
    part_o = torch.empty(0 if one else B * H * num_splits * D, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(0 if one else B * H * num_splits * 2, dtype=torch.float32, device=q.device)
    _decode_attention_split_kernel[(B * Hkv, num_splits)](
        q, k_new, v_new, k_cache, v_cache, lengths, rope if rope is not None else out,
        k_scale if fp8 else lengths, v_scale if fp8 else lengths, part_o, part_ml, out,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), scale, num_splits,
        S, rope.shape[0] if rope is not None else 1,
        H_KV=Hkv, GROUP=group, GROUP_P=group_p, HEAD_DIM=D, BLOCK_N=block_n, HAS_ROPE=rope is not None, FP8=fp8,
        DOT_F32=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreted()), ONE_SPLIT=one,
        num_warps=4, num_stages=2)
    if one:
        return out
    _decode_attention_merge_kernel[(B * H,)](
        part_o, part_ml, lengths, out, out.stride(0), out.stride(1), num_splits,
        H=H, HEAD_DIM=D, BLOCK_N=block_n, BLOCK_S=max(triton.next_power_of_2(num_splits), 2), num_warps=4)
    return out
