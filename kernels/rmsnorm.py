"""Residual add + RMSNorm in one launch: r = x + residual (written back into `residual`), out = RMSNorm(r).

In the decode step each layer adds its attention/MLP output to the residual stream and normalises the sum
for the next sub-block. In torch that is eight or so separate launches (add, cast to fp32, square, mean,
+ eps, rsqrt, multiply, cast back, weight multiply), each a round trip of an [M, D] (mostly fp32) tensor
through memory for a few microseconds of work at decode sizes. Here one program per row loads x and the residual
once, writes the new residual and the normed activations, and keeps everything else in registers.

Numerics follow the Llama RMSNorm that Janus uses,
`weight * (r.float() * torch.rsqrt(r.float().pow(2).mean(-1, keepdim=True) + eps)).to(dtype)`:
the sum r is rounded to the dtype (it *is* the residual stream), the normalised value is rounded to the dtype
before the weight multiplies it, and that product is rounded once more. So the kernel matches torch up to the
order of the mean's reduction (and rsqrt's last bit).

Grid (M,): it depends only on the row count, never on the data, so a launch replays in a CUDA Graph.
Torch reference: `reference.add_rmsnorm_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_D = 8192  # one row lives in registers: 8192 fp32 over 8 warps is 32 per thread


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, D, stride_x, stride_r, stride_o, eps,
                        HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: rows·stride can pass 2^31 in a long prefill
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    r = tl.load(x_ptr + row * stride_x + d, mask=mask, other=0.0)  # [BD], padding is 0: no effect on the sum
    if HAS_RES:
        res = tl.load(res_ptr + row * stride_r + d, mask=mask, other=0.0)
        r = (r.to(tl.float32) + res.to(tl.float32)).to(res.dtype)  # rounded once, as torch's x + residual
        tl.store(res_ptr + row * stride_r + d, r, mask=mask)
    rf = r.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(rf * rf, axis=0) / D + eps)
    normed = (rf * rstd).to(r.dtype).to(tl.float32)  # the reference rounds before the weight multiplies
    w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + d, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory spans of a and b (first to last element, non-negative strides) do not meet."""
    if a.numel() == 0 or b.numel() == 0:
        return True

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a1 <= b0 or b1 <= a0


def add_rmsnorm(x: torch.Tensor, *, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, D]; weight [D]; residual [M, D] or None → out [M, D] = RMSNorm(x + residual) · weight.

    With a residual, x + residual (rounded to the dtype) is written into `residual` in place, and normed;
    without one, x itself is normed. All tensors share x's dtype (fp32/fp16/bf16) and have a contiguous last
    dim (any row stride). `out` must not overlap x or the residual.
    """
    assert x.dim() == 2, f"x must be [M, D], got {list(x.shape)}"
    M, D = x.shape
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x dtype {x.dtype} is not fp32/fp16/bf16"
    assert 1 <= D <= MAX_D, f"hidden size {D} is not supported (1..{MAX_D}: one row per program)"
    assert weight.shape == (D,) and weight.dtype == x.dtype, \
        f"weight must be [{D}] {x.dtype}, got {list(weight.shape)} {weight.dtype}"
    assert weight.stride(0) == 1, "weight must be contiguous"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, \
            f"residual must be [{M}, {D}] {x.dtype}, got {list(residual.shape)} {residual.dtype}"
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype, \
        f"out must be [{M}, {D}] {x.dtype}, got {list(out.shape)} {out.dtype}"
    for name, t in (("x", x), ("residual", residual), ("out", out)):
        if t is not None:
            assert t.stride(1) == 1, f"{name}: the last dim must be contiguous"
    assert disjoint(out, x) and (residual is None or disjoint(out, residual)), \
        "out must not overlap x or residual"
    block_d = triton.next_power_of_2(D)
    has_res = residual is not None
    _add_rmsnorm_kernel[(M,)](x, residual if has_res else x, weight, out, D, x.stride(0),
                              residual.stride(0) if has_res else 0, out.stride(0), eps,
                              HAS_RES=has_res, BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8)
    return out
