"""Time per speculative pass against a one-token step, on the static runtime (what `--speculative` trades).

    python -m fastjanus.bench.spec_pass [--arch ARCH | --model DIR] [--rows 2,32] [--windows 8,16,32]
                                        [--passes 32] [--repeats 3] [--json FILE] [--device cuda] [--dtype bf16]

Method. For each row count R (2 per image) the bucket's plain decoder (`StaticDecoder`) and, per window W, its
speculative decoder (`SpecDecoder`) are made ready (captured with CUDA Graphs on), prefilled with random
prompts, and run for --passes steps/passes between two synchronisations; the figure is the median over
--repeats of (elapsed / count). A pass costs the same whatever it accepts (an image that is done still runs
its rows), so random weights time it fairly; how many codes a pass accepts is not measured here (it depends on
the weights: see `fastjanus bench --speculative`). ratio = pass / step: speculative decoding wins when the
codes accepted per pass exceed it.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from ..errors import InputError
from .roofline import sync


def _prompt_rows(pipe, images: int, words: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    from .harness import random_prompt
    return pipe._image_rows([random_prompt(rng, words) for _ in range(images)], 1)


def _time(fn, count: int, repeats: int, device) -> float:
    """Median seconds per unit of fn(count) over repeats, synchronised around each run."""
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn(count)
        sync(device)
        out.append((time.perf_counter() - t0) / count)
    return statistics.median(out)


@torch.inference_mode()
def pass_vs_step(pipe, rows: int, windows: list[int], passes: int = 32, repeats: int = 3, seed: int = 0) -> dict:
    """{"rows", "step_ms", "windows": {W: {"pass_ms", "ratio"}}} for one bucket of `rows` rows."""
    rt = pipe.runtime
    if rt is None:
        raise InputError("the pass benchmark needs the static runtime: load with backend='triton'")
    toks = _prompt_rows(pipe, rows // 2, 12, seed)
    T = max(len(r) for r in toks)
    n_tok = pipe.cfg.num_image_tokens
    steps = min(passes, n_tok - 2)  # the plain decoder's history holds the image's codes: stay inside it
    bucket, cap = pipe.memory_plan.image_bucket(len(toks), T, extra=max(windows))
    d = rt._decoder(bucket, cap, True, None, n_tok)
    d.warm()
    out = {"rows": bucket, "capacity": cap, "prompt_len": T, "passes": passes, "repeats": repeats}
    # each repeat restarts from the prefill so that every run sees the same lengths
    step_s = []
    for _ in range(repeats):
        h, _ = pipe.runner.prefill(toks, d.cache)
        d.start(h, 5.0, 1.0, seed)
        step_s.append(_time(d.run, steps, 1, pipe.device))
    out["step_ms"] = statistics.median(step_s) * 1e3
    out["windows"] = {}
    for w in windows:
        s = rt.spec_decoder(bucket, cap, w, None)
        s.warm()
        pass_s = []
        for _ in range(repeats):
            h, _ = pipe.runner.prefill(toks, s.cache)
            s.start(h, len(toks) // 2, 5.0, 1.0, seed)
            pass_s.append(_time(s.run, passes, 1, pipe.device))
        ms = statistics.median(pass_s) * 1e3
        out["windows"][str(w)] = {"pass_ms": ms, "ratio": ms / out["step_ms"]}
    return out


def _ints(text: str, flag: str) -> list[int]:
    try:
        xs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not xs or min(xs) < 1:
        raise InputError(f"{flag} takes integers >= 1, got {text!r}")
    return xs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastjanus.bench.spec_pass", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--arch", default="tiny", choices=["tiny", "janus-1.3b", "janus-pro-1b", "janus-pro-7b"],
                     help="a cached random checkpoint of this preset (written on first use)")
    src.add_argument("--model", default=None, metavar="DIR")
    p.add_argument("--rows", default="2,32", help="bucket rows (2 per image), comma-separated")
    p.add_argument("--windows", default="8,16,32", help="speculative windows, comma-separated")
    p.add_argument("--passes", type=int, default=32, help="steps / passes per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--json", default=None, metavar="FILE")
    a = p.parse_args(argv)
    import fastjanus
    from ..checks import check_speculative
    from ..random_init import cached_random_model
    from .harness import device_info, package_versions
    try:
        rows, windows = _ints(a.rows, "--rows"), _ints(a.windows, "--windows")
        for w in windows:
            check_speculative(True, w)
        if any(r % 2 for r in rows):
            raise InputError(f"--rows must be even (2 per image), got {a.rows}")
        path = a.model or cached_random_model(a.arch, progress=True)
        pipe = fastjanus.load(path, device=a.device, dtype=a.dtype, backend="triton", max_rows=max(rows))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = {"what": "speculative pass vs one-token step", "method": __doc__.partition("Method. ")[2].strip(),
           "arch": a.arch if not a.model else a.model, "device": device_info(pipe.device),
           "dtype": str(pipe.dtype).replace("torch.", ""), "cuda_graphs": pipe.cuda_graphs,
           "versions": package_versions(), "results": []}
    for r in rows:
        res = pass_vs_step(pipe, r, windows, a.passes, a.repeats)
        rep["results"].append(res)
        line = ", ".join(f"W={w} {v['pass_ms']:.3f} ms ({v['ratio']:.2f}x)" for w, v in res["windows"].items())
        print(f"{res['rows']} rows: step {res['step_ms']:.3f} ms; pass {line}")
    if pipe.device.type != "cuda":
        print("CPU run: checks the harness; these are not GPU figures", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
