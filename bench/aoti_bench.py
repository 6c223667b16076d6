"""The Python-free runner against the Python runtime, in one run (GPU pass part `aoti`):

    python -m fastjanus.bench.aoti_bench --arch janus-pro-1b --device cuda --images 1,16 --json OUT.json

1. `export_aoti` writes the generator and VQ-decoder packages for the device (timed, sizes recorded);
2. CMakeLists.txt is built against this torch's LibTorch (timed; a failed build is recorded and the packages are
   then timed from Python through torch's AOTI loader instead);
3. for each image count: `fastjanus-run generate --runs K` (the first run pays the packages' load and first-use
   costs; the median of runs 2..K is reported), and the Python runtime (`fastjanus.load` with its defaults: on
   CUDA the triton backend with CUDA Graphs) timed around generate_image_tokens + decode_image_tokens, median of
   K after a warm-up;
4. greedy codes of both (temperature 0) compared, and each decode step against the roofline (the weight and KV
   bytes a step must read over the copy bandwidth measured in this run).

Random weights of the preset (speed does not depend on the values).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a red fox standing in fresh snow at sunrise, soft light, highly detailed, 85mm lens"
_LINE = re.compile(r"median of runs [^:]*: ([\d.]+) ms: prefill ([\d.]+) ms, decode ([\d.]+) ms \(([\d.]+) ms/step\), "
                   r"VQ decode ([\d.]+) ms")


def build_runner(build: Path, log) -> tuple[Path | None, dict]:
    """cmake configure + build of fastjanus-run; (binary or None, record)."""
    import torch.utils
    rec: dict = {}
    if shutil.which("cmake") is None:
        return None, {"error": "cmake not installed"}
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    t0 = time.perf_counter()
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                ["cmake", "--build", str(build), "-j"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
            log("C++ build failed:\n" + "\n".join(tail))
            return None, {"error": "\n".join(tail), "seconds": round(time.perf_counter() - t0, 1)}
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"built fastjanus-run in {rec['seconds']} s")
    return build / "fastjanus-run", rec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_python(pipe, n: int, runs: int, device) -> dict:
    """generate_image_tokens + decode_image_tokens, sampled (temperature 1, seed 0): median of `runs` after one
    warm-up, wall clock around a synchronised call."""
    def once():
        _sync(device)
        t0 = time.perf_counter()
        codes = pipe.generate_image_tokens(PROMPT, n, cfg_weight=5.0, temperature=1.0, seed=0)
        t1 = time.perf_counter()
        pipe.decode_image_tokens(codes)
        _sync(device)
        t2 = time.perf_counter()
        return {"total_ms": (t2 - t0) * 1e3, "codes_ms": (t1 - t0) * 1e3, "vq_ms": (t2 - t1) * 1e3,
                "prefill_ms": pipe.last_timings.get("prefill_s", 0) * 1e3,
                "decode_ms": pipe.last_timings.get("decode_s", 0) * 1e3}
    once()
    rows = [once() for _ in range(runs)]
    med = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
    med["per_step_ms"] = round(med["decode_ms"] / (pipe.cfg.num_image_tokens - 1), 3)
    return med


def time_cpp(exe: Path, pkg: Path, ids: Path, n: int, runs: int, out: Path) -> dict:
    r = subprocess.run([str(exe), "generate", "--packages", str(pkg), "--prompt-ids", str(ids), "--num-images",
                        str(n), "--cfg", "5", "--temperature", "1", "--seed", "0", "--runs", str(runs + 1),
                        "--out", str(out / f"cpp-{n}")], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip()}
    m = _LINE.search(r.stdout)
    if m is None:
        return {"error": f"unexpected output of fastjanus-run: {r.stdout.strip()[-500:]}"}
    total, prefill, decode, step, vq = (float(x) for x in m.groups())
    return {"total_ms": total, "prefill_ms": prefill, "decode_ms": decode, "per_step_ms": step, "vq_ms": vq,
            "first_run": r.stdout.splitlines()[0]}


def time_packages_python(pkg: Path, model, rows: list[list[int]], pad: int, runs: int, device) -> dict:
    """Without a C++ build: the same packages chained from Python (torch's AOTI loader) as fastjanus-run chains
    them, the step given the loaded model's tensors as its constants. Median of `runs` after a warm-up; codes only
    (the VQ decoder package is not timed here)."""
    from fastjanus.export.aoti_export import load_generator_package
    from fastjanus.export.aoti_modules import request_buffers, run_generator
    prefill, step = load_generator_package(pkg / "generator.pt2", model)
    n_tok = model.cfg.num_image_tokens

    def once():
        buf = request_buffers(model.cfg, rows, pad, 5.0, 1.0, 0, model.dtype, device)
        marks = []
        mark = lambda: (_sync(device), marks.append(time.perf_counter()))  # noqa: E731
        mark()
        run_generator(prefill, step, buf, after_prefill=mark).cpu()
        mark()
        return {"prefill_ms": (marks[1] - marks[0]) * 1e3, "decode_ms": (marks[2] - marks[1]) * 1e3}
    once()
    timed = [once() for _ in range(runs)]
    med = {k: round(statistics.median(t[k] for t in timed), 2) for k in timed[0]}
    med["per_step_ms"] = round(med["decode_ms"] / (n_tok - 1), 3)
    return med


def greedy_cpp(exe: Path, pkg: Path, ids: Path, n: int, out: Path) -> torch.Tensor | None:
    prefix = out / f"greedy-{n}"
    r = subprocess.run([str(exe), "generate", "--packages", str(pkg), "--prompt-ids", str(ids), "--num-images",
                        str(n), "--temperature", "0", "--seed", "0", "--out", str(prefix)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return None
    return torch.tensor([list(map(int, line.split())) for line in Path(f"{prefix}.codes").read_text().splitlines()])


def run(args, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    import fastjanus
    from fastjanus.config import JanusConfig
    from fastjanus.engine.pipeline import image_token_rows
    from fastjanus.export.aoti_export import DTYPES, export_aoti
    from fastjanus.random_init import cached_random_model
    from fastjanus.tokenizer import JanusTokenizer

    from .harness import device_info, package_versions
    from .roofline import copy_bandwidth, mean_image_step_bytes

    images = [int(x) for x in args.images.split(",")]
    device = torch.device(args.device)
    model = Path(args.model) if args.model else cached_random_model(args.arch)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    out.mkdir(exist_ok=True)
    cfg = JanusConfig.from_file(model)
    rep: dict = {"what": "fastjanus-run (AOTInductor packages, C++) vs the Python runtime",
                 "model": args.model or f"random {args.arch}", "device": device_info(device),
                 "versions": package_versions(), "dtype": args.dtype, "prompt": PROMPT, "cfg_weight": 5.0,
                 "temperature": 1.0, "runs": args.runs, "timing": "wall clock; the C++ figures are the median of "
                 "runs 2..K+1 of one fastjanus-run process (run 1 pays the load), the Python ones the median of K "
                 "after a warm-up, both around a synchronised call including the VQ decode"}
    pkg = work / "packages"
    t0 = time.perf_counter()
    m = export_aoti(model, pkg, parts="generator,vq-decoder", device=args.device, dtype=args.dtype,
                    max_images=max(images), progress=log)
    rep["export"] = {"seconds": round(time.perf_counter() - t0, 1),
                     "bytes": {p: e["bytes"] for p, e in m["parts"].items()}}
    exe, rep["build"] = build_runner(work / "build", log)
    tok = JanusTokenizer(model, cfg.language.vocab_size)
    ids = work / "ids.txt"
    prompt_ids = tok.generation_prompt(PROMPT)
    ids.write_text(" ".join(map(str, prompt_ids)) + "\n")
    rep["prompt_tokens"] = len(prompt_ids)
    dt = DTYPES[args.dtype]
    elem = torch.finfo(dt).bits // 8
    gbs, how = copy_bandwidth(device)
    rep["copy_bandwidth_gbs"], rep["copy_bandwidth_how"] = round(gbs, 1), how
    rep["scenarios"] = []
    cpp_greedy = {}
    for n in images:
        row: dict = {"images": n, "roofline_step_ms": round(mean_image_step_bytes(cfg, elem, n, len(prompt_ids))
                                                             / (gbs * 1e9) * 1e3, 3)}
        if exe is not None:
            row["cpp"] = time_cpp(exe, pkg, ids, n, args.runs, out)
            cpp_greedy[n] = greedy_cpp(exe, pkg, ids, n, out)
            log(f"{n} image(s), fastjanus-run: {row['cpp']}")
        rep["scenarios"].append(row)
    pipe = fastjanus.load(model, device=device, dtype=dt)
    rep["python_runtime"] = {"backend": pipe.backend, "cuda_graphs": pipe.cuda_graphs}
    for row in rep["scenarios"]:
        n = row["images"]
        row["python"] = time_python(pipe, n, args.runs, device)
        log(f"{n} image(s), Python runtime: {row['python']}")
        if exe is None:  # no C++ runner: the packages from Python, so the export is still measured
            rows = image_token_rows(tok, cfg, PROMPT, n)
            row["packages_from_python"] = time_packages_python(pkg, pipe.model, rows, tok.pad_id, args.runs, device)
            log(f"{n} image(s), packages from Python: {row['packages_from_python']}")
        want = pipe.generate_image_tokens(PROMPT, n, cfg_weight=5.0, temperature=0)
        got = cpp_greedy.get(n)
        if got is not None:
            row["greedy_codes_equal"] = bool(torch.equal(got, want))
            row["greedy_codes_agree_fraction"] = round((got == want).float().mean().item(), 4)
        for k in ("cpp", "python", "packages_from_python"):
            if "per_step_ms" in row.get(k, {}):
                row[k]["of_roofline"] = round(row["roofline_step_ms"] / row[k]["per_step_ms"], 3)
    return rep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--arch", default="janus-pro-1b", help="random weights of a preset (cached)")
    src.add_argument("--model", default=None, help="a checkpoint folder instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--images", default="1,16", help="image counts, comma-separated")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each")
    p.add_argument("--work", default="aoti-bench", help="folder for the packages, the build and the outputs")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    rep = run(args)
    text = json.dumps(rep, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
