"""Fused classifier-free guidance + sampling: logits [2N, V] (interleaved cond/uncond) → one code per pair.

One pass over V, split across programs (grid [N, V / BLOCK_V]); a second tiny launch merges the per-tile
winners. Sampling is the Gumbel-max trick: argmax_i(g_i / T + G_i) with G_i = −log(−log U_i) is distributed
as softmax(g / T), so no normalising sum is needed and tiles merge by a plain max. U comes from Philox keyed
by (seed; vocab index, pair, step, 0), so a stream is a pure function of the seed and the step: nothing to
advance, no host sync, same seed → same codes. The guided logits g = u + w·(c − u) live only in registers.

temperature == 0 (read on the device) gives argmax, ties to the lowest index as torch.argmax does.
top-k keeps the guided logits ≥ the k-th largest one (ties kept, as in `filter_top_k_top_p`); the threshold
comes from `_topk_threshold_kernel`, an exact 32-step radix select over order-preserving integer keys.

The guided-logit kernels are compiled with enable_fp_fusion=False: with fusion, u + w·(c − u) becomes one
FMA (one rounding instead of torch's two) and ~27% of fp32 guided logits differ from `cfg_mix` by an ulp,
which breaks exact top-k thresholds and argmax parity (found by lowering to PTX; the interpreter never fuses).

The same kernels sample text (`paired=False`: each row is its own distribution, no guidance).
Torch reference: `fastjanus.engine.sampling` (`cfg_mix`, `sample`); the streams differ (Philox vs torch's
generator), the distributions and the greedy result do not.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _guided_tile(logits_ptr, row_stride, n, offs, mask, w, PAIRED: tl.constexpr):
    """fp32 guided logits of pair n (or plain logits of row n) at offs."""
    if PAIRED:
        c = tl.load(logits_ptr + (2 * n) * row_stride + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(logits_ptr + (2 * n + 1) * row_stride + offs, mask=mask, other=0.0).to(tl.float32)
        g = u + w * (c - u)
    else:
        g = tl.load(logits_ptr + n * row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    return g


@triton.jit
def _cfg_sample_tile_kernel(logits_ptr, row_stride, V, w_ptr, temp_ptr, seed_ptr, step_ptr, thr_ptr,
                            part_val_ptr, part_idx_ptr, n_tiles,
                            PAIRED: tl.constexpr, HAS_THR: tl.constexpr, BLOCK_V: tl.constexpr):
    n = tl.program_id(0)
    t = tl.program_id(1)
    offs = t * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    w = tl.load(w_ptr)
    temp = tl.load(temp_ptr)
    g = _guided_tile(logits_ptr, row_stride, n, offs, mask, w, PAIRED)  # [BLOCK_V] fp32

    seed = tl.load(seed_ptr)
    step = tl.load(step_ptr).to(tl.int32)
    zero = offs * 0
    r, _, _, _ = tl.philox(seed, offs, zero + n, zero + step, zero)
    unif = tl.uint_to_uniform_float(r)  # [0, 1): U = 0 gives −inf noise, never picked
    gumbel = -tl.log(-tl.log(unif))
    # temp == 0: plain argmax of g (the safe divisor keeps inf/nan out of the discarded branch)
    val = tl.where(temp > 0, g / tl.where(temp > 0, temp, 1.0) + gumbel, g)
    keep = mask
    if HAS_THR:
        keep = keep & (g >= tl.load(thr_ptr + n))
    val = tl.where(keep, val, float("-inf"))
    best = tl.max(val, axis=0)
    idx = tl.min(tl.where(keep & (val == best), offs, 2147483647), axis=0)
    tl.store(part_val_ptr + n * n_tiles + t, best)
    tl.store(part_idx_ptr + n * n_tiles + t, idx)


@triton.jit
def _cfg_sample_merge_kernel(part_val_ptr, part_idx_ptr, n_tiles, V, out_ptr, rows_out_ptr, hist_ptr, hist_stride,
                             hist_len, step_ptr, HAS_ROWS: tl.constexpr, HAS_HIST: tl.constexpr,
                             BLOCK_T: tl.constexpr):
    n = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    mask = t < n_tiles
    val = tl.load(part_val_ptr + n * n_tiles + t, mask=mask, other=float("-inf"))
    idx = tl.load(part_idx_ptr + n * n_tiles + t, mask=mask, other=2147483647)
    best = tl.max(val, axis=0)
    # tiles cover increasing index ranges, so the lowest index among the maxima is the global first one
    tok = tl.min(tl.where(mask & (val == best), idx, 2147483647), axis=0)
    # only an all-NaN/−inf row leaves no winner; keep the code in range rather than write 2^31 − 1
    tok = tl.minimum(tok, V - 1).to(tl.int64)
    tl.store(out_ptr + n, tok)
    if HAS_ROWS:  # the code goes to both rows of the pair for the next step's embedding
        tl.store(rows_out_ptr + 2 * n, tok)
        tl.store(rows_out_ptr + 2 * n + 1, tok)
    if HAS_HIST:
        step = tl.load(step_ptr)
        tl.store(hist_ptr + n * hist_stride + step, tok, mask=step < hist_len)  # never past the buffer


@triton.jit
def _ordered_key(x):
    """fp32 → int64 in [0, 2^32) with the same order as the floats (NaN aside)."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648


