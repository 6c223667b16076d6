"""`fastjanus export-aoti`: AOTInductor packages that a C++ program runs without Python (`export/cpp/`,
`CMakeLists.txt`), one `.pt2` per part plus manifest.json:

    vision_encoder.pt2  model "model": pixel_values float32 [N, 3, s, s] → image_embeds [N, tokens, D]
    vq_decoder.pt2      model "model": codes int64 [N, n] → images uint8 [N, S, S, 3] (decode_image_tokens' pixels)
    generator.pt2       models "prefill" and "step" (aoti_modules.py): the prompt prefill into a caller-owned KV
                        cache, one decode step, and the guided sampler, all on the device

Each package carries the checkpoint's fingerprint in its metadata, so the runner refuses packages of another
model. The step is packaged without weights: the runner gives it the prefill's (one copy of the LLM in memory and
on disk). A package is compiled for the export machine's kind: the CPU ISA (AOTI_CPU_ISA in its metadata) or the
GPU, and it runs with the LibTorch of the same torch release (the manifest records both).
"""
from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import torch

from ..errors import InputError, path_of

VISION, VQ, GENERATOR = "vision", "vq-decoder", "generator"
PARTS = (VISION, VQ, GENERATOR)
FILES = {VISION: "vision_encoder.pt2", VQ: "vq_decoder.pt2", GENERATOR: "generator.pt2"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MANIFEST = "manifest.json"
FORMAT = "fastjanus-aoti"
FORMAT_VERSION = 1
DEFAULT_MAX_IMAGES = 16
VQ_MAX_BATCH = 8  # images per VQ decoder / vision encoder call; the runner chunks larger requests


def parse_parts(parts) -> list[str]:
    """"vision,vq-decoder,generator" (any subset, comma-separated), a list, or None for all three."""
    if parts is None:
        return list(PARTS)
    items = parts.split(",") if isinstance(parts, str) else list(parts)
    items = [p.strip() for p in items if p.strip()]
    bad = [p for p in items if p not in PARTS]
    if bad or not items:
        raise InputError(f"--parts: unknown part {', '.join(map(repr, bad)) or '(none given)'}; choose from "
                         f"{', '.join(PARTS)} (comma-separated)")
    return [p for p in PARTS if p in items]


def resolve_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = "cpu" if device is None else device
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: this torch has no usable CUDA device (a package for a GPU is compiled on "
                         "one); export on a GPU machine, or use --device cpu")
    if dtype is None:
        dtype = "bf16" if device == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return torch.device(device), DTYPES[dtype]


def check_max_images(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 256:
        raise InputError(f"--max-images must be an integer in [1, 256] (images per generate call), got {n!r}")
    return n


def _stale_files(out: Path) -> list[Path]:
    return [out / MANIFEST] + [out / f for f in FILES.values()]


def _metadata(part: str, fingerprint: str, name: str) -> dict[str, str]:
    return {"fastjanus.part": part, "fastjanus.fingerprint": fingerprint, "fastjanus.model": name,
            "fastjanus.format_version": str(FORMAT_VERSION)}


def _compile(ep, metadata: dict, with_weights: bool = True):
    """One exported program → AOTInductor's files (a temporary folder), ready for package_aoti."""
    from torch._inductor import aot_compile
    opts = {"aot_inductor.package": True, "aot_inductor.metadata": metadata}
    if not with_weights:
        opts["aot_inductor.package_constants_in_so"] = False
    return aot_compile(ep.module(), ep.example_inputs[0], ep.example_inputs[1], options=opts)


def _package(path: Path, models: dict) -> int:
    from torch._inductor.package import package_aoti
    tmp = path.with_name(".partial-" + path.name)  # (package_aoti wants a name ending in .pt2)
    package_aoti(str(tmp), models)
    os.replace(tmp, path)
    return path.stat().st_size


def _tensor_spec(name: str, dtype, shape: list) -> dict:
    return {"name": name, "dtype": str(dtype).removeprefix("torch."), "shape": shape}


def export_generator(model, cfg, out: Path, max_images: int, meta: dict, progress=print) -> dict:
    """generator.pt2 (models "prefill", "step") for a fused JanusModel on its device and dtype. Returns the
    manifest entry."""
    from torch.export import Dim

    from .aoti_modules import GenPrefill, GenStep
    lm, n = cfg.language, cfg.num_image_tokens
    L, Hkv, hd, D, P = lm.num_hidden_layers, lm.num_key_value_heads, lm.head_dim, lm.hidden_size, \
        lm.max_position_embeddings
    dev, dt = model.device, model.dtype
    # example sizes distinct from each other and from every fixed size of the presets, or the export specialises
    # them (2 images = 4 rows, tiny's head count, did). The packages' image range is therefore at least 1..3; the
    # manifest's max_images is what the runner enforces.
    dim_max = max(max_images, 3)
    N, T, S = 3, 5, 11
    R = 2 * N
    i64 = dict(dtype=torch.int64, device=dev)
    kv = lambda: torch.zeros(L, R, Hkv, S, hd, dtype=dt, device=dev)  # noqa: E731
    lengths = torch.full((R,), T, dtype=torch.int32, device=dev)
    codes = torch.zeros(N, n, **i64)
    scal = (torch.tensor([5.0], device=dev), torch.tensor([1.0], device=dev), torch.tensor([1], **i64),
            torch.zeros(1, **i64))
    images = Dim("images", min=1, max=dim_max)
    rows = 2 * images
    tokens = Dim("tokens", min=2, max=P - n)
    slots = Dim("slots", min=3, max=P)
    kvs = {1: rows, 3: slots}
    fixed = (None,) * 4
    t0 = time.perf_counter()
    with torch.no_grad():
        ep_pre = torch.export.export(GenPrefill(model), (torch.zeros(R, T, **i64), lengths, kv(), kv(), codes, *scal),
                                     dynamic_shapes=({0: rows, 1: tokens}, {0: rows}, kvs, kvs, {0: images}, *fixed))
        ep_step = torch.export.export(GenStep(model), (torch.zeros(R, D, dtype=dt, device=dev), kv(), kv(), lengths,
                                                       codes, *scal),
                                      dynamic_shapes=({0: rows}, kvs, kvs, {0: rows}, {0: images}, *fixed))
    progress(f"generator: traced in {time.perf_counter() - t0:.1f} s; compiling the prefill (with the weights)")
    t1 = time.perf_counter()
    pre = _compile(ep_pre, {**meta, "fastjanus.model_name": "prefill"})
    progress(f"generator: prefill compiled in {time.perf_counter() - t1:.1f} s; compiling the step (weights "
             "shared with the prefill at load)")
    t2 = time.perf_counter()
    step = _compile(ep_step, {**meta, "fastjanus.model_name": "step"}, with_weights=False)
    progress(f"generator: step compiled in {time.perf_counter() - t2:.1f} s")
    nbytes = _package(out / FILES[GENERATOR], {"prefill": pre, "step": step})
    kv_shape = ["layers", "rows", "kv_heads", "slots", "head_dim"]
    scalars = [_tensor_spec("cfg_weight", torch.float32, [1]), _tensor_spec("temperature", torch.float32, [1]),
               _tensor_spec("seed", torch.int64, [1]), _tensor_spec("step", torch.int64, [1])]
    state = [_tensor_spec("k_cache", dt, kv_shape), _tensor_spec("v_cache", dt, kv_shape)]
    return {"file": FILES[GENERATOR], "bytes": nbytes, "seconds": round(time.perf_counter() - t0, 1),
            "models": {
                "prefill": {"inputs": [_tensor_spec("input_ids", torch.int64, ["rows", "tokens"]),
                                       _tensor_spec("lengths", torch.int32, ["rows"]), *state,
                                       _tensor_spec("codes", torch.int64, ["images", n]), *scalars],
                            "outputs": [_tensor_spec("next_embeds", dt, ["rows", D])]},
                "step": {"inputs": [_tensor_spec("inputs_embeds", dt, ["rows", D]), *state,
                                    _tensor_spec("lengths", torch.int32, ["rows"]),
                                    _tensor_spec("codes", torch.int64, ["images", n]), *scalars],
                         "outputs": [_tensor_spec("next_embeds", dt, ["rows", D])]}},
            "mutated": ["k_cache", "v_cache", "lengths (step)", "codes", "step"],
            "rows": "2 per image, interleaved: even = conditional, odd = unconditional",
            "loop": "prefill, then image_tokens − 1 steps, each fed the previous output; slots = tokens + image_tokens",
            "sampler": "guidance u + w·(c − u) in fp32; temperature 0: argmax; else Gumbel-max with counter-based "
                       "noise of (seed, step, image, code) (aoti_modules.counter_uniform)"}


def load_generator_package(path, model):
    """generator.pt2 from Python (torch's AOTI loader): (prefill, step), the step given `model`'s tensors as its
    constants by name (the C++ runtime gives it the prefill's). model: the fused JanusModel it was exported from."""
    from torch._inductor.package import load_package
    prefill = load_package(str(path), "prefill")
    step = load_package(str(path), "step")
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    step.load_constants({k: tensors[k.removeprefix("model.")] for k in step.get_constant_fqns()},
                        check_full_update=True, user_managed=True)
    return prefill, step


def _export_single(module, example, dyn, path: Path, meta: dict, inputs: list, outputs: list) -> dict:
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(module.eval(), example, dynamic_shapes=dyn)
    files = _compile(ep, {**meta, "fastjanus.model_name": "model"})
    nbytes = _package(path, {"model": files})
    return {"file": path.name, "bytes": nbytes, "seconds": round(time.perf_counter() - t0, 1),
            "max_batch": VQ_MAX_BATCH, "inputs": inputs, "outputs": outputs}


def export_aoti(model_dir, out, parts=None, device=None, dtype=None, max_images: int = DEFAULT_MAX_IMAGES,
                progress=print) -> dict:
    """Export the parts to `out` and write manifest.json (returned). Everything is checked before any weight is
    read; the manifest is written last, so a folder with one is a complete export."""
    from torch.export import Dim

    from ..config import JanusConfig
    from ..engine.pipeline import check_model_dir
    from ..flow_config import is_janusflow, read_config_dict
    from ..quant import QuantConfig
    from ..tokenizer import JanusTokenizer
    from .onnx_export import VisionEncoder, _load_parts, check_out_dir, config_digest, model_fingerprint, \
        model_summary, preprocessing
    from .aoti_modules import VQImages

    parts = parse_parts(parts)
    try:
        from torch._inductor.package import package_aoti  # noqa: F401
    except ImportError:
        raise InputError(f"export-aoti needs torch >= 2.6 (AOTInductor packages); this is torch {torch.__version__}") \
            from None
    dev, dt = resolve_device_dtype(device, dtype)
    max_images = check_max_images(max_images)
    model_dir = check_model_dir(model_dir)
    if is_janusflow(read_config_dict(model_dir)):
        raise InputError(f"{path_of('model', model_dir)}: a JanusFlow checkpoint; export-aoti covers Janus and "
                         "Janus-Pro (VQ image generation) only")
    cfg = JanusConfig.from_file(model_dir)
    if QuantConfig.of(cfg, str(model_dir / "config.json")) is not None:
        raise InputError(f"{path_of('model', model_dir)}: holds 8-bit weights (fastjanus quantize); export the "
                         "float checkpoint")
    tok = JanusTokenizer(model_dir, cfg.language.vocab_size)  # checks the tokenizer and processor files too
    out = check_out_dir(out)
    fingerprint = model_fingerprint(model_dir)
    name = model_dir.resolve().name
    lm = cfg.language
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {"path": str(model_dir.resolve()), "name": name, "fingerprint": fingerprint,
                  "config_sha256": config_digest(model_dir), "architecture": model_summary(cfg)},
        "device": dev.type, "dtype": str(dt).removeprefix("torch."), "max_images": max_images,
        "torch": torch.__version__, "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "generator": {"layers": lm.num_hidden_layers, "kv_heads": lm.num_key_value_heads, "head_dim": lm.head_dim,
                      "hidden_size": lm.hidden_size, "image_tokens": cfg.num_image_tokens,
                      "codebook_size": cfg.vq.codebook_size, "vocab_size": lm.vocab_size,
                      "max_positions": lm.max_position_embeddings},
        "special_tokens": tok.special_ids(),
        "vq": {"image_size": cfg.vq.image_size, "grid": cfg.vq.grid},
        "vision": {"image_size": cfg.vision.image_size, "tokens": cfg.vision.num_patches,
                   "hidden_size": lm.hidden_size},
        "sampling_defaults": {"cfg_weight": 5.0, "temperature": 1.0},
        "prompt": "token ids of the generation template (`fastjanus tokenize`); the unconditional row is BOS, pad "
                  "tokens, then the last id (<begin_of_image>)",
        "preprocessing": preprocessing(tok.processor),
        "postprocessing": {"images": "uint8, NHWC: trunc(clamp((pixels + 1) / 2 · 255, 0, 255)) in fp32"},
        "parts": {},
    }
    for f in _stale_files(out):  # the manifest first: a half-written export must not look complete
        f.unlink(missing_ok=True)
    meta = lambda part: _metadata(part, fingerprint, name)  # noqa: E731
    full = None
    if GENERATOR in parts:
        import fastjanus
        progress(f"loading {name} ({str(dt).removeprefix('torch.')}, {dev.type})")
        full = fastjanus.load(model_dir, device=dev, dtype=dt, backend="torch", cuda_graphs=False).model
    t_all = time.perf_counter()
    for part in parts:
        if part == GENERATOR:
            progress(f"{FILES[part]}: exporting (prefill + step + guided sampler, up to {max_images} images)")
            entry = export_generator(full, cfg, out, max_images, meta(part), progress)
        else:
            prefixes = {VISION: ("vision_model.", "aligner."), VQ: ("gen_vision_model.",)}[part]
            holder = full if full is not None else _load_parts(model_dir, cfg, prefixes).to(dev, dt)
            progress(f"{FILES[part]}: exporting")
            batch = Dim("batch", min=1, max=VQ_MAX_BATCH)
            if part == VISION:
                s = cfg.vision.image_size
                mod = VisionEncoder(holder.vision_model, holder.aligner, dt)
                example = (torch.zeros(3, 3, s, s, device=dev),)
                entry = _export_single(mod, example, ({0: batch},), out / FILES[part], meta(part),
                                       [_tensor_spec("pixel_values", torch.float32, ["batch", 3, s, s])],
                                       [_tensor_spec("image_embeds", dt, ["batch", cfg.vision.num_patches,
                                                                          lm.hidden_size])])
            else:
                S = cfg.vq.image_size
                mod = VQImages(holder.gen_vision_model)
                example = (torch.zeros(3, cfg.vq.grid ** 2, dtype=torch.int64, device=dev),)
                entry = _export_single(mod, example, ({0: batch},), out / FILES[part], meta(part),
                                       [_tensor_spec("codes", torch.int64, ["batch", cfg.vq.grid ** 2])],
                                       [_tensor_spec("images", torch.uint8, ["batch", S, S, 3])])
            del holder, mod
        manifest["parts"][part] = entry
        progress(f"{entry['file']}: {entry['bytes'] / 2 ** 20:.1f} MiB in {entry['seconds']} s")
    manifest["export_seconds"] = round(time.perf_counter() - t_all, 1)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest
