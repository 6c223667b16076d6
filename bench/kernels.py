"""Kernel microbenchmarks: each Triton kernel next to the torch ops it replaces and against the roofline.

    python -m fastjanus.bench.kernels [--dtype bf16] [--json bench/results/<device>-<date>-kernels.json]
                                      [--dry-run]

Needs CUDA. One run measures the device's copy bandwidth (a 1 GiB device-to-device copy: read + write bytes
over the median time) and then, per kernel and shape, the median time of the kernel and of the torch
reference with `triton.testing.do_bench` (CUDA events; L2 flushed before every repeat), the bytes the op must
move at minimum, the achieved GB/s and its fraction of the measured copy bandwidth. `--dry-run` runs the same
code on the CPU through Triton's interpreter at toy shapes, timed with the host clock: it checks the plumbing
(the GPU pass's dry run uses it); its numbers mean nothing.

The torch side of `add_rmsnorm`, `silu_mul` and `decode_attention+rope` is what the decode step ran before
those kernels: `x + residual` then the Llama `RMSNorm` module; `F.silu(gate) * up` on the halves of the [M, 2I]
GEMM output; the rotary in torch (`rotary_cos_sin` at the rows' lengths, `apply_rotary` on q and k) then the
kernel without `rope`. That sequence computed cos/sin once per step for all layers, so its row also gives
`cos_sin_ms` alone: per layer, the torch side cost `torch_ms` less (layers − 1)/layers of it.

`skinny_gemm` times the split-K Triton GEMM (`kernels.skinny_gemm`, default split and blocks) against
`F.linear` (cuBLAS) on the four decode GEMMs of each model (QKV, o_proj, gate_up, down: weight [N, K]) at
M = 2, 8, 32 rows; `skinny_gemm+silu_mul` times the fused gate/up GEMM + SiLU·mul against `F.linear` then the
`kernels.activation.silu_mul` kernel (what the decode step runs). Their rows add `winner` ("triton" or
"cublas": the faster of the two), `split_k`, `block_n` and `block_k`: the input of the per-shape table that
decides where the Triton GEMM replaces cuBLAS (it is the default nowhere until such a table is committed).

`w8_gemm[int8]` / `w8_gemm[fp8]` time the weight-only 8-bit path (`skinny_gemm(..., w_scale=)`: the weight int8 or
float8_e4m3fn with per-row fp32 scales, activations in --dtype) on the same GEMMs and rows, `w8_gemm[...]+silu_mul`
the fused gate/up; the baseline (`torch_ms`) is the 16-bit cuBLAS GEMM of the same shape (then the SiLU·mul
kernel), what the decode step runs now. `bytes` counts the 8-bit weight (1 byte per element) and its scales, so
`gbs` is the achieved rate of the 8-bit weight read; `weight_gbs` is the weight bytes alone over the time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

# Shapes from the issue, per preset (`fastjanus.config`): Pro-1B D 2048, I 5632, 16 heads × 128; Pro-7B D 4096,
# I 11008, 32 × 128 (both MHA). A 576-token image after a prompt of up to ~124 tokens means KV lengths up to
# 700; the rotary comparison runs at ~600. 2 rows = 1 image with CFG, 8 = 4 images, 32 = 16 images.
ARCHS = ["janus-pro-1b", "janus-pro-7b"]
ROWS = [2, 8, 32]
KV_LEN = 700
ROPE_KV_LEN = 600
CODEBOOK, EMBED_DIM, Z_CHANNELS, GRID = 16384, 8, 256, 24
IMAGES = (1, 16)


@dataclass(frozen=True)
class Shapes:
    archs: list  # preset names: hidden, intermediate, heads, head dim, eps and rope theta come from the config
    rows: list
    kv_len: int
    rope_kv_len: int
    codebook: int
    embed_dim: int
    z_channels: int
    grid: int
    images: tuple


PUBLISHED = Shapes(ARCHS, ROWS, KV_LEN, ROPE_KV_LEN, CODEBOOK, EMBED_DIM, Z_CHANNELS, GRID, IMAGES)
TOY = Shapes(["tiny"], [2], 20, 20, 256, 8, 16, 4, (1,))  # --dry-run: seconds in the interpreter


def attention_bytes(rows: int, kv_heads: int, length: int, head_dim: int, elem: int, heads: int | None = None,
                    rope: bool = False) -> int:
    """Minimum traffic of one decode-attention call: K and V of `length` cached slots read, the new K/V slot
    written (and read from its input), q read and the output written; with `rope`, each row's fp32 cos/sin row
    of the table (2 × head_dim/2 × 4 bytes) read too."""
    heads = kv_heads if heads is None else heads
    kv = rows * kv_heads * head_dim * elem * (2 * length + 4)
    return kv + 2 * rows * heads * head_dim * elem + (rows * head_dim * 4 if rope else 0)


def add_rmsnorm_bytes(rows: int, dim: int, elem: int) -> int:
    """x and the residual read, the new residual and the normed output written, the weight read once."""
    return (4 * rows + 1) * dim * elem


def silu_mul_bytes(rows: int, intermediate: int, elem: int) -> int:
    """gate and up read (the [M, 2I] GEMM output), silu(gate) · up [M, I] written."""
    return 3 * rows * intermediate * elem


def skinny_gemm_bytes(rows: int, n: int, k: int, elem: int, n_out: int | None = None) -> int:
    """The weight [n, k] read once, the activations x [rows, k] read and y [rows, n_out] written (n_out = n, or
    the intermediate size n / 2 with the SiLU·mul epilogue)."""
    return (n * k + rows * k + rows * (n if n_out is None else n_out)) * elem


def w8_gemm_bytes(rows: int, n: int, k: int, elem: int, n_out: int | None = None) -> int:
    """The 8-bit weight [n, k] (1 byte per element) and its fp32 scales [n] read once, x [rows, k] read and
    y [rows, n_out] written in the activation dtype (n_out = n, or n / 2 with the SiLU·mul epilogue)."""
    return n * k + 4 * n + (rows * k + rows * (n if n_out is None else n_out)) * elem


def sample_bytes(rows: int, vocab: int, elem: int) -> int:
    """Minimum traffic of the fused sampler: every logit read once (the outputs are a few bytes per pair)."""
    return rows * vocab * elem


def vq_lookup_bytes(images: int, positions: int, embed_dim: int, channels: int, elem: int) -> int:
    """codes read (int64), one codebook row gathered per position, the conv output written."""
    return images * positions * (8 + embed_dim * elem + channels * elem)


def _median_ms(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def _host_median_ms(fn, n: int = 3) -> float:
    """--dry-run: the host clock around a few calls (no device, no meaning; the plumbing only)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30, device: str = "cuda", timer=_median_ms) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _row(name, shape, ms, ref_ms, nbytes, bw, **extra):
    gbs = nbytes / (ms * 1e-3) / 1e9
    return {"kernel": name, "shape": shape, "ms": ms, "torch_ms": ref_ms, "speedup": ref_ms / ms, "bytes": nbytes,
            "gbs": gbs, "roofline_fraction": gbs / bw, **extra}


