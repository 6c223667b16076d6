"""`fastjanus export-onnx`: the SigLIP encoder (with its aligner) and the VQ decoder as ONNX graphs, plus
manifest.json; with `--parts all` also the LLM side of image generation (`onnx_llm.py`).

    vision_encoder.onnx   pixel_values float32 [N, 3, S, S] (what the processor gives) → image_embeds [N, 576, D]
    vq_decoder.onnx       codes int64 [N, 576] → pixels [N, 3, S, S] (the decoder's raw output),
                          images uint8 [N, S, S, 3] (the post-processing of decode_image_tokens, in the graph)

Only the tensors a part needs are read: exporting the vision pieces of Pro-7B does not load its 7B LLM.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, path_of
from .onnx_io import DEFAULT_OPSET, check_opset, describe, export_module, require

VISION, VQ = "vision", "vq-decoder"
PARTS = (VISION, VQ)
LLM_PARTS = ("llm",)  # added by --parts all: the prefill, decode step, gen_head and image-code embedding
FILES = {VISION: "vision_encoder.onnx", VQ: "vq_decoder.onnx"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MANIFEST = "manifest.json"
FORMAT = "fastjanus-onnx"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------ export modules
class VisionEncoder(nn.Module):
    """SigLIP + aligner: pixel_values float32 [N, 3, S, S] → image_embeds [N, n_patches, D] (the export dtype)."""

    def __init__(self, vision_model: nn.Module, aligner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.vision_model, self.aligner, self.dtype = vision_model, aligner, dtype

    def forward(self, pixel_values):
        return self.aligner(self.vision_model(pixel_values.to(self.dtype)))  # [N, n, D]


class VQDecoder(nn.Module):
    """codes int64 [N, g·g] → (pixels [N, 3, S, S] in about [-1, 1], images uint8 [N, S, S, 3]).

    The lookup, L2 normalisation and post_quant_conv are the torch backend's (`VQModel.codes_to_latent`), the
    uint8 conversion is `image.to_uint8` (fp32, truncation), so `images` is what decode_image_tokens makes."""

    def __init__(self, vq: nn.Module):
        super().__init__()
        self.vq, self.grid = vq, vq.cfg.grid

    def forward(self, codes):
        g = self.grid
        z = F.normalize(self.vq.quantize.embedding(codes), dim=-1)  # [N, g·g, e]
        z = z.reshape(-1, g, g, z.shape[-1]).permute(0, 3, 1, 2)  # [N, e, g, g]
        pixels = self.vq.decoder(self.vq.post_quant_conv(z))  # [N, 3, S, S]
        images = ((pixels.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return pixels, images


# ------------------------------------------------------------------------------------ identity of a model
FINGERPRINT_WINDOWS = 64  # windows of 64 KiB sampled evenly across each weight file (4 MiB read per file)


def config_digest(model_dir: Path) -> str:
    return "sha256:" + hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """A content sample of a checkpoint folder, cheap enough to check at every load: config.json, and each
    weight file's name, size, header (the first MiB: tensor names, shapes, offsets) and 64 windows of 64 KiB
    spread evenly over the rest. Another seed, another size or a retrained model differ; a checkpoint that
    differs only between the sampled windows (a few tensors of a large file) would not be told apart: this is
    a guard against mixing up folders, not a hash of every byte."""
    from ..checkpoint import find_weights
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in find_weights(model_dir).files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(2 ** 20))
            for i in range(FINGERPRINT_WINDOWS):
                fh.seek(2 ** 20 + (size - 2 ** 20) * i // FINGERPRINT_WINDOWS)
                h.update(fh.read(2 ** 16))
    return "sha256:" + h.hexdigest()


def model_identity(model_dir: Path) -> dict:
    """What an export is checked against: {"fingerprint": ...} of the checkpoint, or {"config_sha256": ...} where
    its weight files are absent (an edge bundle may hold only the config and tokenizer files beside the graphs).
    The keyword arguments of ort_runtime.read_manifest / OrtVision."""
    from ..checkpoint import find_weights
    from ..errors import CheckpointNotFoundError
    try:
        find_weights(model_dir)
    except CheckpointNotFoundError:
        return {"config_sha256": config_digest(model_dir)}
    return {"fingerprint": model_fingerprint(model_dir)}


def model_summary(cfg) -> dict:
    L = cfg.language
    return {"hidden_size": L.hidden_size, "num_layers": L.num_hidden_layers, "vocab_rows": L.vocab_size,
            "vision_width": cfg.vision.width, "image_size": cfg.vision.image_size,
            "image_tokens": cfg.vision.num_patches, "codebook_size": cfg.vq.codebook_size, "vq_grid": cfg.vq.grid,
            "vq_image_size": cfg.vq.image_size, "generated_image_tokens": cfg.num_image_tokens}


def preprocessing(proc) -> dict:
    """The understanding image's preprocessing constants (a manifest entry: what a runner without Python redoes)."""
    return {"image_size": proc.image_size, "min_size": proc.min_size, "rescale_factor": proc.rescale_factor,
            "do_normalize": proc.do_normalize, "image_mean": list(proc.image_mean), "image_std": list(proc.image_std),
            "background_color": list(proc.background_color),
            "method": "RGB; the longer side resized to image_size (bicubic), pasted centred on a background_color "
                      "square; x · rescale_factor, then (x − mean) / std; NCHW"}


