"""VQ-16 image tokenizer (LlamaGen), `gen_vision_model.*`: codes ↔ pixels.

Decoder: codebook lookup (rows L2-normalised) → [B, 8, g, g] → post_quant_conv → conv_in → mid (res, attn, res)
→ conv_blocks (deepest first; attention only in the first; nearest ×2 upsample + conv between levels)
→ GroupNorm → swish → conv_out. The encoder mirrors it and is only used to turn an image into codes.
Every op runs in the module dtype: unlike the official Upsample, nothing here casts to bfloat16, so fp16 works.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQConfig


def Norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = Norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions, 1×1 convs, scale c^-½, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = Norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # [B, 1, HW, C]
        o = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(o)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in the official encoder


class Level(nn.Module):
    """One resolution level: `res.{j}`, optional `attn.{j}` after each ResBlock, optional resampler."""

    def __init__(self, cin: int, cout: int, n_res: int, attn: bool, resample: str | None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout) for j in range(n_res))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n_res)) if attn else nn.ModuleList()
        if resample == "up":
            self.upsample = Upsample(cout)
        elif resample == "down":
            self.downsample = Downsample(cout)

    def forward(self, x):
        for j, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[j](x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        return x


def _mid(c: int) -> nn.ModuleList:
    return nn.ModuleList([ResBlock(c, c), AttnBlock(c), ResBlock(c, c)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, n = cfg.base_channels, cfg.channel_multiplier, len(cfg.channel_multiplier)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        cins = [ch] + [ch * m for m in mult[:-1]]
        self.conv_blocks = nn.ModuleList(
            Level(cins[i], ch * mult[i], cfg.num_res_blocks, attn=i == n - 1, resample=None if i == n - 1 else "down")
            for i in range(n))
        c = ch * mult[-1]
        self.mid = _mid(c)
        self.norm_out = Norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x):  # [B, 3, S, S] → [B, z, g, g]
        x = self.conv_in(x)
        for level in self.conv_blocks:
            x = level(x)
        for m in self.mid:
            x = m(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, n = cfg.base_channels, len(cfg.channel_multiplier)
        outs = [ch * m for m in reversed(cfg.channel_multiplier)]  # deepest level first
        self.conv_in = nn.Conv2d(cfg.z_channels, outs[0], 3, padding=1)
        self.mid = _mid(outs[0])
        cins = [outs[0]] + outs[:-1]
        self.conv_blocks = nn.ModuleList(
            Level(cins[i], outs[i], cfg.num_res_blocks + 1, attn=i == 0, resample=None if i == n - 1 else "up")
            for i in range(n))
        self.norm_out = Norm(outs[-1])
        self.conv_out = nn.Conv2d(outs[-1], 3, 3, padding=1)

    def forward(self, z):  # [B, z, g, g] → [B, 3, S, S]
        x = self.conv_in(z)
        for m in self.mid:
            x = m(x)
        for level in self.conv_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


@contextlib.contextmanager
def _cudnn_benchmark():
    """cuDNN's benchmark mode for the duration of a call, leaving the process-wide setting as it was."""
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = was


class Quantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.embed_dim)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, g·g] (row-major grid) → L2-normalised codebook entries [B, embed_dim, g, g]."""
        g = self.cfg.grid
        z = F.normalize(self.quantize.embedding(codes), dim=-1)  # [B, g·g, e]
        return z.view(codes.shape[0], g, g, -1).permute(0, 3, 1, 2)

    def decode_codes(self, codes: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """codes [B, g·g] → images [B, 3, S, S], roughly in [-1, 1].

        backend "triton": lookup, normalisation and post_quant_conv in one kernel (`kernels.vq_lookup`)."""
        if backend == "triton":
            from ..kernels.vq_lookup import vq_lookup
            pq = self.post_quant_conv
            z = vq_lookup(codes, self.quantize.embedding.weight, grid=self.cfg.grid, conv_weight=pq.weight,
                          conv_bias=pq.bias)  # [B, z, g, g]
        else:
            z = self.post_quant_conv(self.codes_to_latent(codes))
        if not z.is_cuda:
            return self.decoder(z)
        # On CUDA: channels-last activations (the weights are converted once, in channels_last()), the layout
        # cuDNN's tensor-core convolutions use natively, and cuDNN's benchmark mode, which times the candidate
        # algorithms once per input shape and keeps the fastest. Not yet measured on a GPU here.
        with _cudnn_benchmark():
            return self.decoder(z.contiguous(memory_format=torch.channels_last)).contiguous()

    def channels_last(self) -> None:
        """Convert the decoder's conv weights to channels-last (CUDA only; see decode_codes)."""
        self.decoder.to(memory_format=torch.channels_last)

    def encode_to_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] in [-1, 1] → codes [B, g·g]: nearest codebook entry by cosine similarity
        (VQ-16 L2-normalises both sides, so the L2-nearest normalised entry is the most similar one)."""
        z = self.quant_conv(self.encoder(pixels.to(self.quant_conv.weight.dtype)))  # [B, e, g, g]
        z = F.normalize(z.flatten(2).transpose(1, 2).float(), dim=-1)  # [B, g·g, e]
        book = F.normalize(self.quantize.embedding.weight.float(), dim=-1)  # [K, e]
        return (z @ book.T).argmax(-1)
