"""Plain-torch references for the kernels (torch only; the torch backend runs these).

The sampling reference is `fastjanus.engine.sampling` (cfg_mix, filter_top_k_top_p, sample).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def append_kv(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              lengths: torch.Tensor) -> None:
    """Write k_new/v_new [B, Hkv, D] at slot lengths[b] of k_cache/v_cache [B, Hkv, S, D] (device indices)."""
    rows = torch.arange(k_new.shape[0], device=k_new.device)
    k_cache[rows, :, lengths.long()] = k_new
    v_cache[rows, :, lengths.long()] = v_new


def decode_attention_ref(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, lengths: torch.Tensor, *, sm_scale: float | None = None,
                         bound: int | None = None) -> torch.Tensor:
    """Same contract as `decode_attention`: append at slot lengths[b], attend over slots 0..lengths[b].

    bound: an upper limit on lengths + 1 known on the host (the eager loop knows it without a sync); the
    keys beyond it are not read. None reads the whole cache.
    """
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    append_kv(k_new, v_new, k_cache, v_cache, lengths)
    end = S if bound is None else min(bound, S)
    mask = torch.arange(end, device=q.device)[None, :] <= lengths[:, None].long()  # [B, end]
    o = F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :end], v_cache[:, :, :end],
                                       attn_mask=mask[:, None, None], scale=sm_scale,
                                       enable_gqa=Hkv != H)  # [B, H, 1, D]
    return o[:, :, 0]


def vq_lookup_ref(codes: torch.Tensor, embedding: torch.Tensor, *, grid: int, conv_weight: torch.Tensor | None = None,
                  conv_bias: torch.Tensor | None = None) -> torch.Tensor:
    """codes [B, grid²] → [B, E, grid, grid] L2-normalised entries, or the 1×1 conv of them [B, C, grid, grid]."""
    z = F.normalize(embedding[codes], dim=-1)  # [B, P, E]
    z = z.view(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
    if conv_weight is not None:
        z = F.conv2d(z, conv_weight, conv_bias)
    return z

