"""`fastjanus` command line: generate, understand, info, quantize, init-random, bench.

Every flag is checked before a model is loaded, and `--out` before anything is generated, so a typo costs
a second, not a model load. Errors print one line, `fastjanus: error: ...`, in terms of flags, and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

from .errors import FastJanusError, InputError, cli_style, path_of, strip_ansi

MODEL_HELP = ("checkpoint folder in the official hub layout (config.json, weights, tokenizer files). Without it, "
              "a tiny RANDOM checkpoint is written once to the cache ($FASTJANUS_CACHE, else ~/.cache/fastjanus) "
              "and used: its outputs are noise, for trying the tool out")


def default_tiny_model() -> Path:
    """A tiny random checkpoint, written once into the cache directory (the same folder `bench --arch tiny`
    uses)."""
    from .random_init import cached_random_model
    return cached_random_model("tiny")


def _model_arg(args) -> Path:
    if args.model:
        return Path(args.model)
    d = default_tiny_model()
    print(f"note: no --model given; using the tiny RANDOM checkpoint at {d}. "
          "Its outputs are noise, not pictures or answers: pass --model DIR for a real Janus checkpoint.",
          file=sys.stderr)
    return d


_GRAPHS = {"auto": "auto", "on": True, "off": False}


def _check_runtime_flags(args) -> None:
    """--device, --dtype, --backend, --cuda-graphs, --max-rows, --max-len: the checks load() makes, before any
    model is read (those that need the model's config come with load)."""
    from .engine.pipeline import check_static_options, resolve_backend, resolve_cuda_graphs, resolve_device_dtype
    dev, _ = resolve_device_dtype(args.device, args.dtype)
    backend = resolve_backend(args.backend, dev)
    flow = _flow_model_arg(args)  # JanusFlow's graphs capture its plain-torch flow step: any backend
    resolve_cuda_graphs(_GRAPHS[args.cuda_graphs], dev, backend, needs_triton=not flow)
    if not flow:  # (JanusFlow refuses max_rows/max_len itself, at load)
        check_static_options(backend, args.max_rows, args.max_len)


def _flow_model_arg(args) -> bool:
    """--model (or bench's --arch) names a JanusFlow checkpoint (read from config.json alone; no model is written)."""
    from .flow_config import FLOW_PRESETS, is_janusflow, read_config_dict
    if getattr(args, "model", None):
        return is_janusflow(read_config_dict(Path(args.model)))
    return getattr(args, "arch", None) in FLOW_PRESETS


def _model_files(path: Path):
    """config.json and the tokenizer files alone (no weights): enough to check a request before loading.
    The config is a JanusConfig, or a JanusFlowConfig for a JanusFlow folder."""
    from .config import JanusConfig
    from .engine.pipeline import check_model_dir
    from .flow_config import JanusFlowConfig, is_janusflow, read_config_dict
    from .tokenizer import JanusTokenizer
    path = check_model_dir(path)
    cfg = (JanusFlowConfig if is_janusflow(read_config_dict(path)) else JanusConfig).from_file(path)
    return cfg, JanusTokenizer(path, cfg.language.vocab_size)


def _is_flow(cfg) -> bool:
    return getattr(cfg, "family", "janus") == "janusflow"


def _load(args, path: Path):
    from .engine.pipeline import load
    t0 = time.perf_counter()
    pipe = load(path, device=args.device, dtype=args.dtype, progress=True, backend=args.backend,
                cuda_graphs=_GRAPHS[args.cuda_graphs], max_rows=args.max_rows, max_len=args.max_len,
                quantize=args.quantize, quantize_heads=args.quantize_heads, kv_cache=args.kv_cache,
                onnx_dir=args.onnx_dir, vae=args.vae)
    q = pipe.quantization
    print(f"loaded {pipe.path} on {pipe.device} ({str(pipe.dtype).replace('torch.', '')}, {pipe.backend} backend, "
          f"CUDA graphs {'on' if pipe.cuda_graphs else 'off'}"
          + (f", {q.weights} weights{' + heads' if q.heads else ''}" if q else "")
          + (f", {pipe.kv_cache} KV cache" if pipe.kv_cache else "")
          + (f", SigLIP and VQ decoder on ONNX Runtime ({pipe.onnx.provider})" if pipe.onnx else "")
          + (f", VAE {pipe.vae_dir}" if getattr(pipe, "vae_dir", None) else "") + ") "
          f"in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return pipe


def _seed(args, matters: bool) -> int:
    """The seed of this run: --seed, or a new one that is printed so that a good result can be repeated."""
    if args.seed is not None:
        return args.seed
    seed = secrets.randbelow(2 ** 31)
    if matters:
        print(f"seed {seed} (pass --seed {seed} to repeat this run)", file=sys.stderr)
    return seed


def prepare_out_dir(out: str) -> Path:
    """--out: a folder that exists or can be made, and is writable; checked before anything is generated."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder; pass a folder for the PNG files (it is created "
                         "when missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create this folder ({e.strerror or e})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: the folder is not writable")
    return p


def save_images(images, out: Path, seed: int) -> list[Path]:
    """janus-<date>-<time>-s<seed>-<i>.png. Each file is created exclusively (O_EXCL): two runs in the same
    second, even with the same seed, never overwrite each other; a taken name gets a -2, -3, ... suffix."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    for i, img in enumerate(images):
        base, n = f"janus-{stamp}-s{seed}-{i:02d}", 1
        while True:
            path = out / (base + (f"-{n}" if n > 1 else "") + ".png")
            try:
                f = open(path, "xb")
            except FileExistsError:
                n += 1
                continue
            with f:
                img.save(f, format="PNG")
            break
        paths.append(path)
    return paths


def _check_onnx_flags(args) -> None:
    """--engine onnx: the flags that only the torch engine reads are refused, and --onnx-dir is needed."""
    torch_only = [f for f, v in (("--device", args.device), ("--dtype", args.dtype), ("--backend", args.backend),
                                 ("--max-rows", args.max_rows), ("--max-len", args.max_len),
                                 ("--kv-cache", args.kv_cache), ("--top-p", args.top_p),
                                 ("--window", args.window)) if v is not None]
    torch_only += [f for f, v in (("--quantize-heads", args.quantize_heads),
                                  ("--cuda-graphs", args.cuda_graphs != "auto"),
                                  ("--speculative", args.speculative)) if v]
    if torch_only:
        raise InputError(f"{', '.join(torch_only)}: not used by --engine onnx (the graphs fix the dtype; ONNX Runtime "
                         "picks the provider); drop them, or use --engine torch")
    if args.quantize not in (None, "int8"):
        raise InputError(f"--quantize {args.quantize}: --engine onnx has int8 graphs only "
                         "(export-onnx --quantize int8)")
    if not args.onnx_dir:
        raise InputError("--engine onnx needs --onnx-dir DIR, written by `fastjanus export-onnx --model MODEL "
                         "--out DIR --parts all`")


def _generate_onnx(args, path: Path, rows: list[list[int]], seed: int):
    """--engine onnx: the whole generation on ONNX Runtime (the LLM graphs, then the VQ decoder graph); only the
    tokenizer runs in Python and the checkpoint's weights are not loaded (onnx_export.model_identity says what
    the export is checked against). Returns (images, the timing line)."""
    from PIL import Image

    from .export.onnx_export import VQ, model_identity
    from .export.onnx_llm import PARTS as LLM_GRAPHS
    from .export.onnx_llm import OrtImageGenerator
    from .export.ort_runtime import OrtVision
    t0 = time.perf_counter()
    vision = OrtVision(args.onnx_dir, parts=(VQ, *LLM_GRAPHS), model_dir=path, **model_identity(path))
    if args.quantize and "int8" not in vision.manifest:
        raise InputError(f"--onnx-dir {args.onnx_dir}: exported without the int8 LLM graphs; export again with "
                         "`fastjanus export-onnx --parts all --quantize int8`")
    gen = OrtImageGenerator(args.onnx_dir, int8=args.quantize == "int8")
    t1 = time.perf_counter()
    codes = gen.generate(rows, cfg_weight=args.cfg, temperature=args.temperature, top_k=args.top_k, seed=seed)
    t2 = time.perf_counter()
    vq_batch = 8  # images per VQ decoder call, as the torch path without a memory plan: bounds the activations
    images = [Image.fromarray(a) for i in range(0, len(codes), vq_batch)
              for a in vision.decode(codes[i:i + vq_batch])[1]]
    t3 = time.perf_counter()
    return images, (f"{len(images)} image(s) on ONNX Runtime: sessions {t1 - t0:.2f} s, tokens {t2 - t1:.2f} s "
                    f"({gen.provider}{', int8 LLM' if args.quantize else ''}), VQ decode {t3 - t2:.2f} s "
                    f"({vision.provider}), seed {seed}")


def _generate_torch(args, path: Path, seed: int):
    """The pipeline on torch (the default engine). Returns (images, the timing line)."""
    pipe = _load(args, path)
    t0 = time.perf_counter()
    codes = pipe.generate_image_tokens(args.prompt, num_images=args.num_images, cfg_weight=args.cfg,
                                       temperature=args.temperature, seed=seed, top_k=args.top_k,
                                       top_p=args.top_p, progress=True, speculative=args.speculative,
                                       window=_window(args))
    t1 = time.perf_counter()
    tm = dict(pipe.last_timings)
    images = pipe.decode_image_tokens(codes)
    t2 = time.perf_counter()
    if args.speculative:  # acceptance depends on the model's entropy: random weights say little about trained ones
        steps = (f"{tm['passes']} speculative passes of {tm['window']} ({tm['codes_per_pass']:.2f} codes/pass per "
                 f"image) {tm['decode_s']:.2f} s")
    else:
        steps = f"{tm['steps']} steps {tm['decode_s']:.2f} s"
    return images, (f"{len(images)} image(s): tokens {t1 - t0:.2f} s (prefill {tm['prefill_s']:.3f} s, "
                    f"{steps}), VQ decode {t2 - t1:.2f} s, total {t2 - t0:.2f} s "
                    f"[{pipe.device}, {str(pipe.dtype).replace('torch.', '')}, seed {seed}]")


def _window(args) -> int:
    return 16 if args.window is None else args.window


def _check_flow_flags(args) -> None:
    """JanusFlow's generate: the flags of Janus's token sampler are refused rather than ignored."""
    from .engine.flow_pipeline import check_cfg_weight, check_steps
    codes_only = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                 ("--top-p", args.top_p), ("--window", args.window)) if v is not None]
    codes_only += ["--speculative"] if args.speculative else []
    codes_only += ["--engine onnx"] if args.engine == "onnx" else []
    if codes_only:
        raise InputError(f"{', '.join(codes_only)}: JanusFlow makes images by rectified flow, not by sampling image "
                         "codes; drop them (its options are --steps and --cfg)")
    check_cfg_weight(args.cfg)
    check_steps(args.steps)


def _generate_flow(args, path: Path, seed: int):
    """JanusFlow: the flow's latents, then the SDXL VAE. Returns (images, the timing line)."""
    pipe = _load(args, path)
    t0 = time.perf_counter()
    z = pipe.generate_image_latents(args.prompt, num_images=args.num_images, cfg_weight=args.cfg, steps=args.steps,
                                    seed=seed, progress=True)
    tm = dict(pipe.last_timings)
    images = pipe.decode_image_latents(z)
    t1 = time.perf_counter()
    capture = f"graph capture {tm['capture_s']:.2f} s, " if tm["capture_s"] else ""
    return images, (f"{len(images)} image(s): {capture}prompt {tm['prompt_s']:.3f} s, {tm['steps']} flow steps "
                    f"{tm['steps_s']:.2f} s ({tm['step_s'] * 1e3:.1f} ms/step), VAE decode "
                    f"{pipe.last_timings['vae_s']:.2f} s, total {t1 - t0:.2f} s "
                    f"[{pipe.device}, {str(pipe.dtype).replace('torch.', '')}, CUDA graphs "
                    f"{'on' if tm['cuda_graphs'] else 'off'}, seed {seed}]")


def cmd_generate(args) -> int:
    from .engine.flow_pipeline import check_steps
    from .engine.pipeline import check_count, check_sampling, check_seed, check_speculative, image_token_rows
    # Values first, for either family (no model is read, not even the default tiny one, before they pass); then,
    # once config.json says which family this is, the flags that family does not take.
    check_count("num_images", args.num_images)
    check_sampling(1.0 if args.temperature is None else args.temperature, args.top_k, args.top_p,
                   0.0 if args.cfg is None else args.cfg)
    check_seed(args.seed)
    if args.steps is not None:
        check_steps(args.steps)
    if args.window is not None and not args.speculative:
        raise InputError("--window sets the draft codes per pass of --speculative; add --speculative or drop it")
    check_speculative(args.speculative, _window(args))
    if args.speculative and args.kv_cache:
        raise InputError(f"--speculative does not support --kv-cache {args.kv_cache} yet; drop one of them")
    if args.engine == "onnx" and not _flow_model_arg(args):  # (JanusFlow refuses --engine onnx below)
        _check_onnx_flags(args)
    elif args.engine != "onnx":
        _check_runtime_flags(args)
    out = prepare_out_dir(args.out)
    path = _model_arg(args)
    cfg, tk = _model_files(path)
    if _is_flow(cfg):
        from .engine.flow_pipeline import flow_prompt_ids, resolve_vae_dir
        args.cfg = 2.0 if args.cfg is None else args.cfg  # the official JanusFlow default
        args.steps = 30 if args.steps is None else args.steps
        _check_flow_flags(args)
        flow_prompt_ids(tk, cfg, args.prompt)  # the prompts' lengths, before loading
        resolve_vae_dir(path, args.vae)  # images need the VAE: say so before loading
        seed = _seed(args, matters=True)
        images, timing = _generate_flow(args, path, seed)
    else:
        if args.steps is not None:
            raise InputError("--steps sets JanusFlow's flow steps; this is a Janus checkpoint, which makes one image "
                             "code per step: drop it")
        if args.vae is not None:
            raise InputError("--vae applies to JanusFlow checkpoints; this is a Janus checkpoint (its own VQ decoder "
                             "makes the pixels): drop it")
        args.cfg = 5.0 if args.cfg is None else args.cfg
        args.temperature = 1.0 if args.temperature is None else args.temperature
        rows = image_token_rows(tk, cfg, args.prompt, args.num_images)  # the prompts' lengths, before loading
        seed = _seed(args, matters=args.temperature > 0)
        images, timing = (_generate_onnx(args, path, rows, seed) if args.engine == "onnx" else
                          _generate_torch(args, path, seed))
    for p in save_images(images, out, seed):
        print(p)
    print(timing, file=sys.stderr)
    return 0


def cmd_understand(args) -> int:
    from .engine.pipeline import check_count, check_sampling, check_seed, question_ids
    from .image import load_image
    check_count("max_new_tokens", args.max_new_tokens)
    check_sampling(args.temperature, args.top_k, args.top_p)
    check_seed(args.seed)
    _check_runtime_flags(args)
    image = load_image(args.image)
    path = _model_arg(args)
    cfg, tk = _model_files(path)
    question_ids(tk, cfg, args.question, args.max_new_tokens)  # the image tag, the length: before loading
    seed = _seed(args, matters=args.temperature > 0)
    pipe = _load(args, path)

    def show(piece: str) -> None:  # the answer as it is decoded
        sys.stdout.write(piece)
        sys.stdout.flush()
    pipe.answer(image, args.question, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                seed=seed, top_k=args.top_k, top_p=args.top_p, stream=show)
    print()
    tm = pipe.last_timings
    print(f"{tm['new_tokens']} tokens in {tm['total_s']:.2f} s (first token after {tm['time_to_first_token_s']:.3f} s)"
          + (f", seed {seed}" if args.temperature > 0 else ""), file=sys.stderr)
    return 0


def _weights_info(d: Path, find=None) -> dict | None:
    """The weight files of a folder: format, files, bytes, tensors by dtype (None when there are none)."""
    import math

    import torch

    from .checkpoint import find_weights, read_shapes
    from .errors import CheckpointNotFoundError
    try:
        files = (find or find_weights)(d)
    except CheckpointNotFoundError:
        return None
    dtypes: dict[str, int] = {}
    by_dtype: dict[str, int] = {}
    for shape, dt, _ in read_shapes(files).values():
        dtypes[dt] = dtypes.get(dt, 0) + 1
        t = getattr(torch, dt, None)  # a dtype name torch lacks counts 0 bytes rather than failing `info`
        by_dtype[dt] = by_dtype.get(dt, 0) + math.prod(shape) * (t.itemsize if isinstance(t, torch.dtype) else 0)
    return {"format": files.format, "files": [f.name for f in files.files], "bytes": files.total_bytes,
            "dtypes": dtypes, "tensor_bytes_by_dtype": by_dtype}


