"""Kernels per decode step: what one image step and one text step of the static runtime launch, per published
architecture. The count, not the kernels' speed, bounds a graphed step: every launch costs a few µs of GPU
time even inside a CUDA Graph, and a 7B step launches about a thousand.

    python -m fastjanus.bench.step_kernels [--arch ARCH ...] [--json FILE] [--device cpu|cuda] [--dtype bf16]

Method. The real step (`StaticDecoder.step()` of `pipe.runtime`, backend "triton": embed → decoder layers →
head → fused sampler; the image step has 2 paired CFG rows and `gen_head`, the text step 1 row and `lm_head`;
top_k off) runs once uncounted, then once under `KernelCounter`:
- aten ops, seen by a TorchDispatchMode, each counted as one kernel. Ops that launch none are left out: views
  and metadata changes (by their schema: `OpOverload.is_view`, the `inplace_view` tag; plus `_unsafe_view`,
  a view whose schema does not say so) and allocations without data (empty, empty_strided, empty_permuted,
  empty_like, new_empty, new_empty_strided). Composite ops (linear, reshape, to, chunk) are decomposed first
  and what they become is counted, as when autograd dispatch decomposes them outside inference mode.
- Triton launches, by patching the launch entry points (`JITFunction.run`, and `InterpretedFunction.run`
  when the kernels run in the interpreter); the aten ops a launch does itself (the interpreter copies its
  tensors to the host and back) are not counted.
On the CPU the decode attention splits its work as on an H100 (132 SMs), so its merge launch is counted
where a GPU would make it. On a GPU one aten op can launch more than one kernel (a cuBLAS split-K GEMM
launches two) or a memcpy, so this is a lower bound there; `profile_graph_replay` counts what a captured
step's replay really runs (CUDA only).

Published sizes without their weights: the step is the same code for every architecture and only the number
of decoder layers differs. Tiny checkpoints of the published per-layer structure (the "tiny" preset, with
the architecture's query/KV head grouping) with 1 and 2 decoder layers give per layer = n(2) − n(1) and
outside = n(1) − per layer, and an architecture's count is outside + per layer × its num_hidden_layers.
`count_pipeline` counts a loaded pipeline (any model and device, no scaling); `fastjanus bench` records it
(without the profiler, which stays loaded after use and would slow what follows). `--full-size` counts the
cached full-size random checkpoint of each architecture instead of scaling: on CUDA its graph replay then
runs the published GEMM shapes, whose cuBLAS kernels (split-K or not) tiny widths do not show. The GPU pass
runs that.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from torch.utils._python_dispatch import TorchDispatchMode

from ..config import preset

ARCHES = ("janus-1.3b", "janus-pro-1b", "janus-pro-7b")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON = "triton:"  # prefix of Triton kernels in an op breakdown
METHOD = (__doc__ or "").partition("Method. ")[2].strip()

_aten = torch.ops.aten
_NO_KERNEL = {_aten._unsafe_view, _aten.empty, _aten.empty_strided, _aten.empty_permuted, _aten.empty_like,
              _aten.new_empty, _aten.new_empty_strided}


def launches_kernel(func) -> bool:
    """False for views, metadata changes and allocations without data (see the module docstring)."""
    return not (func.is_view or torch.Tag.inplace_view in func.tags or func.overloadpacket in _NO_KERNEL)


def _op_name(func) -> str:
    name = func.overloadpacket.__name__
    ns = func.namespace
    base = name if ns == "aten" else f"{ns}.{name}"
    return base if func._overloadname == "default" else f"{base}.{func._overloadname}"


def _triton_launchers() -> list[type]:
    """The classes whose run() launches a Triton kernel: JITFunction, and InterpretedFunction in the interpreter."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:  # no Triton: only aten ops to count
        return []
    out = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        out.append(InterpretedFunction)
    except ImportError:
        pass
    return out


