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


class TorchSampler:
    """The eager sampler: guidance and sampling in torch with a seeded torch.Generator.

    Each call takes the step's logits ([2N, V] paired cond/uncond rows, or [N, V]) and returns the tokens [N];
    it also keeps every step's tokens in `codes` [N, steps] and, paired, the tokens repeated per row in
    `rows` [2N] for the next step's embedding."""

    def __init__(self, n: int, steps: int, cfg_weight: float | None, temperature: float, seed: int,
                 top_k: int | None, top_p: float | None, paired: bool, device: torch.device):
        self.cfg_weight, self.temperature, self.top_k, self.top_p, self.paired = \
            cfg_weight, temperature, top_k, top_p, paired
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.codes = torch.empty(n, steps, dtype=torch.long, device=device)
        self.rows = torch.empty(2 * n if paired else n, dtype=torch.long, device=device)
        self.step = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        mixed = cfg_mix(logits, self.cfg_weight) if self.paired else logits.float()
        tok = sample(mixed, self.temperature, self.generator, self.top_k, self.top_p)  # [N]
        self.codes[:, self.step] = tok
        self.rows.copy_(tok.repeat_interleave(2) if self.paired else tok)
        self.step += 1
        return tok


class KernelSampler:
    """The fused Triton sampler (`kernels.cfg_sample`), same interface as TorchSampler.

    Parameters, seed and step live in device tensors and the step is advanced on the device, so nothing
    here waits for the host. Streams differ from TorchSampler's for the same seed (Philox vs torch's
    generator); the distribution and the greedy result do not. top_p is not fused: use TorchSampler."""

    def __init__(self, n: int, steps: int, cfg_weight: float | None, temperature: float, seed: int,
                 top_k: int | None, paired: bool, device: torch.device):
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.cfg_weight = torch.tensor([1.0 if cfg_weight is None else cfg_weight], **f32)
        self.temperature = torch.tensor([temperature], **f32)
        self.seed = torch.tensor([seed], **i64)
        self.step = torch.zeros(1, **i64)
        self.top_k, self.paired = top_k, paired
        self.codes = torch.empty(n, steps, **i64)
        self.out = torch.empty(n, **i64)
        self.rows = torch.empty(2 * n, **i64) if paired else self.out
        from ..kernels.cfg_sample import cfg_sample  # imports Triton: only when this sampler is used
        self._cfg_sample = cfg_sample

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self._cfg_sample(logits, cfg_weight=self.cfg_weight, temperature=self.temperature, seed=self.seed,
                         step=self.step, top_k=self.top_k, paired=self.paired, out=self.out,
                         rows_out=self.rows if self.paired else None, history=self.codes)
        self.step += 1
        return self.out
