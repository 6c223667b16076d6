"""The `transformers` Janus port, built from a loaded fastjanus model: config and weights mapped from the
official layout. The benchmark's baseline and the tests' oracle.

transformers is optional (never a runtime dependency): it is imported inside the functions, and callers
catch ImportError to report the baseline as skipped.
"""
from __future__ import annotations

import re

import torch

from ..config import JanusConfig


def hf_config(cfg: JanusConfig, image_token_id: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import JanusConfig as HFJanusConfig, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig
    L, V, Q = cfg.language, cfg.vision, cfg.vq
    text = LlamaConfig(hidden_size=L.hidden_size, intermediate_size=L.intermediate_size,
                       num_hidden_layers=L.num_hidden_layers, num_attention_heads=L.num_attention_heads,
                       num_key_value_heads=L.num_key_value_heads, vocab_size=L.vocab_size,
                       max_position_embeddings=L.max_position_embeddings, rms_norm_eps=L.rms_norm_eps,
                       rope_theta=L.rope_theta, tie_word_embeddings=False, pad_token_id=pad_id,
                       bos_token_id=bos_id, eos_token_id=eos_id)
    vision = JanusVisionConfig(hidden_size=V.width, num_hidden_layers=V.layers_used, num_attention_heads=V.heads,
                               image_size=V.image_size, patch_size=V.patch_size, mlp_ratio=V.mlp_dim / V.width,
                               layer_norm_eps=V.ln_eps, projection_dim=cfg.aligner.n_embed, depth=cfg.aligner.depth,
                               num_image_tokens=Q.num_image_tokens)
    vq = JanusVQVAEConfig(embed_dim=Q.embed_dim, num_embeddings=Q.codebook_size, latent_channels=Q.z_channels,
                          base_channels=Q.base_channels, channel_multiplier=list(Q.channel_multiplier),
                          num_res_blocks=Q.num_res_blocks, projection_dim=cfg.gen_aligner.n_embed,
                          num_hidden_layers=cfg.gen_aligner.depth, image_token_embed_dim=cfg.gen_head.n_embed)
    hf = HFJanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token_id,
                       tie_word_embeddings=False)
    hf.text_config.tie_word_embeddings = False
    return hf


# official → transformers parameter names (applied in order, first match wins)
_RULES = [
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_model\.vision_tower\.patch_embed\.proj\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.norm1\.", r"model.vision_model.encoder.layers.\1.layer_norm1."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.norm2\.", r"model.vision_model.encoder.layers.\1.layer_norm2."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.proj\.",
     r"model.vision_model.encoder.layers.\1.self_attn.projection_layer."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.mlp\.", r"model.vision_model.encoder.layers.\1.mlp."),
    (r"^vision_model\.vision_tower\.norm\.", "model.vision_model.post_layernorm."),
    (r"^aligner\.layers\.0\.", "model.aligner.fc1."),
    (r"^aligner\.layers\.(\d+)\.", lambda m: f"model.aligner.hidden_layers.{int(m.group(1)) // 2 - 1}."),
    (r"^gen_aligner\.layers\.0\.", "model.generation_aligner.fc1."),
    (r"^gen_aligner\.layers\.(\d+)\.", lambda m: f"model.generation_aligner.hidden_layers.{int(m.group(1)) // 2 - 1}."),
    (r"^gen_head\.output_mlp_projector\.", "model.generation_head.proj_out."),
    (r"^gen_head\.vision_head\.", "model.generation_head.vision_head."),
    (r"^gen_embed\.", "model.generation_embeddings."),
    (r"^gen_vision_model\.(encoder|decoder)\.mid\.0\.", r"model.vqmodel.\1.mid.block_1."),
    (r"^gen_vision_model\.(encoder|decoder)\.mid\.1\.", r"model.vqmodel.\1.mid.attn_1."),
    (r"^gen_vision_model\.(encoder|decoder)\.mid\.2\.", r"model.vqmodel.\1.mid.block_2."),
    (r"^gen_vision_model\.encoder\.conv_blocks\.(\d+)\.res\.", r"model.vqmodel.encoder.down.\1.block."),
    (r"^gen_vision_model\.encoder\.conv_blocks\.(\d+)\.", r"model.vqmodel.encoder.down.\1."),
    (r"^gen_vision_model\.decoder\.conv_blocks\.(\d+)\.res\.", r"model.vqmodel.decoder.up.\1.block."),
    (r"^gen_vision_model\.decoder\.conv_blocks\.(\d+)\.", r"model.vqmodel.decoder.up.\1."),
    (r"^gen_vision_model\.", "model.vqmodel."),
]


def to_hf_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in official.items():
        if ".attn_pool." in k or k.endswith("codebook_used"):
            continue
        m = re.match(r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", k)
        if m:
            q, kk, vv = v.chunk(3, dim=0)
            base = f"model.vision_model.encoder.layers.{m.group(1)}.self_attn."
            out.update({base + f"q_proj.{m.group(2)}": q, base + f"k_proj.{m.group(2)}": kk,
                        base + f"v_proj.{m.group(2)}": vv})
            continue
        if k == "vision_model.vision_tower.pos_embed":
            out["model.vision_model.embeddings.position_embedding.weight"] = v[0]
            continue
        for pat, rep in _RULES:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            raise KeyError(f"no transformers name for {k}")
    return out


def build_hf_model(model, tokenizer, device, dtype, attn: str = "sdpa") -> torch.nn.Module:
    """A JanusForConditionalGeneration on `device` in `dtype` holding a copy of `model`'s weights (eval mode).

    It is constructed directly on the device in the target dtype, so the only extra memory is one copy of the
    weights; attn is transformers' attention implementation ("sdpa" for speed, "eager" for the oracle)."""
    from transformers import JanusForConditionalGeneration
    tk = tokenizer
    cfg = hf_config(model.cfg, tk.image_id, tk.pad_id, tk.bos_id, tk.eos_id)
    cfg._attn_implementation = attn
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = JanusForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"transformers Janus port does not match the official layout: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return hf


def generate_image_codes(hf, input_ids: torch.Tensor, generation_config, image_tokens: int) -> torch.Tensor:
    """`hf.generate(generation_mode="image")` with a static cache made here: [num_return_sequences, image_tokens].

    transformers 5.17 (the lent GPU machines' version) fails to make its own: its Janus `generate` calls
    `_prepare_static_cache()` without the `prefill_chunk_size` argument that method requires (fixed in 5.18).
    A cache passed in is used as is, and gives the same codes on 5.17 and 5.23. Its length is what
    transformers would size for itself: the prompt plus the image tokens; its batch (2 rows per image,
    conditional and unconditional) is set at its first write."""
    from transformers import StaticCache
    cache = StaticCache(config=hf.config.get_text_config(), max_cache_len=input_ids.shape[1] + image_tokens)
    return hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation_config,
                       generation_mode="image", past_key_values=cache)