# ------------------------------------------------------------------------------------------ checks
def parse_parts(parts) -> list[str]:
    """"vision,vq-decoder", a list, "llm" (the LLM graphs of image generation), or "all" (every part)."""
    if parts is None:
        return list(PARTS)
    items = parts.split(",") if isinstance(parts, str) else list(parts)
    items = [p.strip() for p in items if p.strip()]
    known = PARTS + LLM_PARTS
    if items == ["all"]:
        return list(known)
    bad = [p for p in items if p not in known]
    if bad or not items:
        what = ("'all' stands alone (it is every part)" if "all" in bad else
                f"unknown part {', '.join(map(repr, bad)) or '(none given)'}")
        raise InputError(f"--parts: {what}; choose from {', '.join(known)} (comma-separated) or all")
    return [p for p in known if p in items]


def _stale_files(out: Path) -> list[Path]:
    """Every file an export writes, so that a new export never leaves an older one's graphs beside its own."""
    from .onnx_llm import PARTS as LLM_GRAPHS, SETTINGS, graph_file
    names = list(FILES.values()) + [graph_file(p, i) for p in LLM_GRAPHS for i in (False, True)]
    return [out / MANIFEST] + [out / n for n in names] + [out / (n + ".data") for n in names] + [out / SETTINGS]


