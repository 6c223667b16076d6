"""Skinny split-K GEMM (+ SiLU·mul epilogue) vs its torch reference: odd sizes, dtypes, splits, row strides,
determinism of the reduce, the default split rule and the launcher's checks."""
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
from fastjanus.kernels import skinny_gemm as sg  # noqa: E402
from fastjanus.kernels.reference import skinny_gemm_ref  # noqa: E402
from fastjanus.kernels.skinny_gemm import skinny_gemm, skinny_gemm_config  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Measured on the interpreter over this file's cases, max |Δ| / (1 + |ref|), plain / silu_mul:
# fp32 1.7e-6 / 5.4e-6 (fp32 sums of up to 300 products in another order; silu_mul multiplies two such sums,
# |y| up to ~100 with the 4× inputs); fp16 2.8e-4 / 6.2e-4 (one ulp of the output, ≤ 2⁻¹⁰ ≈ 9.8e-4, where the
# fp32 sums straddle a rounding boundary); bf16 6.9e-3 / 7.6e-3: Triton's interpreter truncates fp32 → bf16
# where torch rounds to nearest even, so up to one ulp (2⁻⁷ ≈ 7.8e-3) toward zero; on the GPU (round to
# nearest) the same one-ulp bound. Tolerances: about 2× what was seen (fp32), two ulps (fp16, bf16).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
MEASURE = os.environ.get("SKINNY_GEMM_MEASURE")  # set: print the error of every case (pytest -s)


