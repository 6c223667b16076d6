"""Kernel microbenchmark: byte arithmetic (hand-computed) and the no-GPU refusal."""
import pytest
import torch

from fastjanus.bench import kernels as kb


def test_byte_counts_by_hand():
    # one row, 16 heads × 128, bf16, 1 cached slot: K+V read (2·1 slots) + new K/V read and written (4 slots)
    # = 16·128·2·6 = 24576, plus q read and out written = 2·16·128·2 = 8192
    assert kb.attention_bytes(1, 16, 1, 128, 2) == 24576 + 8192
    # Pro-1B: 24 layers, 16 × 128 bf16 → 192 KiB of K+V per token per row over all layers
    per_token_all_layers = 24 * (kb.attention_bytes(1, 16, 2, 128, 2) - kb.attention_bytes(1, 16, 1, 128, 2))
    assert per_token_all_layers == 192 * 1024
    assert kb.sample_bytes(32, 16384, 2) == 1 << 20  # 32 rows × 16384 bf16 logits = 1 MiB
    assert kb.vq_lookup_bytes(1, 576, 8, 256, 2) == 576 * (8 + 16 + 512)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_refuses_without_cuda(capsys):
    assert kb.main([]) == 2
    assert "need a CUDA device" in capsys.readouterr().err
