"""`fastjanus bench`: latency, throughput, peak memory and roofline of every scenario, next to the baselines
a user would pick instead, in one run.

Method. Each scenario runs `warmup` untimed times, then `repeats` timed times with a fresh random prompt (or
image and question) and a fresh seed per repeat; the device is synchronised around every timed region and
the time is read from `time.perf_counter`. The report gives the median with min and max. Decode-step
bytes (weights read + KV read and written) come from the shapes and the prompt lengths actually used; the
copy bandwidth and matmul throughput they are compared with are measured at the start of the same run.
Baselines run after all fastjanus scenarios (so the peaks measured for fastjanus hold only its own model),
on the same weights and the same prompts and seeds.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import check_speculative
from ..errors import InputError, arg
from ..quant import check_kv_cache, check_scheme
from ..random_init import cached_random_model
from . import roofline as rl
from .roofline import sync as _sync

SCENARIOS = ("t2i-1", "t2i-16", "throughput", "siglip", "vq-decode", "understand")
BASELINES = ("torch-eager", "transformers")
ARCHES = ("tiny", "janus-1.3b", "janus-pro-1b", "janus-pro-7b")
ENGINES = ("torch", "onnx")

_WORDS = ("red fox cabin lake mountain astronaut city night neon forest river castle cat dog portrait oil "
          "painting watercolor sunset snow desert ocean robot garden library tower bridge market train "
          "storm lighthouse violin owl dragon tea ceramic glass marble autumn spring winter summer misty "
          "golden detailed cinematic soft light wide angle macro photo").split()


@dataclass
class BenchConfig:
    arch: str | None = "tiny"
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    backend: str | None = None
    cuda_graphs: bool | str = "auto"
    scenarios: tuple[str, ...] = SCENARIOS
    baselines: tuple[str, ...] = BASELINES
    repeats: int = 3
    warmup: int = 1
    baseline_repeats: int | None = None  # None: min(repeats, 2) (the baselines are slow; their spread is wide)
    max_batch: int | None = None  # images for the throughput scenario; None: from free memory (CUDA), 8 on CPU
    text_tokens: int = 64  # new tokens per understanding run (EOS ignored so every run decodes this many)
    prompt_words: int = 12
    seed: int = 0
    progress: bool = True
    time_limit: float | None = None  # seconds: no new run starts after it (what is left out is reported)
    max_rows: int | None = None  # memory plan overrides, passed to fastjanus.load
    max_len: int | None = None
    quantize: str | None = None  # "int8" | "fp8": 8-bit weights, quantized at load (fastjanus/quant.py)
    quantize_heads: bool = False
    kv_cache: str | None = None  # "fp8": an e4m3 KV cache
    quality: bool = False  # also measure the 8-bit model's error against the unquantized one (bench/quant_quality)
    quality_prompts: int = 32
    engine: str = "torch"  # "onnx": also time SigLIP and the VQ decoder on ONNX Runtime (rows siglip[onnx] ...)
    speculative: int | None = None  # a window: each image scenario also runs with speculative decoding ([spec W])

    def __post_init__(self):
        if (self.arch is None) == (self.model is None):
            raise InputError("give exactly one of arch (a preset with cached random weights) or model (a folder)")
        if self.arch is not None and self.arch not in ARCHES:
            raise InputError(f"arch must be one of {ARCHES}, got {self.arch!r}")
        self.scenarios = tuple(self.scenarios)
        self.baselines = tuple(self.baselines)
        for s in self.scenarios:
            if s not in SCENARIOS:
                raise InputError(f"unknown {arg('scenario')} {s!r}; choose from {', '.join(SCENARIOS)}")
        for b in self.baselines:
            if b not in BASELINES:
                raise InputError(f"unknown baseline {b!r} in {arg('baselines')}; choose from {', '.join(BASELINES)} "
                                 "(or none)")
        if not self.scenarios:
            raise InputError("no scenario selected")
        if self.engine not in ENGINES:
            raise InputError(f"{arg('engine')} must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "onnx" and not {"siglip", "vq-decode"} & set(self.scenarios):
            raise InputError(f"{arg('engine')} onnx times SigLIP and the VQ decoder: select the siglip or "
                             "vq-decode scenario (or all)")
        if self.engine == "onnx":  # before the checkpoint is written or loaded
            from ..export.onnx_io import require
            require("onnx")
            require("onnxruntime")
        if self.quantize is not None:
            check_scheme(self.quantize)
        check_kv_cache(self.kv_cache)
        if self.quality and self.quantize is None and self.kv_cache is None:
            raise InputError(f"{arg('quality')} compares an 8-bit model with the unquantized one: add "
                             f"{arg('quantize')} (and/or {arg('kv_cache')})")
        for name, lo in (("repeats", 1), ("warmup", 0), ("text_tokens", 2), ("prompt_words", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise InputError(f"{arg(name)} must be an integer >= {lo}, got {v!r}")
        for name in ("baseline_repeats", "max_batch"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise InputError(f"{arg(name)} must be an integer >= 1 (or left out), got {v!r}")
        if self.speculative is not None:
            check_speculative(True, self.speculative)
            if self.kv_cache is not None:
                raise InputError(f"{arg('speculative')} does not support {arg('kv_cache')} {self.kv_cache} yet; drop "
                                 "one of them")
        if self.time_limit is not None and (not isinstance(self.time_limit, (int, float)) or
                                            isinstance(self.time_limit, bool) or not self.time_limit > 0):
            raise InputError(f"{arg('time_limit')} must be a number of seconds > 0, got {self.time_limit!r}")


# ------------------------------------------------------------------------------------------ helpers
def _stats(xs: list[float]) -> dict:
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs)}


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def random_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def random_image(rng: random.Random, size: int):
    from PIL import Image
    data = bytes(rng.getrandbits(8) for _ in range(size * size * 3)) if size <= 64 else \
        torch.randint(0, 256, (size, size, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(rng.getrandbits(31))).numpy().tobytes()
    return Image.frombytes("RGB", (size, size), data)


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        driver = None
        try:
            import subprocess
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
        return {"device": torch.cuda.get_device_name(device), "platform": "cuda", "driver": driver,
                "cuda": torch.version.cuda, "sm": f"{p.major}.{p.minor}", "memory_bytes": p.total_memory,
                "multiprocessors": p.multi_processor_count}
    cpu = platform.processor() or platform.machine()
    return {"device": f"CPU ({cpu}, {torch.get_num_threads()} threads)", "platform": "cpu", "driver": None,
            "cuda": None}


def package_versions() -> dict:
    """Versions of what the numbers depend on (None: not installed)."""
    from importlib import metadata
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "numpy", "transformers", "onnxruntime", "onnxruntime-gpu", "onnx", "flash-attn",
                 "tokenizers", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _triton_version() -> str:
    from ..kernels import triton_status
    ok, _, info = triton_status()
    return info if ok else f"unavailable ({info})"


def _scenario(name: str, num_images, times: list[float], **extra) -> dict:
    d = {"name": name, "num_images": num_images, **_stats(times), "runs": len(times), "decode_step_ms": None,
         "bytes_per_step": None, "bandwidth_gbs": None, "roofline_fraction": None, "peak_mem_bytes": None,
         "baselines": {}}
    d.update(extra)
    return d


# ----------------------------------------------------------------------------------------- the runs
class OutOfTime(Exception):
    """The time limit came before a scenario had one timed run."""


class _Runner:
    """Runs one scenario's callable with warm-up, repeats and progress; each call gets the repeat index.

    With a deadline (--time-limit), no run starts once the deadline has passed or when the last run's
    duration says it would end after it; a scenario keeps the timed runs it has (its `runs` says how many),
    and one with none raises OutOfTime."""

    def __init__(self, cfg: BenchConfig, device: torch.device, deadline: float | None = None):
        self.cfg, self.device, self.deadline = cfg, device, deadline
        self.cut: list[str] = []  # scenarios that ran fewer repeats than asked

    def out_of_time(self, need: float = 0.0) -> bool:
        return self.deadline is not None and time.perf_counter() + need > self.deadline

    def repeat(self, what: str, fn, repeats: int, first_guess: float = 0.0) -> list[dict]:
        """first_guess: seconds the first run is expected to take (0: unknown); later runs use the last one's."""
        rows = []
        total = self.cfg.warmup + repeats
        it = range(total)
        if self.cfg.progress:
            from tqdm import tqdm
            it = tqdm(it, desc=what, unit="run", leave=False, file=sys.stderr)
        last = first_guess
        for i in it:
            if self.out_of_time(last):
                if not rows:
                    raise OutOfTime(f"{what}: the time limit came before its first timed run")
                self.cut.append(f"{what}: {len(rows)} of {repeats} timed runs (time limit)")
                break
            t = time.perf_counter()
            r = fn(i - self.cfg.warmup if i >= self.cfg.warmup else -1 - i)
            last = time.perf_counter() - t
            if i >= self.cfg.warmup:
                rows.append(r)
        return rows


