"""The whole JanusFlow model, with module names equal to the official checkpoint's parameter names.

One Llama LLM, SigLIP for understanding (with a single Linear aligner and a learned begin-of-understanding
embedding that takes the `<begin_of_image>` position), and for generation a ShallowUViT encoder → Linear aligner
→ the LLM → RMSNorm + Linear aligner → ShallowUViT decoder, which predicts the rectified-flow velocity of the
SDXL VAE's latent. The VAE is a separate checkpoint (models/sdxl_vae.py).

A flow step, per CFG row (B = 2N rows: N conditional, then N unconditional, as the official loop stacks them):

    z [B, 4, 48, 48] ─ encoder(z, t) ─→ x_emb [B, 768, 24, 24], t_emb [B, D]
    tokens = aligner(x_emb as [B, 576, 768])                               # [B, 576, D]
    h = LLM([prompt] ‖ t_emb ‖ tokens)[-576:]   (causal; the prompt's K/V from the cache)
    v = decoder(dec_aligner(norm(h)) as [B, 768, 24, 24], x_emb, t_emb)     # [B, 4, 48, 48]
"""
from __future__ import annotations

import torch
from torch import nn

from ..flow_config import JanusFlowConfig
from .janus import unused_siglip_key
from .llama import KVCache, LanguageModel, RMSNorm
from .siglip import VisionTower
from .uvit import ShallowUViTDecoder, ShallowUViTEncoder


class JanusFlowModel(nn.Module):
    def __init__(self, cfg: JanusFlowConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.language.hidden_size
        self.vision_und_enc_model = VisionTower(cfg.vision)
        self.vision_und_enc_aligner = nn.Linear(cfg.vision.width, D)
        self.beg_of_und_embed = nn.Parameter(torch.zeros(1, D))
        self.vision_gen_enc_model = ShallowUViTEncoder(cfg.gen_enc)
        self.vision_gen_enc_aligner = nn.Linear(cfg.gen_enc.channels, D)
        self.vision_gen_dec_model = ShallowUViTDecoder(cfg.gen_dec)
        self.language_model = LanguageModel(cfg.language)
        self.vision_gen_dec_aligner_norm = RMSNorm(D, cfg.language.rms_norm_eps)
        self.vision_gen_dec_aligner = nn.Linear(D, cfg.gen_dec.in_channels)

    # ---- what the understanding path shares with Janus (engine/runner.py, engine/pipeline.py)
    @property
    def llm(self):
        return self.language_model.model

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] → [B, T, D]
        return self.llm.embed_tokens(ids)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] → [B, N, D]
        return self.vision_und_enc_aligner(self.vision_und_enc_model(pixels))

    def understanding_embeds(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] → [B, 1 + N, D]
        """What replaces `<begin_of_image>` and the N image placeholders: the begin-of-understanding embedding,
        then the aligned SigLIP features (the official prepare_inputs_embeds)."""
        img = self.encode_images(pixels)
        return torch.cat((self.beg_of_und_embed.to(img.dtype).expand(img.shape[0], 1, -1), img), 1)

    def fuse(self) -> None:
        self.llm.fuse()

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.norm.weight.device

    kv_scales = None  # no fp8 KV cache for JanusFlow
    kv_dtype = property(lambda self: self.dtype)

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        return KVCache(self.cfg.language, rows, max_len, self.device, self.dtype)

    # ---- the flow step's pieces
    def flow_inputs(self, z: torch.Tensor, t: torch.Tensor):
        """z [B, C, H, W] (fp32 ODE state), t [B] fp32 → (LLM block [B, 1 + G, D], x_emb, t_emb)."""
        x_emb, t_emb = self.vision_gen_enc_model(z.to(self.dtype), t)  # [B, Ce, g, g], [B, D]
        tokens = self.vision_gen_enc_aligner(x_emb.flatten(2).transpose(1, 2))  # [B, G, D], G = g·g row-major
        return torch.cat((t_emb[:, None], tokens), 1), x_emb, t_emb

    def flow_velocity(self, h: torch.Tensor, x_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """The LLM's normed hidden states of the G latent tokens [B, G, D] → velocity [B, C, H, W] (model dtype)."""
        B, G, _ = h.shape
        g = x_emb.shape[-1]
        x = self.vision_gen_dec_aligner(self.vision_gen_dec_aligner_norm(h))  # [B, G, Cin]
        x = x.transpose(1, 2).reshape(B, -1, g, g)  # [B, Cin, g, g]
        return self.vision_gen_dec_model(x, x_emb, t_emb)


def flow_known_unused_key(key: str, cfg: JanusFlowConfig) -> bool:
    """Checkpoint keys that the official model carries but inference never reads."""
    return unused_siglip_key(key, "vision_und_enc_model.", cfg.vision)
