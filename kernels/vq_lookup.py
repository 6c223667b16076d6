"""VQ codebook lookup: codes [B, P] → L2-normalised codebook rows, laid out as the decoder's first conv wants.

Replaces normalise + gather + view + permute + contiguous (+ the 1×1 `post_quant_conv`, fused): grid
[B, P / BLOCK_P, C / BLOCK_C]; each program gathers BLOCK_P entries (embed_dim E = 8 for VQ-16, unrolled),
normalises them in fp32 (x / max(‖x‖, 1e-12), as F.normalize) and writes either the latent [B, E, P]
or, with the conv fused, W·x + b as [B, C, P] (channels-first, P = grid·grid row-major, so the result is a
contiguous [B, C, g, g] view). Torch reference: `reference.vq_lookup_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _vq_lookup_kernel(codes_ptr, emb_ptr, w_ptr, bias_ptr, out_ptr, P, C, K, stride_codes, stride_out, eps,
                      E: tl.constexpr, FUSE_CONV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    code = tl.load(codes_ptr + b * stride_codes + p, mask=pmask, other=0).to(tl.int64)
    code = tl.minimum(tl.maximum(code, 0), K - 1)  # callers validate codes; a bad one must not read out of bounds
    sumsq = tl.zeros([BLOCK_P], tl.float32)
    for j in tl.static_range(E):
        e = tl.load(emb_ptr + code * E + j, mask=pmask, other=0.0).to(tl.float32)
        sumsq += e * e
    inv = 1.0 / tl.maximum(tl.sqrt(sumsq), eps)  # [BLOCK_P]
    out_base = out_ptr + b * stride_out
    if FUSE_CONV:
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32) + tl.load(bias_ptr + c, mask=cmask, other=0.0).to(
            tl.float32)[:, None]
        for j in tl.static_range(E):  # the second gather hits L1/L2: E·4 bytes per code
            e = tl.load(emb_ptr + code * E + j, mask=pmask, other=0.0).to(tl.float32) * inv
            wj = tl.load(w_ptr + c * E + j, mask=cmask, other=0.0).to(tl.float32)
            acc += wj[:, None] * e[None, :]
        tl.store(out_base + c[:, None] * P + p[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=cmask[:, None] & pmask[None, :])
    else:
        for j in tl.static_range(E):
            e = tl.load(emb_ptr + code * E + j, mask=pmask, other=0.0).to(tl.float32) * inv
            tl.store(out_base + j * P + p, e.to(out_ptr.dtype.element_ty), mask=pmask)


def vq_lookup(codes: torch.Tensor, embedding: torch.Tensor, *, grid: int, conv_weight: torch.Tensor | None = None,
              conv_bias: torch.Tensor | None = None, out: torch.Tensor | None = None, eps: float = 1e-12,
              block_p: int = 64) -> torch.Tensor:
    """codes [B, grid²] int; embedding [K, E] → [B, E, grid, grid], or [B, C, grid, grid] with the 1×1 conv
    (conv_weight [C, E, 1, 1], conv_bias [C]) fused. Output dtype = embedding dtype. Codes must be in [0, K)."""
    B, P = codes.shape
    K, E = embedding.shape
    assert P == grid * grid, f"codes have {P} positions, expected grid² = {grid * grid}"
    assert not codes.dtype.is_floating_point and codes.stride(1) == 1, "codes: contiguous integer rows"
    assert embedding.is_contiguous(), "embedding must be contiguous [K, E]"
    assert E <= 64, f"embed_dim {E} is unrolled in the kernel; > 64 is not supported"
    fuse = conv_weight is not None
    if fuse:
        C = conv_weight.shape[0]
        assert conv_weight.shape == (C, E, 1, 1) and conv_weight.is_contiguous(), \
            f"conv_weight must be contiguous [C, {E}, 1, 1], got {list(conv_weight.shape)}"
        assert conv_bias is not None and conv_bias.shape == (C,), f"conv_bias must be [{C}]"
    else:
        C = E
    if out is None:
        out = torch.empty(B, C, grid, grid, dtype=embedding.dtype, device=embedding.device)
    assert out.shape == (B, C, grid, grid) and out.is_contiguous(), f"out must be contiguous [{B}, {C}, {grid}, {grid}]"
    block_p = min(block_p, triton.next_power_of_2(P))
    block_c = min(64, triton.next_power_of_2(C)) if fuse else 1
    launch = (B, triton.cdiv(P, block_p), triton.cdiv(C, block_c) if fuse else 1)
    _vq_lookup_kernel[launch](codes, embedding, conv_weight if fuse else embedding,
                              conv_bias if fuse else embedding, out, P, C, K, codes.stride(0), out.stride(0), eps,
                              E=E, FUSE_CONV=fuse, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return out
