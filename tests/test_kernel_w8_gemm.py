"""Weight-only 8-bit skinny GEMM (`skinny_gemm(..., w_scale=)`: int8 / float8_e4m3fn weight, per-row fp32 scales,
fp32/fp16/bf16 activations) vs the dequantize-then-matmul reference: odd sizes, splits, both epilogues, default
blocks, row strides, the launcher's checks, broken variants that must fail, and Pro-1B shapes on a GPU."""
import itertools
import os

import pytest
import torch

pytest.importorskip("triton")
from fastjanus.kernels.reference import skinny_gemm_ref  # noqa: E402
from fastjanus.kernels.skinny_gemm import skinny_gemm, skinny_gemm_config  # noqa: E402
from fastjanus.quant import quantize_weight  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
XDTYPES = [torch.float32, torch.float16, torch.bfloat16]
WDTYPES = [torch.int8, torch.float8_e4m3fn]
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
# Measured on the interpreter over this file's cases (SKINNY_GEMM_MEASURE=1 pytest -s), max |Δ| / (1 + |ref|),
# plain / silu_mul, both weight dtypes: fp32 4.0e-7 / 3.8e-6 (fp32 sums in another order, and the kernel scales
# the sum where the reference scales each weight: a few fp32 ulps; silu_mul multiplies two such sums, |y| up to
# ~100 with the 4× inputs); fp16 2.6e-4 / 7.6e-6 (one output ulp, ≤ 2⁻¹⁰ ≈ 9.8e-4, where the fp32 sum straddles
# a rounding boundary; an earlier choice of cases saw 5.9e-4 with silu_mul); bf16 6.4e-3 / 7.5e-3 (the
# interpreter truncates fp32 → bf16 where torch rounds to nearest even: up to one ulp, 2⁻⁷ ≈ 7.8e-3). Tolerances
# those of the 16-bit GEMM's tests: ~5× what was seen for fp32, two output ulps for fp16 and bf16.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
MEASURE = os.environ.get("SKINNY_GEMM_MEASURE")  # set: print the error of every case (pytest -s)


def quantize(w: torch.Tensor, wdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row quantization of an fp32 weight [N, K] → (8-bit w, fp32 scales [N]).
    int8: s = amax / 127, round(w / s) clamped to ±127; e4m3: s = amax / 448, (w / s) cast (round to nearest)."""
    amax = w.abs().amax(dim=1)
    s = torch.where(amax > 0, amax / QMAX[wdtype], 1.0)  # an all-zero row: scale 1
    q = w / s[:, None]
    if wdtype == torch.int8:
        return q.round().clamp(-127, 127).to(torch.int8).contiguous(), s.float().contiguous()
    return q.clamp(-448, 448).to(torch.float8_e4m3fn).contiguous(), s.float().contiguous()


def _inputs(seed, M, N, K, xdtype, wdtype, x_scale=1.0):
    """x [M, K] ~ N(0, x_scale²), w [N, K] ~ N(0, 1/K) quantized per row: y ~ N(0, x_scale²), as in a layer."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * x_scale).to(DEV, xdtype)
    q, s = quantize(torch.randn(N, K, generator=g) / K ** 0.5, wdtype)
    return x, q.to(DEV), s.to(DEV)


def _check(x, q, s, out, epilogue, **kw):
    x0, q0, s0 = x.clone(), q.clone(), s.clone()
    got = skinny_gemm(x, q, epilogue=epilogue, out=out, w_scale=s, **kw)
    assert got is out
    ref = skinny_gemm_ref(x, q, epilogue=epilogue, w_scale=s)
    if MEASURE:
        err = ((out.float() - ref.float()).abs() / (1 + ref.float().abs())).max().item()
        print(f"\nERR {x.dtype} {q.dtype} {epilogue} {list(x.shape)} {list(q.shape)} {kw}: {err:.3g}")
    torch.testing.assert_close(out, ref, rtol=TOL[x.dtype][0], atol=TOL[x.dtype][1])
    # bit comparison: torch.equal on fp8 is not implemented for every device/version, so compare the bytes
    assert torch.equal(x, x0) and torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0), \
        "inputs must not be modified"