def _t2i_inputs(cfg: BenchConfig, idx: int) -> tuple[str, int]:
    """The prompt and seed of repeat idx (warm-ups get negative idx): the same for fastjanus and baselines."""
    rng = random.Random(cfg.seed * 1_000_003 + idx)
    return random_prompt(rng, cfg.prompt_words), (cfg.seed * 1_000_003 + idx) % (2 ** 62)


def _fj_t2i(pipe, n: int, prompt: str, seed: int, window: int | None = None) -> dict:
    """window: speculative decoding with that window (the row also gets its passes and codes per pass)."""
    from ..image import to_pil
    dev = pipe.device
    _sync(dev)
    t0 = time.perf_counter()
    codes = pipe.generate_image_tokens(prompt, num_images=n, seed=seed, temperature=1.0, cfg_weight=5.0,
                                       speculative=window is not None, window=window or 16)
    tm = dict(pipe.last_timings)
    t1 = time.perf_counter()
    to_pil(pipe.decode_image_pixels(codes))  # .cpu() inside: synchronises
    t2 = time.perf_counter()
    out = {"total_s": t2 - t0, "prefill_s": tm["prefill_s"], "decode_s": tm["decode_s"], "vq_decode_s": t2 - t1,
           "steps": tm["steps"], "prompt_len": len(pipe.tokenizer.generation_prompt(prompt))}
    if window is not None:
        out.update(passes=tm["passes"], passes_needed=tm["passes_needed"], codes_per_pass=tm["codes_per_pass"])
    return out


# shown with every speculative figure
ACCEPTANCE_NOTE = ("random weights: acceptance depends on the model's entropy, so these passes and codes per pass "
                   "say little about a trained checkpoint; the time per pass does not depend on the weights")