def _llm_vision_info(cfg) -> dict:
    """The LLM's and SigLIP's sizes (Janus and JanusFlow alike)."""
    L, v = cfg.language, cfg.vision
    return {"hidden_size": L.hidden_size, "num_layers": L.num_hidden_layers, "num_heads": L.num_attention_heads,
            "num_kv_heads": L.num_key_value_heads, "head_dim": L.head_dim, "intermediate_size": L.intermediate_size,
            "vocab_rows": L.vocab_size, "max_positions": L.max_position_embeddings,
            "vision": {"width": v.width, "layers_used": v.layers_used, "image_size": v.image_size,
                       "image_tokens": v.num_patches}}


def _print_llm_vision(a: dict, vision_note: str = "") -> None:
    print(f"LLM         hidden {a['hidden_size']}, layers {a['num_layers']}, heads {a['num_heads']}, "
          f"kv heads {a['num_kv_heads']}, intermediate {a['intermediate_size']}, vocab rows {a['vocab_rows']}, "
          f"context {a['max_positions']}")
    print(f"vision      width {a['vision']['width']}, {a['vision']['layers_used']} blocks, "
          f"{a['vision']['image_size']} px → {a['vision']['image_tokens']} tokens{vision_note}")


def _print_tokenizer(t: dict) -> None:
    print(f"tokenizer   {t['size']} tokens, template {t['template']}, special ids {t['special_ids']}"
          + (f", added at load: {t['added_at_load']}" if t["added_at_load"] else ""))


def flow_model_info(d: Path) -> dict:
    """model_info for a JanusFlow folder: the LLM, SigLIP, the UViT pair, the flow geometry and the VAE."""
    import torch

    from .flow_config import JanusFlowConfig
    from .models.janusflow import JanusFlowModel
    from .tokenizer import JanusTokenizer
    cfg = JanusFlowConfig.from_file(d)
    L, e, dc = cfg.language, cfg.gen_enc, cfg.gen_dec
    with torch.device("meta"):
        m = JanusFlowModel(cfg)
    count = (lambda prefix: sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix)))  # noqa: E731
    info = {
        "path": str(d), "family": "janusflow",
        "architecture": {**_llm_vision_info(cfg),
                         "image_generation": {
                             "method": "rectified flow", "image_size": cfg.image_size,
                             "latent": [cfg.latent_channels, cfg.latent_size, cfg.latent_size],
                             "grid": cfg.grid, "latent_tokens": cfg.num_gen_tokens,
                             "uvit_encoder": {"channels": e.channels, "kernel": e.kernel_size, "stride": e.stride,
                                              "padding": e.padding, "convnext_blocks": e.layers_in_middle
                                              if e.use_mid_block else 0},
                             "uvit_decoder": {"in_channels": dc.in_channels, "channels": dc.channels,
                                              "upsamples": dc.upsamples, "convnext_blocks": dc.layers_in_middle
                                              if dc.use_mid_block else 0}}},
        "parameters": sum(p.numel() for p in m.parameters()),
        "llm_parameters_without_embeddings": count("language_model.model.layers.") + L.hidden_size,
        "uvit_parameters": count("vision_gen_enc_model.") + count("vision_gen_dec_model."),
    }
    tk = JanusTokenizer(d, L.vocab_size)
    info["tokenizer"] = {"size": len(tk), "template": tk.template, "special_ids": tk.special_ids(),
                         "added_at_load": tk.added}
    info["weights"] = _weights_info(d)
    info["vae"] = _vae_info(d / "vae", cfg)
    info["quantization"] = None
    return info


def _vae_info(vd: Path, cfg) -> dict | None:
    from .models.sdxl_vae import VAEConfig, find_vae_weights
    if not (vd / "config.json").is_file():
        return None
    v = VAEConfig.from_file(vd)
    return {"path": str(vd), "latent_channels": v.latent_channels, "block_out_channels": list(v.block_out_channels),
            "downsample": v.downsample, "scaling_factor": v.scaling_factor,
            "matches_model": v.latent_channels == cfg.latent_channels and v.downsample * cfg.latent_size ==
            cfg.image_size, "weights": _weights_info(vd, find_vae_weights)}


