"""`fastjanus` command line: generate, understand, info, init-random."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import FastJanusError


def default_tiny_model() -> Path:
    """A tiny random checkpoint, written once into the cache directory."""
    from .random_init import cached_random_model
    return cached_random_model("tiny", folder="tiny-random")


def _model_arg(args) -> Path:
    if args.model:
        return Path(args.model)
    d = default_tiny_model()
    print(f"note: no --model given; using the tiny RANDOM checkpoint at {d}. "
          "Its outputs are noise, not pictures or answers: pass --model DIR for a real Janus checkpoint.",
          file=sys.stderr)
    return d


def _load(args):
    from .engine.pipeline import load
    t0 = time.perf_counter()
    pipe = load(_model_arg(args), device=args.device, dtype=args.dtype, progress=True, backend=args.backend,
                cuda_graphs={"auto": "auto", "on": True, "off": False}[args.cuda_graphs])
    print(f"loaded {pipe.path} on {pipe.device} ({str(pipe.dtype).replace('torch.', '')}, {pipe.backend} backend, "
          f"CUDA graphs {'on' if pipe.cuda_graphs else 'off'}) "
          f"in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return pipe


def cmd_generate(args) -> int:
    pipe = _load(args)
    t0 = time.perf_counter()
    codes = pipe.generate_image_tokens(args.prompt, num_images=args.num_images, cfg_weight=args.cfg,
                                       temperature=args.temperature, seed=args.seed, top_k=args.top_k,
                                       top_p=args.top_p, progress=True)
    t1 = time.perf_counter()
    images = pipe.decode_image_tokens(codes)
    t2 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i, img in enumerate(images):
        path = out / f"janus-{stamp}-{i:02d}.png"
        img.save(path)
        print(path)
    tm = pipe.last_timings
    print(f"{len(images)} image(s): tokens {t1 - t0:.2f} s (prefill {tm['prefill_s']:.3f} s, "
          f"{tm['steps']} steps {tm['decode_s']:.2f} s), VQ decode {t2 - t1:.2f} s, total {t2 - t0:.2f} s "
          f"[{pipe.device}, {str(pipe.dtype).replace('torch.', '')}]", file=sys.stderr)
    return 0


def cmd_understand(args) -> int:
    pipe = _load(args)
    text = pipe.answer(args.image, args.question, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed, top_p=args.top_p)
    print(text)
    tm = pipe.last_timings
    print(f"{tm['new_tokens']} tokens in {tm['total_s']:.2f} s (first token after {tm['time_to_first_token_s']:.3f} s)",
          file=sys.stderr)
    return 0


def model_info(model_dir) -> dict:
    """Architecture, parameter count, special ids and (if present) the weight files, without loading weights."""
    import torch
    from .checkpoint import find_weights, read_shapes
    from .config import JanusConfig
    from .errors import CheckpointNotFoundError
    from .models.janus import JanusModel
    from .tokenizer import JanusTokenizer
    d = Path(model_dir)
    cfg = JanusConfig.from_file(d)
    L = cfg.language
    with torch.device("meta"):
        m = JanusModel(cfg)
    n_params = sum(p.numel() for p in m.parameters())
    n_llm = sum(p.numel() for n, p in m.named_parameters()
                if n.startswith("language_model.model.layers.") or n == "language_model.model.norm.weight")
    info = {
        "path": str(d),
        "architecture": {"hidden_size": L.hidden_size, "num_layers": L.num_hidden_layers,
                         "num_heads": L.num_attention_heads, "num_kv_heads": L.num_key_value_heads,
                         "head_dim": L.head_dim, "intermediate_size": L.intermediate_size,
                         "vocab_rows": L.vocab_size, "max_positions": L.max_position_embeddings,
                         "vision": {"width": cfg.vision.width, "layers_used": cfg.vision.layers_used,
                                    "image_size": cfg.vision.image_size, "image_tokens": cfg.vision.num_patches},
                         "image_generation": {"codebook": cfg.vq.codebook_size, "grid": cfg.vq.grid,
                                              "image_tokens": cfg.num_image_tokens,
                                              "image_size": cfg.vq.image_size}},
        "parameters": n_params,
        "llm_parameters_without_embeddings": n_llm,
    }
    tk = JanusTokenizer(d, L.vocab_size)
    info["tokenizer"] = {"size": len(tk), "template": tk.template, "special_ids": tk.special_ids(),
                         "added_at_load": tk.added}
    try:
        files = find_weights(d)
    except CheckpointNotFoundError:
        info["weights"] = None
    else:
        dtypes: dict[str, int] = {}
        for shape, dt, _ in read_shapes(files).values():
            dtypes[dt] = dtypes.get(dt, 0) + 1
        info["weights"] = {"format": files.format, "files": [f.name for f in files.files],
                           "bytes": files.total_bytes, "dtypes": dtypes}
    return info


def cmd_info(args) -> int:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    a = info["architecture"]
    print(f"model       {info['path']}")
    print(f"LLM         hidden {a['hidden_size']}, layers {a['num_layers']}, heads {a['num_heads']}, "
          f"kv heads {a['num_kv_heads']}, intermediate {a['intermediate_size']}, vocab rows {a['vocab_rows']}, "
          f"context {a['max_positions']}")
    print(f"vision      width {a['vision']['width']}, {a['vision']['layers_used']} blocks, "
          f"{a['vision']['image_size']} px → {a['vision']['image_tokens']} tokens")
    g = a["image_generation"]
    print(f"generation  {g['image_tokens']} codes ({g['grid']}×{g['grid']}) of {g['codebook']} → {g['image_size']} px")
    print(f"parameters  {info['parameters']:,} (LLM without embeddings {info['llm_parameters_without_embeddings']:,})")
    t = info["tokenizer"]
    print(f"tokenizer   {t['size']} tokens, template {t['template']}, special ids {t['special_ids']}"
          + (f", added at load: {t['added_at_load']}" if t["added_at_load"] else ""))
    w = info["weights"]
    if w is None:
        print("weights     none found")
    else:
        print(f"weights     {w['format']}, {len(w['files'])} file(s), {w['bytes'] / 2 ** 30:.2f} GiB, "
              f"dtypes {w['dtypes']}")
    return 0


def cmd_init_random(args) -> int:
    from .random_init import init_random
    t0 = time.perf_counter()
    out = init_random(args.arch, args.out, fmt=args.format, seed=args.seed, progress=True)
    print(out)
    print(f"wrote a random {args.arch} checkpoint in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from .bench.harness import main as bench_main
    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .random_init import FORMATS
    p = argparse.ArgumentParser(prog="fastjanus", description="Fast inference for Janus / Janus-Pro.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, model_required: bool):
        sp.add_argument("--model", required=model_required, help="checkpoint folder (official hub layout)")
        sp.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
        sp.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default: bf16/fp16 on CUDA, fp32 on CPU)")
        sp.add_argument("--seed", type=int, default=None)
        sp.add_argument("--backend", choices=["triton", "torch"], default=None,
                        help="kernels: triton (default on CUDA) or torch (default on CPU; triton there needs "
                             "TRITON_INTERPRET=1)")
        sp.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                        help="capture the decode step in CUDA Graphs (auto: on for CUDA + triton)")

    g = sub.add_parser("generate", help="text → images (PNG files)")
    common(g, False)
    g.add_argument("--prompt", required=True, action="append",
                   help="repeat for several prompts: they run as one batch")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance weight")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--out", default="out", help="output folder")
    g.set_defaults(fn=cmd_generate)

    u = sub.add_parser("understand", help="answer a question about an image")
    common(u, False)
    u.add_argument("--image", required=True)
    u.add_argument("--question", required=True)
    u.add_argument("--max-new-tokens", type=int, default=256)
    u.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    u.add_argument("--top-p", type=float, default=None)
    u.set_defaults(fn=cmd_understand)

    i = sub.add_parser("info", help="describe a checkpoint from its config and tokenizer files")
    i.add_argument("--model", required=True)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    b = sub.add_parser("bench", help="benchmark latency, throughput, memory and roofline against baselines")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--arch", choices=["tiny", "janus-1.3b", "janus-pro-1b", "janus-pro-7b"], default="tiny",
                     help="random weights of a preset, written once into the cache (default: tiny)")
    src.add_argument("--model", default=None, help="a checkpoint folder instead of --arch")
    b.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    b.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default: bf16/fp16 on CUDA, fp32 on CPU)")
    b.add_argument("--backend", choices=["triton", "torch"], default=None)
    b.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="capture the decode step in CUDA Graphs (auto: on for CUDA + triton)")
    b.add_argument("--scenario", action="append",
                   choices=["t2i-1", "t2i-16", "throughput", "siglip", "vq-decode", "understand"],
                   help="repeat to pick several (default: all)")
    b.add_argument("--baselines", default="torch-eager,transformers",
                   help="comma-separated: torch-eager, transformers, or none (default: both)")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--baseline-repeats", type=int, default=None, help="default: --repeats")
    b.add_argument("--max-batch", type=int, default=None,
                   help="images for the throughput scenario (default: the largest power of two that fits; 8 on CPU)")
    b.add_argument("--text-tokens", type=int, default=64, help="tokens per understanding run (EOS ignored)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, help="write the full report (conditions and every number) here")
    b.add_argument("--plot", default=None, help="write a PNG: latency breakdown and roofline fraction")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(fn=cmd_bench)

    r = sub.add_parser("init-random", help="write a random checkpoint in the official layout")
    r.add_argument("--arch", required=True, choices=sorted(PRESETS))
    r.add_argument("--out", required=True)
    r.add_argument("--format", choices=FORMATS, default=None, help="default: the hub's format for that model")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(fn=cmd_init_random)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "prompt", None) is not None and len(args.prompt) == 1:
        args.prompt = args.prompt[0]
    try:
        return args.fn(args)
    except (FastJanusError, OSError) as e:  # OSError: unwritable --out and the like
        msg = " ".join(str(e).split())
        print(f"fastjanus: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
