"""Skinny GEMM for the decode step: y = x @ w.T with few rows (x [M, K], M ≤ 64; w [N, K], nn.Linear layout),
split over K with a deterministic reduce, and an optional SiLU·mul epilogue.

What it is for: in a decode step every GEMM has M = 2..32 rows (one or two per image) against a weight of
millions of elements, so it is a weight read with a little arithmetic on the side. cuBLAS answers such shapes
with split-K plus a reduce kernel; this is the Triton counterpart, plus one thing cuBLAS cannot do: with
`epilogue="silu_mul"` and w the fused [gate; up] weight [2I, K], the output is silu(y[:, :I]) · y[:, I:]
[M, I], so the gate/up GEMM and the `activation.silu_mul` launch become one launch (with one split) and the
[M, 2I] intermediate is never written.

NOT USED BY THE MODEL by default. The issue asks for it to become the default for a shape only where a GPU
microbenchmark at the published shapes (`python -m fastjanus.bench.kernels`, entries `skinny_gemm` and
`skinny_gemm+silu_mul`, M = 2, 8, 32) shows it ahead of cuBLAS, chosen per shape from a committed table
measured on a GPU. THIS KERNEL HAS NOT RUN ON A GPU YET: it is tested in Triton's interpreter on the CPU and
compiled for sm_90 without a GPU (tests/sm90_compile.py); its block sizes are starting points, not tuned.

Kernel 1, grid (⌈N_out / BLOCK_N⌉, SPLIT_K): program (j, s) computes output columns j·BN..j·BN+BN−1 over its
share of K (K blocks [s·nb/SPLIT_K, (s+1)·nb/SPLIT_K) of nb = ⌈K / BLOCK_K⌉: never empty, since the launcher
keeps SPLIT_K ≤ nb), walking it in BLOCK_K chunks with tl.dot and fp32 accumulation. The dot is taken as
w_tile [BN, BK] @ x_tileᵀ [BK, BM] ("swap AB"): the weight rows fill the wide side of the MMA and the few
activation rows, padded to BLOCK_M = max(16, next_pow2(M)) and masked, sit on the narrow side. With silu_mul
the program loads weight rows j.. (gate) and I+j.. (up) and keeps two accumulators.
With SPLIT_K = 1 it applies the epilogue and writes out (rounded once to the dtype): one launch.
With SPLIT_K > 1 it writes fp32 partials [SPLIT_K, M, N] (every program writes its whole tile, so no memset),
and kernel 2 `_skinny_gemm_reduce_kernel`, grid (M, ⌈N_out / BLOCK⌉), sums them in split order (fixed: the
result is bit-identical run to run, no atomics) and applies the epilogue: two launches, as cuBLAS split-K.

Weight-only 8-bit ("W8A16", `w_scale=`): w int8 or float8_e4m3fn [N, K], quantized symmetrically per output row,
with fp32 scales w_scale [N]; x stays fp32/fp16/bf16. The weight tile is loaded as 8-bit (half the bytes of bf16:
a decode-step GEMM is a weight read) and widened in registers to x's dtype (both 8-bit formats are exact in it);
the dot accumulates in fp32 and each row's scale multiplies the fp32 sum once after the K loop (it factors out of
the sum; with SPLIT_K > 1 each partial is scaled before it is stored). No dequantized copy of w is ever made.
Default BLOCK_K 256 for 8-bit weights (256 contiguous bytes per row, as bf16 at 128). Equally untested on a GPU.
`fastjanus.quant.quantize_weight` makes such a weight.

The grid depends only on the shapes and the split count, never on the data, so a launch replays in a CUDA
Graph (no host syncs). Torch reference: `reference.skinny_gemm_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted
from .rmsnorm import disjoint

MAX_M = 64  # rows live in one padded tile (BLOCK_M ≤ 64) next to the weight tiles in shared memory
EPILOGUES = (None, "silu_mul")
W8_DTYPES = (torch.int8, torch.float8_e4m3fn)  # 8-bit weights, with a per-row fp32 scale (w_scale)


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, M, N, N_OUT, K, stride_xm, stride_om, n_kblocks,
                        split_k, SILU_MUL: tl.constexpr, ONE_SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
                        W_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    nl = tl.arange(0, BLOCK_N)
    n = pid_n * BLOCK_N + nl  # [BN] output columns (gate rows of w with silu_mul)
    nmask = n < N_OUT
    m = tl.arange(0, BLOCK_M)
    mmask = m < M  # rows ≥ M are padding for the dot: loaded as 0, never stored
    kk = tl.arange(0, BLOCK_K)
    lo = (s * n_kblocks // split_k) * BLOCK_K  # this split's K blocks, in whole blocks
    hi = tl.minimum(((s + 1) * n_kblocks // split_k) * BLOCK_K, K)
    # int64 base: N·K passes 2^31 for a large weight (tile offsets from it stay small)
    w_base = w_ptr + (pid_n * BLOCK_N).to(tl.int64) * K
    wu_base = w_ptr + (pid_n * BLOCK_N + N_OUT).to(tl.int64) * K  # silu_mul: the up rows I + n
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # yᵀ tile: [columns, rows]
    if SILU_MUL:
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        k = k0 + kk
        kmask = k < K
        xt = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :],
                     other=0.0)  # [BM, BK]
        w_off = nl[:, None] * K + k[None, :]
        wmask = nmask[:, None] & kmask[None, :]
        # [BN, BK]: BK contiguous elements per weight row, loaded in w's dtype (8-bit with W_SCALE: half the
        # bytes of bf16), then widened in registers to the dot operand dtype: x's, or fp32 with DOT_F32.
        # int8 (|q| ≤ 127) and e4m3 (3 mantissa bits, |q| ≤ 448) are exact in fp16, bf16 and fp32.
        wt = tl.load(w_base + w_off, mask=wmask, other=0.0)
        if DOT_F32:  # fp32 inputs (exact fp32 products), or bf16 in the interpreter (see kernels.interpreted)
            xd = tl.trans(xt.to(tl.float32))
            acc = tl.dot(wt.to(tl.float32), xd, acc, input_precision="ieee")
        else:
            xd = tl.trans(xt)
            acc = tl.dot(wt.to(xt.dtype), xd, acc)  # fp16/bf16 operands, fp32 accumulation
        if SILU_MUL:
            wu = tl.load(wu_base + w_off, mask=wmask, other=0.0)
            if DOT_F32:
                acc_u = tl.dot(wu.to(tl.float32), xd, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(wu.to(xt.dtype), xd, acc_u)

    if W_SCALE:  # per weight row: it factors out of the K sum, so once on the fp32 sums (each split's partial)
        acc = acc * tl.load(s_ptr + n, mask=nmask, other=0.0)[:, None]
        if SILU_MUL:
            acc_u = acc_u * tl.load(s_ptr + N_OUT + n, mask=nmask, other=0.0)[:, None]

    if ONE_SPLIT:  # the whole K range here: epilogue, round once, store
        y = acc
        if SILU_MUL:
            # silu as torch writes it; a large negative gate gives −0 (exp overflows to inf), not NaN
            y = acc / (1.0 + tl.exp(-acc)) * acc_u
        tl.store(out_ptr + m[None, :] * stride_om + n[:, None], y.to(out_ptr.dtype.element_ty),
                 mask=nmask[:, None] & mmask[None, :])
    else:  # fp32 partial [s, M, N] (N = 2·N_OUT with silu_mul: gate columns, then up columns)
        part = part_ptr + s.to(tl.int64) * M * N + m[None, :] * N + n[:, None]
        pmask = nmask[:, None] & mmask[None, :]
        tl.store(part, acc, mask=pmask)
        if SILU_MUL:
            tl.store(part + N_OUT, acc_u, mask=pmask)


@triton.jit
def _skinny_gemm_reduce_kernel(part_ptr, out_ptr, M, N, N_OUT, stride_om, split_k,
                               SILU_MUL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < N_OUT
    acc = tl.zeros([BLOCK], tl.float32)
    acc_u = tl.zeros([BLOCK], tl.float32)
    for s in range(0, split_k):  # split order, fixed: deterministic
        base = part_ptr + (s * M + row).to(tl.int64) * N
        acc += tl.load(base + c, mask=mask, other=0.0)
        if SILU_MUL:
            acc_u += tl.load(base + N_OUT + c, mask=mask, other=0.0)
    y = acc
    if SILU_MUL:
        y = acc / (1.0 + tl.exp(-acc)) * acc_u
    tl.store(out_ptr + row * stride_om + c, y.to(out_ptr.dtype.element_ty), mask=mask)


def default_split_k(n_tiles: int, K: int, block_k: int, device: torch.device) -> int:
    """Splits so that n_tiles · split_k ≈ 2 × the SM count (two programs per SM keep weight loads in flight
    while the other waits), each split at least 4 × BLOCK_K of K (shorter splits spend more on the partials
    and the prologue/epilogue than they gain).

    On the CPU (the interpreter, where every program costs Python time) one split: the fewest programs and
    launches. The kernel tests pass split_k explicitly to test the reduce."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, n_tiles), K // (4 * block_k)))


