"""`fastjanus bench --arch janusflow-1.3b`: JanusFlow text-to-image, ours against the official loop, in one run.

Per scenario (1 and 16 images, and 1 image after a long prompt, 30 steps, cfg 2):
  - ours: the prompt's K/V once, then 1 + G tokens per step (CUDA Graph per bucket on CUDA);
  - cached, eager: the same without graphs (CUDA only: separates the graphs' share of the gain);
  - official loop: the prompt recomputed at every step (engine/flow.recompute_step), eager, as demo/app_janusflow.py.
Each reports the per-step time (median over runs), the prompt time, the VAE decode and the total, and the
step's achieved fraction of the measured matmul throughput (FLOPs counted by torch's FlopCounterMode on one
eager step; elementwise work not counted: an upper bound on efficiency). The same starting noise runs
through both loops and the largest latent difference is reported (they are the same computation).
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

from ..engine.flow import FlowStep, Prompts, prompt_prefix, recompute_step
from ..engine.flow_pipeline import flow_prompt_ids
from ..engine.pipeline import load, resolve_device_dtype
from ..errors import InputError, arg
from ..random_init import cached_random_model
from .harness import _median, device_info, package_versions, random_prompt
from .roofline import count_flops, matmul_throughput

# scenario → (images, prompt words). The long prompt (about 300 tokens) is where computing it once matters most:
# the official loop pays for it at every step.
FLOW_SCENARIOS = {"t2i-1": (1, 12), "t2i-16": (16, 12), "t2i-1-long": (1, 240)}


def _step_flops(pipe, prompt: str, n: int) -> tuple[int, int]:
    """FLOPs of one step: (cached: one eager FlowStep at the request's exact sizes, the official recomputation)."""
    ids = flow_prompt_ids(pipe.tokenizer, pipe.cfg, prompt)
    pr = Prompts(ids, n, pipe.tokenizer.pad_id)
    st = FlowStep(pipe.model, n, pr.P)
    with torch.inference_mode():
        st.load(pr, prompt_prefix(pipe.model, pr), torch.zeros_like(st.z), 2.0, 30)
        cached = count_flops(st._step)
        z = torch.zeros_like(st.z)
        return cached, count_flops(lambda: recompute_step(pipe.model, pr, z, 0.0, 2.0, 1 / 30))


def _timed(pipe, fn, repeats: int, warmup: int) -> list[dict]:
    """Timings of `repeats` runs after `warmup` untimed ones; the first run's graph capture time (warm-up or
    not) is kept in every entry as first_capture_s."""
    first = None
    for _ in range(warmup):
        fn()
        first = pipe.last_timings.get("capture_s", 0.0) if first is None else first
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        tm = dict(pipe.last_timings)
        tm["wall_s"] = time.perf_counter() - t0
        first = tm.get("capture_s", 0.0) if first is None else first
        out.append(tm)
    for tm in out:
        tm["first_capture_s"] = first
    return out


def run_flow_bench(path: Path, device=None, dtype=None, scenarios=("t2i-1", "t2i-16"), steps: int = 30,
                   repeats: int = 3, warmup: int = 1, baseline_repeats: int | None = None, seed: int = 0,
                   cuda_graphs="auto", progress: bool = True, log=lambda s: print(s, file=sys.stderr)) -> dict:
    dev, dt = resolve_device_dtype(device, dtype)
    t_load = time.perf_counter()
    pipe = load(path, device=dev, dtype=dt, cuda_graphs=cuda_graphs, progress=progress)
    t_load = time.perf_counter() - t_load
    pipe._need_vae()  # the benchmark decodes its images: a missing VAE is said now, not after the first run
    rng = random.Random(seed)
    tflops, how = matmul_throughput(dev, dt)
    baseline_repeats = min(repeats, 2) if baseline_repeats is None else baseline_repeats
    rows = []
    for name in scenarios:
        n, words = FLOW_SCENARIOS[name]
        prompt = random_prompt(rng, words)
        noise = torch.randn(n, pipe.cfg.latent_channels, pipe.cfg.latent_size, pipe.cfg.latent_size,
                            generator=torch.Generator().manual_seed(seed))
        log(f"{name}: {n} image(s), {steps} steps")
        variants = {}

        def ours(cache_prompt=True):
            z = pipe.generate_image_latents(prompt, n, cfg_weight=2.0, steps=steps, latents=noise,
                                            cache_prompt=cache_prompt)
            tm = dict(pipe.last_timings)
            pipe.decode_image_latents(z)
            tm["vae_s"] = pipe.last_timings["vae_s"]
            pipe.last_timings = tm
            ours.z = z
        graphs = pipe.cuda_graphs
        variants["ours"] = _timed(pipe, ours, repeats, warmup)
        z_ours = ours.z
        if graphs:  # the same loop eager: what the graphs add
            pipe.cuda_graphs = False
            try:
                variants["cached, eager"] = _timed(pipe, ours, baseline_repeats, min(warmup, 1))
            finally:
                pipe.cuda_graphs = True
        variants["official loop"] = _timed(pipe, lambda: ours(False), baseline_repeats, min(warmup, 1))
        z_base = ours.z
        flops, flops_official = _step_flops(pipe, prompt, n)
        out = {"name": name, "num_images": n, "steps": steps, "prompt_tokens": pipe.last_timings["prompt_len"],
               "step_flops": flops, "official_step_flops": flops_official,
               "max_abs_latent_diff_vs_official_loop": float((z_ours - z_base).abs().max()), "variants": {}}
        for k, runs in variants.items():
            step = _median(runs, "step_s")
            f = flops_official if k == "official loop" else flops
            out["variants"][k] = {"runs": len(runs), "step_ms": step * 1e3,
                                  "prompt_ms": _median(runs, "prompt_s") * 1e3,
                                  "graph_capture_s": runs[0]["first_capture_s"],
                                  "latents_s": _median(runs, "total_s"), "vae_s": _median(runs, "vae_s"),
                                  "total_s": _median(runs, "wall_s"), "step_tflops": f / step / 1e12,
                                  "matmul_fraction": f / step / 1e12 / tflops,
                                  "cuda_graphs": runs[0]["cuda_graphs"]}
        base = out["variants"]["official loop"]
        for v in out["variants"].values():
            v["step_speedup"] = base["step_ms"] / v["step_ms"]
            v["total_speedup"] = base["total_s"] / v["total_s"]
        rows.append(out)
        log(format_row(out))
    pipe.close()
    return {"kind": "janusflow", "model": str(path), "device": device_info(dev),
            "dtype": str(dt).replace("torch.", ""), "packages": package_versions(), "load_s": t_load,
            "matmul_tflops": tflops, "matmul_how": how, "cfg_weight": 2.0,
            "timing": "perf_counter around each request (host sync at its end), median of runs; per-step = the "
                      "loop's time / steps; VAE = decode_image_latents",
            "scenarios": rows, "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def format_row(r: dict) -> str:
    lines = [f"{r['name']} ({r['num_images']} image(s), {r['steps']} steps, prompt {r['prompt_tokens']} tokens, "
             f"{r['step_flops'] / 1e12:.2f} TFLOP/step, official {r['official_step_flops'] / 1e12:.2f}; latents vs "
             f"official loop max |Δ| "
             f"{r['max_abs_latent_diff_vs_official_loop']:.2e})"]
    for k, v in r["variants"].items():
        lines.append(f"  {k:14s} step {v['step_ms']:9.2f} ms ({v['step_speedup']:.2f}x)  prompt {v['prompt_ms']:7.2f} "
                     f"ms  VAE {v['vae_s']:7.3f} s  total {v['total_s']:8.3f} s ({v['total_speedup']:.2f}x)  "
                     f"{100 * v['matmul_fraction']:5.1f}% of matmul peak")
    return "\n".join(lines)


def format_report(rep: dict) -> str:
    head = (f"JanusFlow bench: {rep['model']} on {rep['device']['device']} ({rep['dtype']}), measured matmul "
            f"{rep['matmul_tflops']:.1f} TFLOP/s ({rep['matmul_how']})")
    return "\n".join([head] + [format_row(r) for r in rep["scenarios"]])


def main(args, path: Path | None = None) -> int:
    """`fastjanus bench` for a JanusFlow checkpoint (args from the CLI parser)."""
    scen = tuple(args.scenario) if args.scenario else tuple(FLOW_SCENARIOS)
    bad = [s for s in scen if s not in FLOW_SCENARIOS]
    if bad:
        raise InputError(f"{arg('scenario')} {bad[0]!r} is not a JanusFlow scenario; choose from "
                         f"{', '.join(FLOW_SCENARIOS)}")
    for flag, v in (("--speculative", args.speculative), ("--quality", args.quality),
                    ("--engine onnx", args.engine == "onnx"), ("--quantize", args.quantize),
                    ("--kv-cache", args.kv_cache), ("--max-rows", args.max_rows), ("--max-len", args.max_len),
                    ("--plot", args.plot), ("--time-limit", args.time_limit), ("--max-batch", args.max_batch),
                    ("--window", args.window), ("--baselines", args.baselines != "torch-eager,transformers"),
                    ("--text-tokens", args.text_tokens != 64)):
        if v:
            raise InputError(f"{flag} does not apply to a JanusFlow benchmark (its baseline is the official loop, "
                             "always run); drop it")
    for flag, v in (("--repeats", args.repeats), ("--baseline-repeats", args.baseline_repeats or 1)):
        if not isinstance(v, int) or v < 1:
            raise InputError(f"{flag} must be an integer >= 1, got {v!r}")
    if args.warmup < 0:
        raise InputError(f"--warmup must be an integer >= 0, got {args.warmup}")
    steps = 30 if args.steps is None else args.steps
    from ..engine.flow_pipeline import check_steps
    check_steps(steps)
    if path is None:
        path = Path(args.model) if args.model else cached_random_model(args.arch, progress=not args.quiet)
    rep = run_flow_bench(path, args.device, args.dtype, scen, steps, args.repeats, args.warmup,
                         args.baseline_repeats, args.seed or 0,
                         {"auto": "auto", "on": True, "off": False}[args.cuda_graphs], progress=not args.quiet)
    print(format_report(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