def _inputs(seed, M, N, K, dtype, x_scale=1.0):
    """x [M, K] ~ N(0, x_scale²), w [N, K] ~ N(0, 1/K): y = x @ w.T ~ N(0, x_scale²), as in a real layer."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * x_scale).to(DEV, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEV, dtype)
    return x, w


def _check(x, w, out, epilogue, dtype, **kw):
    x0, w0 = x.clone(), w.clone()
    got = skinny_gemm(x, w, epilogue=epilogue, out=out, **kw)
    assert got is out
    ref = skinny_gemm_ref(x, w, epilogue=epilogue)
    if MEASURE:
        err = ((out.float() - ref.float()).abs() / (1 + ref.float().abs())).max().item()
        print(f"\nERR {dtype} {epilogue} {list(x.shape)} {list(w.shape)} {kw}: {err:.3g}")
    torch.testing.assert_close(out, ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    assert torch.equal(x, x0) and torch.equal(w, w0), "inputs must not be modified"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("K", [33, 300])
@pytest.mark.parametrize("N", [17, 130])
@pytest.mark.parametrize("M", [1, 7])
def test_matches_reference(M, N, K, split_k, dtype):
    # block_k 32: K = 33 / 128 / 300 is 2 / 4 / 10 chunks, so every split count is exercised (3 splits of 2
    # chunks clamp to 2) and the last chunk is partly masked; N = 17 / 130 leave a partly masked column tile
    x, w = _inputs(M * 100000 + N * 1000 + K * 10 + split_k, M, N, K, dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    _check(x, w, out, None, dtype, split_k=split_k, block_k=32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("K", [33, 300])
@pytest.mark.parametrize("N", [18, 130])  # 2I: I = 9, 65
@pytest.mark.parametrize("M", [1, 7])
def test_silu_mul_matches_reference(M, N, K, split_k, dtype):
    # x scaled 4×: the gate reaches ±12 or so, both tails of silu; block_n 16 puts the up rows (I + j) of a
    # tile at an offset that is not a multiple of the tile, and I = 9 / 65 leave masked columns
    x, w = _inputs(M * 100000 + N * 1000 + K * 10 + split_k + 7, M, N, K, dtype, x_scale=4.0)
    out = torch.full((M, N // 2), float("nan"), dtype=dtype, device=DEV)
    _check(x, w, out, "silu_mul", dtype, split_k=split_k, block_k=32, block_n=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", [None, "silu_mul"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_row_strides_and_defaults(split_k, epilogue, dtype):
    # x and out are column slices of wider tensors (row strides K + 24 and N_out + 8); default block sizes
    # (block_k 128: K = 300 is 3 chunks); the columns around out must come through untouched
    M, N, K = 5, 130, 300
    n_out = N // 2 if epilogue else N
    x_wide, w = _inputs(split_k * 10 + (epilogue is None), M, N, K + 24, dtype, x_scale=3.0)
    x, w = x_wide[:, 16:16 + K], w[:, :K].contiguous()
    out_wide = torch.full((M, n_out + 8), float("nan"), dtype=dtype, device=DEV)
    out = out_wide[:, 3:3 + n_out]
    assert not x.is_contiguous() and x.stride(0) == K + 24
    _check(x, w, out, epilogue, dtype, split_k=split_k)
    assert out_wide[:, :3].isnan().all() and out_wide[:, 3 + n_out:].isnan().all()


def test_default_out_and_reference_out():
    x, w = _inputs(3, 3, 40, 64, torch.float32)
    y = skinny_gemm(x, w)  # out allocated, default split (1 on the CPU)
    assert y.shape == (3, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, skinny_gemm_ref(x, w), rtol=1e-5, atol=1e-5)
    ref_out = torch.empty(3, 20, device=DEV)
    assert skinny_gemm_ref(x, w, epilogue="silu_mul", out=ref_out) is ref_out
    assert torch.equal(ref_out, skinny_gemm_ref(x, w, epilogue="silu_mul"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("epilogue", [None, "silu_mul"])
def test_split_k_is_deterministic(epilogue, dtype):
    # the reduce sums the partials in split order: two runs give the same bits
    x, w = _inputs(5, 7, 130, 300, dtype, x_scale=3.0)
    a = skinny_gemm(x, w, epilogue=epilogue, split_k=3, block_k=32)
    b = skinny_gemm(x, w, epilogue=epilogue, split_k=3, block_k=32)
    assert torch.equal(a, b)


def test_config_defaults_and_split_rule(monkeypatch):
    cpu = torch.device("cpu")
    assert skinny_gemm_config(2, 6144, 2048, torch.bfloat16, cpu) == (64, 128, 1, 2)  # one split on the CPU
    assert skinny_gemm_config(2, 64, 300, torch.float32, cpu, split_k=8)[2] == 3  # clamped to ⌈300 / 128⌉
    assert skinny_gemm_config(2, 64, 300, torch.float32, cpu, split_k=8, block_k=32)[2] == 8
    # the CUDA rule by hand, for an H100 (132 SMs: target 264 programs), at the published decode shapes
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    split = lambda n_out, K: skinny_gemm_config(2, n_out, K, torch.bfloat16, cuda)[2]  # noqa: E731
    assert split(6144, 2048) == 3  # Pro-1B QKV: 96 column tiles, ⌈264 / 96⌉ = 3 (K allows 2048 / 512 = 4)
    assert split(2048, 2048) == 4  # o_proj: 32 tiles want 9, each split keeps ≥ 512 of K: 4
    assert split(5632, 2048) == 3  # gate_up with silu_mul: 88 output tiles
    assert split(11264, 2048) == 2  # gate_up without: 176 tiles
    assert split(2048, 5632) == 9  # down: 32 tiles, K 5632 allows 11
    assert split(22016, 4096) == 1  # Pro-7B gate_up: 344 tiles already fill it
    assert sg.default_split_k(1, 100, 128, cuda) == 1  # K shorter than 4 chunks: never below one split


def test_launcher_checks():
    x, w = _inputs(1, 3, 20, 64, torch.float32)
    with pytest.raises(AssertionError, match="epilogue must be"):
        skinny_gemm(x, w, epilogue="gelu")
    with pytest.raises(AssertionError, match=r"x must be \[M, K\]"):
        skinny_gemm(x[None], w)
    with pytest.raises(AssertionError, match=r"w must be \[N, K\]"):
        skinny_gemm(x, w[None])
    with pytest.raises(AssertionError, match="rows; the skinny GEMM takes"):
        skinny_gemm(torch.randn(65, 64, device=DEV), w)
    with pytest.raises(AssertionError, match="rows; the skinny GEMM takes"):
        skinny_gemm(x[:0], w)
    with pytest.raises(AssertionError, match="not fp32/fp16/bf16"):
        skinny_gemm(x.double(), w.double())
    with pytest.raises(AssertionError, match="w dtype"):
        skinny_gemm(x, w.half())
    with pytest.raises(AssertionError, match=r"w must be \[N, 64\]"):
        skinny_gemm(x, w[:, :32].contiguous())
    with pytest.raises(AssertionError, match="x: the last dim"):
        skinny_gemm(torch.randn(64, 3, device=DEV).t(), w)
    with pytest.raises(AssertionError, match="w must be contiguous"):
        skinny_gemm(x, torch.randn(64, 20, device=DEV).t())
    with pytest.raises(AssertionError, match="silu_mul: w must be the fused"):
        skinny_gemm(x, w[:19], epilogue="silu_mul")
    with pytest.raises(AssertionError, match=r"out must be \[3, 10\]"):
        skinny_gemm(x, w, epilogue="silu_mul", out=torch.empty(3, 20, device=DEV))
    with pytest.raises(AssertionError, match="out must be"):
        skinny_gemm(x, w, out=torch.empty(3, 20, device=DEV, dtype=torch.float16))
    with pytest.raises(AssertionError, match="out: the last dim"):
        skinny_gemm(x, w, out=torch.empty(20, 3, device=DEV).t())
    buf = torch.randn(3, 64, device=DEV)
    with pytest.raises(AssertionError, match="must not overlap"):
        skinny_gemm(buf, w, out=buf[:, :20])
    w_sq = torch.randn(20, 20, device=DEV)
    with pytest.raises(AssertionError, match="must not overlap"):
        skinny_gemm(torch.randn(3, 20, device=DEV), w_sq, out=w_sq[:3])
    with pytest.raises(AssertionError, match="block_n must be a power of two"):
        skinny_gemm(x, w, block_n=48)
    with pytest.raises(AssertionError, match="block_k must be a power of two"):
        skinny_gemm(x, w, block_k=8)
    with pytest.raises(AssertionError, match="split_k must be >= 1"):
        skinny_gemm(x, w, split_k=0)