def hf_image_generation_config(tk, num_images: int, image_tokens: int):
    """transformers' settings for the same sampling as fastjanus's: CFG 5, temperature 1, the full codebook.
    top_k=0 matters: left unset (or None) transformers applies its default top-k of 50."""
    from transformers import GenerationConfig
    return GenerationConfig(bos_token_id=tk.bos_id, pad_token_id=tk.pad_id, eos_token_id=tk.eos_id,
                            guidance_scale=5.0, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                            num_return_sequences=num_images, max_new_tokens=image_tokens,
                            generation_kwargs={"boi_token_id": tk.boi_id})


def _hf_t2i(hf, pipe, n: int, prompt: str, seed: int) -> dict:
    """Timed like _fj_t2i: from the prompt string (tokenization included) to pixels on the host."""
    from ..image import to_pil
    from .hf_port import generate_image_codes
    tk, dev = pipe.tokenizer, pipe.device
    gc = hf_image_generation_config(tk, n, pipe.cfg.num_image_tokens)
    torch.manual_seed(seed)
    _sync(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ids = torch.tensor([tk.generation_prompt(prompt)], device=dev)
        codes = generate_image_codes(hf, ids, gc, pipe.cfg.num_image_tokens)
        _sync(dev)
        t1 = time.perf_counter()
        px = hf.decode_image_tokens(codes)  # [N, H, W, 3] in transformers 5.x
        to_pil(px.permute(0, 3, 1, 2) if px.shape[-1] == 3 else px)
    t2 = time.perf_counter()
    return {"total_s": t2 - t0, "generate_s": t1 - t0, "vq_decode_s": t2 - t1}


def _understand_inputs(cfg: BenchConfig, pipe, idx: int):
    rng = random.Random(cfg.seed * 7_000_003 + idx)
    return random_image(rng, pipe.cfg.vision.image_size), random_prompt(rng, 6) + "?"


def _fj_understand(pipe, image, question: str, n: int) -> dict:
    _sync(pipe.device)
    ids = pipe.answer_ids(image, question, max_new_tokens=n, temperature=0.0, ignore_eos=True)
    tm = pipe.last_timings
    assert len(ids) == n, (len(ids), n)
    return {"ttft_s": tm["time_to_first_token_s"], "total_s": tm["total_s"],
            "decode_s": tm["total_s"] - tm["time_to_first_token_s"], "new_tokens": n,
            "prompt_len": tm["prompt_len"]}


def _hf_understand(hf, pipe, image, question: str, n: int) -> dict:
    """Timed like _fj_understand: tokenization and image preprocessing inside the timed region."""
    from ..image import preprocess
    tk, dev = pipe.tokenizer, pipe.device
    out = {}
    with torch.inference_mode():
        for key, m in (("ttft_s", 1), ("total_s", n)):
            _sync(dev)
            t0 = time.perf_counter()
            ids = torch.tensor([tk.understanding_prompt(question, pipe.cfg.vision.num_patches)], device=dev)
            px = preprocess(image, tk.processor)[None].to(dev, pipe.dtype)
            hf.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), do_sample=False,
                        eos_token_id=tk.eos_id, pad_token_id=tk.eos_id, max_new_tokens=m, min_new_tokens=m)
            _sync(dev)
            out[key] = time.perf_counter() - t0
    out["decode_s"] = out["total_s"] - out["ttft_s"]
    return out


