"""SigLIP ViT encoder for image understanding (`vision_model.vision_tower.*`).

Conv patch embedding, learned position embedding, no class token, pre-norm blocks with a fused qkv Linear,
exact GELU, and a final LayerNorm. `attn_pool.*` in the checkpoint is not used by Janus.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):  # [B, 3, S, S] → [B, N, W]
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, N, W = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, N, hd]
        return self.proj(o.transpose(1, 2).reshape(B, N, W))


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SigLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width))
        # Only the blocks that select_layer keeps are built; the checkpoint's others are ignored.
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers_used))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.pos_embed.dtype)) + self.pos_embed  # [B, N, W]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class VisionTower(nn.Module):
    """`vision_model` in the checkpoint (the official CLIPVisionTower wrapper)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_tower = SigLIPEncoder(cfg)

    def forward(self, pixels):  # [B, 3, S, S] → [B, N, W]
        return self.vision_tower(pixels)