def check_out_dir(out) -> Path:
    """--out must be creatable and writable, found out before any weight is read."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{path_of('out', out)}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{path_of('out', out)}: not writable ({e.strerror or e}); choose another folder") from None
    return out


# ------------------------------------------------------------------------------------------ export
def _load_parts(model_dir: Path, cfg, prefixes: tuple[str, ...]):
    """A JanusModel on the CPU in fp32 with only the tensors under `prefixes` read (the rest stay on meta)."""
    from ..checkpoint import load_state_into
    from ..models.janus import JanusModel, known_unused_key
    with torch.device("meta"):
        full = JanusModel(cfg)
    holder = nn.Module()
    holder.cfg = cfg
    for name in {p.split(".")[0] for p in prefixes}:
        holder.add_module(name, getattr(full, name))
    load_state_into(holder, model_dir, torch.device("cpu"), torch.float32,
                    lambda k: known_unused_key(k, cfg) or not k.startswith(prefixes))
    holder.eval()
    return holder


def export_onnx(model_dir, out, parts=None, dtype: str = "fp32", opset: int = DEFAULT_OPSET, progress=print,
                external_data_bytes: int | None = None, quantize: str | None = None) -> dict:
    """Export the parts to `out` and write manifest.json (returned). progress: called with one line per part.
    quantize="int8" (with the LLM graphs, fp32): also their int8 variant by ONNX Runtime's dynamic quantization
    (`onnx_llm.quantize_llm_int8`), its sizes and first-step logit error recorded under manifest["int8"]."""
    from ..config import JanusConfig
    from ..engine.pipeline import check_model_dir
    from ..tokenizer import JanusTokenizer
    require("onnx")
    parts = parse_parts(parts)
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    opset = check_opset(opset)
    if quantize not in (None, "int8"):
        raise InputError(f"--quantize for ONNX export must be int8 (ONNX Runtime's own int8 kernels), got {quantize!r}")
    if quantize and ("llm" not in parts or dtype != "fp32"):
        raise InputError("--quantize int8 applies to the LLM graphs exported in fp32: add --parts all and keep "
                         "--dtype fp32")
    if quantize:
        require("onnxruntime")  # its quantization tools, before anything is exported
    model_dir = check_model_dir(model_dir)
    cfg = JanusConfig.from_file(model_dir)
    if "llm" in parts:
        from ..quant import QuantConfig
        if QuantConfig.of(cfg, str(model_dir / "config.json")) is not None:
            raise InputError(f"{path_of('model', model_dir)}: holds 8-bit weights (fastjanus quantize); the LLM "
                             "graphs are exported from the float checkpoint (and --quantize int8 makes their int8 "
                             "variant with ONNX Runtime's own kernels)")
    proc = JanusTokenizer(model_dir, cfg.language.vocab_size).processor  # checks the processor files too
    out = check_out_dir(out)
    fingerprint = model_fingerprint(model_dir)
    tdt = DTYPES[dtype]
    kw = {} if external_data_bytes is None else {"external_data_bytes": external_data_bytes}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {"path": str(model_dir.resolve()), "name": model_dir.resolve().name, "fingerprint": fingerprint,
                  "config_sha256": config_digest(model_dir), "architecture": model_summary(cfg)},
        "dtype": {"fp32": "float32", "fp16": "float16"}[dtype], "opset": opset,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "preprocessing": preprocessing(proc),
        "postprocessing": {"images": "uint8, NHWC: trunc(clamp((pixels + 1) / 2 · 255, 0, 255)) in fp32"},
        "parts": {},
    }
    mp = out / MANIFEST
    for f in _stale_files(out):  # the manifest first of all: a half-written export must not look complete
        f.unlink(missing_ok=True)
    prefixes = {VISION: ("vision_model.", "aligner."), VQ: ("gen_vision_model.",)}
    for part in parts:
        t0 = time.perf_counter()
        if part == "llm":
            from . import onnx_llm
            model = _load_full(model_dir, cfg)
            progress(f"llm: exporting the prefill, decode step, gen_head and image-code embedding ({dtype}, "
                     f"opset {opset})")
            entries = onnx_llm.export_llm(model, cfg, out, opset=opset, dtype=tdt, progress=progress)
            manifest["parts"].update(entries)
            del model
            if quantize:
                progress("llm: int8 variant (onnxruntime.quantization.quantize_dynamic)")
                q = onnx_llm.quantize_llm_int8(out, progress=progress)
                manifest["int8"] = q
                e = q["first_step"]
                progress(f"int8 first-step logits vs fp32: max abs error {e['max_abs']:.3g} "
                         f"({e['max_rel']:.2%} of the largest logit), top-1 agreement {e['argmax_agree']:.0%}")
            continue
        holder = _load_parts(model_dir, cfg, prefixes[part])
        progress(f"{FILES[part]}: exporting ({dtype}, opset {opset})")
        if part == VISION:
            S = cfg.vision.image_size
            mod = VisionEncoder(holder.vision_model, holder.aligner, tdt).to(tdt)
            args = (torch.zeros(1, 3, S, S),)
            names, outs = ["pixel_values"], ["image_embeds"]
            axes = {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}
            shapes = None
        else:
            mod = VQDecoder(holder.gen_vision_model).to(tdt)
            args = (torch.zeros(1, cfg.vq.grid ** 2, dtype=torch.long),)
            names, outs = ["codes"], ["pixels", "images"]
            axes = {"codes": {0: "batch"}, "pixels": {0: "batch"}, "images": {0: "batch"}}
            S = cfg.vq.image_size
            shapes = [["batch", 3, S, S], ["batch", S, S, 3]]
        entry = export_module(mod, args, out / FILES[part], input_names=names, output_names=outs, dynamic_axes=axes,
                              opset=opset, output_shapes=shapes, **kw)
        entry.update(describe(out / FILES[part]))
        manifest["parts"][part] = entry
        progress(f"{FILES[part]}: written, {entry['bytes'] / 2 ** 20:.1f} MiB"
                 f"{' (+ external data)' if entry['external_data'] else ''} in {time.perf_counter() - t0:.1f} s")
        del holder, mod
    tmp = mp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, mp)  # written last: a folder with a manifest is a complete export
    return manifest


def _load_full(model_dir: Path, cfg):
    """The whole model in fp32 on the CPU, fused (the LLM graphs read its code table)."""
    import fastjanus
    return fastjanus.load(model_dir, device="cpu", dtype=torch.float32, backend="torch").model


__all__ = ["export_onnx", "parse_parts", "model_fingerprint", "VisionEncoder", "VQDecoder", "MANIFEST", "FILES",
           "PARTS", "DTYPES", "require"]