@triton.jit
def _topk_threshold_kernel(logits_ptr, row_stride, V, w_ptr, k, thr_ptr,
                           PAIRED: tl.constexpr, BLOCK_V: tl.constexpr):
    n = tl.program_id(0)
    w = tl.load(w_ptr)
    one = n.to(tl.int64) * 0 + 1
    prefix = one * 0
    # Largest key X with count(key >= X) >= k, found bit by bit from the top: exactly the k-th largest key.
    for i in range(32):  # (a positive-step loop: scf.for does not take negative steps)
        cand = prefix | (one << (31 - i))
        count = 0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            key = _ordered_key(_guided_tile(logits_ptr, row_stride, n, offs, mask, w, PAIRED))
            count += tl.sum(((key >= cand) & mask).to(tl.int32), axis=0)
        prefix = tl.where(count >= k, cand, prefix)
    ks = (prefix - 2147483648).to(tl.int32)
    tl.store(thr_ptr + n, (ks ^ ((ks >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True))


def _scalar(x, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    """A one-element device tensor: passed through when it already is one (graph replay), else created."""
    if isinstance(x, torch.Tensor):
        assert x.numel() == 1 and x.dtype == dtype and x.device == device, \
            f"{name}: expected a 1-element {dtype} tensor on {device}, got {x.dtype} {list(x.shape)} on {x.device}"
        return x
    # a host number costs a blocking host→device copy: fine eagerly, impossible inside a graph capture
    assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), \
        f"{name}: pass a device tensor while capturing a CUDA graph (a Python number would be baked in)"
    return torch.tensor([x], dtype=dtype, device=device)


def topk_threshold(logits: torch.Tensor, *, k: int, cfg_weight=1.0, paired: bool = True,
                   out: torch.Tensor | None = None, block_v: int = 2048) -> torch.Tensor:
    """Per pair (or row), the k-th largest guided logit, fp32 [N]. Reference: torch.topk(...).values[:, -1]."""
    R, V = logits.shape
    N = R // 2 if paired else R
    assert logits.stride(1) == 1, "logits: the vocabulary dimension must be contiguous"
    assert not paired or R % 2 == 0, f"paired logits need an even number of rows, got {R}"
    assert 1 <= k <= V, f"k must be in [1, {V}], got {k}"
    if out is None:
        out = torch.empty(N, dtype=torch.float32, device=logits.device)
    assert out.shape == (N,) and out.dtype == torch.float32
    w = _scalar(cfg_weight, torch.float32, logits.device, "cfg_weight")
    block = min(block_v, triton.next_power_of_2(V))
    _topk_threshold_kernel[(N,)](logits, logits.stride(0), V, w, k, out, PAIRED=paired, BLOCK_V=block,
                                 num_warps=8, enable_fp_fusion=False)
    return out


def cfg_sample(logits: torch.Tensor, *, cfg_weight=1.0, temperature=1.0, seed=0, step=0, top_k: int | None = None,
               paired: bool = True, out: torch.Tensor | None = None, rows_out: torch.Tensor | None = None,
               history: torch.Tensor | None = None, block_v: int = 1024) -> torch.Tensor:
    """Sample one token per pair (paired=True, rows 2n / 2n+1 = cond / uncond) or per row → out [N] int64.

    cfg_weight, temperature (fp32), seed, step (int64) may be Python numbers (each costs a blocking host→device
    copy) or 1-element device tensors (no sync; required under graph capture, and replays read new values).
    Optional caller-owned outputs: rows_out [2N] (each code written to both rows of its pair) and history
    [N, L] (written at column `step`; a step ≥ L writes nothing).
    """
    R, V = logits.shape
    dev = logits.device
    assert logits.dtype in (torch.float32, torch.float16, torch.bfloat16), f"logits dtype {logits.dtype}"
    assert logits.stride(1) == 1, "logits: the vocabulary dimension must be contiguous"
    assert not paired or R % 2 == 0, f"paired logits need an even number of rows, got {R}"
    N = R // 2 if paired else R
    if out is None:
        out = torch.empty(N, dtype=torch.int64, device=dev)
    assert out.shape == (N,) and out.dtype == torch.int64 and out.is_contiguous()
    if rows_out is not None:
        assert paired and rows_out.shape == (2 * N,) and rows_out.dtype == torch.int64 and rows_out.is_contiguous()
    if history is not None:
        assert history.dim() == 2 and history.shape[0] == N and history.dtype == torch.int64 \
            and history.stride(1) == 1, f"history must be int64 [{N}, L], got {history.dtype} {list(history.shape)}"
    w = _scalar(cfg_weight, torch.float32, dev, "cfg_weight")
    temp = _scalar(temperature, torch.float32, dev, "temperature")
    seed_t = _scalar(seed, torch.int64, dev, "seed")
    step_t = _scalar(step, torch.int64, dev, "step")
    thr = None
    if top_k is not None and top_k < V:
        thr = topk_threshold(logits, k=top_k, cfg_weight=w, paired=paired)
    block = min(block_v, triton.next_power_of_2(V))
    n_tiles = triton.cdiv(V, block)
    part_val = torch.empty(N, n_tiles, dtype=torch.float32, device=dev)
    part_idx = torch.empty(N, n_tiles, dtype=torch.int32, device=dev)
    _cfg_sample_tile_kernel[(N, n_tiles)](
        logits, logits.stride(0), V, w, temp, seed_t, step_t, thr if thr is not None else part_val,
        part_val, part_idx, n_tiles, PAIRED=paired, HAS_THR=thr is not None, BLOCK_V=block, num_warps=4,
        enable_fp_fusion=False)
    _cfg_sample_merge_kernel[(N,)](
        part_val, part_idx, n_tiles, V, out, rows_out if rows_out is not None else out,
        history if history is not None else out, history.stride(0) if history is not None else 0,
        history.shape[1] if history is not None else 0, step_t,
        HAS_ROWS=rows_out is not None, HAS_HIST=history is not None,
        BLOCK_T=max(triton.next_power_of_2(n_tiles), 2), num_warps=1)
    return out