def largest_batch(pipe, cfg: BenchConfig, prompt_len: int) -> tuple[int, str]:
    """Images for the throughput scenario: the largest power of two whose KV cache, decode workspace and VQ
    decode batch (8 images) fit in the free device memory with a 10% margin; capped at 256."""
    if cfg.max_batch is not None:
        return cfg.max_batch, "--max-batch"
    plan = pipe.memory_plan
    if plan is not None and pipe.device.type == "cuda":  # the static runtime: the largest bucket that holds it
        fits = [r // 2 for r in plan.buckets if plan.capacity(r) >= prompt_len + plan.image_tokens]
        return max(fits, default=1), f"largest bucket of the memory plan ({plan.source})"
    if pipe.device.type != "cuda":
        return 8, "CPU default (8 images)"
    from ..engine import memory as mem
    torch.cuda.empty_cache()  # the blocks freed by earlier scenarios count as free
    free, _ = torch.cuda.mem_get_info(pipe.device)
    elem = torch.empty(0, dtype=pipe.dtype).element_size()
    kv_elem = pipe.model.kv_dtype.itemsize  # 1 with an FP8 KV cache
    c = pipe.cfg
    best = 1
    n = 1
    while n <= 256:
        need = (mem.kv_cache_bytes(c.language, kv_elem, 2 * n, prompt_len + c.num_image_tokens)
                + mem.decode_workspace_bytes(c, 2 * n) + mem.prefill_workspace_bytes(c, 2 * n, prompt_len, elem)
                + mem.vq_decode_bytes(c, min(n, 8), elem))
        if need > 0.9 * free:
            break
        best = n
        n *= 2
    return best, f"largest power of two fitting {free / 2 ** 30:.1f} GiB free (estimate, capped at 256)"


BASELINE_FIRST_RUN_GUESS = 10  # a baseline's first run is guessed at 10x fastjanus's median (the speed target)


def step_kernels(pipe) -> dict | str:
    """Kernels of one image and one text decode step (bench/step_kernels.py), or why they could not be counted:
    the count is a side result and never stops the benchmark."""
    try:
        from .step_kernels import count_pipeline
        return count_pipeline(pipe, profile=False)  # the profiler would stay loaded and slow the baselines
    except Exception as e:
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _onnx_engine(path: Path, dtype: torch.dtype, log):
    """Export SigLIP and the VQ decoder of `path` into a scratch folder and open them on ONNX Runtime (providers
    "auto"). fp16 graphs for a 16-bit run on a GPU provider, fp32 on the CPU provider (its fp16 kernels are few).
    The sessions hold the graphs in memory, so the folder is removed at once. Returns (OrtVision, what the
    report records)."""
    import tempfile

    import onnxruntime

    from ..export.onnx_export import export_onnx
    from ..export.ort_runtime import OrtVision, choose_providers
    first = choose_providers("auto")[0]
    onnx_dtype = "fp32" if dtype == torch.float32 or first == "CPUExecutionProvider" else "fp16"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastjanus-bench-onnx-") as tmp:
        m = export_onnx(path, tmp, parts="vision,vq-decoder", dtype=onnx_dtype, progress=lambda s: None)
        ov = OrtVision(tmp, "auto")
    info = {"onnxruntime": onnxruntime.__version__, "available_providers": onnxruntime.get_available_providers(),
            "providers": ov.providers, "dtype": m["dtype"], "opset": m["opset"],
            "export_s": round(time.perf_counter() - t0, 1)}
    log(f"ONNX Runtime {info['onnxruntime']}: SigLIP and the VQ decoder exported ({m['dtype']}) and opened on "
        f"{ov.provider} in {info['export_s']} s")
    return ov, info


def run_bench(cfg: BenchConfig, log=lambda s: print(s, file=sys.stderr), on_update=None) -> dict:
    """Every scenario, then the baselines; returns the report. on_update(report) gets the report so far after
    each scenario and each baseline (`partial: true`), so that a run stopped from outside still leaves one."""
    from ..engine.pipeline import (JanusPipeline, load, resolve_backend, resolve_cuda_graphs,
                                   resolve_device_dtype)
    from ..image import preprocess

    t_begin = time.perf_counter()
    deadline = None if cfg.time_limit is None else t_begin + cfg.time_limit
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    resolve_cuda_graphs(cfg.cuda_graphs, device, resolve_backend(cfg.backend, device))  # before any checkpoint
    path = Path(cfg.model) if cfg.model else cached_random_model(cfg.arch, progress=cfg.progress)
    # warmup=True: every bucket's graph is captured (or its kernels compiled) here, not in a timed run
    pipe = load(path, device=device, dtype=dtype, progress=cfg.progress, backend=cfg.backend,
                cuda_graphs=cfg.cuda_graphs, max_rows=cfg.max_rows, max_len=cfg.max_len, warmup=True,
                quantize=cfg.quantize, quantize_heads=cfg.quantize_heads, kv_cache=cfg.kv_cache)
    log(f"loaded {path} on {device} ({str(dtype).replace('torch.', '')}, {pipe.backend} backend, "
        f"CUDA graphs {'on' if pipe.cuda_graphs else 'off'}) in {pipe.load_timings['load_s']:.1f} s, "
        f"warm-up (capture) {pipe.load_timings['warmup_s']:.1f} s")
    kernels: dict | str = "not counted yet (counted after the scenarios, off the clock)"
    ort_vision, onnx_info = None, None
    if cfg.engine == "onnx":
        ort_vision, onnx_info = _onnx_engine(path, dtype, log)
    jc = pipe.cfg
    model, plan = pipe.model, pipe.memory_plan
    load_timings = dict(pipe.load_timings)
    elem = torch.empty(0, dtype=dtype).element_size()
    quant, kv_elem = pipe.quantization, model.kv_dtype.itemsize  # what a step really reads
    quantization = None if quant is None and cfg.kv_cache is None else {
        "weights": None if quant is None else quant.to_dict(), "kv_cache": cfg.kv_cache,
        "weight_bytes_loaded": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "at_load": cfg.quantize is not None}
    quality: dict | str | None = None
    info = device_info(device)
    if info["platform"] == "cpu":
        log("NOTE: CPU run. These numbers check the harness; they are not GPU figures.")

    t_start = time.perf_counter()
    bw, bw_method = rl.copy_bandwidth(device)
    tflops, mm_method = rl.matmul_throughput(device, dtype)
    log(f"measured: copy bandwidth {bw:.0f} GB/s, matmul {tflops:.1f} TFLOP/s")
    runner = _Runner(cfg, device, deadline)
    out_of_time: list[str] = []  # what the time limit left out
    reps_b = cfg.baseline_repeats or min(cfg.repeats, 2)
    scenarios: list[dict] = []
    pending: list[tuple[dict, str]] = []  # (scenario, kind) for the baselines, run after every fastjanus scenario
    skipped: dict[str, str] = {}
    failed: dict[str, dict[str, str]] = {}
    versions = package_versions()  # once: the report is rebuilt after every scenario

    def report(partial: bool) -> dict:
        L = jc.language
        return {
            **info,
            "label": "CPU run: checks the harness, not a GPU figure" if info["platform"] == "cpu" else "GPU run",
            "partial": partial,
            "dtype": str(dtype).replace("torch.", ""), "arch": cfg.arch or "custom", "model_path": str(path),
            "torch": torch.__version__, "triton": _triton_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "backend": pipe.backend, "cuda_graphs": pipe.cuda_graphs,
            "memory_plan": None if plan is None else {
                "pool_bytes": plan.pool_bytes, "buckets": plan.buckets, "max_len": plan.max_len,
                "source": plan.source},
            "load_s": load_timings["load_s"], "warmup_s": load_timings["warmup_s"],
            "versions": versions,
            "step_kernels": kernels,
            "quantization": quantization,
            "quality": quality,
            "onnx": onnx_info,
            "shapes": {"hidden": L.hidden_size, "layers": L.num_hidden_layers, "heads": L.num_attention_heads,
                       "kv_heads": L.num_key_value_heads, "intermediate": L.intermediate_size,
                       "image_tokens": jc.num_image_tokens, "codebook": jc.vq.codebook_size,
                       "vision_image_size": jc.vision.image_size, "vq_image_size": jc.vq.image_size},
            "method": {"repeats": cfg.repeats, "warmup": cfg.warmup, "baseline_repeats": reps_b,
                       "timer": "time.perf_counter with the device synchronised around each timed region",
                       "inputs": "fresh random prompt (or image + question) and seed per repeat, shared with "
                                 "baselines",
                       "sampling": "image: temperature 1, cfg 5, full codebook (no top-k/top-p, transformers "
                                   "top_k=0); text: greedy, EOS ignored",
                       "decode_step": "decode-loop time / (image tokens - 1) decode steps; the loop also runs the "
                                      "first head + sample and copies the codes to the host (a <0.5% overcount)",
                       "copy_bandwidth": bw_method, "matmul": mm_method,
                       "bytes_per_step": "weights read (decoder, norm and the step's head) + K/V of all cached "
                                         "slots read + one slot written, per row, at the mean cached length of "
                                         "the loop",
                       "flops": "torch.utils.flop_counter.FlopCounterMode on the real shapes (matmul/conv/"
                                "attention)"},
            "copy_bandwidth_gbs": bw, "matmul_tflops": tflops,
            "scenarios": scenarios, "baselines_skipped": skipped, "baselines_failed": failed,
            "time_limit": {"limit_s": cfg.time_limit, "skipped": out_of_time, "cut": runner.cut},
        }

    def update() -> None:
        if on_update is not None:
            on_update(copy.deepcopy(report(partial=True)))  # a snapshot: the lists grow on

    def decode_roof(sc: dict, step_s: float, nbytes: int) -> None:
        sc["decode_step_ms"] = step_s * 1e3
        sc["bytes_per_step"] = int(nbytes)
        sc["bandwidth_gbs"] = nbytes / step_s / 1e9
        sc["roofline_fraction"] = sc["bandwidth_gbs"] / bw

    def t2i(name: str, n: int, throughput: bool = False, why: str | None = None) -> None:
        _reset_peak(device)
        # the first run's time, guessed from the last image scenario: linear in images (an upper bound for a
        # memory-bound decode), so that the time limit does not start a run it cannot finish
        prev = [sc for sc in scenarios if "breakdown" in sc]
        guess = prev[-1]["median_s"] * max(1.0, n / prev[-1]["num_images"]) if prev else 0.0
        rows = runner.repeat(name, lambda i: _fj_t2i(pipe, n, *_t2i_inputs(cfg, i)), cfg.repeats, guess)
        sc = _scenario(name, n, [r["total_s"] for r in rows],
                       breakdown={k: _median(rows, k) for k in ("prefill_s", "decode_s", "vq_decode_s")},
                       prompt_len=statistics.mean(r["prompt_len"] for r in rows), peak_mem_bytes=_peak(device))
        steps = rows[0]["steps"] - 1  # decode forwards; the first code comes from the prefill's hidden state
        decode_roof(sc, sc["breakdown"]["decode_s"] / steps,
                    rl.mean_image_step_bytes(jc, elem, n, sc["prompt_len"], quant, kv_elem))
        if throughput:
            sc["images_per_s"] = n / sc["median_s"]
            sc["batch_rule"] = why
        scenarios.append(sc)
        pending.append((sc, "t2i"))
        if cfg.speculative is not None:
            t2i_spec(sc, cfg.speculative)

    def t2i_spec(plain: dict, window: int) -> None:
        """The same requests (prompts, seeds) with speculative decoding, against the plain row of this run."""
        _reset_peak(device)
        n = plain["num_images"]
        name = f"{plain['name']}[spec{window}]"
        rows = runner.repeat(name, lambda i: _fj_t2i(pipe, n, *_t2i_inputs(cfg, i), window=window), cfg.repeats,
                             plain["median_s"])
        sc = _scenario(name, n, [r["total_s"] for r in rows],
                       breakdown={k: _median(rows, k) for k in ("prefill_s", "decode_s", "vq_decode_s")},
                       prompt_len=plain["prompt_len"], peak_mem_bytes=_peak(device))
        passes = _median(rows, "passes")
        # a pass reads what a step reads (weights + KV) plus the window's few rows: the step's bytes are its floor
        decode_roof(sc, sc["breakdown"]["decode_s"] / passes, plain["bytes_per_step"])
        sc["speculative"] = {"window": window, "passes": passes, "passes_needed": _median(rows, "passes_needed"),
                             "codes_per_pass": _median(rows, "codes_per_pass"),
                             "pass_vs_step": sc["decode_step_ms"] / plain["decode_step_ms"],
                             "speedup_vs_plain": plain["median_s"] / sc["median_s"], "note": ACCEPTANCE_NOTE}
        if "images_per_s" in plain:
            sc["images_per_s"] = n / sc["median_s"]
            sc["batch_rule"] = plain["batch_rule"]
        scenarios.append(sc)

    def compute_bound(name: str, make_input, fn, flops: int | None = None) -> int:
        """One image through fn (SigLIP or the VQ decoder), against the measured matmul throughput. flops: the
        count of the same work (the ONNX rows reuse the torch module's); returns it."""
        _reset_peak(device)

        def once(i):
            x = make_input(i)
            _sync(device)
            s = time.perf_counter()
            with torch.inference_mode():
                fn(x)
            _sync(device)
            return {"s": time.perf_counter() - s, "x": x}
        rows = runner.repeat(name, once, cfg.repeats)
        peak = _peak(device)
        if flops is None:
            with torch.inference_mode():
                flops = rl.count_flops(lambda: fn(rows[0]["x"]))
        sc = _scenario(name, 1, [r["s"] for r in rows], peak_mem_bytes=peak, flops=flops)
        sc["tflops"] = flops / sc["median_s"] / 1e12
        sc["roofline_fraction"] = sc["tflops"] / tflops
        if ort_vision is not None and name.endswith("[onnx]"):
            sc["engine"] = {"name": "onnxruntime", "providers": ort_vision.providers, "dtype": ort_vision.dtype}
            sc["peak_mem_bytes"] = None  # torch's allocator does not see ONNX Runtime's memory
            on_cpu = all(p == "CPUExecutionProvider" for p in ort_vision.providers.values())
            if on_cpu != (device.type == "cpu"):  # the matmul roof was measured on the other device
                sc["roofline_fraction"] = None
        scenarios.append(sc)
        return flops

    def scenario(name: str) -> None:
        if name in ("t2i-1", "t2i-16"):
            t2i(name, int(name.split("-")[1]))
        elif name == "throughput":
            n, why = largest_batch(pipe, cfg, len(pipe.tokenizer.generation_prompt(_t2i_inputs(cfg, 0)[0])) + 8)
            t2i("throughput", n, throughput=True, why=why)
        elif name == "siglip":
            proc, size = pipe.tokenizer.processor, jc.vision.image_size
            pixels = (lambda i: preprocess(random_image(random.Random(cfg.seed + 31 * i), size), proc)[None])
            flops = compute_bound("siglip", lambda i: pixels(i).to(device, dtype), pipe.model.encode_images)
            if ort_vision is not None:  # the same images, as the float32 numpy array the graph takes
                compute_bound("siglip[onnx]", lambda i: pixels(i).numpy(), ort_vision.encode, flops)
        elif name == "vq-decode":
            codes = (lambda i: torch.randint(0, jc.vq.codebook_size, (1, jc.num_image_tokens),
                                             generator=torch.Generator().manual_seed(i + 99)))
            flops = compute_bound("vq-decode", codes, pipe.decode_image_pixels)
            if ort_vision is not None:  # pixels and the uint8 images, both outputs of the graph
                compute_bound("vq-decode[onnx]", lambda i: codes(i).numpy(), ort_vision.decode, flops)
        elif name == "understand":
            _reset_peak(device)
            n = cfg.text_tokens
            rows = runner.repeat("understand", lambda i: _fj_understand(pipe, *_understand_inputs(cfg, pipe, i), n),
                                 cfg.repeats)
            peak = _peak(device)
            plen = statistics.mean(r["prompt_len"] for r in rows)
            ttft = _scenario("understand-ttft", 1, [r["ttft_s"] for r in rows], peak_mem_bytes=peak, prompt_len=plen)
            dec = _scenario("understand-decode", 1, [r["decode_s"] for r in rows], peak_mem_bytes=peak,
                            prompt_len=plen, new_tokens=n)
            dec["tokens_per_s"] = (n - 1) / dec["median_s"]
            decode_roof(dec, dec["median_s"] / (n - 1), rl.mean_text_step_bytes(jc, elem, plen, n - 1, quant, kv_elem))
            scenarios.extend([ttft, dec])
            pending.append(((ttft, dec), "understand"))

    for name in cfg.scenarios:
        try:
            scenario(name)
        except OutOfTime:
            out_of_time.append(name)
        update()
    kernels = step_kernels(pipe)
    update()
    pipe.close()  # fastjanus's KV pool and graphs go: the baselines get the memory (model: kept above)

    # ---- baselines, after every fastjanus number (so the peaks above hold only fastjanus's own model)
    want = [b for b in BASELINES if b in cfg.baselines]
    for b in BASELINES:
        if b not in cfg.baselines:
            skipped[b] = "not requested (--baselines)"
    if not pending:
        for b in want:
            skipped[b] = "no scenario here has this baseline (t2i-1, t2i-16, throughput and understand do)"
        want = []
    if "transformers" in want and (quant is not None or cfg.kv_cache is not None):
        skipped["transformers"] = ("8-bit weights or an FP8 KV cache: the transformers port would run other "
                                   "arithmetic; compare with a bench run of the unquantized model instead")
        want.remove("transformers")
    if "torch-eager" in want and pipe.backend == "torch":
        skipped["torch-eager"] = "the measured configuration already is fastjanus's plain-torch eager path"
        want.remove("torch-eager")
    hf = base = None
    log(f"fastjanus scenarios done in {time.perf_counter() - t_start:.0f} s")
    if "transformers" in want:
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            skipped["transformers"] = f"transformers is not installed ({e}); pip install 'transformers>=5.0'"
            want.remove("transformers")
    for b in want:
        if runner.out_of_time():
            out_of_time.extend(f"{b} {sc['name'] if kind == 't2i' else 'understand'}" for sc, kind in pending)
            continue
        if b == "torch-eager":
            base = JanusPipeline(model, pipe.tokenizer, device, dtype, pipe.weights, pipe.path, backend="torch")
            t2i_fn = lambda sc, i: _fj_t2i(base, sc["num_images"], *_t2i_inputs(cfg, i))  # noqa: E731
            und_fn = lambda i: _fj_understand(base, *_understand_inputs(cfg, pipe, i), cfg.text_tokens)  # noqa: E731
        else:
            from transformers.utils import logging as hf_logging

            from .hf_port import build_hf_model
            hf_verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # its per-call notes about max_length would drown the progress bars
            log("building the transformers Janus port from the loaded weights ...")
            try:
                hf = build_hf_model(model, pipe.tokenizer, device, dtype, attn="sdpa")
            except Exception as e:  # an incompatible transformers version: report, do not abort the run
                skipped[b] = f"could not build the transformers Janus port: {type(e).__name__}: {e}"
                continue
            t2i_fn = lambda sc, i: _hf_t2i(hf, pipe, sc["num_images"], *_t2i_inputs(cfg, i))  # noqa: E731
            und_fn = lambda i: _hf_understand(hf, pipe, *_understand_inputs(cfg, pipe, i), cfg.text_tokens)  # noqa: E731
        t_b = time.perf_counter()
        for sc, kind in pending:
            what = sc["name"] if kind == "t2i" else "understand"
            ours = sc["median_s"] if kind == "t2i" else sc[0]["median_s"] + sc[1]["median_s"]
            try:
                rows = runner.repeat(f"{b} {what}", (lambda i, sc=sc: t2i_fn(sc, i)) if kind == "t2i" else und_fn,
                                     reps_b, BASELINE_FIRST_RUN_GUESS * ours)
            except OutOfTime:
                out_of_time.append(f"{b} {what}")
                continue
            except Exception as e:  # e.g. out of memory at the throughput batch: keep every other number
                failed.setdefault(b, {})[what] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if kind == "t2i":
                st = _stats([r["total_s"] for r in rows])
                sc["baselines"][b] = {**st, "speedup": st["median_s"] / sc["median_s"]}
                for k in ("decode_s", "generate_s"):  # torch-eager: the decode loop; transformers: generate()
                    if k in rows[0]:
                        sc["baselines"][b][k] = _median(rows, k)
            else:
                for s, key in zip(sc, ("ttft_s", "decode_s")):
                    st = _stats([r[key] for r in rows])
                    s["baselines"][b] = {**st, "speedup": st["median_s"] / s["median_s"]}
            update()
        log(f"baseline {b}: {time.perf_counter() - t_b:.0f} s")
        if hf is not None:
            del hf
            hf = None
            hf_logging.set_verbosity(hf_verbosity)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if cfg.quality:
        if runner.out_of_time():
            out_of_time.append("quality")
        else:
            from .quant_quality import measure
            log("measuring the quality of the 8-bit model against the unquantized one ...")
            model = base = None  # noqa: F841  the float reference model needs the memory
            quality = measure(path, cfg.quantize, cfg.quantize_heads, n_prompts=cfg.quality_prompts,
                              kv_cache=cfg.kv_cache is not None, device=device, dtype=dtype, backend=cfg.backend,
                              seed=cfg.seed, log=log)
    return report(partial=False)


# --------------------------------------------------------------------------------------- reporting
def _fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def format_table(rep: dict) -> str:
    head = [f"fastjanus bench  {rep['arch']}  {rep['device']}  {rep['dtype']}  backend {rep['backend']}  "
            f"graphs {rep['cuda_graphs']}  torch {rep['torch']}  triton {rep['triton']}",
            f"copy bandwidth {rep['copy_bandwidth_gbs']:.0f} GB/s, matmul {rep['matmul_tflops']:.1f} TFLOP/s "
            f"(measured in this run); median of {rep['method']['repeats']} after {rep['method']['warmup']} warm-up "
            f"(baselines: median of {rep['method']['baseline_repeats']})"]
    q = rep.get("quantization")
    if q:
        w = q["weights"]
        what = "float weights" if w is None else w["weights"] + " weights" + (" + heads" if w["heads"] else "")
        head.append(f"quantized: {what}{' (at load)' if q['at_load'] else ''}, KV cache "
                    f"{q['kv_cache'] or rep['dtype']}, {q['weight_bytes_loaded'] / 2 ** 30:.2f} GiB of tensors loaded")
    if rep["platform"] == "cpu":
        head.insert(0, "*** CPU RUN: these numbers check the harness; they are NOT GPU figures ***")
    names = sorted({b for s in rep["scenarios"] for b in s["baselines"]})
    cols = f"{'scenario':18s} {'imgs':>4s} {'median':>9s} {'min':>9s} {'max':>9s} {'step':>9s} {'GB/s':>7s} " \
           f"{'roof':>5s} {'peak MiB':>9s}" + "".join(f" {n + ' x':>16s}" for n in names)
    lines = head + [cols]
    for s in rep["scenarios"]:
        step = f"{s['decode_step_ms']:.3f}ms" if s["decode_step_ms"] is not None else "-"
        gbs = f"{s['bandwidth_gbs']:.0f}" if s["bandwidth_gbs"] is not None else "-"
        roof = f"{s['roofline_fraction']:.0%}" if s["roofline_fraction"] is not None else "-"
        peak = f"{s['peak_mem_bytes'] / 2 ** 20:.0f}" if s["peak_mem_bytes"] is not None else "-"
        n = "-" if s["num_images"] is None else str(s["num_images"])
        row = f"{s['name']:18s} {n:>4s} {_fmt_s(s['median_s']):>9s} {_fmt_s(s['min_s']):>9s} " \
              f"{_fmt_s(s['max_s']):>9s} {step:>9s} {gbs:>7s} {roof:>5s} {peak:>9s}"
        for b in names:
            r = s["baselines"].get(b)
            row += f" {(_fmt_s(r['median_s']) + ' ' + format(r['speedup'], '.1f') + 'x') if r else '-':>16s}"
        lines.append(row)
        extra = []
        if "breakdown" in s:
            bd = s["breakdown"]
            extra.append(f"prefill {_fmt_s(bd['prefill_s'])}, decode {_fmt_s(bd['decode_s'])}, "
                         f"VQ decode {_fmt_s(bd['vq_decode_s'])}")
        if "images_per_s" in s:
            extra.append(f"{s['images_per_s']:.2f} images/s ({s['batch_rule']})")
        if "speculative" in s:
            sp = s["speculative"]
            extra.append(f"window {sp['window']}: {sp['passes']:.0f} passes, {sp['codes_per_pass']:.2f} codes/pass "
                         f"per image*; a pass {sp['pass_vs_step']:.2f}x a plain step; {sp['speedup_vs_plain']:.2f}x "
                         "the plain row")
        if "tokens_per_s" in s:
            extra.append(f"{s['tokens_per_s']:.1f} decode tokens/s (after the first token)")
        if "tflops" in s:
            extra.append(f"{s['tflops']:.2f} TFLOP/s of {s['flops'] / 1e9:.1f} GFLOP")
        if extra:
            lines.append(" " * 19 + "; ".join(extra))
    lines.append("roof: decode steps = achieved GB/s / copy bandwidth; siglip and vq-decode = TFLOP/s / matmul. "
                 "Baseline columns: its median and fastjanus's speed-up over it.")
    if any("speculative" in s for s in rep["scenarios"]):
        lines.append(f"[specW] rows: speculative decoding, step = one pass. *{ACCEPTANCE_NOTE}")
    sk = rep.get("step_kernels")
    if isinstance(sk, dict):
        lines.append("kernels per decode step: " + ", ".join(
            f"{k} {v['total']} ({v['aten']} aten + {v['triton']} triton"
            + (f"; graph replay {v['graph_replay']['total']}" if "graph_replay" in v else "") + ")"
            for k, v in sk.items()))
    for b, why in rep["baselines_skipped"].items():
        lines.append(f"baseline {b} skipped: {why}")
    for b, errs in rep.get("baselines_failed", {}).items():
        for what, why in errs.items():
            lines.append(f"baseline {b} failed on {what}: {why}")
    tl = rep.get("time_limit") or {}
    for what in tl.get("skipped", []):
        lines.append(f"not run (--time-limit {tl['limit_s']:g} s): {what}")
    for what in tl.get("cut", []):
        lines.append(f"cut short: {what}")
    if isinstance(rep.get("quality"), dict):
        from .quant_quality import format_report
        lines.append(format_report(rep["quality"]))
    return "\n".join(lines)


def main(args) -> int:
    """Entry point of `fastjanus bench` (args from the CLI parser)."""
    baselines = () if args.baselines in ("none", "") else tuple(b.strip() for b in args.baselines.split(","))
    cfg = BenchConfig(arch=None if args.model else args.arch, model=args.model, device=args.device,
                      dtype=args.dtype, backend=args.backend,
                      cuda_graphs={"auto": "auto", "on": True, "off": False}[args.cuda_graphs],
                      scenarios=tuple(args.scenario) if args.scenario else SCENARIOS, baselines=baselines,
                      repeats=args.repeats, warmup=args.warmup, baseline_repeats=args.baseline_repeats,
                      max_batch=args.max_batch, text_tokens=args.text_tokens, seed=args.seed or 0,
                      progress=not args.quiet, time_limit=getattr(args, "time_limit", None),
                      max_rows=getattr(args, "max_rows", None), max_len=getattr(args, "max_len", None),
                      quantize=getattr(args, "quantize", None), quantize_heads=getattr(args, "quantize_heads", False),
                      kv_cache=getattr(args, "kv_cache", None), quality=getattr(args, "quality", False),
                      engine=getattr(args, "engine", "torch"),
                      speculative=(16 if getattr(args, "window", None) is None else args.window)
                      if getattr(args, "speculative", False) else None)
    if getattr(args, "window", None) is not None and not getattr(args, "speculative", False):
        raise InputError("--window sets the draft codes per pass of --speculative; add --speculative or drop it")
    for flag, p in (("--json", args.json), ("--plot", args.plot)):  # fail now, not after minutes of measuring
        if p:
            if Path(p).is_dir():
                raise InputError(f"{flag} {p}: is a folder; give a file name")
            parent = Path(p).resolve().parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(f"{flag} {p}: cannot create its folder ({e.strerror or e})") from None
            if not os.access(parent, os.W_OK):
                raise InputError(f"{flag} {p}: the folder is not writable")
    def write(r: dict) -> None:  # atomically: a reader (or a kill) never sees half a file
        tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
        tmp.write_text(json.dumps(r, indent=1))
        tmp.replace(args.json)
    rep = run_bench(cfg, on_update=write if args.json else None)
    print(format_table(rep))
    if args.json:
        write(rep)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from .plot import plot_report
        plot_report(rep, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


__all__ = ["BenchConfig", "run_bench", "format_table", "largest_batch", "cached_random_model", "main",
           "SCENARIOS", "BASELINES"]