def model_info(model_dir) -> dict:
    """Architecture, parameter count, special ids and (if present) the weight files, without loading weights."""
    import torch

    from .config import JanusConfig
    from .engine.memory import weight_bytes
    from .engine.pipeline import check_model_dir
    from .flow_config import is_janusflow, read_config_dict
    from .models.janus import JanusModel
    from .tokenizer import JanusTokenizer
    d = check_model_dir(model_dir)
    if is_janusflow(read_config_dict(d)):
        return flow_model_info(d)
    cfg = JanusConfig.from_file(d)
    L = cfg.language
    with torch.device("meta"):
        m = JanusModel(cfg)
    n_params = sum(p.numel() for p in m.parameters())
    n_llm = sum(p.numel() for n, p in m.named_parameters()
                if n.startswith("language_model.model.layers.") or n == "language_model.model.norm.weight")
    info = {
        "path": str(d),
        "architecture": {**_llm_vision_info(cfg),
                         "image_generation": {"codebook": cfg.vq.codebook_size, "grid": cfg.vq.grid,
                                              "image_tokens": cfg.num_image_tokens,
                                              "image_size": cfg.vq.image_size}},
        "parameters": n_params,
        "llm_parameters_without_embeddings": n_llm,
    }
    tk = JanusTokenizer(d, L.vocab_size)
    info["tokenizer"] = {"size": len(tk), "template": tk.template, "special_ids": tk.special_ids(),
                         "added_at_load": tk.added}
    info["weights"] = _weights_info(d)
    from .bench import roofline as rl
    from .quant import QuantConfig
    qc = QuantConfig.of(cfg, str(d / "config.json"))
    info["quantization"] = None if qc is None else qc.to_dict()
    # what load() places and what one decode step reads, in the model dtype (bf16 on a GPU) and for this scheme
    info["loaded_bytes_bf16"] = weight_bytes(cfg, 2, qc)
    info["image_step_weight_bytes_bf16"] = rl.image_step_weight_bytes(cfg, 2, qc)
    info["text_step_weight_bytes_bf16"] = rl.text_step_weight_bytes(cfg, 2, qc)
    return info


def _size(b: float) -> str:
    return f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"


def _print_weights(w, indent: str = "weights     ") -> None:
    if w is None:
        print(indent + "none found")
        return
    print(f"{indent}{w['format']}, {len(w['files'])} file(s), {w['bytes'] / 2 ** 30:.2f} GiB, dtypes {w['dtypes']}")
    print(" " * len(indent) + "tensor bytes by dtype: " + ", ".join(f"{k} {_size(v)}"
                                                                  for k, v in w["tensor_bytes_by_dtype"].items()))


def cmd_info(args) -> int:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    a = info["architecture"]
    if info.get("family") == "janusflow":
        print(f"model       {info['path']} (JanusFlow: rectified-flow text-to-image)")
        _print_llm_vision(a, " (+ begin-of-understanding)")
        g = a["image_generation"]
        e, dc = g["uvit_encoder"], g["uvit_decoder"]
        print(f"generation  latent {'×'.join(map(str, g['latent']))} → {g['latent_tokens']} LLM tokens "
              f"({g['grid']}×{g['grid']}) → {g['image_size']} px; UViT encoder {e['channels']} ch, "
              f"{e['kernel']}×{e['kernel']}/{e['stride']} conv + {e['convnext_blocks']} ConvNeXt; decoder "
              f"{dc['convnext_blocks']} ConvNeXt + {dc['upsamples']} unpatchify")
        print(f"parameters  {info['parameters']:,} (LLM without embeddings "
              f"{info['llm_parameters_without_embeddings']:,}, UViT {info['uvit_parameters']:,})")
        _print_tokenizer(info["tokenizer"])
        _print_weights(info["weights"])
        v = info["vae"]
        if v is None:
            print(f"VAE         none in {Path(info['path']) / 'vae'} (pass --vae DIR to generate, or put the SDXL VAE "
                  "there: config.json + diffusion_pytorch_model.safetensors)")
        else:
            print(f"VAE         {v['path']}: latent {v['latent_channels']} ch, {v['downsample']}× "
                  f"(channels {v['block_out_channels']}), scaling {v['scaling_factor']}"
                  + ("" if v["matches_model"] else " — DOES NOT MATCH the model's latent"))
            _print_weights(v["weights"], "            ")
        return 0
    print(f"model       {info['path']}")
    _print_llm_vision(a)
    g = a["image_generation"]
    print(f"generation  {g['image_tokens']} codes ({g['grid']}×{g['grid']}) of {g['codebook']} → {g['image_size']} px")
    print(f"parameters  {info['parameters']:,} (LLM without embeddings {info['llm_parameters_without_embeddings']:,})")
    _print_tokenizer(info["tokenizer"])
    _print_weights(info["weights"])
    q = info["quantization"]
    print("quantized   " + ("no" if q is None else
                            f"{q['weights']} ({q['weight_dtype']}), {q['granularity']} {q['scale_dtype']} scales, "
                            f"weight-only; LLM linears{' + heads' if q['heads'] else ''}"))
    print(f"in memory   {_size(info['loaded_bytes_bf16'])} of tensors loaded (bf16); a decode step "
          f"reads {info['image_step_weight_bytes_bf16'] / 1e9:.2f} GB of weights (image), "
          f"{info['text_step_weight_bytes_bf16'] / 1e9:.2f} GB (text)")
    return 0


def cmd_export_onnx(args) -> int:
    from .export.onnx_export import MANIFEST, export_onnx
    m = export_onnx(args.model, args.out, args.parts, args.dtype, args.opset,
                    progress=lambda line: print(line, file=sys.stderr, flush=True), quantize=args.quantize)
    total = sum(e["bytes"] for e in m["parts"].values())
    print(f"{len(m['parts'])} graph(s), {total / 2 ** 20:.1f} MiB, manifest: {Path(args.out) / MANIFEST}",
          file=sys.stderr)
    print(Path(args.out) / MANIFEST)
    return 0


