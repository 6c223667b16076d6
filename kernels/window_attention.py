"""Window attention: W new queries per row against the static KV cache, for speculative (Jacobi) decoding, which
verifies a window of W draft tokens in one pass. The multi-query sibling of `decode_attention` (read that first):
the same cache layout, rotary table and split/merge flash-decoding design.

Shapes: q [W, B, H, D]; k_new, v_new [W, B, Hkv, D] (window-major, as the pass's rows j·B + b come out of one fused
QKV projection: any W, B and head strides, the head dim contiguous); k_cache, v_cache [B, Hkv, S, D] holding
lengths[b] tokens in row b. Window token j of row b sits at slot (and rotary position) lengths[b] + j: its key
and value are written there (only where < S: slots past the cache are dropped), and it attends over slots
0..lengths[b] + j, the cached prefix and the window causally. lengths is not advanced: the caller advances each
row by the tokens it accepts, and the next pass overwrites the rejected slots.

Rotary (rope = [P, 2, D/2] fp32 table): q and k_new are rotated in fp32 at their own positions (clamped to P − 1),
the rotated key rounded once to the cache dtype when stored, as `reference.rope_ref` does.

Two launches, because the window's keys are read by programs other than the one that writes them (every split
and every query of the window reads them; decode_attention's single new slot is read by one program only):
1. `_window_append_kernel`, grid [B·Hkv]: rotates and stores the W new keys and values of one kv head. Stream
   order makes them visible to the next launch; inside one launch there would be a race.
2. `_window_attention_kernel`, grid [B·Hkv, splits]: program (b, kv head, s) serves the W·GROUP query rows sharing
   that kv head (row i = j·GROUP + g, padded to a power of two ≥ 16: the M dimension of the tensor-core dots), so
   K and V are read once per pass. It reads slots [0, end), end = min(lengths[b] + W, S), the splits sized from
   end on the device (⌈end / splits⌉ in whole blocks: the programs past a short row's end do nothing) with a
   per-row causal mask slot ≤ lengths[b] + j. Online softmax in fp32 (exp2, the scale folded into q). A row sees
   no slot of a split that starts after its own slot (token 0 against the window's later slots): its running max
   stays −inf, and the exponentials are taken against 0 instead, so that exp2(−inf − (−inf)) never makes a NaN.
   (In a split it sees, its first block holds the split's first slot, so the max is finite from then on.)
   With one split the program writes the output; otherwise it stores (acc, max, sum) partials and
3. `_window_merge_kernel`, grid [W·B·H], merges the splits that hold a slot the row sees (the first always does:
   slot 0), so every merged max is finite.

The grids depend only on W, B, H, Hkv and the split count, never on the lengths, so a pass replays in a CUDA
Graph. Model-dtype caches only (fp32, fp16, bf16; one dtype for every tensor): no FP8 cache.
Torch reference: `reference.window_attention_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted
from .decode_attention import _live_split_len, check_layout, tiling


@triton.jit
def _rotate_rows(x, x_ptrs_partner, pmask, rope_ptr, pos, d, HALF: tl.constexpr):
    """x [R, D] fp32, row r rotated by the rotary angle of position pos[r] (rotate-half layout): decode_attention's
    `_rotate` with one position per row. pos must lie inside the table (the callers clamp it)."""
    i = d % HALF
    cos_ptrs = rope_ptr + pos[:, None] * (2 * HALF) + i[None, :]  # [R, D]
    c = tl.load(cos_ptrs)
    s = tl.load(cos_ptrs + HALF)
    partner = tl.load(x_ptrs_partner, mask=pmask, other=0.0).to(tl.float32)
    sign = tl.where(d < HALF, -1.0, 1.0)
    return x * c + (sign[None, :] * s) * partner


@triton.jit
def _window_append_kernel(k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, len_ptr, rope_ptr,
                          stride_nw, stride_nb, stride_nh, stride_cb, stride_ch, stride_cs, capacity, rope_rows,
                          H_KV: tl.constexpr, W: tl.constexpr, W_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                          HAS_ROPE: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H_KV
    hk = pid % H_KV
    j = tl.arange(0, W_P)
    slot = tl.load(len_ptr + b) + j  # [WP] token j's slot and rotary position
    smask = ((j < W) & (slot < capacity))[:, None]  # slots past the cache are dropped
    d = tl.arange(0, HEAD_DIM)
    src = j[:, None] * stride_nw + b * stride_nb + hk * stride_nh  # [WP, 1]
    k = tl.load(k_new_ptr + src + d[None, :], mask=smask, other=0.0)  # [WP, D]
    v = tl.load(v_new_ptr + src + d[None, :], mask=smask, other=0.0)
    if HAS_ROPE:
        k = _rotate_rows(k.to(tl.float32), k_new_ptr + src + ((d + HEAD_DIM // 2) % HEAD_DIM)[None, :], smask,
                         rope_ptr, tl.minimum(slot, rope_rows - 1), d, HALF=HEAD_DIM // 2)
    dst = b.to(tl.int64) * stride_cb + hk * stride_ch + slot[:, None] * stride_cs + d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=smask)  # the one rounding of the rotation
    tl.store(v_cache_ptr + dst, v, mask=smask)


@triton.jit
def _window_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, len_ptr, rope_ptr, part_o_ptr, part_ml_ptr, out_ptr,
        stride_qw, stride_qb, stride_qh, stride_cb, stride_ch, stride_cs, qk_scale, num_splits, capacity, rope_rows,
        B, H_KV: tl.constexpr, GROUP: tl.constexpr, W: tl.constexpr, M_P: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_ROPE: tl.constexpr, DOT_F32: tl.constexpr, ONE_SPLIT: tl.constexpr):
    DOT_TY: tl.constexpr = q_ptr.dtype.element_ty  # the dot operands' dtype (the caches' too)
    pid = tl.program_id(0)
    s = tl.program_id(1)
    b = pid // H_KV
    hk = pid % H_KV
    L = tl.load(len_ptr + b)  # tokens cached before the window
    end = tl.minimum(L + W, capacity)  # slots read: the prefix and the window's slots inside the cache
    split_len = _live_split_len(end - 1, num_splits, BLOCK_N)  # ⌈end / splits⌉ in whole blocks
    lo = s * split_len
    hi = tl.minimum(lo + split_len, end)  # lo ≥ end (a split past the row's end): empty loop, nothing stored
    i = tl.arange(0, M_P)
    j = i // GROUP  # [MP] window token of each query row
    heads = hk * GROUP + i % GROUP  # its query head
    rmask = i < W * GROUP  # rows past W·GROUP are padding
    last = L + j  # the last slot each row sees (its own)
    d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + j[:, None] * stride_qw + b * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)  # [MP, D]
    if HAS_ROPE:
        q = _rotate_rows(q, q_rows + ((d + HEAD_DIM // 2) % HEAD_DIM)[None, :], rmask[:, None], rope_ptr,
                         tl.minimum(last, rope_rows - 1), d, HALF=HEAD_DIM // 2)
    q = q * qk_scale  # scores come out in log2 units
    q_dot = q.to(DOT_TY)  # the tensor cores' operand (a no-op for fp32)
    if DOT_F32:
        q_dot = q_dot.to(tl.float32)

    m = tl.full([M_P], float("-inf"), tl.float32)
    l = tl.zeros([M_P], tl.float32)
    acc = tl.zeros([M_P, HEAD_DIM], tl.float32)
    kv_base = b.to(tl.int64) * stride_cb + hk * stride_ch  # int64: rows·heads·slots·D can pass 2^31
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        off = kv_base + n[:, None] * stride_cs + d[None, :]
        k = tl.load(k_cache_ptr + off, mask=nmask[:, None], other=0.0)  # [BN, D]
        v = tl.load(v_cache_ptr + off, mask=nmask[:, None], other=0.0)
        if DOT_F32:
            sc = tl.dot(q_dot, tl.trans(k.to(tl.float32)), input_precision="ieee")  # [MP, BN]
        else:
            sc = tl.dot(q_dot, tl.trans(k))
        sc = tl.where(nmask[None, :] & (n[None, :] <= last[:, None]), sc, float("-inf"))  # causal in the window
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        # −inf in a split that starts after the row's own slot (the merge skips it): subtract 0 then, so that
        # p = alpha = exp2(−inf) = 0 and the partials are (−inf, 0, 0), not exp2(−inf − (−inf)) = NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(sc - m_ref[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p.to(DOT_TY).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(DOT_TY), v)  # [MP, D], fp32 accumulation
        acc = acc * alpha[:, None] + pv
        m = m_new

    row = (j * B + b) * (H_KV * GROUP) + heads  # [MP] the row of out viewed as [W·B·H, D]
    if ONE_SPLIT:  # the whole row in this program (l > 0: every token sees slot 0): the output, no merge launch
        o = acc / l[:, None]
        tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None])
    else:  # partials: o [W·B·H, splits, D], (m, l) [W·B·H, splits, 2]; a row that saw nothing stores (−inf, 0, 0)
        live = rmask & (i * 0 + lo < end)  # (a vector compare: the interpreter rejects a scalar bool here)
        prow = row * num_splits + s
        tl.store(part_o_ptr + prow[:, None] * HEAD_DIM + d[None, :], acc, mask=live[:, None])
        tl.store(part_ml_ptr + prow * 2, m, mask=live)
        tl.store(part_ml_ptr + prow * 2 + 1, l, mask=live)


@triton.jit
def _window_merge_kernel(part_o_ptr, part_ml_ptr, len_ptr, out_ptr, num_splits, capacity, B,
                         H: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)  # (j·B + b)·H + h
    j = pid // (B * H)
    b = (pid // H) % B
    L = tl.load(len_ptr + b)
    split_len = _live_split_len(tl.minimum(L + W, capacity) - 1, num_splits, BLOCK_N)  # as the attention kernel
    # the splits holding a slot this token sees, 0..its last: each has a finite max (the others are skipped)
    n_live = tl.minimum(L + j, capacity - 1) // split_len + 1
    s = tl.arange(0, BLOCK_S)
    smask = s < n_live
    d = tl.arange(0, HEAD_DIM)
    prow = pid * num_splits + s
    m = tl.load(part_ml_ptr + prow * 2, mask=smask, other=float("-inf"))
    l = tl.load(part_ml_ptr + prow * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)  # finite: split 0 holds slot 0
    wgt = tl.where(smask, tl.exp2(m - m_max), 0.0)  # [S]
    o = tl.load(part_o_ptr + prow[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(wgt[:, None] * o, axis=0) / tl.sum(wgt * l, axis=0)
    tl.store(out_ptr + pid * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def window_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, lengths: torch.Tensor, *, rope: torch.Tensor | None = None,
                     sm_scale: float | None = None, out: torch.Tensor | None = None, num_splits: int | None = None,
                     block_n: int | None = None) -> torch.Tensor:
    """q [W, B, H, D]; k_new, v_new [W, B, Hkv, D]; k_cache, v_cache [B, Hkv, S, D]; lengths [B] int32 → out
    [W, B, H, D].

    Window token j of row b is at slot and rotary position lengths[b] + j. rope: [P, 2, D/2] fp32 cos/sin table
    (`reference.rope_table`); q and k_new are then rotated at those positions (clamped to P − 1) inside the
    kernels. None: they are used as given.
    Writes (the rotated) k_new and v_new into the caches at slots lengths[b] + j < S (the others are dropped);
    token j attends over slots 0..lengths[b] + j. Does not advance `lengths`.
    q, k_new, v_new: any W, B and head strides, the head dim contiguous (views of one fused QKV output);
    out: a caller-owned contiguous [W, B, H, D] tensor, or None to allocate one. Every tensor shares one dtype:
    fp32, fp16 or bf16 (no FP8 cache, unlike decode_attention).
    """
    W, B, H, D = q.shape
    Bc, Hkv, S, Dc = k_cache.shape
    assert not any(str(t.dtype).startswith("torch.float8") for t in (k_cache, v_cache)), \
        f"window_attention takes model-dtype caches only (fp32, fp16, bf16), got {k_cache.dtype}/{v_cache.dtype}: " \
        f"FP8 KV caches are not supported here"
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"q must be fp32, fp16 or bf16, got {q.dtype}"
    assert q.dtype == k_new.dtype == v_new.dtype == k_cache.dtype == v_cache.dtype, \
        f"q, k/v and caches share a dtype, got {q.dtype}/{k_new.dtype}/{v_new.dtype}/{k_cache.dtype}/{v_cache.dtype}"
    assert (Bc, Dc) == (B, D) and v_cache.shape == k_cache.shape, \
        f"cache {list(k_cache.shape)} / {list(v_cache.shape)} does not match q {list(q.shape)}"
    assert k_new.shape == (W, B, Hkv, D) and v_new.shape == (W, B, Hkv, D), \
        f"k_new/v_new must be [{W}, {B}, {Hkv}, {D}], got {list(k_new.shape)} / {list(v_new.shape)}"
    assert H % Hkv == 0, f"{H} query heads are not a multiple of {Hkv} kv heads"
    assert D in (16, 32, 64, 128, 256), f"head dim {D} is not supported (power of two 16..256)"
    check_layout(q, k_new, v_new, k_cache, v_cache, lengths, rope, B, D)
    if out is None:
        out = torch.empty(W, B, H, D, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), \
        f"out must be a contiguous {q.dtype} {list(q.shape)} tensor"
    group = H // Hkv
    m_p = max(triton.next_power_of_2(W * group), 16)  # tl.dot needs M >= 16: padded rows are masked
    block_n, num_splits, scale = tiling(q, B * Hkv, S, block_n, num_splits, sm_scale)  # decode_attention's
    has_rope = rope is not None
    rope_arg, rope_rows = (rope, rope.shape[0]) if has_rope else (out, 1)  # out: any pointer, never read

    _window_append_kernel[(B * Hkv,)](
        k_new, v_new, k_cache, v_cache, lengths, rope_arg, k_new.stride(0), k_new.stride(1), k_new.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), S, rope_rows,
        H_KV=Hkv, W=W, W_P=triton.next_power_of_2(W), HEAD_DIM=D, HAS_ROPE=has_rope, num_warps=4)

    one = num_splits == 1
    part_o = torch.empty(0 if one else W * B * H * num_splits * D, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(0 if one else W * B * H * num_splits * 2, dtype=torch.float32, device=q.device)
    _window_attention_kernel[(B * Hkv, num_splits)](
        q, k_cache, v_cache, lengths, rope_arg, part_o, part_ml, out, q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), scale, num_splits, S, rope_rows, B,
        H_KV=Hkv, GROUP=group, W=W, M_P=m_p, HEAD_DIM=D, BLOCK_N=block_n, HAS_ROPE=has_rope,
        DOT_F32=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreted()), ONE_SPLIT=one,
        num_warps=4 if m_p <= 64 else 8, num_stages=2)
    if one:
        return out
    _window_merge_kernel[(W * B * H,)](
        part_o, part_ml, lengths, out, num_splits, S, B,
        H=H, W=W, HEAD_DIM=D, BLOCK_N=block_n, BLOCK_S=max(triton.next_power_of_2(num_splits), 2), num_warps=4)
    return out
