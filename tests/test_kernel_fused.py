"""Fused residual add + RMSNorm and SwiGLU kernels vs their torch references: odd sizes, dtypes, row strides."""
import pytest
import torch

pytest.importorskip("triton")
from fastjanus.kernels.activation import silu_mul  # noqa: E402
from fastjanus.kernels.reference import add_rmsnorm_ref, silu_mul_ref  # noqa: E402
from fastjanus.kernels.rmsnorm import add_rmsnorm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6
# Measured on the interpreter, max |Δ| / (1 + |ref|) over M ≤ 64, D and I ≤ 5632 (rmsnorm / silu_mul):
# fp32 2.1e-7 / 2.9e-7 (the sum of squares in another order); fp16 7.4e-4 / 4.8e-4 (one ulp);
# bf16 1.75e-2 / 7.6e-3. Triton's interpreter truncates fp32 → bf16 where the GPU rounds to nearest even,
# and the rmsnorm rounds twice (normed, then × weight), so on the CPU bf16 can sit two truncations from
# torch's two roundings: 2 · (2⁻⁷ + 2⁻⁸) ≈ 2.4e-2 bounds it. On the GPU one ulp, 1.6e-2.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
TOL_RMS_BF16_INTERP = (2.4e-2, 2.4e-2)


def _rand(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


def _assert_residual(res, ref, dtype):
    """x + residual is rounded once: bit-exact, except bf16 in the interpreter (truncated: one ulp toward 0)."""
    if dtype == torch.bfloat16 and DEV == "cpu":
        torch.testing.assert_close(res, ref, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(res, ref)


def _check_rmsnorm(x, w, residual, out, dtype):
    x0 = x.clone()
    res_ref = None if residual is None else residual.clone()
    ref = add_rmsnorm_ref(x, weight=w, eps=EPS, residual=res_ref)
    got = add_rmsnorm(x, weight=w, eps=EPS, residual=residual, out=out)
    assert got is out
    rtol, atol = TOL_RMS_BF16_INTERP if dtype == torch.bfloat16 and DEV == "cpu" else TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    assert torch.equal(x, x0), "x must not be modified"
    if residual is not None:
        _assert_residual(residual, res_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("D", [17, 64, 200, 2048])
@pytest.mark.parametrize("M", [1, 3, 7])
def test_add_rmsnorm_matches_reference(M, D, with_residual, dtype):
    g = torch.Generator().manual_seed(M * 10000 + D)
    x = _rand(g, M, D, dtype=dtype, scale=3.0)
    w = (1 + 0.5 * torch.randn(D, generator=g)).to(DEV, dtype)
    residual = _rand(g, M, D, dtype=dtype) if with_residual else None
    out = torch.full((M, D), float("nan"), dtype=dtype, device=DEV)
    _check_rmsnorm(x, w, residual, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm_row_strides(dtype, with_residual):
    # x, residual and out are column slices of wider tensors: each has its own row stride, and the columns
    # around the slices must come through untouched
    M, D = 5, 200
    g = torch.Generator().manual_seed(7)
    x_wide = _rand(g, M, D + 24, dtype=dtype)
    res_wide = _rand(g, M, D + 40, dtype=dtype)
    out_wide = torch.full((M, D + 8), float("nan"), dtype=dtype, device=DEV)
    res_wide0 = res_wide.clone()
    w = _rand(g, D, dtype=dtype)
    x, residual, out = x_wide[:, 16:16 + D], res_wide[:, 8:8 + D] if with_residual else None, out_wide[:, 3:3 + D]
    _check_rmsnorm(x, w, residual, out, dtype)
    assert out_wide[:, :3].isnan().all() and out_wide[:, 3 + D:].isnan().all()
    assert torch.equal(res_wide[:, :8], res_wide0[:, :8]) and torch.equal(res_wide[:, 8 + D:], res_wide0[:, 8 + D:])


def test_add_rmsnorm_zero_row_is_zero_not_nan():
    # eps keeps rsqrt finite on an all-zero row (a padded batch row)
    x = torch.zeros(2, 64, device=DEV)
    x[1] = 1.0
    out = add_rmsnorm(x, weight=torch.full((64,), 2.0, device=DEV), eps=EPS)
    assert torch.equal(out[0], torch.zeros(64, device=DEV))
    torch.testing.assert_close(out[1], torch.full((64,), 2.0, device=DEV), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("I", [5, 64, 300])
@pytest.mark.parametrize("M", [1, 3, 7])
def test_silu_mul_matches_reference(M, I, dtype):
    g = torch.Generator().manual_seed(M * 1000 + I)
    gate_up = _rand(g, M, 2 * I, dtype=dtype, scale=4.0)  # ±12: both tails of silu
    gate_up0 = gate_up.clone()
    out = torch.full((M, I), float("nan"), dtype=dtype, device=DEV)
    # block 128: I = 300 spans three column programs, the last one partly masked
    assert silu_mul(gate_up, out=out, block=128) is out
    torch.testing.assert_close(out, silu_mul_ref(gate_up), rtol=TOL[dtype][0], atol=TOL[dtype][1])
    assert torch.equal(gate_up, gate_up0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_row_strides(dtype):
    M, I = 4, 300
    g = torch.Generator().manual_seed(11)
    gu_wide = _rand(g, M, 2 * I + 10, dtype=dtype, scale=4.0)
    out_wide = torch.full((M, I + 6), float("nan"), dtype=dtype, device=DEV)
    gate_up, out = gu_wide[:, 10:], out_wide[:, 6:]
    silu_mul(gate_up, out=out)  # default block: one column program per row
    torch.testing.assert_close(out, silu_mul_ref(gate_up), rtol=TOL[dtype][0], atol=TOL[dtype][1])
    assert out_wide[:, :6].isnan().all()
    ref_out = torch.empty_like(out)
    assert silu_mul_ref(gate_up, out=ref_out) is ref_out and torch.equal(ref_out, silu_mul_ref(gate_up))


def test_launchers_check_shapes():
    x, w, res = torch.randn(3, 64, device=DEV), torch.randn(64, device=DEV), torch.randn(3, 64, device=DEV)
    with pytest.raises(AssertionError, match="weight must be"):
        add_rmsnorm(x, weight=w[:32], eps=EPS)
    with pytest.raises(AssertionError, match="weight must be"):
        add_rmsnorm(x, weight=w.half(), eps=EPS)
    with pytest.raises(AssertionError, match="residual must be"):
        add_rmsnorm(x, weight=w, eps=EPS, residual=res[:2])
    with pytest.raises(AssertionError, match="residual must be"):
        add_rmsnorm(x, weight=w, eps=EPS, residual=res.bfloat16())
    with pytest.raises(AssertionError, match="x: the last dim"):
        add_rmsnorm(torch.randn(64, 3, device=DEV).t(), weight=w, eps=EPS)
    with pytest.raises(AssertionError, match="not fp32/fp16/bf16"):
        add_rmsnorm(x.double(), weight=w.double(), eps=EPS)
    with pytest.raises(AssertionError, match="hidden size"):
        add_rmsnorm(torch.randn(1, 8193, device=DEV), weight=torch.randn(8193, device=DEV), eps=EPS)
    with pytest.raises(AssertionError, match="out must be"):
        add_rmsnorm(x, weight=w, eps=EPS, out=torch.empty(3, 64, device=DEV, dtype=torch.float16))
    with pytest.raises(AssertionError, match="must not overlap"):
        add_rmsnorm(x, weight=w, eps=EPS, residual=res, out=res)
    with pytest.raises(AssertionError, match="must not overlap"):
        add_rmsnorm(x, weight=w, eps=EPS, out=x)

    gu = torch.randn(3, 20, device=DEV)
    with pytest.raises(AssertionError, match=r"gate_up must be \[M, 2I\]"):
        silu_mul(gu[:, :19])
    with pytest.raises(AssertionError, match="out must be"):
        silu_mul(gu, out=torch.empty(3, 20, device=DEV))
    with pytest.raises(AssertionError, match="not fp32/fp16/bf16"):
        silu_mul(gu.double())
    with pytest.raises(AssertionError, match="gate_up: the last dim"):
        silu_mul(torch.randn(20, 3, device=DEV).t())
    with pytest.raises(AssertionError, match="must not overlap"):
        silu_mul(gu, out=gu[:, 10:])
