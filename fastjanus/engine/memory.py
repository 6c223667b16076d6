"""Memory arithmetic: the KV cache per token, the working set of the decode loop and the VQ decoder, and
how many images fit in a given amount of free device memory.

The estimates are deliberately generous (fp32 scratch everywhere, several live feature maps in the VQ
decoder), because the point is to refuse a request before it starts rather than run out of memory at step
400. The benchmark reports measured peaks next to them.
"""
from __future__ import annotations

from ..config import JanusConfig, LlamaConfig


def kv_bytes_per_token(cfg: LlamaConfig, elem: int) -> int:
    """K and V of one token of one row over all layers (Pro-1B bf16: 24·2·2048·2 = 192 KiB)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem


def kv_cache_bytes(cfg: LlamaConfig, elem: int, rows: int, max_len: int) -> int:
    return rows * max_len * kv_bytes_per_token(cfg, elem)


def decode_workspace_bytes(cfg: JanusConfig, rows: int, splits: int = 4) -> int:
    """Transient memory of one decode step, fp32 upper bound: hidden/q/k/v/attention output (≈ 6·D), the MLP
    (3·I), logits over the larger of the text vocabulary and the codebook (twice: raw + guided), and the
    flash-decoding partials (splits × heads × (head_dim + 2))."""
    L = cfg.language
    vocab = max(L.vocab_size, cfg.gen_head.image_token_size)
    per_row = 6 * L.hidden_size + 3 * L.intermediate_size + 2 * vocab
    per_row += splits * L.num_attention_heads * (L.head_dim + 2)
    return rows * per_row * 4


def prefill_workspace_bytes(cfg: JanusConfig, rows: int, length: int, elem: int) -> int:
    """Transient memory of the prefill: per token the hidden state, q/k/v, attention output and the MLP
    (≈ 6·D + 3·I in the model dtype), plus a float32 copy for the norms."""
    L = cfg.language
    return rows * length * ((6 * L.hidden_size + 3 * L.intermediate_size) * elem + 2 * L.hidden_size * 4)


def vq_decode_bytes(cfg: JanusConfig, images: int, elem: int) -> int:
    """The VQ decoder's peak for a batch of images: about six live feature maps at full resolution with the
    widest full-resolution channel count, in fp32 (group norm upcasts)."""
    q = cfg.vq
    c_full = q.base_channels * q.channel_multiplier[0]
    return images * 6 * c_full * q.image_size * q.image_size * max(elem, 4)
