"""Fused verify step of speculative Jacobi decoding: `fastjanus.engine.speculative.verify_ref` on device buffers.

After a window pass (logits [W·2N, V], window-major paired rows: row j·2N + 2n / + 1 = conditional /
unconditional row of image n at window position j, i.e. pair j·N + n) this accepts or rejects each image's
drafts, writes the accepted codes and moves the state on, in place, with no host sync and a grid fixed by
(N, W, V): the static runtime captures it in a CUDA Graph and replays it every pass. Read verify_ref for the
algorithm; here only the split of the work:

1. `_spec_rows_kernel`, grid [W·N, V / BLOCK_V]: one tile of one pair. z = g / T with g = u + w·(c − u) in
   fp32 (greedy: z = g), top-k masked by z ≥ thr / T (division by T > 0 is monotonic, so this is the k-th
   largest z exactly, as `filter_top_k_top_p(g / T)` keeps). Partials per tile: max and Σ exp(z − max) (the
   log-sum-exp), and the Gumbel-max winner of z + G (greedy: of z), ties to the lowest index.
2. `_spec_accept_kernel`, grid [N]: one image, vectorised over its window ([W_P] vectors, W_P = W padded to a
   power of two). It merges the partials into lse[j] and fresh[j] (a sample of p_j; greedy: its argmax), then
   p_j(draft) from the draft's two logits, q_j(draft) = 1 for a random draft (q_row < 0) or
   exp(zq − prev_lse) from the previous pass's row q_row (its own threshold prev_thr), and accepts while
   u·q < p (greedy: draft = argmax). At the first rejection a0 (sampling only) one loop over V draws the
   replacement from norm(max(0, p − q)) by Gumbel-max; no residual (p = q to rounding) falls back to fresh[a0].
   Then codes, done, lengths, passes, the next drafts / q_row / tokens and lse are written. Window shifts
   (slot t takes fresh[a + t]) are [W_P, W_P] selections in registers. Every load of the image's state comes
   before its stores in the same program, and no other program touches that image, so updating in place is
   safe.
The launcher then copies logits → prev_logits, lse → prev_lse, thr → prev_thr (the next pass's q) and adds 1 to
pass_count, all on the device.

Randomness: noise=None draws from Philox keyed by (seed; index, image n, pass_count, 1 + 4·j + purpose):
purpose 0 the Gumbel noise of row (n, j)'s fresh sample (index = vocab index), 1 its accept uniform (index 0),
2 the residual Gumbel noise of image n (j = 0, index = vocab index), 3 the random draft of next slot t (j = t,
index 0; the raw 32-bit draw modulo V). The last counter is ≥ 1, so the streams never meet cfg_sample's (0).
A `SpecNoise` instead (tests) is read from its tensors, the same numbers verify_ref uses, so the two can be
compared exactly: integer outputs equal, lse to rounding (the kernel's exp(z − lse) differs from torch's
log_softmax by ulps, so a decision sitting within rounding of its threshold could differ; never seen).

Both kernels compute guided logits, so they are compiled with enable_fp_fusion=False (see cfg_sample: an FMA
would round u + w·(c − u) once instead of twice and break exact parity with the torch reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cfg_sample import _guided_tile, _scalar, topk_threshold

_BIG = tl.constexpr(2147483647)  # "no index": larger than any vocabulary index (a constexpr: jit code may read it)


@triton.jit
def _philox_u32(seed, index, n, pass_, key):
    """Raw 32-bit Philox draws keyed by (seed; index, image n, pass, key); index and key of one shape."""
    zero = index * 0
    r, _, _, _ = tl.philox(seed, index, zero + n, zero + pass_, key)
    return r


@triton.jit
def _gumbel(r):
    """Standard Gumbel noise from raw draws: U in [0, 1), U = 0 gives −inf (never picked)."""
    return -tl.log(-tl.log(tl.uint_to_uniform_float(r)))


@triton.jit
def _spec_rows_kernel(logits_ptr, row_stride, V, N, W, w_ptr, temp_ptr, seed_ptr, pass_ptr, thr_ptr, noise_ptr,
                      part_max_ptr, part_sum_ptr, part_val_ptr, part_idx_ptr, n_tiles,
                      HAS_THR: tl.constexpr, NOISE: tl.constexpr, BLOCK_V: tl.constexpr):
    r = tl.program_id(0)  # pair j·N + n
    t = tl.program_id(1)
    j = r // N
    n = r % N
    offs = t * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    w = tl.load(w_ptr)
    temp = tl.load(temp_ptr)
    # z = g / T correctly rounded, as torch on the CPU (Triton's `/` is div.full.f32, off by up to 2 ulp);
    # greedy divides by 1: z = g exactly
    tdiv = tl.where(temp > 0, temp, 1.0)
    z = tl.math.div_rn(_guided_tile(logits_ptr, row_stride, r, offs, mask, w, True), tdiv)  # [BLOCK_V] fp32
    keep = mask
    if HAS_THR:
        keep = keep & (z >= tl.math.div_rn(tl.load(thr_ptr + r), tdiv))
    # log-sum-exp partials; a tile with nothing kept has max −inf and sum 0 (exp taken against 0: no NaN)
    m = tl.max(tl.where(keep, z, float("-inf")), axis=0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    s = tl.sum(tl.where(keep, tl.exp(z - m_safe), 0.0), axis=0)
    if NOISE:
        gum = tl.load(noise_ptr + (n * W + j).to(tl.int64) * V + offs, mask=mask, other=0.0)  # fresh [N, W, V]
    else:
        gum = _gumbel(_philox_u32(tl.load(seed_ptr), offs, n, tl.load(pass_ptr).to(tl.int32), offs * 0 + 1 + 4 * j))
    val = tl.where(keep, tl.where(temp > 0, z + gum, z), float("-inf"))
    best = tl.max(val, axis=0)
    idx = tl.min(tl.where(keep & (val == best), offs, _BIG), axis=0)
    tl.store(part_max_ptr + r * n_tiles + t, m)
    tl.store(part_sum_ptr + r * n_tiles + t, s)
    tl.store(part_val_ptr + r * n_tiles + t, best)
    tl.store(part_idx_ptr + r * n_tiles + t, idx)


@triton.jit
def _spec_accept_kernel(logits_ptr, prev_ptr, row_stride, prev_stride, V, N, W, n_tok,
                        w_ptr, temp_ptr, seed_ptr, pass_ptr, thr_ptr, prev_thr_ptr,
                        part_max_ptr, part_sum_ptr, part_val_ptr, part_idx_ptr, n_tiles,
                        codes_ptr, done_ptr, drafts_ptr, q_row_ptr, tokens_ptr, lengths_ptr, passes_ptr,
                        lse_ptr, prev_lse_ptr, acc_noise_ptr, res_noise_ptr, init_noise_ptr,
                        HAS_THR: tl.constexpr, NOISE: tl.constexpr, W_P: tl.constexpr, T_P: tl.constexpr,
                        BLOCK_V: tl.constexpr):
    n = tl.program_id(0)
    j = tl.arange(0, W_P)  # window position
    jm = j < W
    r = j * N + n  # [W_P] pair of (j, n)
    w = tl.load(w_ptr)
    temp = tl.load(temp_ptr)
    tdiv = tl.where(temp > 0, temp, 1.0)
    seed = tl.load(seed_ptr)
    pass_ = tl.load(pass_ptr).to(tl.int32)

    # merge the row partials: lse [W_P] and fresh [W_P] (tiles cover increasing indices: ties → lowest index)
    tt = tl.arange(0, T_P)
    pm = jm[:, None] & (tt[None, :] < n_tiles)  # [W_P, T_P]
    po = r[:, None] * n_tiles + tt[None, :]
    m = tl.load(part_max_ptr + po, mask=pm, other=float("-inf"))
    s = tl.load(part_sum_ptr + po, mask=pm, other=0.0)
    mx = tl.max(m, axis=1)
    mx = tl.where(mx > float("-inf"), mx, 0.0)  # padded lanes: keep exp(−inf − mx) = 0, not NaN
    lse = mx + tl.log(tl.where(jm, tl.sum(s * tl.exp(m - mx[:, None]), axis=1), 1.0))  # [W_P] (sum ≥ 1 in a row)
    val = tl.load(part_val_ptr + po, mask=pm, other=float("-inf"))
    idx = tl.load(part_idx_ptr + po, mask=pm, other=_BIG)
    best = tl.max(val, axis=1)
    fresh = tl.min(tl.where(pm & (val == best[:, None]), idx, _BIG), axis=1)
    fresh = tl.minimum(fresh, V - 1).to(tl.int64)  # [W_P] a sample of every p_j: the next drafts

    # the image's state (all loads before any store)
    done = tl.load(done_ptr + n)
    passes = tl.load(passes_ptr + n)
    tok0 = tl.load(tokens_ptr + 2 * n)  # row 0·2N + 2n: the last accepted code
    len_c = tl.load(lengths_ptr + 2 * n)
    len_u = tl.load(lengths_ptr + 2 * n + 1)
    d = tl.load(drafts_ptr + n * W + j, mask=jm, other=0)  # [W_P]
    qr = tl.load(q_row_ptr + n * W + j, mask=jm, other=-1)
    dc = tl.minimum(tl.maximum(d, 0), V - 1)  # callers keep drafts in range; never read outside the row

    # p_j(draft) from the draft's column of pair (j, n)
    zd = tl.math.div_rn(_guided_tile(logits_ptr, row_stride, r, dc, jm, w, True), tdiv)
    p_in = jm
    if HAS_THR:
        p_in = p_in & (zd >= tl.math.div_rn(tl.load(thr_ptr + r, mask=jm, other=0.0), tdiv))
    p_d = tl.where(p_in, tl.exp(zd - lse), 0.0)
    # q_j(draft): 1 for a random draft, else the previous pass's p at row q_row (only read there)
    has_q = jm & (qr >= 0)
    rq = qr * N + n
    zq = tl.math.div_rn(_guided_tile(prev_ptr, prev_stride, rq, dc, has_q, w, True), tdiv)
    q_in = has_q
    if HAS_THR:
        q_in = q_in & (zq >= tl.math.div_rn(tl.load(prev_thr_ptr + rq, mask=has_q, other=0.0), tdiv))
    q_lse = tl.load(prev_lse_ptr + n * W + qr, mask=has_q, other=0.0)
    q_d = tl.where(qr < 0, 1.0, tl.where(q_in, tl.exp(zq - q_lse), 0.0))
    if NOISE:
        u = tl.load(acc_noise_ptr + n * W + j, mask=jm, other=0.0)
    else:
        u = tl.uint_to_uniform_float(_philox_u32(seed, j * 0, n, pass_, 2 + 4 * j))
    accept = tl.where(temp > 0, u * q_d < p_d, d == fresh)  # u < p/q without the division
    a0 = tl.min(tl.where(jm & ~accept, j, W), axis=0)  # the first rejection, W if none
    a = tl.where(a0 < W, a0 + 1, W)
    a = tl.minimum(a, n_tok - done)  # never past the image (0 once it is done)

    # the replacement at a0: greedy takes the argmax; sampling draws from norm(max(0, p − q)).
    # (x[a0] of a register vector is a masked sum; reloading the draft and q row is cheaper in the interpreter)
    repl = tl.sum(tl.where(j == a0, fresh, 0), axis=0)
    if (a0 < W) & (temp > 0):
        d0 = tl.minimum(tl.maximum(tl.load(drafts_ptr + n * W + a0), 0), V - 1)
        q0 = tl.load(q_row_ptr + n * W + a0)
        lse0 = tl.sum(tl.where(j == a0, lse, 0), axis=0)
        r0 = a0 * N + n
        rq0 = q0 * N + n
        q_lse0 = tl.load(prev_lse_ptr + n * W + q0, mask=q0 >= 0, other=0.0)
        thr0 = 0.0
        q_thr0 = 0.0
        if HAS_THR:
            thr0 = tl.math.div_rn(tl.load(thr_ptr + r0), tdiv)
            q_thr0 = tl.math.div_rn(tl.load(prev_thr_ptr + rq0, mask=q0 >= 0, other=0.0), tdiv)
        top = tl.full([], float("-inf"), tl.float32)
        top_idx = tl.full([], _BIG, tl.int32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.math.div_rn(_guided_tile(logits_ptr, row_stride, r0, offs, mask, w, True), tdiv)
            keep = mask
            if HAS_THR:
                keep = keep & (z >= thr0)
            p = tl.where(keep, tl.exp(z - lse0), 0.0)
            qmask = mask & (offs * 0 + q0 >= 0)  # a vector compare: Triton 3.9's interpreter makes
            # bool vector & bool scalar an int32 mask, which tl.load rejects
            zq_v = tl.math.div_rn(_guided_tile(prev_ptr, prev_stride, rq0, offs, qmask, w, True), tdiv)
            if HAS_THR:
                qmask = qmask & (zq_v >= q_thr0)
            q = tl.where(q0 < 0, tl.where(offs == d0, 1.0, 0.0), tl.where(qmask, tl.exp(zq_v - q_lse0), 0.0))
            res = tl.maximum(p - q, 0.0)
            if NOISE:
                gum = tl.load(res_noise_ptr + n.to(tl.int64) * V + offs, mask=mask, other=0.0)
            else:
                gum = _gumbel(_philox_u32(seed, offs, n, pass_, offs * 0 + 3))
            score = tl.where(res > 0, tl.log(tl.where(res > 0, res, 1.0)) + gum, float("-inf"))  # log 0: never
            t_top = tl.max(score, axis=0)
            t_idx = tl.min(tl.where((res > 0) & (score == t_top), offs, _BIG), axis=0)
            take = t_top > top  # strictly: an earlier tile keeps a tie (the lower index)
            top_idx = tl.where(take, t_idx, top_idx)
            top = tl.maximum(top, t_top)
        repl = tl.where(top_idx < _BIG, top_idx.to(tl.int64), repl)  # no residual: the fresh sample

    # accepted codes: drafts before a0, the replacement at a0
    new = tl.where(j < a0, d, repl)  # [W_P]
    keep = jm & (j < a)
    tl.store(codes_ptr + n * n_tok + done + j, new, mask=keep)
    last = tl.where(a > 0, tl.sum(tl.where(j == a - 1, new, 0), axis=0), tok0)
    # next window: slot t holds position done + a + t, this window's row a + t while that is inside
    src = a + j
    inside = src < W
    if NOISE:
        init = tl.load(init_noise_ptr + n * W + j, mask=jm, other=0)
    else:
        # the raw draw as an unsigned 32-bit value (the mask keeps it so whatever extension the cast uses), mod V
        init = (_philox_u32(seed, j * 0, n, pass_, 4 + 4 * j).to(tl.int64) & 0xFFFFFFFF) % V
    shifted = tl.sum(tl.where(j[None, :] == src[:, None], fresh[None, :], 0), axis=1)  # fresh[a + t]: [W_P, W_P]
    nd = tl.where(inside, shifted, init)  # [W_P] the next drafts
    tl.store(drafts_ptr + n * W + j, nd, mask=jm)
    tl.store(q_row_ptr + n * W + j, tl.where(inside, src, -1), mask=jm)
    # next tokens: row 0 the last accepted code, row t ≥ 1 the next draft t − 1 (both rows of the pair)
    tok = tl.where(j == 0, last, tl.sum(tl.where(j[None, :] == j[:, None] - 1, nd[None, :], 0), axis=1))
    tl.store(tokens_ptr + j * 2 * N + 2 * n, tok, mask=jm)
    tl.store(tokens_ptr + j * 2 * N + 2 * n + 1, tok, mask=jm)
    tl.store(done_ptr + n, done + a)
    tl.store(passes_ptr + n, passes + (done < n_tok).to(tl.int64))
    tl.store(lengths_ptr + 2 * n, len_c + a.to(tl.int32))
    tl.store(lengths_ptr + 2 * n + 1, len_u + a.to(tl.int32))
    tl.store(lse_ptr + n * W + j, lse, mask=jm)


def _check(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    assert isinstance(t, torch.Tensor), f"{name}: expected a tensor, got {type(t).__name__}"
    assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, \
        f"{name}: expected {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}"
    assert t.device == device, f"{name}: expected it on {device}, got {t.device}"
    assert t.is_contiguous(), f"{name}: must be contiguous"


def spec_verify(logits: torch.Tensor, *, prev_logits: torch.Tensor, cfg_weight, temperature, seed, pass_count,
                top_k: int | None, codes: torch.Tensor, done: torch.Tensor, drafts: torch.Tensor,
                q_row: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, passes: torch.Tensor,
                lse: torch.Tensor, prev_lse: torch.Tensor, thr: torch.Tensor | None, prev_thr: torch.Tensor | None,
                noise=None, block_v: int = 1024) -> None:
    """One verify step in place (see the module docstring and verify_ref, whose state fields these are).

    logits, prev_logits [W·2N, V] (fp32/fp16/bf16, one dtype; prev_logits read only where q_row ≥ 0);
    cfg_weight, temperature (fp32), seed, pass_count (int64): 1-element device tensors (numbers work eagerly;
    a number pass_count is not advanced); temperature 0 is greedy. top_k: None or a Python int (top_p is not
    fused). State: codes [N, n_tok], done [N], drafts [N, W], q_row [N, W], tokens [W·2N], passes [N] int64;
    lengths [2N] int32; lse, prev_lse [N, W] fp32; thr, prev_thr [W·N] fp32 (None allowed without top_k).
    noise: None (Philox) or a SpecNoise (accept [N, W], fresh [N, W, V], residual [N, V] fp32, init [N, W] int64).
    """
    R, V = logits.shape
    dev = logits.device
    N, W = done.shape[0], drafts.shape[-1]
    n_tok = codes.shape[-1]
    assert logits.dtype in (torch.float32, torch.float16, torch.bfloat16), f"logits dtype {logits.dtype}"
    assert logits.stride(1) == 1, "logits: the vocabulary dimension must be contiguous"
    assert R == W * 2 * N, f"logits: expected W·2N = {W}·{2 * N} rows (window-major pairs), got {R}"
    assert isinstance(prev_logits, torch.Tensor) and prev_logits.shape == logits.shape \
        and prev_logits.dtype == logits.dtype and prev_logits.device == dev and prev_logits.stride(1) == 1, \
        f"prev_logits: expected {logits.dtype} {list(logits.shape)} on {dev} with a contiguous vocabulary dimension"
    i64 = torch.int64
    _check("codes", codes, (N, n_tok), i64, dev)
    _check("done", done, (N,), i64, dev)
    _check("drafts", drafts, (N, W), i64, dev)
    _check("q_row", q_row, (N, W), i64, dev)
    _check("tokens", tokens, (W * 2 * N,), i64, dev)
    _check("lengths", lengths, (2 * N,), torch.int32, dev)
    _check("passes", passes, (N,), i64, dev)
    _check("lse", lse, (N, W), torch.float32, dev)
    _check("prev_lse", prev_lse, (N, W), torch.float32, dev)
    assert top_k is None or (isinstance(top_k, int) and top_k >= 1), f"top_k must be None or an int ≥ 1, got {top_k}"
    has_thr = top_k is not None and top_k < V  # k ≥ V keeps everything, as filter_top_k_top_p
    if has_thr:
        _check("thr", thr, (W * N,), torch.float32, dev)
        _check("prev_thr", prev_thr, (W * N,), torch.float32, dev)
    if noise is not None:
        _check("noise.accept", noise.accept, (N, W), torch.float32, dev)
        _check("noise.fresh", noise.fresh, (N, W, V), torch.float32, dev)
        _check("noise.residual", noise.residual, (N, V), torch.float32, dev)
        _check("noise.init", noise.init, (N, W), i64, dev)
    w = _scalar(cfg_weight, torch.float32, dev, "cfg_weight")
    temp = _scalar(temperature, torch.float32, dev, "temperature")
    seed_t = _scalar(seed, i64, dev, "seed")
    pass_t = _scalar(pass_count, i64, dev, "pass_count")

    if has_thr:
        topk_threshold(logits, k=top_k, cfg_weight=w, paired=True, out=thr)
    block = min(block_v, triton.next_power_of_2(V))
    n_tiles = triton.cdiv(V, block)
    part_max = torch.empty(W * N, n_tiles, dtype=torch.float32, device=dev)
    part_sum = torch.empty_like(part_max)
    part_val = torch.empty_like(part_max)
    part_idx = torch.empty(W * N, n_tiles, dtype=torch.int32, device=dev)
    thr_arg = thr if has_thr else lse  # never read without top-k
    nz = noise is not None
    _spec_rows_kernel[(W * N, n_tiles)](
        logits, logits.stride(0), V, N, W, w, temp, seed_t, pass_t, thr_arg, noise.fresh if nz else lse,
        part_max, part_sum, part_val, part_idx, n_tiles,
        HAS_THR=has_thr, NOISE=nz, BLOCK_V=block, num_warps=4, enable_fp_fusion=False)
    _spec_accept_kernel[(N,)](
        logits, prev_logits, logits.stride(0), prev_logits.stride(0), V, N, W, n_tok,
        w, temp, seed_t, pass_t, thr_arg, prev_thr if has_thr else lse,
        part_max, part_sum, part_val, part_idx, n_tiles,
        codes, done, drafts, q_row, tokens, lengths, passes, lse, prev_lse,
        noise.accept if nz else lse, noise.residual if nz else lse, noise.init if nz else done,
        HAS_THR=has_thr, NOISE=nz, W_P=max(triton.next_power_of_2(W), 2),
        T_P=max(triton.next_power_of_2(n_tiles), 2), BLOCK_V=block, num_warps=4, enable_fp_fusion=False)
    # the next pass's q: this pass's logits, normalisers and thresholds (device copies, graph-capturable)
    prev_logits.copy_(logits)
    prev_lse.copy_(lse)
    if has_thr:
        prev_thr.copy_(thr)
    pass_t.add_(1)
