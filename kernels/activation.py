"""SwiGLU activation: gate_up [M, 2I] → silu(gate) · up [M, I], one launch.

The MLP runs one GEMM against the concatenated [gate; up] weight, so gate and up arrive side by side in
one row (gate in columns 0..I−1, up in I..2I−1). Torch would slice, run silu (an fp32 round trip in half
types) and multiply: three launches and two [M, I] intermediates. Here each program loads BLOCK columns of
gate and of up, computes silu(g)·u in fp32 and rounds once to the dtype.

Grid (M, I / BLOCK): shapes only, so a launch replays in a CUDA Graph. Torch reference: `reference.silu_mul_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rmsnorm import disjoint


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, I, stride_gu, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: rows·stride can pass 2^31 in a long prefill
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < I
    g = tl.load(gu_ptr + row * stride_gu + c, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    u = tl.load(gu_ptr + row * stride_gu + I + c, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u  # silu as torch writes it; g → −∞ gives g / ∞ = −0, not NaN
    tl.store(out_ptr + row * stride_o + c, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """gate_up [M, 2I] (gate | up) → out [M, I] = silu(gate) · up, same dtype (fp32/fp16/bf16).

    Both tensors have a contiguous last dim (any row stride); `out` must not overlap gate_up.
    """
    assert gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0 and gate_up.shape[1] > 0, \
        f"gate_up must be [M, 2I] (gate | up), got {list(gate_up.shape)}"
    assert gate_up.dtype in (torch.float32, torch.float16, torch.bfloat16), \
        f"gate_up dtype {gate_up.dtype} is not fp32/fp16/bf16"
    assert gate_up.stride(1) == 1, "gate_up: the last dim must be contiguous"
    M, I = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(M, I, dtype=gate_up.dtype, device=gate_up.device)
    assert out.shape == (M, I) and out.dtype == gate_up.dtype, \
        f"out must be [{M}, {I}] {gate_up.dtype}, got {list(out.shape)} {out.dtype}"
    assert out.stride(1) == 1, "out: the last dim must be contiguous"
    assert disjoint(out, gate_up), "out must not overlap gate_up"
    block = min(block, triton.next_power_of_2(I))
    _silu_mul_kernel[(M, triton.cdiv(I, block))](gate_up, out, I, gate_up.stride(0), out.stride(0),
                                                 BLOCK=block, num_warps=4)
    return out