def cmd_export_aoti(args) -> int:
    from .export.aoti_export import MANIFEST, export_aoti
    m = export_aoti(args.model, args.out, args.parts, args.device, args.dtype, args.max_images,
                    progress=lambda line: print(line, file=sys.stderr, flush=True))
    total = sum(e["bytes"] for e in m["parts"].values())
    print(f"{len(m['parts'])} package(s), {total / 2 ** 20:.1f} MiB, {m['device']} {m['dtype']}, in "
          f"{m['export_seconds']} s; run them with fastjanus-run (CMakeLists.txt)", file=sys.stderr)
    print(Path(args.out) / MANIFEST)
    return 0


def cmd_tokenize(args) -> int:
    """The generation prompt's token ids (chat template applied), one prompt per line: the input of the C++
    runner (`fastjanus-run generate --prompt-ids FILE`), which has no tokenizer."""
    from .engine.pipeline import image_token_rows
    path = _model_arg(args)
    cfg, tk = _model_files(path)
    if _is_flow(cfg):
        raise InputError(f"{path_of('model', path)}: a JanusFlow checkpoint; the C++ runner covers Janus and "
                         "Janus-Pro only")
    rows = image_token_rows(tk, cfg, args.prompt, 1)  # each prompt checked against the context
    lines = "".join(" ".join(map(str, r)) + "\n" for r in rows[0::2])
    if args.out == "-":
        sys.stdout.write(lines)
        return 0
    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"{path_of('out', out)}: is a folder; pass a file name for the token ids")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(lines)
    except OSError as e:
        raise InputError(f"{path_of('out', out)}: cannot write ({e.strerror or e})") from None
    print(out)
    return 0


def cmd_quantize(args) -> int:
    from .quant import check_scheme
    from .quantize import check_out_dir, check_source, quantize_checkpoint
    from .engine.memory import weight_bytes
    check_scheme(args.weights, "weights")
    src, cfg = check_source(args.model)
    check_out_dir(args.out)
    if args.quality:
        _check_runtime_flags(args)
        from .engine.pipeline import check_count
        check_count("quality_prompts", args.quality_prompts)
    t0 = time.perf_counter()
    out = quantize_checkpoint(src, args.out, args.weights, heads=args.heads, progress=True)
    info = model_info(out)
    print(out)
    print(f"wrote {args.weights} weights{' + heads' if args.heads else ''} in {time.perf_counter() - t0:.1f} s: "
          f"{_size(info['weights']['bytes'])} on disk, {_size(info['loaded_bytes_bf16'])} loaded in bf16 (was "
          f"{_size(weight_bytes(cfg, 2))})", file=sys.stderr)
    if args.quality:
        from .bench.quant_quality import format_report, measure
        rep = measure(src, args.weights, args.heads, quantized_dir=out, n_prompts=args.quality_prompts,
                      device=args.device, dtype=args.dtype, backend=args.backend,
                      log=lambda s: print(s, file=sys.stderr))
        print(format_report(rep))
    return 0


