"""JanusFlow's generation encoder and decoder around the LLM (`vision_gen_enc_model.*`, `vision_gen_dec_model.*`).

The rectified-flow step runs: latent z [B, 4, 48, 48] and time t → ShallowUViTEncoder → (x_emb [B, 768, 24, 24],
t_emb [B, 2048]); the LLM reads t_emb and the 576 x_emb tokens (through an aligner); the decoder takes the LLM's
576 outputs (through another aligner) as a grid, concatenates x_emb (the U-Net skip), and unpatchifies a velocity
[B, 4, 48, 48]. Both sides are a few ConvNeXt blocks whose output is FiLM-modulated by t_emb.

Module and parameter names follow the official checkpoint, so it loads by name. Of the official classes, the
down/upsampling layers and dropout are left out: with the published configurations they are never built
(`downsample=False`, `upsample=False`) or own no parameters. Everything is plain torch with static shapes and no
host syncs: the whole flow step is captured in a CUDA Graph. Tensors enter and leave channels-first, as the
official modules take and return them; the channel-wise parts run channels-last, where Linear and RMSNorm act on
the last dimension.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..flow_config import UViTDecoderConfig, UViTEncoderConfig
from .llama import RMSNorm


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t [B] fp32 → [B, dim] fp32: the sinusoid of diffusers' `Timesteps(dim, flip_sin_to_cos=True,
    downscale_freq_shift=0)`, laid out [cos | sin] (a zero column is appended for an odd dim).

    Always fp32: the official demo hands t over in bf16, which rounds e.g. t = 966.67 to 968 (bf16 keeps 8
    significant bits), a visibly different time. We keep t exact, so a half-precision t is refused rather than
    silently carrying that rounding in."""
    if t.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(f"timestep_embedding takes t in float32 (got {t.dtype}); half precision rounds the time")
    half = dim // 2
    # Frequencies max_period^(-i/half), i = 0..half−1, evaluated in the same order of operations as diffusers.
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -math.log(max_period) / half)
    angles = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([angles.cos(), angles.sin()], dim=-1)  # [B, 2·half]
    return F.pad(emb, (0, dim - 2 * half))