class _CountingMode(TorchDispatchMode):
    def __init__(self, counter: "KernelCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if c.in_launch:
            return func(*args, **kwargs)
        with self:  # a composite op: count the ops it decomposes into
            out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
        if launches_kernel(func):
            c.ops[_op_name(func)] += 1
        return func(*args, **kwargs)


class KernelCounter:
    """`with KernelCounter() as c: fn()` → c.ops: {op or "triton:<kernel>": launches} (see the module docstring)."""

    def __init__(self):
        self.ops: Counter = Counter()
        self.in_launch = 0
        self._mode = _CountingMode(self)
        self._patched: list[tuple[type, object]] = []

    def _wrap(self, run):
        def counted_run(fn, *args, **kwargs):
            if kwargs.get("warmup"):  # compiles, launches nothing
                return run(fn, *args, **kwargs)
            self.ops[TRITON + getattr(fn.fn, "__name__", repr(fn.fn))] += 1
            self.in_launch += 1
            try:
                return run(fn, *args, **kwargs)
            finally:
                self.in_launch -= 1
        return counted_run

    def __enter__(self) -> "KernelCounter":
        for cls in _triton_launchers():
            run = cls.__dict__["run"]
            self._patched.append((cls, run))
            cls.run = self._wrap(run)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for cls, run in self._patched:
            cls.run = run
        self._patched.clear()


def summary(ops: dict) -> dict:
    """{"aten", "triton", "total", "ops"} of an op breakdown (largest first)."""
    triton = sum(n for k, n in ops.items() if k.startswith(TRITON))
    total = sum(ops.values())
    return {"aten": total - triton, "triton": triton, "total": total,
            "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))}


def count_calls(fn) -> dict:
    """Kernels launched by fn() (see the module docstring): {"aten", "triton", "total", "ops"}."""
    with KernelCounter() as c:
        fn()
    return summary(c.ops)


H100_SMS = 132


@contextlib.contextmanager
def _gpu_split_rule(sms: int = H100_SMS):
    """Decode attention's split count as CUDA would choose it on a GPU with `sms` SMs. On the CPU the launcher
    takes one split (fewest interpreter programs), which skips the merge launch a GPU makes when rows × heads
    leave it room to split (2 rows × 16 heads: yes; 32 rows × 32 heads: no)."""
    from ..kernels import decode_attention as da
    cpu_rule = da.default_splits

    def rule(batch_kv_heads, capacity, block_n, device):
        return da.gpu_splits(batch_kv_heads, capacity, block_n, sms)
    da.default_splits = rule
    try:
        yield
    finally:
        da.default_splits = cpu_rule


def count_step(decoder) -> dict:
    """One eager step() of a StaticDecoder, after an uncounted one (Triton compiles, cuBLAS makes its handles,
    lazy imports run). Leaves the decoder's state as a warm-up does: start() resets it for the next request.
    On the CPU, attention splits as on an H100 (`_gpu_split_rule`)."""
    split_rule = _gpu_split_rule() if decoder.device.type == "cpu" else contextlib.nullcontext()
    with torch.inference_mode(), split_rule:
        decoder._reset_for_warmup()
        decoder.step()
        decoder._reset_for_warmup()
        res = count_calls(decoder.step)
        if decoder.device.type == "cuda":
            torch.cuda.synchronize(decoder.device)
    return res


def profile_graph_replay(decoder) -> dict:
    """What one replay of the captured step runs on the GPU, from the CUDA profiler: {"kernels", "memcpy",
    "memset", "total", "ops"} (ops: event name → count). Not yet run on a GPU (no session with one has had
    this code)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    if decoder.graph is None:
        raise ValueError("the decoder has no captured CUDA graph (load with cuda_graphs=True)")
    torch.cuda.synchronize(decoder.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.graph.replay()
        torch.cuda.synchronize(decoder.device)
    ops = Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)
    return _profile_summary(ops)


def _profile_summary(ops: dict) -> dict:
    memcpy = sum(n for k, n in ops.items() if k.startswith("Memcpy"))
    memset = sum(n for k, n in ops.items() if k.startswith("Memset"))
    total = sum(ops.values())
    return {"kernels": total - memcpy - memset, "memcpy": memcpy, "memset": memset, "total": total,
            "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))}


def _decoders(pipe):
    """The image decoder of the smallest bucket (2 rows: one image with CFG) and the usual one-row text decoder:
    the same keys as the runtime's warm-up, so a warmed pipeline's captured decoders are the ones counted."""
    rt, plan = pipe.runtime, pipe.memory_plan
    rows = min(plan.buckets)
    cap = plan.text_capacity(1, 1)
    return {"image": rt._decoder(rows, plan.capacity(rows), True, None, plan.image_tokens),
            "text": rt._decoder(1, cap, False, None, cap)}


def count_pipeline(pipe, profile: bool = True) -> dict:
    """Kernels of one image step and one text step of a loaded pipeline, as it is (no scaling):
    {"image": {...}, "text": {...}}, each count_step's result plus, with CUDA Graphs and profile, "graph_replay"."""
    if pipe.runtime is None:
        raise ValueError("steps are counted on the static runtime, which only the triton backend has (and a closed "
                         "pipeline has none)")
    with pipe._lock:
        out = {}
        for kind, d in _decoders(pipe).items():
            out[kind] = count_step(d)
            if pipe.cuda_graphs and profile:
                d.ensure_graph()
                out[kind]["graph_replay"] = profile_graph_replay(d)
    return out


# ------------------------------------------------------------------------------ published sizes from tiny models
def _small_model(out: Path, layers: int, group: int) -> Path:
    """The tiny preset with `layers` decoder layers and `group` query heads per KV head, written to `out`."""
    from ..random_init import write_tokenizer_files, write_weights
    cfg = preset("tiny")
    L = cfg.language
    lang = dataclasses.replace(L, num_hidden_layers=layers,
                               num_key_value_heads=max(1, L.num_attention_heads // group))
    cfg = dataclasses.replace(cfg, language=lang)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "architectures": ["MultiModalityCausalLM"]}))
    write_tokenizer_files(out, "tiny", cfg.vision.num_patches, cfg.vision.image_size)
    write_weights(out, cfg, "safetensors", seed=0)
    return out


@functools.lru_cache(maxsize=None)
def _measure(device: str, dtype: torch.dtype, group: int) -> dict[int, dict]:
    """count_pipeline of tiny models with 1 and 2 decoder layers: {layers: result}."""
    from ..engine.pipeline import load
    _check_interpreter(device)
    res = {}
    with tempfile.TemporaryDirectory(prefix="fastjanus-step-kernels-") as tmp:
        for n in (1, 2):
            path = _small_model(Path(tmp) / f"layers{n}", n, group)
            with load(path, device=device, dtype=dtype, backend="triton", cuda_graphs=device == "cuda") as pipe:
                res[n] = count_pipeline(pipe)
    return res


def _split(one: dict, two: dict, what: str) -> tuple[dict, dict]:
    """(per layer, outside) op breakdowns from the counts with 1 and 2 layers."""
    per = {k: two.get(k, 0) - one.get(k, 0) for k in set(one) | set(two)}
    outside = {k: one.get(k, 0) - per[k] for k in per}
    bad = {k: (one.get(k, 0), two.get(k, 0)) for k in per if per[k] < 0 or outside[k] < 0}
    assert not bad, f"{what}: ops whose counts (1 layer, 2 layers) are not outside + layers x per layer: {bad}"
    return {k: n for k, n in per.items() if n}, {k: n for k, n in outside.items() if n}


def _scale(one: dict, two: dict, layers: int, what: str, summarise) -> dict:
    per, outside = _split(one, two, what)
    total = {k: outside.get(k, 0) + layers * per.get(k, 0) for k in set(per) | set(outside)}
    return {**summarise(total), "per_layer": summarise(per), "outside": summarise(outside)}


def _check_interpreter(device: str) -> None:
    from ..kernels import triton_status
    if device == "cpu" and not triton_status()[1]:
        raise RuntimeError("counting on the CPU runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1 "
                           "before Python starts (python -m fastjanus.bench.step_kernels does it for you)")


def count_checkpoint(arch: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> dict:
    """count_pipeline of the cached full-size random checkpoint of `arch` (written on first use; "tiny" too):
    the published shapes, no scaling. {"arch", "layers", "device", "dtype", "image", "text"}."""
    from ..engine.pipeline import load
    from ..random_init import cached_random_model
    _check_interpreter(device)
    with load(cached_random_model(arch), device=device, dtype=dtype, backend="triton",
              cuda_graphs=device == "cuda") as pipe:
        res = count_pipeline(pipe)
        layers = pipe.cfg.language.num_hidden_layers
    return {"arch": arch, "layers": layers, "device": device, "dtype": str(dtype).replace("torch.", ""), **res,
            "full_size": True}


def count_arch(arch: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Kernels per image and text step of a published architecture, scaled from tiny models (module docstring).

    {"arch", "layers", "device", "dtype", "image": {...}, "text": {...}}; each step has "aten", "triton",
    "total", "ops" for the whole step and the same under "per_layer" and "outside", so that
    total == outside + layers × per_layer; on CUDA also "graph_replay" (profiler counts, scaled alike)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHES)}")
    L = preset(arch).language
    group = L.num_attention_heads // L.num_key_value_heads
    m = _measure(device, dtype, group)
    out = {"arch": arch, "layers": L.num_hidden_layers, "device": device, "dtype": str(dtype).replace("torch.", "")}
    for kind in ("image", "text"):
        one, two = m[1][kind], m[2][kind]
        out[kind] = _scale(one["ops"], two["ops"], L.num_hidden_layers, f"{arch} {kind} step", summary)
        if "graph_replay" in one:
            out[kind]["graph_replay"] = _scale(one["graph_replay"]["ops"], two["graph_replay"]["ops"],
                                               L.num_hidden_layers, f"{arch} {kind} graph replay", _profile_summary)
    return out


# ---------------------------------------------------------------------------------------------------- CLI
def _parts(s: dict) -> str:
    return f"{s['total']} ({s['aten']} aten + {s['triton']} triton)"


def _ops_line(ops: dict) -> str:
    return ", ".join(f"{k} {n}" for k, n in ops.items())


def format_full_size(results: list[dict], device_name: str) -> str:
    lines = [f"Kernels per decode step of full-size random checkpoints, static runtime (backend triton), "
             f"{results[0]['dtype']}, counted on {device_name} (no scaling)", ""]
    for r in results:
        for kind in ("image", "text"):
            s = r[kind]
            g = s.get("graph_replay")
            replay = (f"; graph replay (profiler): {g['kernels']} kernels, {g['memcpy']} memcpy, {g['memset']} memset"
                      if g else "")
            lines.append(f"{r['arch']:14s} {r['layers']:>3d} layers  {kind:5s}  {_parts(s)}{replay}")
    return "\n".join(lines)


def format_table(results: list[dict], device_name: str) -> str:
    r0 = results[0]
    lines = [f"Kernels per decode step, static runtime (backend triton), {r0['dtype']}, counted on {device_name}",
             "The step is the same code for every architecture; only the decoder layer count differs, so per layer "
             "and outside are the same for all (measured on tiny models with 1 and 2 layers).",
             "",
             f"{'arch':14s} {'layers':>6s}  {'step':5s}  {'per layer':>24s}  {'outside':>24s}  {'total':>6s}"]
    for r in results:
        for kind in ("image", "text"):
            s = r[kind]
            lines.append(f"{r['arch'] if kind == 'image' else '':14s} {r['layers'] if kind == 'image' else '':>6}  "
                         f"{kind:5s}  {_parts(s['per_layer']):>24s}  {_parts(s['outside']):>24s}  {s['total']:>6d}")
            g = s.get("graph_replay")
            if g is not None:
                lines.append(f"{'':14s} {'':>6s}  {'':5s}  graph replay (profiler): {g['per_layer']['total']} per "
                             f"layer, {g['outside']['total']} outside, {g['total']} total ({g['kernels']} kernels, "
                             f"{g['memcpy']} memcpy, {g['memset']} memset)")
    lines.append("")
    lines.append("image step = 2 paired CFG rows, gen_head + fused sampler; text step = 1 row, lm_head + sampler; "
                 "aten ops counted as one kernel each (views, metadata and empty allocations excluded).")
    for kind in ("image", "text"):
        for part in ("per_layer", "outside"):
            lines.append(f"{kind} {part.replace('_', ' ')}: {_ops_line(r0[kind][part]['ops'])}")
    return "\n".join(lines)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return "cpu (Triton interpreter)"


def build_parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(prog="python -m fastjanus.bench.step_kernels",
                                description="Count the GPU kernels that one image and one text decode step of the "
                                            "static runtime launch, per published architecture.")
    p.add_argument("--arch", action="extend", nargs="+", metavar="ARCH",
                   help=f"architectures, any of {', '.join(ARCHES)} (default: all of them)")
    p.add_argument("--json", metavar="FILE", help="also write every count, the method and the versions to FILE "
                                                  "(default: none)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=default_device,
                   help=f"where the steps run; cuda also profiles the captured graph's replay (default: "
                        f"{default_device})")
    p.add_argument("--full-size", action="store_true",
                   help="count the cached full-size random checkpoint of each --arch (written on first use, GBs) "
                        "instead of scaling tiny models; on CUDA its graph replay runs the published GEMM shapes")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16",
                   help="model dtype; the published models run in bf16, fp32 drops the norms' casts (default: bf16)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    args = p.parse_args(argv)
    archs = args.arch or list(ARCHES)
    valid = ARCHES + (("tiny",) if args.full_size else ())
    bad = [a for a in archs if a not in valid]
    if bad:
        p.error(f"unknown --arch {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here; use --device cpu")
    if args.device == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("--device cuda counts compiled kernels and captured graphs: unset TRITON_INTERPRET")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # CUDA here: interpret, from a fresh start
        os.execve(sys.executable, [sys.executable, "-m", "fastjanus.bench.step_kernels", *argv],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    from .harness import _triton_version
    count = count_checkpoint if args.full_size else count_arch
    results = [count(a, args.device, DTYPES[args.dtype]) for a in dict.fromkeys(archs)]
    name = _device_name(args.device)
    print((format_full_size if args.full_size else format_table)(results, name))
    if args.json:
        report = {"method": METHOD, "device": name, "platform": args.device, "dtype": results[0]["dtype"],
                  "torch": torch.__version__, "triton": _triton_version(),
                  "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "archs": {r["arch"]: r for r in results}}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
