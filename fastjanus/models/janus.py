"""The whole Janus model, with module names equal to the official checkpoint's parameter names."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AlignerConfig, GenHeadConfig, JanusConfig
from .llama import KVCache, LanguageModel
from .siglip import VisionTower
from .vq import VQModel


class MlpProjector(nn.Module):
    """`layers.0` Linear(in→D), then per extra depth GELU + Linear(D→D) at `layers.2`, `layers.4`, ..."""

    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        mods: list[nn.Module] = [nn.Linear(cfg.input_dim, cfg.n_embed)]
        for _ in range(1, cfg.depth):
            mods += [nn.GELU(), nn.Linear(cfg.n_embed, cfg.n_embed)]
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


class GenHead(nn.Module):
    def __init__(self, cfg: GenHeadConfig):
        super().__init__()
        self.output_mlp_projector = nn.Linear(cfg.n_embed, cfg.image_token_embed)
        self.vision_head = nn.Linear(cfg.image_token_embed, cfg.image_token_size)

    def forward(self, h):  # [R, D] → [R, K]
        return self.vision_head(F.gelu(self.output_mlp_projector(h)))


class JanusModel(nn.Module):
    def __init__(self, cfg: JanusConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTower(cfg.vision)
        self.aligner = MlpProjector(cfg.aligner)
        self.gen_vision_model = VQModel(cfg.vq)
        self.gen_aligner = MlpProjector(cfg.gen_aligner)
        self.gen_head = GenHead(cfg.gen_head)
        self.gen_embed = nn.Embedding(cfg.vq.codebook_size, cfg.vq.embed_dim)
        self.language_model = LanguageModel(cfg.language)
        self.register_buffer("gen_code_table", None, persistent=False)  # [codebook, D], made by fuse()
        # e4m3 KV cache scales [layers, Hkv] fp32 (quant.kv_cache_scales), set by use_fp8_kv_cache()
        self.register_buffer("kv_k_scale", None, persistent=False)
        self.register_buffer("kv_v_scale", None, persistent=False)

    # ---- pieces the engine composes
    @property
    def llm(self):
        return self.language_model.model

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] → [B, T, D]
        return self.llm.embed_tokens(ids)

    def embed_image_codes(self, codes: torch.Tensor) -> torch.Tensor:  # [...] → [..., D]: one gather
        return F.embedding(codes, self.gen_code_table)

    def fuse(self) -> None:
        """The inference layout, once, after loading: the decoder's fused weights and rotary table
        (`LlamaModel.fuse`), the image-code embedding table (`code_table`) and, on CUDA, the VQ decoder in
        channels-last."""
        self.llm.fuse()
        self.register_buffer("gen_code_table", self.code_table(), persistent=False)
        if self.gen_code_table.is_cuda:
            self.gen_vision_model.channels_last()

    @torch.no_grad()
    def code_table(self, chunk: int = 4096) -> torch.Tensor:
        """gen_aligner(gen_embed(c)) for every code c: [codebook, D] in the model dtype, so that an image step
        embeds its codes with one gather instead of an embedding, two GEMMs and a GELU (4 kernels).

        How exact: computed in fp32 from the stored weights and rounded to the model dtype once, so each entry
        is within half an ulp of the fp32 result. The per-step computation in bf16/fp16 rounds after each op,
        so the two agree up to the dtype's rounding (a few ulps); in fp32 they agree to fp32 rounding (~1e-6
        relative, tested). Memory: codebook × D in the model dtype (64 MiB for Pro-1B in bf16, 128 MiB for
        Pro-7B); built in chunks of `chunk` codes to bound the fp32 scratch."""
        w = self.gen_embed.weight  # [K, E]
        layers = [(m.weight.float(), m.bias.float()) if isinstance(m, nn.Linear) else m
                  for m in self.gen_aligner.layers]  # fp32 copies: the aligner is a few MB
        out = torch.empty(w.shape[0], self.cfg.language.hidden_size, device=w.device, dtype=w.dtype)
        for a in range(0, w.shape[0], chunk):
            x = w[a:a + chunk].float()  # [chunk, E]
            for m in layers:
                x = F.linear(x, *m) if isinstance(m, tuple) else m(x)
            out[a:a + chunk] = x  # [chunk, D], rounded once
        return out

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] → [B, N, D]
        return self.aligner(self.vision_model(pixels))

    @property
    def dtype(self) -> torch.dtype:  # the model (activation) dtype; 8-bit weights do not change it
        return self.llm.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.norm.weight.device

    @property
    def kv_scales(self):
        return None if self.kv_k_scale is None else (self.kv_k_scale, self.kv_v_scale)

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.dtype if self.kv_k_scale is None else torch.float8_e4m3fn

    @torch.no_grad()
    def use_fp8_kv_cache(self) -> None:
        """Make every new KV cache e4m3 with per-layer, per-head scales bounded from the weights (after fuse())."""
        from ..quant import kv_cache_scales
        k, v = kv_cache_scales(self.llm)
        self.register_buffer("kv_k_scale", k.contiguous(), persistent=False)
        self.register_buffer("kv_v_scale", v.contiguous(), persistent=False)

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        return KVCache(self.cfg.language, rows, max_len, self.device, self.dtype, self.kv_scales)


def known_unused_key(key: str, cfg: JanusConfig) -> bool:
    """Checkpoint keys that the official model carries but inference never reads."""
    return key == "gen_vision_model.quantize.codebook_used" or unused_siglip_key(key, "vision_model.", cfg.vision)


def unused_siglip_key(key: str, prefix: str, vision) -> bool:
    """SigLIP keys under `prefix` that inference never reads: the attention-pooling head, and the blocks that
    select_layer drops (Janus's `vision_model.`, JanusFlow's `vision_und_enc_model.`)."""
    if key.startswith(prefix + "vision_tower.attn_pool."):
        return True
    blocks = prefix + "vision_tower.blocks."
    if key.startswith(blocks):
        idx = key[len(blocks):].split(".", 1)[0]
        return idx.isdigit() and int(idx) >= vision.layers_used
    return False
