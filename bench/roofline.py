"""Roofline arithmetic: the bytes a decode step must move and the FLOPs of the vision parts, from the shapes,
and the device limits they are compared with, measured in the same run.

A decode step is memory-bound at the batch sizes Janus runs (2–32 rows): it reads every weight of the
decoder and the head once, reads each row's cached K/V and writes one new slot. Activations (a few KiB per
row) are left out. The VQ decoder and SigLIP are compute-bound and are compared with the device's measured
dense-matmul throughput instead.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..config import JanusConfig, LlamaConfig
from ..engine.memory import kv_bytes_per_token, weight_bytes

# Checkpoint tensors read on every image-generation step: the decoder, its final norm and the generation head
# (an MLP to the 16384 codes). The code embedding (`gen_embed` → `gen_aligner`) is precomputed at load as a
# [16384, D] table (models/janus.py) that a step gathers a row per token from, so neither is read whole.
IMAGE_STEP_PREFIXES = ("language_model.model.layers.", "language_model.model.norm.", "gen_head.")
# Text decoding: the decoder, its norm and the text head (lm_head, vocab × D); one embedding row per token.
TEXT_STEP_PREFIXES = ("language_model.model.layers.", "language_model.model.norm.", "language_model.lm_head.")


def image_step_weight_bytes(cfg: JanusConfig, elem: int, quant=None) -> int:
    """Weights one image step reads: elem bytes per element, or 8-bit + fp32 row scales where quantized."""
    return weight_bytes(cfg, elem, quant, IMAGE_STEP_PREFIXES)


def text_step_weight_bytes(cfg: JanusConfig, elem: int, quant=None) -> int:
    return weight_bytes(cfg, elem, quant, TEXT_STEP_PREFIXES)


def kv_step_bytes(cfg: LlamaConfig, elem: int, rows: int, kv_len: float) -> float:
    """K/V traffic of one step: `kv_len` cached slots read and one slot written, per row, all layers (elem: the
    cache's bytes per element, 1 for e4m3; its per-head scales are a few KiB, left out)."""
    return rows * kv_bytes_per_token(cfg, elem) * (kv_len + 1)


def image_step_bytes(cfg: JanusConfig, elem: int, rows: int, kv_len: float, quant=None,
                     kv_elem: int | None = None) -> int:
    return int(image_step_weight_bytes(cfg, elem, quant)
               + kv_step_bytes(cfg.language, kv_elem or elem, rows, kv_len))


def text_step_bytes(cfg: JanusConfig, elem: int, rows: int, kv_len: float, quant=None,
                    kv_elem: int | None = None) -> int:
    return int(text_step_weight_bytes(cfg, elem, quant)
               + kv_step_bytes(cfg.language, kv_elem or elem, rows, kv_len))


def mean_image_step_bytes(cfg: JanusConfig, elem: int, num_images: int, prompt_len: float, quant=None,
                          kv_elem: int | None = None) -> int:
    """Bytes per decode step averaged over one generation: the first code comes from the prefill, then decode
    step i = 0 .. n−2 reads prompt_len + i cached slots, so the mean is prompt_len + (n − 2) / 2. Two rows
    (conditional + unconditional) per image. The step's time also covers the head and the sampler."""
    n = cfg.num_image_tokens
    return image_step_bytes(cfg, elem, 2 * num_images, prompt_len + (n - 2) / 2, quant, kv_elem)


def mean_text_step_bytes(cfg: JanusConfig, elem: int, prompt_len: float, steps: int, quant=None,
                         kv_elem: int | None = None) -> int:
    """Text decoding, one row: decode step i = 0 .. steps−1 reads prompt_len + i cached slots."""
    return text_step_bytes(cfg, elem, 1, prompt_len + (steps - 1) / 2, quant, kv_elem)


# ------------------------------------------------------------------------------------------- FLOPs
def count_flops(fn) -> int:
    """FLOPs of one call of fn(), counted by torch's FlopCounterMode (matmuls, convolutions, attention) on
    the real shapes; elementwise work is not counted, which makes the fraction an upper bound on efficiency."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


# ------------------------------------------------------------------------------------ device limits
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> tuple[float, str]:
    """Measured copy bandwidth in GB/s (bytes read + written over the median time) and how it was measured."""
    if device.type == "cuda":
        from .kernels import copy_bandwidth_gbs
        return copy_bandwidth_gbs(1 << 30), ("1 GiB device-to-device copy_, triton.testing.do_bench median "
                                             "(CUDA events, L2 flushed); GB/s = 2 x bytes / time")
    nbytes = 256 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    s = _median_s(lambda: dst.copy_(src), device, 7)
    return 2 * nbytes / s / 1e9, "256 MiB host copy_, median of 7, perf_counter; GB/s = 2 x bytes / time"


def matmul_throughput(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Measured dense matmul throughput in TFLOP/s for the run's dtype, and how it was measured."""
    if device.type == "cuda":
        from triton.testing import do_bench
        n = 8192
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        ms = float(do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median"))
        return 2 * n ** 3 / (ms * 1e-3) / 1e12, (f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} matmul, "
                                                  "triton.testing.do_bench median")
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    s = _median_s(lambda: a @ b, device, 5)
    return 2 * n ** 3 / s / 1e12, f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} host matmul, median of 5"