# A covering subset, not the cartesian product (480 cases): every (x dtype, weight dtype, epilogue) with one
# and three splits (24 cases); M walks 1, 2, 7, 33, 64 and (N, K) the four pairs of N 17 / 130 (silu_mul:
# 2I = 18 / 130) and K 33 / 300 along them, so that each M and each (N, K) meets every x dtype, weight dtype,
# epilogue and split count somewhere (checked below). block_k 32: K = 33 / 300 is 2 / 10 chunks (3 splits of
# 2 chunks clamp to 2), the last one partly masked; block_n 16 with silu_mul puts the up rows (I + j) of a tile
# at an offset that is not a multiple of the tile.
MS, NKS = [1, 2, 7, 33, 64], [(17, 33), (130, 300), (130, 33), (17, 300)]
CASES = [(xd, wd, epi, split, MS[i % 5], *NKS[(i + i // 8) % 4])
         for i, (xd, wd, epi, split) in enumerate(itertools.product(XDTYPES, WDTYPES, [None, "silu_mul"], [1, 3]))]


@pytest.mark.parametrize("xdtype,wdtype,epilogue,split_k,M,N,K", CASES,
                         ids=[f"{str(c[0])[6:]}-{str(c[1])[6:]}-{c[2]}-s{c[3]}-M{c[4]}-N{c[5]}-K{c[6]}"
                              for c in CASES])
def test_matches_reference(xdtype, wdtype, epilogue, split_k, M, N, K):
    silu = epilogue == "silu_mul"
    N = N + (N % 2) if silu else N  # 2I: I = 9 / 65
    # silu_mul: x scaled 4× so the gate reaches ±12 or so, both tails of silu
    x, q, s = _inputs(M * 100000 + N * 1000 + K * 10 + split_k + 7 * silu, M, N, K, xdtype, wdtype,
                      x_scale=4.0 if silu else 1.0)
    out = torch.full((M, N // 2 if silu else N), float("nan"), dtype=xdtype, device=DEV)
    _check(x, q, s, out, epilogue, split_k=split_k, block_k=32, **({"block_n": 16} if silu else {}))


def test_cases_cover_every_size_and_combination():
    seen = {(c[0], c[1], c[2], c[3]) for c in CASES}
    assert len(seen) == 24  # every dtype pair × epilogue × split
    for i in range(4):  # x dtype, weight dtype, epilogue, split: all of them at each M and each (N, K)
        full = {c[i] for c in CASES}
        assert all({c[i] for c in CASES if c[4] == m} == full for m in MS), i
        assert all({c[i] for c in CASES if (c[5], c[6]) == nk} == full for nk in NKS), i


@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("epilogue", [None, "silu_mul"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_default_blocks_and_row_strides(split_k, epilogue, wdtype):
    # the launcher's own blocks (block_k 256 for 8-bit weights: K = 600 is 3 chunks, the last partly masked);
    # x and out are column slices of wider tensors; the columns around out must come through untouched
    M, N, K, xdtype = 5, 130, 600, torch.bfloat16
    n_out = N // 2 if epilogue else N
    assert skinny_gemm_config(M, n_out, K, xdtype, torch.device(DEV), split_k=split_k, w_dtype=wdtype)[1] == 256
    x_wide, q, s = _inputs(split_k * 10 + (epilogue is None), M, N, K + 24, xdtype, wdtype, x_scale=3.0)
    x, q = x_wide[:, 16:16 + K], q[:, :K].contiguous()
    out_wide = torch.full((M, n_out + 8), float("nan"), dtype=xdtype, device=DEV)
    out = out_wide[:, 3:3 + n_out]
    assert not x.is_contiguous() and x.stride(0) == K + 24
    _check(x, q, s, out, epilogue, split_k=split_k)
    assert out_wide[:, :3].isnan().all() and out_wide[:, 3 + n_out:].isnan().all()


def test_config_block_k():
    cpu = torch.device("cpu")
    cfg = lambda dtype, w_dtype: skinny_gemm_config(2, 6144, 2048, dtype, cpu, w_dtype=w_dtype)  # noqa: E731
    assert cfg(torch.bfloat16, torch.int8) == (64, 256, 1, 2)  # 256 bytes of each 8-bit weight row per load
    assert cfg(torch.float16, torch.float8_e4m3fn) == (64, 256, 1, 2)
    assert cfg(torch.float32, torch.int8) == (64, 128, 1, 2)  # fp32 x: 256 would exceed 99 KiB at 64 rows
    assert cfg(torch.bfloat16, None) == cfg(torch.bfloat16, torch.bfloat16) == (64, 128, 1, 2)  # unchanged


@pytest.mark.parametrize("wdtype", WDTYPES)
def test_library_quantizer_matches_this_files(wdtype):
    # the library's quantizer (the microbenchmark's) is this file's, bit for bit; a zero row quantizes to zeros
    # with scale 1 (no 0/0), and dequantizing comes back within half a step of the row's scale grid
    w = torch.randn(33, 70, generator=torch.Generator().manual_seed(4)) / 70 ** 0.5
    w[3] = 0
    q, s = quantize_weight(w.to(DEV), "int8" if wdtype == torch.int8 else "fp8")
    q_ref, s_ref = quantize(w, wdtype)
    assert q.dtype == wdtype and s.dtype == torch.float32 and q.shape == (33, 70) and s.shape == (33,)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    assert (q[3].float() == 0).all() and s[3] == 1
    err = (q.float().cpu() * s_ref[:, None] - w).abs() / w.abs().amax(1, keepdim=True).clamp_min(1e-12)
    assert err.max() <= (0.5 / 127 if wdtype == torch.int8 else 2 ** -4) + 1e-6  # int8 step / e4m3 half-ulp


def test_reference_is_dequantize_then_matmul():
    x, q, s = _inputs(1, 3, 20, 64, torch.float32, torch.int8)
    torch.testing.assert_close(skinny_gemm_ref(x, q, w_scale=s), x @ (q.float() * s[:, None]).T)
    out = torch.empty(3, 10, device=DEV)
    assert skinny_gemm_ref(x, q, epilogue="silu_mul", w_scale=s, out=out) is out


@pytest.mark.parametrize("wdtype", WDTYPES)
def test_broken_variants_fail(wdtype):
    """The comparison catches a kernel that ignores the scales, or applies the gate rows' scales to the up rows:
    run the real kernel with such scales and check the result is far outside the tolerance."""
    M, N, K = 3, 40, 96
    x, q, s = _inputs(2, M, N, K, torch.bfloat16, wdtype, x_scale=4.0)
    ref = skinny_gemm_ref(x, q, w_scale=s)
    with pytest.raises(AssertionError):  # scale ignored (all ones)
        torch.testing.assert_close(skinny_gemm(x, q, w_scale=torch.ones_like(s), block_k=32), ref,
                                   rtol=TOL[x.dtype][0], atol=TOL[x.dtype][1])
    # silu_mul with the gate scales used for the up rows too (the N_OUT offset of the up scales dropped); the
    # gate and up halves must differ in scale for this to show, so rescale the up half of the scales
    s2 = s.clone()
    s2[N // 2:] *= 3.0
    ref = skinny_gemm_ref(x, q, epilogue="silu_mul", w_scale=s2)
    got = skinny_gemm(x, q, epilogue="silu_mul", w_scale=s2, block_k=32, block_n=16)
    torch.testing.assert_close(got, ref, rtol=TOL[x.dtype][0], atol=TOL[x.dtype][1])
    bad = torch.cat([s2[:N // 2], s2[:N // 2]])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(skinny_gemm(x, q, epilogue="silu_mul", w_scale=bad, block_k=32, block_n=16),
                                   ref, rtol=TOL[x.dtype][0], atol=TOL[x.dtype][1])


def test_launcher_checks():
    x, q, s = _inputs(1, 3, 20, 64, torch.bfloat16, torch.int8)
    with pytest.raises(AssertionError, match="needs its per-row scales"):
        skinny_gemm(x, q)
    with pytest.raises(AssertionError, match="needs its per-row scales"):
        skinny_gemm(x, q.float().to(torch.float8_e4m3fn))
    with pytest.raises(AssertionError, match="with w_scale, w must be int8 or float8_e4m3fn"):
        skinny_gemm(x, q.to(torch.bfloat16), w_scale=s)  # a float weight with scales: refused, not guessed
    with pytest.raises(AssertionError, match="with w_scale, w must be int8 or float8_e4m3fn"):
        skinny_gemm(x, q.to(torch.uint8), w_scale=s)
    with pytest.raises(AssertionError, match="w_scale must be float32"):
        skinny_gemm(x, q, w_scale=s.to(torch.bfloat16))
    with pytest.raises(AssertionError, match=r"w_scale must be \[20\]"):
        skinny_gemm(x, q, w_scale=s[:10])
    with pytest.raises(AssertionError, match=r"w_scale must be \[20\]"):
        skinny_gemm(x, q, w_scale=s[None])
    with pytest.raises(AssertionError, match="w_scale must be contiguous"):
        skinny_gemm(x, q, w_scale=torch.ones(40, device=DEV)[::2])
    with pytest.raises(AssertionError, match=r"w must be \[N, 64\]"):
        skinny_gemm(x, q[:, :32].contiguous(), w_scale=s)
    with pytest.raises(AssertionError, match="w must be contiguous"):
        skinny_gemm(x, torch.zeros(64, 20, dtype=torch.int8, device=DEV).t(), w_scale=s)
    with pytest.raises(AssertionError, match="silu_mul: w must be the fused"):
        skinny_gemm(x, q[:19].contiguous(), w_scale=s[:19].contiguous(), epilogue="silu_mul")
    with pytest.raises(AssertionError, match="out must be"):
        skinny_gemm(x, q, w_scale=s, out=torch.empty(3, 20, device=DEV))  # fp32 out for bf16 x
    buf = torch.ones(60, device=DEV)
    with pytest.raises(AssertionError, match="must not overlap w_scale"):
        skinny_gemm(x.float(), q, w_scale=buf[40:], out=buf.view(3, 20))


# Pro-1B's decode GEMMs (hidden 2048, intermediate 5632, 16 × 128 heads), compiled, tensor-core dots, default
# blocks and split: on a GPU only
PRO_1B = [("qkv", 3 * 2048, 2048, None), ("o_proj", 2048, 2048, None), ("gate_up", 2 * 5632, 2048, "silu_mul"),
          ("down", 2048, 5632, None)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("rows", [2, 32])
@pytest.mark.parametrize("gemm,N,K,epilogue", PRO_1B, ids=[g[0] for g in PRO_1B])
def test_pro_1b_shapes_gpu(gemm, N, K, epilogue, rows, wdtype, xdtype):
    x, q, s = _inputs(rows + N + K, rows, N, K, xdtype, wdtype, x_scale=4.0 if epilogue else 1.0)
    out = torch.full((rows, N // 2 if epilogue else N), float("nan"), dtype=xdtype, device=DEV)
    _check(x, q, s, out, epilogue)
    for split in (1, 3):
        _check(x, q, s, out, epilogue, split_k=split)
