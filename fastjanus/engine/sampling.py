"""Plain-torch sampling: classifier-free guidance and the sampling rules (the reference for the fused kernels).

Logits are promoted to fp32 before the softmax; the official sampler works in the model dtype (bf16), so
sampled streams can differ from it by rounding, while greedy decoding matches.
"""
from __future__ import annotations

import torch


def cfg_mix(logits: torch.Tensor, cfg_weight: float) -> torch.Tensor:
    """logits [2N, V], rows interleaved (even = conditional, odd = unconditional) → u + w·(c − u), [N, V] fp32."""
    c, u = logits[0::2].float(), logits[1::2].float()
    return u + cfg_weight * (c - u)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest set with cumulative probability ≥ top_p to −inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token is always kept)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
           top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits [N, V] → token ids [N]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
