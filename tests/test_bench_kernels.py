"""Kernel microbenchmark: byte arithmetic (hand-computed), the no-GPU refusal and the CPU dry run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import requires_interpreter
from fastjanus.bench import kernels as kb


def test_byte_counts_by_hand():
    # one row, 16 heads × 128, bf16, 1 cached slot: K+V read (2·1 slots) + new K/V read and written (4 slots)
    # = 16·128·2·6 = 24576, plus q read and out written = 2·16·128·2 = 8192
    assert kb.attention_bytes(1, 16, 1, 128, 2) == 24576 + 8192
    # with the rotary inside: one fp32 cos/sin row (2 × 64 × 4 = 512 bytes) per row
    assert kb.attention_bytes(2, 16, 1, 128, 2, rope=True) == 2 * (24576 + 8192) + 2 * 512
    # Pro-1B: 24 layers, 16 × 128 bf16 → 192 KiB of K+V per token per row over all layers
    per_token_all_layers = 24 * (kb.attention_bytes(1, 16, 2, 128, 2) - kb.attention_bytes(1, 16, 1, 128, 2))
    assert per_token_all_layers == 192 * 1024
    assert kb.sample_bytes(32, 16384, 2) == 1 << 20  # 32 rows × 16384 bf16 logits = 1 MiB
    assert kb.vq_lookup_bytes(1, 576, 8, 256, 2) == 576 * (8 + 16 + 512)
    # 2 rows × 2048 bf16: x, residual read, residual, out written (4 × 8 KiB) + the weight (4 KiB)
    assert kb.add_rmsnorm_bytes(2, 2048, 2) == 4 * 8192 + 4096
    # 2 rows × 5632 bf16: [2, 11264] read (45056 bytes) + [2, 5632] written (22528)
    assert kb.silu_mul_bytes(2, 5632, 2) == 45056 + 22528
    # Pro-1B QKV at 2 rows, bf16: the [6144, 2048] weight (24 MiB) + x [2, 2048] read + y [2, 6144] written
    assert kb.skinny_gemm_bytes(2, 6144, 2048, 2) == 6144 * 2048 * 2 + 8192 + 24576
    # gate_up with SiLU·mul: the [11264, 2048] weight + x [2, 2048] + out [2, 5632]
    assert kb.skinny_gemm_bytes(2, 11264, 2048, 2, n_out=5632) == 11264 * 2048 * 2 + 8192 + 22528
    # the same with an 8-bit weight: 1 byte per element (12 MiB) + 6144 fp32 scales, x and y still bf16
    assert kb.w8_gemm_bytes(2, 6144, 2048, 2) == 6144 * 2048 + 6144 * 4 + 8192 + 24576
    assert kb.w8_gemm_bytes(2, 11264, 2048, 2, n_out=5632) == 11264 * 2048 + 11264 * 4 + 8192 + 22528


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_refuses_without_cuda(capsys):
    assert kb.main([]) == 2
    assert "need a CUDA device" in capsys.readouterr().err


@requires_interpreter
def test_dry_run_covers_every_kernel(tmp_path):
    # a child process: the interpreter must be on before Triton's first import, and no GPU may be touched
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "kernels.json"
    p = subprocess.run([sys.executable, "-m", "fastjanus.bench.kernels", "--dry-run", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    # the toy model at 2 rows: one row per kernel, the skinny GEMM on its four GEMMs (QKV, o, gate_up, down)
    names = ["decode_attention", "decode_attention+rope", "add_rmsnorm", "silu_mul", *["skinny_gemm"] * 4,
             "skinny_gemm+silu_mul", *["w8_gemm[int8]"] * 4, "w8_gemm[int8]+silu_mul", *["w8_gemm[fp8]"] * 4,
             "w8_gemm[fp8]+silu_mul", *["w8a8_scaled_mm[fp8]"] * 4, "cfg_sample", "vq_lookup+post_quant_conv"]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and [r["kernel"] for r in report["results"]] == names
    assert all(r["ms"] > 0 and r["torch_ms"] > 0 and r["bytes"] > 0 for r in report["results"])
    assert report["results"][1]["cos_sin_ms"] > 0
    gemms = [r for r in report["results"] if r["kernel"].startswith("skinny_gemm")]
    assert [r["shape"]["gemm"] for r in gemms] == ["qkv", "o_proj", "gate_up", "down", "gate_up"]
    # tiny preset: hidden 64, intermediate 128, 4 heads + 2 × 2 kv heads of 16
    assert [(r["shape"]["n"], r["shape"]["k"]) for r in gemms] == [(128, 64), (64, 64), (256, 64), (64, 128),
                                                                   (256, 64)]
    assert all(r["winner"] in ("triton", "cublas") and r["split_k"] == 1 and r["shape"]["rows"] == 2
               for r in gemms)  # one split on the CPU
    assert gemms[-1]["shape"]["intermediate"] == 128 and gemms[-1]["bytes"] == (256 * 64 + 2 * 64 + 2 * 128) * 2
    # the 8-bit rows: the same GEMMs, block_k 256 for an 8-bit weight (bf16 activations), bytes of an 8-bit read
    for wname in ("int8", "fp8"):
        w8 = [r for r in report["results"] if r["kernel"].startswith(f"w8_gemm[{wname}]")]
        assert [(r["shape"]["gemm"], r["shape"]["n"], r["shape"]["k"]) for r in w8] == \
            [(r["shape"]["gemm"], r["shape"]["n"], r["shape"]["k"]) for r in gemms]
        assert all(r["split_k"] == 1 and r["block_k"] == 256 and r["weight_gbs"] > 0 and r["winner"] in
                   ("triton", "cublas") for r in w8)
        assert w8[0]["bytes"] == 128 * 64 + 128 * 4 + (2 * 64 + 2 * 128) * 2
        assert w8[-1]["bytes"] == 256 * 64 + 256 * 4 + (2 * 64 + 2 * 128) * 2
    assert "DRY RUN" in p.stdout and all(f"\n{n} " in p.stdout for n in names)


def test_gemm_table_entries_come_from_committed_measurements():
    # every Triton entry of kernels/gemm_table.py must be a committed GPU run's skinny GEMM row won by >= 3%
    # at that split_k; nothing in the table may be a guess
    from pathlib import Path

    from fastjanus.kernels.gemm_table import TABLE
    rows = {}
    for f in sorted((Path(__file__).parent.parent / "bench" / "results").glob("*-kernels.json")):
        rep = json.loads(f.read_text())
        if rep.get("dry_run") or "results" not in rep:  # a dry run, or a pass report (pass-tests-kernels.json)
            continue
        for r in rep["results"]:
            if r["kernel"] in ("skinny_gemm", "skinny_gemm+silu_mul"):
                epi = "silu_mul" if r["kernel"].endswith("silu_mul") else None
                key = (rep["device"], rep["dtype"], r["shape"]["rows"], r["shape"]["n"], r["shape"]["k"], epi)
                rows[key] = r
    for key, split_k in TABLE.items():
        assert key in rows, f"{key}: no committed measurement"
        r = rows[key]
        assert r["winner"] == "triton" and r["split_k"] == split_k and r["ms"] <= 0.97 * r["torch_ms"], (key, r)