def cmd_init_random(args) -> int:
    from .random_init import init_random
    t0 = time.perf_counter()
    out = init_random(args.arch, args.out, fmt=args.format, seed=args.seed, progress=True)
    print(out)
    print(f"wrote a random {args.arch} checkpoint in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    _check_runtime_flags(args)  # before any random checkpoint is written (Pro-7B: 15 GB)
    if _flow_model_arg(args):
        from .bench.flow_bench import main as flow_main
        return flow_main(args)
    if args.steps is not None:
        raise InputError("--steps sets JanusFlow's flow steps; drop it for a Janus benchmark")
    from .bench.harness import main as bench_main
    return bench_main(args)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except where there is none or the help text already explains it."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in h or "%(default)" in h:
            return h
        return super()._get_help_string(action)


def _version() -> str:
    import platform

    import torch

    from . import __version__
    from .kernels import triton_status
    ok, _, triton = triton_status()
    return (f"fastjanus {__version__} (torch {torch.__version__}, triton {triton if ok else 'not importable'}, "
            f"Python {platform.python_version()})")


def build_parser() -> argparse.ArgumentParser:
    from .random_init import ARCHS, FORMATS
    p = argparse.ArgumentParser(prog="fastjanus", formatter_class=_Help,
                                description="Fast inference for DeepSeek Janus-1.3B, Janus-Pro-1B, Janus-Pro-7B and "
                                            "JanusFlow-1.3B: text-to-image and image understanding.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def common(sp, model_required: bool):
        sp.add_argument("--model", required=model_required, metavar="DIR",
                        help="checkpoint folder (official hub layout)" if model_required else MODEL_HELP)
        sp.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available, else cpu)")
        sp.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="weights and activations (default: bf16 on CUDA, fp16 where bf16 is missing, fp32 on "
                             "the CPU)")
        sp.add_argument("--seed", type=int, default=None,
                        help="sampling seed (default: a new one, printed so that the run can be repeated)")
        sp.add_argument("--backend", choices=["triton", "torch"], default=None,
                        help="kernels: triton (default on CUDA) or torch (default on the CPU; triton there needs "
                             "TRITON_INTERPRET=1)")
        sp.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                        help="capture the decode step in CUDA Graphs (auto: on for CUDA + triton; JanusFlow's flow "
                             "step: on for CUDA, any backend)")
        sp.add_argument("--max-rows", type=int, default=None,
                        help="memory plan: the largest batch in rows, 2 per image (default: from free memory)")
        sp.add_argument("--max-len", type=int, default=None,
                        help="memory plan: KV slots per row (default: 576 image tokens + 512 for the prompt)")
        quant_flags(sp)
        sp.add_argument("--onnx-dir", default=None, metavar="DIR",
                        help="run SigLIP and the VQ decoder on ONNX Runtime from a `fastjanus export-onnx` folder of "
                             "this checkpoint (provider: TensorRT, CUDA, then CPU, whichever is installed)")
        sp.add_argument("--vae", default=None, metavar="DIR",
                        help="JanusFlow: the SDXL VAE folder (diffusers layout; default: vae/ in the model folder)")

    def quant_flags(sp):
        sp.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                        help="8-bit weights for the LLM's linear layers, quantized at load (a folder written by "
                             "`fastjanus quantize` needs no flag)")
        sp.add_argument("--quantize-heads", action="store_true", help="with --quantize: gen_head and lm_head too")
        sp.add_argument("--kv-cache", choices=["fp8"], default=None,
                        help="an e4m3 KV cache (half the bytes; default: the model dtype)")

    g = sub.add_parser("generate", help="text → images (PNG files)", formatter_class=_Help,
                       description="Generate images from a prompt and write them as PNG files.")
    common(g, False)
    g.add_argument("--prompt", required=True, action="append",
                   help="the picture to make; repeat for several prompts, which run as one batch")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance weight (default: 5 for Janus, 2 for JanusFlow)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1; Janus only)")
    g.add_argument("--steps", type=int, default=None, help="JanusFlow: Euler steps of the flow (default 30)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely codes (default: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: off)")
    g.add_argument("--out", default="out", help="output folder, created when missing")
    g.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                   help="onnx: the whole generation on ONNX Runtime from --onnx-dir (exported with --parts all; "
                        "--quantize int8 takes its int8 graphs); the tokenizer stays in Python")
    g.add_argument("--speculative", action="store_true",
                   help="speculative Jacobi decoding: several codes per LLM pass, the same distribution (the same "
                        "codes when greedy); how many per pass depends on the model")
    g.add_argument("--window", type=int, default=None, help="with --speculative: draft codes per pass (default 16)")
    g.set_defaults(fn=cmd_generate)

    u = sub.add_parser("understand", help="answer a question about an image", formatter_class=_Help,
                       description="Answer a question about an image; the answer is printed as it is decoded.")
    common(u, False)
    u.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    u.add_argument("--question", required=True)
    u.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    u.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    u.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    u.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: off)")
    u.set_defaults(fn=cmd_understand)

    i = sub.add_parser("info", help="describe a checkpoint from its config and tokenizer files",
                       formatter_class=_Help)
    i.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(fn=cmd_info)

    q = sub.add_parser("quantize", help="write an 8-bit copy of a checkpoint (int8 or FP8 weights)",
                       formatter_class=_Help,
                       description="Quantize a checkpoint's LLM linear layers to 8 bits (symmetric, per output "
                                   "channel, weight-only) and write a complete folder that fastjanus loads as it is.")
    q.add_argument("--model", required=True, metavar="DIR", help="the float checkpoint folder (official layout)")
    q.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder for the 8-bit checkpoint")
    q.add_argument("--weights", required=True, choices=["int8", "fp8"], help="8-bit format")
    q.add_argument("--heads", action="store_true", help="quantize gen_head and lm_head too")
    q.add_argument("--quality", action="store_true",
                   help="then measure its guided-logit error and top-1 agreement against the float model")
    q.add_argument("--quality-prompts", type=int, default=32, help="random prompts for --quality")
    q.add_argument("--device", default=None, help="for --quality: cuda or cpu (default: cuda when available)")
    q.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="for --quality")
    q.add_argument("--backend", choices=["triton", "torch"], default=None, help="for --quality")
    q.set_defaults(fn=cmd_quantize, cuda_graphs="off", max_rows=None, max_len=None)

    x = sub.add_parser("export-onnx", help="export the SigLIP encoder and the VQ decoder to ONNX",
                       formatter_class=_Help,
                       description="Write vision_encoder.onnx (pixel_values → image_embeds), vq_decoder.onnx (codes → "
                                   "pixels and uint8 images) and manifest.json, with a dynamic batch axis; checked "
                                   "with onnx.checker and shape inference. --parts all adds the LLM graphs of image "
                                   "generation.")
    x.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (official hub layout)")
    x.add_argument("--out", required=True, metavar="DIR", help="output folder, created when missing")
    x.add_argument("--parts", default="vision,vq-decoder",
                   help="comma-separated: vision, vq-decoder, llm (the LLM graphs of image generation); or all")
    x.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="weights and activations of the graphs")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset, 14 to 20 (attention needs 14)")
    x.add_argument("--quantize", choices=["int8"], default=None,
                   help="with --parts all: also int8 LLM graphs (ONNX Runtime's dynamic quantization), their size "
                        "and first-step logit error reported")
    x.set_defaults(fn=cmd_export_onnx)

    a = sub.add_parser("export-aoti", help="AOTInductor packages for the C++ runner (no Python at run time)",
                       formatter_class=_Help,
                       description="Write vision_encoder.pt2 (pixel_values → image_embeds), vq_decoder.pt2 (codes → "
                                   "uint8 images), generator.pt2 (prompt prefill, decode step and guided sampler over "
                                   "caller-owned KV buffers) and manifest.json, for fastjanus-run and "
                                   "libfastjanus_runtime (CMakeLists.txt). A package runs on the kind of machine it "
                                   "was compiled on (CPU ISA or GPU), with the LibTorch of the same torch release.")
    a.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (official hub layout)")
    a.add_argument("--out", required=True, metavar="DIR", help="output folder, created when missing")
    a.add_argument("--parts", default="vision,vq-decoder,generator", help="comma-separated subset")
    a.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the packages run")
    a.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weights and activations (default: fp32 on cpu, bf16 on cuda)")
    a.add_argument("--max-images", type=int, default=16, help="most images per generate call")
    a.set_defaults(fn=cmd_export_aoti)

    t = sub.add_parser("tokenize", help="a prompt's token ids for fastjanus-run (the chat template applied)",
                       formatter_class=_Help)
    t.add_argument("--model", default=None, metavar="DIR",
                   help="checkpoint folder (its tokenizer and config files; default: the tiny random model)")
    t.add_argument("--prompt", required=True, action="append", help="repeat for several prompts (one line each)")
    t.add_argument("--out", default="-", metavar="FILE", help="file to write, - for stdout")
    t.set_defaults(fn=cmd_tokenize)

    b = sub.add_parser("bench", help="benchmark latency, throughput, memory and roofline against baselines",
                       formatter_class=_Help)
    src = b.add_mutually_exclusive_group()
    src.add_argument("--arch", choices=["tiny", "janus-1.3b", "janus-pro-1b", "janus-pro-7b", "tiny-flow",
                                       "janusflow-1.3b"], default="tiny",
                     help="random weights of a preset, written once into the cache")
    src.add_argument("--model", default=None, metavar="DIR", help="a checkpoint folder instead of --arch")
    b.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available, else cpu)")
    b.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="default: bf16 on CUDA (fp16 where bf16 is missing), fp32 on the CPU")
    b.add_argument("--backend", choices=["triton", "torch"], default=None,
                   help="default: triton on CUDA, torch on the CPU")
    b.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="capture the decode step in CUDA Graphs (auto: on for CUDA + triton; JanusFlow: on for CUDA)")
    b.add_argument("--max-rows", type=int, default=None,
                   help="memory plan: the largest batch in rows, 2 per image (default: from free memory)")
    b.add_argument("--max-len", type=int, default=None,
                   help="memory plan: KV slots per row (default: 576 image tokens + 512 for the prompt)")
    quant_flags(b)
    b.add_argument("--quality", action="store_true",
                   help="with --quantize/--kv-cache: also measure the error against the unquantized model")
    b.add_argument("--scenario", action="append",
                   choices=["t2i-1", "t2i-16", "throughput", "siglip", "vq-decode", "understand", "t2i-1-long"],
                   help="repeat to pick several (default: all of the model's; t2i-1-long is JanusFlow's: one image "
                        "after a ~300-token prompt)")
    b.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                   help="onnx: also export SigLIP and the VQ decoder and time them on ONNX Runtime (rows "
                        "siglip[onnx], vq-decode[onnx] beside the torch ones)")
    b.add_argument("--speculative", action="store_true",
                   help="each image scenario also runs with speculative decoding (rows [specW]: passes, codes per "
                        "pass, time per pass against a plain step)")
    b.add_argument("--window", type=int, default=None, help="with --speculative: draft codes per pass (default 16)")
    b.add_argument("--baselines", default="torch-eager,transformers",
                   help="comma-separated: torch-eager, transformers, or none")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per scenario")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs per scenario")
    b.add_argument("--baseline-repeats", type=int, default=None, help="default: min(--repeats, 2)")
    b.add_argument("--max-batch", type=int, default=None,
                   help="images for the throughput scenario (default: the memory plan's largest bucket on CUDA, "
                        "8 on the CPU)")
    b.add_argument("--text-tokens", type=int, default=64, help="tokens per understanding run (EOS ignored)")
    b.add_argument("--steps", type=int, default=None, help="JanusFlow: Euler steps per image (default 30)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random prompts, images and sampling")
    b.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="stop starting new runs after S seconds and report what was skipped (default: no limit)")
    b.add_argument("--json", default=None, metavar="FILE", help="write the full report (conditions, every number)")
    b.add_argument("--plot", default=None, metavar="FILE.png", help="write a PNG: latency breakdown, roofline")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(fn=cmd_bench, flag_names={"max_new_tokens": "--text-tokens"})

    r = sub.add_parser("init-random", help="write a random checkpoint in the official layout", formatter_class=_Help)
    r.add_argument("--arch", required=True, choices=ARCHS)
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--format", choices=FORMATS, default=None, help="default: the hub's format for that model")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(fn=cmd_init_random)
    return p


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, FastJanusError) and e.strerror:
        msg = e.strerror + (f": {e.filename}" if e.filename else "")
    else:
        msg = str(e)
    return " ".join(strip_ansi(msg).split())


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:  # bare `fastjanus`
        parser.print_help()
        return 0
    if getattr(args, "prompt", None) is not None and len(args.prompt) == 1:
        args.prompt = args.prompt[0]
    try:
        with cli_style(getattr(args, "flag_names", None)):
            return args.fn(args)
    except (FastJanusError, OSError) as e:  # OSError: unwritable files and the like
        print(f"fastjanus: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastjanus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