def run(dtype: torch.dtype, dry_run: bool = False) -> dict:
    import torch.nn.functional as F
    import triton

    from ..config import preset
    from ..engine.sampling import cfg_mix
    from ..kernels.activation import silu_mul
    from ..kernels.cfg_sample import cfg_sample
    from ..kernels.decode_attention import decode_attention
    from ..kernels.reference import decode_attention_ref, rope_table, vq_lookup_ref
    from ..kernels.rmsnorm import add_rmsnorm
    from ..kernels.skinny_gemm import skinny_gemm, skinny_gemm_config
    from ..quant import quantize_weight
    from ..kernels.vq_lookup import vq_lookup
    from ..models.llama import RMSNorm, apply_rotary, rotary_cos_sin

    elem = torch.empty(0, dtype=dtype).element_size()
    dev, sh = ("cpu", TOY) if dry_run else ("cuda", PUBLISHED)
    timer = _host_median_ms if dry_run else _median_ms
    bw = copy_bandwidth_gbs(64 << 20 if dry_run else 1 << 30, dev, timer)
    results = []
    gen = torch.Generator(device=dev).manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=gen, device=dev).to(dtype)

    for arch in sh.archs:
        c = preset(arch).language
        heads, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        for rows in sh.rows:
            S = sh.kv_len + 1
            q, kn, vn = r(rows, heads, hd), r(rows, hkv, hd), r(rows, hkv, hd)
            kc, vc = r(rows, hkv, S, hd), r(rows, hkv, S, hd)
            L = torch.full((rows,), sh.kv_len - 1, dtype=torch.int32, device=dev)  # attend over kv_len slots
            out = torch.empty_like(q)
            ms = timer(lambda: decode_attention(q, kn, vn, kc, vc, L, out=out))
            # torch reference: index_put append + SDPA with a [rows, 1, 1, S] mask (what backend="torch" runs)
            ref_ms = timer(lambda: decode_attention_ref(q, kn, vn, kc, vc, L, bound=sh.kv_len))
            results.append(_row("decode_attention", {"arch": arch, "rows": rows, "heads": heads, "kv_heads": hkv,
                                                     "head_dim": hd, "kv_len": sh.kv_len}, ms, ref_ms,
                                attention_bytes(rows, hkv, sh.kv_len - 1, hd, elem, heads), bw))

        for rows in sh.rows:
            S = sh.rope_kv_len + 1
            table = rope_table(S, hd, c.rope_theta, dev)
            qkv = r(rows, (heads + 2 * hkv) * hd)  # the fused QKV GEMM's output; q, k, v are views of it
            q, kn, vn = (t.unflatten(-1, (-1, hd)) for t in qkv.split((heads * hd, hkv * hd, hkv * hd), -1))
            kc, vc = r(rows, hkv, S, hd), r(rows, hkv, S, hd)
            L = torch.full((rows,), sh.rope_kv_len - 1, dtype=torch.int32, device=dev)
            out = torch.empty_like(q)
            ms = timer(lambda: decode_attention(q, kn, vn, kc, vc, L, rope=table, out=out))
            # before: three projections (contiguous q, k, v), cos/sin per step, apply_rotary, the kernel
            q0, k0, v0 = q.contiguous(), kn.contiguous(), vn.contiguous()

            def cos_sin():
                cos, sin = rotary_cos_sin(L[:, None], hd, c.rope_theta, dtype)
                return cos[:, :, 0], sin[:, :, 0]  # [rows, 1, hd]: the same rotation for every head

            def unfused():
                cos, sin = cos_sin()
                decode_attention(apply_rotary(q0, cos, sin), apply_rotary(k0, cos, sin), v0, kc, vc, L, out=out)

            ref_ms = timer(unfused)
            results.append(_row("decode_attention+rope", {"arch": arch, "rows": rows, "heads": heads,
                                                          "kv_heads": hkv, "head_dim": hd, "kv_len": sh.rope_kv_len},
                                ms, ref_ms, attention_bytes(rows, hkv, sh.rope_kv_len - 1, hd, elem, heads, rope=True),
                                bw, cos_sin_ms=timer(cos_sin)))

        for rows in sh.rows:
            D = c.hidden_size
            # x small: the kernel adds it into the residual in place on every repeat, which must stay finite
            x, res, w = r(rows, D) * 1e-3, r(rows, D), r(D)
            norm = RMSNorm(D, c.rms_norm_eps).to(dev, dtype)
            norm.weight.requires_grad_(False).copy_(w)
            out = torch.empty_like(x)
            ms = timer(lambda: add_rmsnorm(x, weight=w, eps=c.rms_norm_eps, residual=res, out=out))
            ref_ms = timer(lambda: norm(x + res))
            results.append(_row("add_rmsnorm", {"arch": arch, "rows": rows, "hidden": D}, ms, ref_ms,
                                add_rmsnorm_bytes(rows, D, elem), bw))

        for rows in sh.rows:
            inter = c.intermediate_size
            gate_up = r(rows, 2 * inter)
            g, u = gate_up.chunk(2, dim=-1)
            out = torch.empty(rows, inter, dtype=dtype, device=dev)
            ms = timer(lambda: silu_mul(gate_up, out=out))
            ref_ms = timer(lambda: F.silu(g) * u)
            results.append(_row("silu_mul", {"arch": arch, "rows": rows, "intermediate": inter}, ms, ref_ms,
                                silu_mul_bytes(rows, inter, elem), bw))

        # the decode step's GEMMs, weight [N, K] (nn.Linear layout, as fused at load: [q; k; v] and [gate; up])
        D, inter = c.hidden_size, c.intermediate_size
        gemms = [("qkv", (heads + 2 * hkv) * hd, D), ("o_proj", D, heads * hd), ("gate_up", 2 * inter, D),
                 ("down", D, inter)]
        for gemm, N, K in gemms:
            w = r(N, K) / K ** 0.5
            for rows in sh.rows:
                x = r(rows, K)
                out = torch.empty(rows, N, dtype=dtype, device=dev)
                bn, bk, split, _ = skinny_gemm_config(rows, N, K, dtype, x.device)
                ms = timer(lambda: skinny_gemm(x, w, out=out))
                ref_ms = timer(lambda: F.linear(x, w))
                results.append(_row("skinny_gemm", {"arch": arch, "gemm": gemm, "rows": rows, "n": N, "k": K}, ms,
                                    ref_ms, skinny_gemm_bytes(rows, N, K, elem), bw,
                                    winner="triton" if ms < ref_ms else "cublas", split_k=split, block_n=bn,
                                    block_k=bk))
        w = r(2 * inter, D) / D ** 0.5  # [gate; up]
        for rows in sh.rows:
            x = r(rows, D)
            out, out_ref = (torch.empty(rows, inter, dtype=dtype, device=dev) for _ in range(2))
            bn, bk, split, _ = skinny_gemm_config(rows, inter, D, dtype, x.device)
            ms = timer(lambda: skinny_gemm(x, w, epilogue="silu_mul", out=out))
            ref_ms = timer(lambda: silu_mul(F.linear(x, w), out=out_ref))
            results.append(_row("skinny_gemm+silu_mul", {"arch": arch, "gemm": "gate_up", "rows": rows,
                                                         "n": 2 * inter, "k": D, "intermediate": inter}, ms, ref_ms,
                                skinny_gemm_bytes(rows, 2 * inter, D, elem, n_out=inter), bw,
                                winner="triton" if ms < ref_ms else "cublas", split_k=split, block_n=bn, block_k=bk))

        # weight-only 8-bit: the same GEMMs with the weight quantized per row, against 16-bit cuBLAS
        for wname, wdtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
            for gemm, N, K in gemms:
                w = r(N, K) / K ** 0.5
                q, scale = quantize_weight(w, wname)
                for rows in sh.rows:
                    x = r(rows, K)
                    out = torch.empty(rows, N, dtype=dtype, device=dev)
                    bn, bk, split, _ = skinny_gemm_config(rows, N, K, dtype, x.device, w_dtype=wdtype)
                    ms = timer(lambda: skinny_gemm(x, q, w_scale=scale, out=out))
                    ref_ms = timer(lambda: F.linear(x, w))
                    results.append(_row(f"w8_gemm[{wname}]", {"arch": arch, "gemm": gemm, "rows": rows, "n": N,
                                                              "k": K}, ms, ref_ms, w8_gemm_bytes(rows, N, K, elem),
                                        bw, weight_gbs=N * K / (ms * 1e-3) / 1e9,
                                        winner="triton" if ms < ref_ms else "cublas", split_k=split, block_n=bn,
                                        block_k=bk))
            w = r(2 * inter, D) / D ** 0.5  # [gate; up]
            q, scale = quantize_weight(w, wname)
            for rows in sh.rows:
                x = r(rows, D)
                out, out_ref = (torch.empty(rows, inter, dtype=dtype, device=dev) for _ in range(2))
                bn, bk, split, _ = skinny_gemm_config(rows, inter, D, dtype, x.device, w_dtype=wdtype)
                ms = timer(lambda: skinny_gemm(x, q, w_scale=scale, epilogue="silu_mul", out=out))
                ref_ms = timer(lambda: silu_mul(F.linear(x, w), out=out_ref))
                results.append(_row(f"w8_gemm[{wname}]+silu_mul", {"arch": arch, "gemm": "gate_up", "rows": rows,
                                                                   "n": 2 * inter, "k": D, "intermediate": inter},
                                    ms, ref_ms, w8_gemm_bytes(rows, 2 * inter, D, elem, n_out=inter), bw,
                                    weight_gbs=2 * inter * D / (ms * 1e-3) / 1e9,
                                    winner="triton" if ms < ref_ms else "cublas", split_k=split, block_n=bn,
                                    block_k=bk))

        # W8A8 (fp8 weights and per-row dynamic fp8 activations, torch._scaled_mm) against the W8A16 kernel: the
        # measurement that decides fastjanus.quant.W8A8_ROWS (winner "scaled_mm")
        from ..quant import w8a8_linear
        for gemm, N, K in gemms:
            q, scale = quantize_weight(r(N, K) / K ** 0.5, "fp8")
            for rows in sh.rows:
                x = r(rows, K)
                try:
                    ms = timer(lambda: w8a8_linear(x, q, scale))
                except RuntimeError as e:  # a device or shape _scaled_mm does not take: recorded, not fatal
                    results.append({"kernel": "w8a8_scaled_mm[fp8]", "shape": {"arch": arch, "gemm": gemm,
                                    "rows": rows, "n": N, "k": K}, "error": " ".join(str(e).split())[:200]})
                    continue
                ref_ms = timer(lambda: skinny_gemm(x, q, w_scale=scale))
                results.append(_row("w8a8_scaled_mm[fp8]", {"arch": arch, "gemm": gemm, "rows": rows, "n": N,
                                                             "k": K}, ms, ref_ms, w8_gemm_bytes(rows, N, K, elem), bw,
                                    baseline="the W8A16 skinny GEMM (torch_ms)",
                                    winner="scaled_mm" if ms < ref_ms else "w8a16"))

    for rows in sh.rows:
        logits = r(rows, sh.codebook)
        w, t, seed, step = (torch.tensor([5.0], device=dev), torch.tensor([1.0], device=dev),
                            torch.tensor([0], device=dev), torch.tensor([0], device=dev))
        out = torch.empty(rows // 2, dtype=torch.int64, device=dev)
        ms = timer(lambda: cfg_sample(logits, cfg_weight=w, temperature=t, seed=seed, step=step, out=out))
        g = torch.Generator(device=dev).manual_seed(0)
        # the torch sequence it replaces (the official sampler's): mix, scale, softmax, multinomial
        ref_ms = timer(lambda: torch.multinomial(torch.softmax(cfg_mix(logits, 5.0) / 1.0, -1), 1, generator=g))
        results.append(_row("cfg_sample", {"rows": rows, "vocab": sh.codebook, "temperature": 1.0}, ms, ref_ms,
                            sample_bytes(rows, sh.codebook, elem), bw))

    for images in sh.images:
        codes = torch.randint(0, sh.codebook, (images, sh.grid * sh.grid), generator=gen, device=dev)
        emb, cw, cb = r(sh.codebook, sh.embed_dim), r(sh.z_channels, sh.embed_dim, 1, 1), r(sh.z_channels)
        out = torch.empty(images, sh.z_channels, sh.grid, sh.grid, dtype=dtype, device=dev)
        ms = timer(lambda: vq_lookup(codes, emb, grid=sh.grid, conv_weight=cw, conv_bias=cb, out=out))
        ref_ms = timer(lambda: vq_lookup_ref(codes, emb, grid=sh.grid, conv_weight=cw, conv_bias=cb))
        results.append(_row("vq_lookup+post_quant_conv", {"images": images, "grid": sh.grid, "codebook": sh.codebook,
                                                          "channels": sh.z_channels}, ms, ref_ms,
                            vq_lookup_bytes(images, sh.grid * sh.grid, sh.embed_dim, sh.z_channels, elem), bw))

    method = ("triton.testing.do_bench median (CUDA events, warmup 25 ms, rep 200 ms, L2 flushed per repeat); "
              "bandwidth = 2 x 1 GiB device copy / median time")
    if dry_run:
        method = "DRY RUN on the CPU (Triton interpreter, toy shapes, host clock): checks the plumbing, not a figure"
    return {"device": torch.cuda.get_device_name() if not dry_run else "CPU (dry run)",
            "dtype": str(dtype).replace("torch.", ""), "dry_run": dry_run,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "date": datetime.date.today().isoformat(), "copy_bandwidth_gbs": bw, "method": method,
            "results": results}


def format_table(report: dict) -> str:
    lines = ["*** DRY RUN: interpreter on the CPU, toy shapes; NOT kernel figures ***"] if report.get("dry_run") else []
    shapes = [" ".join(f"{k}={v}" for k, v in r["shape"].items()) for r in report["results"]]
    w = max(map(len, shapes), default=0)
    lines += [f"{report['device']}  {report['dtype']}  torch {report['torch']}  triton {report['triton']}  "
             f"copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s",
             f"{'kernel':28s} {'shape':{w}s} {'ms':>8s} {'torch ms':>9s} {'x':>6s} {'GB/s':>7s} {'roof':>5s}"]
    for r, shape in zip(report["results"], shapes):
        if "error" in r:  # a configuration the device refused (e.g. _scaled_mm below sm_89)
            lines.append(f"{r['kernel']:28s} {shape:{w}s} failed: {r['error']}")
            continue
        lines.append(f"{r['kernel']:28s} {shape:{w}s} {r['ms']:8.4f} {r['torch_ms']:9.4f} {r['speedup']:6.1f} "
                     f"{r['gbs']:7.0f} {r['roofline_fraction']:5.0%}"
                     + (f"  {r['winner']}" if "winner" in r else "")
                     + (f" (split_k {r['split_k']})" if "split_k" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastjanus.bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--dry-run", action="store_true",
                    help="run on the CPU through Triton's interpreter at toy shapes (checks the plumbing only)")
    args = ap.parse_args(argv)
    if args.dry_run:
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"  # before Triton's first import: jit decides at decoration time
        from ..kernels import triton_status
        if not triton_status()[1]:
            print("fastjanus bench: error: --dry-run needs Triton's interpreter; set TRITON_INTERPRET=1 before "
                  "Python starts", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("fastjanus bench: error: kernel microbenchmarks need a CUDA device (none visible); "
              "CPU timings of the Triton interpreter would mean nothing", file=sys.stderr)
        return 2
    report = run({"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype], dry_run=args.dry_run)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