def skinny_gemm_config(M: int, N_out: int, K: int, dtype: torch.dtype, device: torch.device, *,
                       split_k: int | None = None, block_n: int | None = None, block_k: int | None = None,
                       w_dtype: torch.dtype | None = None) -> tuple[int, int, int, int]:
    """(block_n, block_k, split_k, num_stages) that `skinny_gemm` launches with for these arguments (the
    microbenchmark records them). dtype is x's; w_dtype the weight's (None: the same; int8 / float8_e4m3fn for
    the 8-bit path). An explicit split_k is clamped to 1..⌈K / block_k⌉ (no empty split)."""
    w8 = w_dtype in W8_DTYPES
    if block_n is None:
        # 64 weight rows per program: the "M" side of one warpgroup's MMA (4 warps) with the swapped dot, and
        # enough column tiles (Pro-1B QKV: 96, o_proj: 32) that a few splits fill an H100's 132 SMs.
        block_n = 64
    if block_k is None:
        # 128 elements of K per chunk: 256 contiguous bytes of each bf16/fp16 weight row per load (two whole
        # 128-byte lines), a 16 KiB weight tile per pipeline stage; long enough chunks that the loop overhead
        # is small next to the loads. A starting point, not tuned on a GPU.
        block_k = 128
        if w8 and dtype != torch.float32:
            # 8-bit weight: 256 elements are again 256 contiguous bytes per row per load (128 would halve each
            # row's transfer to one line), the same 16 KiB weight tile per stage as bf16 at 128. Shared memory at
            # bf16/fp16 x (sm_90 compile, KiB, M ≤ 16 / 32 / 64): 32 / 48 / 80, with silu_mul 48 / 64 / 96, under
            # the 99 KiB bound at 64 rows. fp32 x (an FMA dot) keeps 128: 256 would ask 160 KiB at 64 rows with
            # silu_mul (128: 80). A starting point too: no GPU has run it. To look at on one: the sm_90 PTX
            # stages the 8-bit tile with 8-byte cp.async (bf16: 16-byte) and reads it back 2 bytes at a time.
            block_k = 256
    for name, b in (("block_n", block_n), ("block_k", block_k)):
        assert b >= 16 and b & (b - 1) == 0, f"{name} must be a power of two >= 16 (tl.dot), got {b}"
    n_kblocks = triton.cdiv(K, block_k)
    if split_k is None:
        split_k = default_split_k(triton.cdiv(N_out, block_n), K, block_k, device)
    assert split_k >= 1, f"split_k must be >= 1, got {split_k}"
    split_k = min(split_k, n_kblocks)
    # Two pipeline stages (one load in flight while the other tile is multiplied), a modest depth so shared
    # memory stays under the 99 KiB per-block limit of sm_86/sm_89 (H100: 227 KiB). Per stage: the weight
    # tile(s) BN·BK (two with silu_mul) and the x tile BM·BK. The sm_90 compile at the defaults asks for, in KiB
    # (bf16/fp16, M ≤ 16 / 32 / 64): 40 / 48 / 64, with silu_mul 72 / 80 / 96 = 2 × (2·16 + 4 / 8 / 16);
    # fp32 (an FMA dot, tiles staged once) the same bytes. tests/test_kernel_compile.py checks the bound.
    num_stages = 2
    return block_n, block_k, split_k, num_stages


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, *, epilogue: str | None = None, split_k: int | None = None,
                out: torch.Tensor | None = None, block_n: int | None = None, block_k: int | None = None,
                w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (1 ≤ M ≤ 64, contiguous last dim, any row stride); w [N, K] contiguous (nn.Linear weight) → out.

    epilogue None: out [M, N] = x @ w.T, accumulated in fp32 and rounded once to the dtype.
    epilogue "silu_mul": w is the fused [gate; up] weight [2I, K]; out [M, I] = silu(y[:, :I]) · y[:, I:] of
    the fp32 y, rounded once. x, w and out share a dtype (fp32/fp16/bf16); out has a contiguous last dim (any
    row stride) and must not overlap x or w. split_k None: `default_split_k` (1 on the CPU); > 1 launches the
    reduce kernel over fp32 partials allocated here.

    w_scale (weight-only 8-bit, "W8A16"): w is int8 or float8_e4m3fn [N, K] contiguous, quantized symmetrically
    per output row, and w_scale fp32 [N] contiguous its per-row scales (with silu_mul [2I]: gate rows, then up
    rows). y = (x @ w.float().T) · w_scale[None, :] in fp32, then the epilogue, rounded once to x's dtype. The
    weight is read as 8-bit and widened in registers; no dequantized copy is ever made. None: w has x's dtype.
    """
    assert epilogue in EPILOGUES, f"epilogue must be one of {EPILOGUES}, got {epilogue!r}"
    assert x.dim() == 2, f"x must be [M, K], got {list(x.shape)}"
    assert w.dim() == 2, f"w must be [N, K], got {list(w.shape)}"
    M, K = x.shape
    N = w.shape[0]
    assert 1 <= M <= MAX_M, f"x has {M} rows; the skinny GEMM takes 1..{MAX_M}"
    assert K >= 1 and N >= 1, f"empty GEMM: x {list(x.shape)}, w {list(w.shape)}"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x dtype {x.dtype} is not fp32/fp16/bf16"
    if w_scale is None:
        assert w.dtype not in W8_DTYPES, f"w is {w.dtype}: an 8-bit weight needs its per-row scales (w_scale)"
        assert w.dtype == x.dtype, f"w dtype {w.dtype} differs from x dtype {x.dtype}"
    else:
        assert w.dtype in W8_DTYPES, f"with w_scale, w must be int8 or float8_e4m3fn (8-bit), got {w.dtype}"
        assert w_scale.dtype == torch.float32, f"w_scale must be float32, got {w_scale.dtype}"
        assert w_scale.shape == (N,), f"w_scale must be [{N}] (one scale per row of w), got {list(w_scale.shape)}"
        assert w_scale.is_contiguous(), "w_scale must be contiguous"
        assert w_scale.device == x.device, f"x on {x.device}, w_scale on {w_scale.device}"
    assert w.shape[1] == K, f"w must be [N, {K}] (nn.Linear layout), got {list(w.shape)}"
    assert w.device == x.device, f"x on {x.device}, w on {w.device}"
    assert x.stride(1) == 1, "x: the last dim must be contiguous"
    assert w.is_contiguous(), "w must be contiguous [N, K]"
    if epilogue == "silu_mul":
        assert N % 2 == 0, f"silu_mul: w must be the fused [gate; up] weight [2I, K], got {N} rows"
    n_out = N // 2 if epilogue == "silu_mul" else N
    if out is None:
        out = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    assert out.shape == (M, n_out) and out.dtype == x.dtype, \
        f"out must be [{M}, {n_out}] {x.dtype}, got {list(out.shape)} {out.dtype}"
    assert out.stride(1) == 1, "out: the last dim must be contiguous"
    assert disjoint(out, x) and disjoint(out, w), "out must not overlap x or w"
    assert w_scale is None or disjoint(out, w_scale), "out must not overlap w_scale"
    block_n, block_k, split_k, num_stages = skinny_gemm_config(M, n_out, K, x.dtype, x.device, split_k=split_k,
                                                               block_n=block_n, block_k=block_k, w_dtype=w.dtype)
    silu = epilogue == "silu_mul"
    one = split_k == 1
    part = out if one else torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
    _skinny_gemm_kernel[(triton.cdiv(n_out, block_n), split_k)](
        x, w, w if w_scale is None else w_scale, out, part, M, N, n_out, K, x.stride(0), out.stride(0),
        triton.cdiv(K, block_k), split_k, SILU_MUL=silu, ONE_SPLIT=one, W_SCALE=w_scale is not None,
        # bf16 in the interpreter: fp32 dot operands (kernels.interpreted); there the 8-bit weight goes straight
        # to fp32 too (the interpreter's int8 → bf16 conversion is also wrong: it reinterprets the bits)
        DOT_F32=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreted()),
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=num_stages)
    if one:
        return out
    block = min(1024, triton.next_power_of_2(n_out))
    _skinny_gemm_reduce_kernel[(M, triton.cdiv(n_out, block))](
        part, out, M, N, n_out, out.stride(0), split_k, SILU_MUL=silu, BLOCK=block, num_warps=4)
    return out
