"""Which decode-step GEMMs run the Triton skinny GEMM (`skinny_gemm.py`) instead of cuBLAS: per GPU and shape,
from measurements only.

An entry goes in only from a GPU run of `python -m fastjanus.bench.kernels` (committed under bench/results/)
whose `skinny_gemm` or `skinny_gemm+silu_mul` row at that shape has winner "triton" by at least 3% (do_bench's
run-to-run spread is about 1-2%, so a smaller margin is a tie and cuBLAS keeps it). Every other shape uses cuBLAS
(and, for gate/up, the separate SiLU·mul kernel).

Key: (GPU name as torch.cuda.get_device_name reports it, dtype name, M, N, K, epilogue) → split_k, where
x is [M, K] and the weight [N, K]; epilogue None or "silu_mul" (N = 2·I, the fused gate/up weight).
The lookup runs on the host when a step is built (once per captured graph), never inside a replay.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activation import silu_mul
from .skinny_gemm import skinny_gemm

TABLE: dict[tuple[str, str, int, int, int, str | None], int] = {
    # bench/results/h100-80gb-hbm3-2026-11-23-kernels.json (H100 80GB HBM3, bf16, torch 2.11 + cu130, Triton 3.6,
    # triton.testing.do_bench medians). Only Janus-Pro-7B's gate/up weight [22016, 4096] won: Triton ms vs
    # cuBLAS ms (+ the SiLU·mul kernel where fused). Pro-1B's GEMMs and every other 7B GEMM stayed on cuBLAS
    # (the 7B QKV at 32 rows was a tie: 0.05168 vs 0.05171 ms).
    ("NVIDIA H100 80GB HBM3", "bfloat16", 2, 22016, 4096, None): 1,  # 0.0770 vs 0.0795
    ("NVIDIA H100 80GB HBM3", "bfloat16", 8, 22016, 4096, None): 1,  # 0.0769 vs 0.0810
    ("NVIDIA H100 80GB HBM3", "bfloat16", 2, 22016, 4096, "silu_mul"): 2,  # 0.0779 vs 0.0836
    ("NVIDIA H100 80GB HBM3", "bfloat16", 8, 22016, 4096, "silu_mul"): 2,  # 0.0781 vs 0.0839
}


def lookup(x: torch.Tensor, w: torch.Tensor, epilogue: str | None) -> int | None:
    """The measured split_k for this GEMM on this GPU, or None: cuBLAS."""
    if not TABLE or not x.is_cuda:
        return None
    key = (torch.cuda.get_device_name(x.device), str(x.dtype).removeprefix("torch."), x.shape[0], w.shape[0],
           w.shape[1], epilogue)
    return TABLE.get(key)


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]ᵀ → [M, N]: the skinny GEMM where the table says so, else cuBLAS.
    With scale (w 8-bit, scale [N] fp32) always the skinny GEMM: cuBLAS has no W8A16 GEMM, and dequantizing
    first would read more bytes than bf16."""
    if scale is not None:
        from ..quant import use_w8a8, w8a16_linear, w8a8_linear  # fp8 W8A8 where a GPU measured it faster (empty)
        return w8a8_linear(x, w, scale) if use_w8a8(x, w) else w8a16_linear(x, w, scale)
    split_k = lookup(x, w, None)
    if split_k is None:
        return F.linear(x, w)
    return skinny_gemm(x, w, split_k=split_k)


def linear_silu_mul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] with the fused gate/up weight w [2I, K] → silu(gate) · up [M, I]: one skinny-GEMM launch where
    the table says so (or w is 8-bit, with its scales [2I]), else cuBLAS and the SiLU·mul kernel."""
    if scale is not None:
        from ..quant import use_w8a8, w8a16_linear, w8a8_linear
        if use_w8a8(x, w):
            return silu_mul(w8a8_linear(x, w, scale))
        return w8a16_linear(x, w, scale, epilogue="silu_mul")
    split_k = lookup(x, w, "silu_mul")
    if split_k is None:
        return silu_mul(F.linear(x, w))
    return skinny_gemm(x, w, epilogue="silu_mul", split_k=split_k)