class TimestepEmbedding(nn.Module):
    """The sinusoid → t_emb MLP (diffusers' `TimestepEmbedding`, whose key names the checkpoint uses)."""

    def __init__(self, in_dim: int, dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in_dim] → [B, dim]
        return self.linear_2(F.silu(self.linear_1(x)))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on channels-last x [B, H, W, C]: each channel is scaled by its spatial L2 norm relative to
    the mean of those norms over channels, x + bias + weight·x·(‖x_c‖ / mean_c ‖x_c‖)."""

    def __init__(self, dim: int):
        super().__init__()
        # Zeros make a fresh GRN the identity; the checkpoint's [1, 1, 1, C] shape broadcasts over B, H, W.
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)  # [B, 1, 1, C]
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        # One fused op (bias + x·(1 + weight·nx)) with a single rounding, as the official module computes it.
        return torch.addcmul(self.bias, x, self.weight * nx + 1)


class ConvNextBlock(nn.Module):
    """Depthwise 7×7 conv → RMSNorm → Linear(C, 4C) → GELU → GRN → Linear(4C, C), plus the input; then FiLM by
    t_emb: x·(1 + scale) + shift, with (scale, shift) = cond_embeds_mapper(silu(t_emb))."""

    def __init__(self, channels: int, hidden_size: int, eps: float, bias: bool, ffn_factor: int = 4):
        super().__init__()
        inner = channels * ffn_factor
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels, bias=bias)
        self.norm = RMSNorm(channels, eps)
        self.channelwise_linear_1 = nn.Linear(channels, inner, bias=bias)
        self.channelwise_norm = GlobalResponseNorm(inner)
        self.channelwise_linear_2 = nn.Linear(inner, channels, bias=bias)
        self.cond_embeds_mapper = nn.Linear(hidden_size, 2 * channels, bias=bias)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:  # x [B, C, H, W], t_emb [B, D]
        h = self.depthwise(x).permute(0, 2, 3, 1)  # [B, H, W, C]: the MLP is channel-wise
        h = F.gelu(self.channelwise_linear_1(self.norm(h)))  # exact (erf) GELU; [B, H, W, 4C]
        h = self.channelwise_linear_2(self.channelwise_norm(h))  # [B, H, W, C]
        # h first: the sum takes h's channels-last memory layout, as the official block's does. The next block's
        # depthwise conv then runs channels-last (its rounding differs from a channels-first conv's) and the
        # permute before its Linear is free.
        x = h.permute(0, 3, 1, 2) + x
        scale, shift = self.cond_embeds_mapper(F.silu(t_emb)).chunk(2, dim=1)  # [B, C] each
        return torch.addcmul(shift[:, :, None, None], x, 1 + scale[:, :, None, None])


class UViTBlock(nn.Module):
    """A stack of ConvNeXt blocks sharing the time conditioning (the official block's resampling is never built)."""

    def __init__(self, channels: int, num_blocks: int, hidden_size: int, eps: float, bias: bool):
        super().__init__()
        self.res_blocks = nn.ModuleList(ConvNextBlock(channels, hidden_size, eps, bias) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        for blk in self.res_blocks:
            x = blk(x, t_emb)
        return x


class Unpatchify(nn.Module):
    """RMSNorm over channels → 1×1 conv to out·p² channels → pixel shuffle: [B, C, h, w] → [B, out, p·h, p·w]."""

    def __init__(self, in_channels: int, out_channels: int, eps: float, bias: bool, patch: int = 2):
        super().__init__()
        self.patch = patch
        self.norm = RMSNorm(in_channels, eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * patch * patch, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.pixel_shuffle(self.unpatch_conv(x), self.patch)


class ShallowUViTEncoder(nn.Module):
    """(z [B, Cin, H, W] in the model dtype, t [B] fp32) → (x_emb [B, Ce, g, g], t_emb [B, D]), both in z's dtype.

    x_emb is also the decoder's skip input (the official `hs` holds just this one tensor)."""

    def __init__(self, cfg: UViTEncoderConfig):
        super().__init__()
        C = cfg.channels
        if cfg.use_mid_block and cfg.block_out_channels[-1] != C:
            # The official module builds such a mid block but cannot run it on in_conv's C channels.
            raise ValueError(f"ShallowUViTEncoder: block_out_channels {list(cfg.block_out_channels)} must end in "
                             f"the input convolution's {C} channels when use_mid_block is set")
        self.t_dim = C  # the sinusoid's width
        self.time_embed = TimestepEmbedding(C, cfg.hidden_size, bias=cfg.use_bias)
        # The official in_conv has a bias whatever use_bias says.
        self.in_conv = nn.Conv2d(cfg.input_channels, C, kernel_size=cfg.kernel_size, stride=cfg.stride,
                                 padding=cfg.padding)
        self.mid_block = (UViTBlock(C, cfg.layers_in_middle, cfg.hidden_size, cfg.norm_eps, cfg.use_bias)
                          if cfg.use_mid_block else None)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The fp32 sinusoid is cast to the model dtype before the MLP, where the official encoder casts it.
        t_emb = self.time_embed(timestep_embedding(t, self.t_dim).to(z.dtype))  # [B, D]
        x = self.in_conv(z)  # [B, Ce, g, g], g = (H + 2·padding − kernel) // stride + 1
        if self.mid_block is not None:
            x = self.mid_block(x, t_emb)
        return x, t_emb


class ShallowUViTDecoder(nn.Module):
    """(x [B, Cin, g, g] from the LLM's aligner, hs [B, Ce, g, g] = the encoder's x_emb, t_emb [B, D])
    → velocity [B, out_channels, g·2^upsamples, g·2^upsamples]."""

    def __init__(self, cfg: UViTDecoderConfig):
        super().__init__()
        C = cfg.channels  # the encoder's skip channels
        cat = cfg.in_channels + C  # the mid block and first unpatchify see [x, hs] concatenated
        self.mid_block = (UViTBlock(cat, cfg.layers_in_middle, cfg.hidden_size, cfg.norm_eps, cfg.use_bias)
                          if cfg.use_mid_block else None)
        # Each Unpatchify doubles the grid; only the last one writes the velocity's channels.
        self.out_convs = nn.ModuleList(
            Unpatchify(cat if i == 0 else C, cfg.out_channels if i == cfg.upsamples - 1 else C, cfg.norm_eps,
                       cfg.use_bias)
            for i in range(cfg.upsamples))
        self.input_norm = RMSNorm(cfg.in_channels, cfg.norm_eps)

    def forward(self, x: torch.Tensor, hs: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # the norm is over channels
        x = torch.cat([x, hs], dim=1)  # [B, Cin + Ce, g, g]
        if self.mid_block is not None:
            x = self.mid_block(x, t_emb)
        for up in self.out_convs:
            x = up(x)
        return x
