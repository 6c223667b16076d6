"""`fastjanus init-random`: a complete random checkpoint in the official hub layout.

No weights can be downloaded here, and decode speed does not depend on weight values, so tests, the demo and
benchmarks run on these. Every tensor is drawn from its own generator (seed, name), written one at a time,
so even Janus-Pro-7B is produced without holding the model in memory (except the single-file `.bin` format,
which torch.save writes from one dict).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

import torch

from .config import PRESET_TEMPLATES, JanusConfig, preset
from .flow_config import FLOW_PRESETS, FLOW_TEMPLATES, JanusFlowConfig
from .errors import InputError
from .tokenizer import BOI, BOS, EOI, EOS, IMAGE_TAG, PAD

FORMATS = ("safetensors", "sharded-safetensors", "bin", "sharded-bin")
DEFAULT_FORMAT = {"tiny": "safetensors", "tiny-flow": "safetensors", "janusflow-1.3b": "safetensors",
                  "janus-1.3b": "safetensors", "janus-pro-1b": "bin",
                  "janus-pro-7b": "sharded-bin"}  # as published on the hub
ROLE_TOKENS = ["<patch_placeholder>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
               "<|User|>", "<|Assistant|>"]

_CORPUS = """A photo of a red fox sitting in the snow at sunrise, highly detailed, soft light.
An astronaut riding a horse on the moon, digital art, trending, sharp focus.
The quick brown fox jumps over the lazy dog. What is shown in this image? Describe the picture.
A bowl of fruit on a wooden table: apples, oranges, bananas and grapes. Watercolor painting.
A city street at night with neon signs, rain on the road, reflections, cinematic, 4k, wide angle.
Please explain the chart, the table and the text in the image step by step, then answer the question.
Portrait of an old man with a beard, oil on canvas, dramatic lighting, close-up, museum quality.
A small cabin in the mountains surrounded by pine trees and a lake, morning fog, landscape photography."""


TEMPLATES = {**PRESET_TEMPLATES, **FLOW_TEMPLATES}
ARCHS = sorted(TEMPLATES)  # every preset init-random writes: Janus's and JanusFlow's

# ------------------------------------------------------------------------------------- tensors
def official_tensor_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint (Janus or JanusFlow), including the ones inference never reads."""
    if isinstance(cfg, JanusFlowConfig):
        from .models.janusflow import JanusFlowModel
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in JanusFlowModel(cfg).state_dict().items()}
        shapes.update(_attn_pool_shapes(cfg, "vision_und_enc_model.vision_tower.attn_pool."))
        return shapes
    from .models.janus import JanusModel
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in JanusModel(cfg).state_dict().items()}
    shapes.update(_attn_pool_shapes(cfg, "vision_model.vision_tower.attn_pool."))
    shapes["gen_vision_model.quantize.codebook_used"] = (65536,)
    return shapes


def _attn_pool_shapes(cfg, p: str) -> dict[str, tuple[int, ...]]:
    """SigLIP's attention-pooling head: in the published files, never used by Janus or JanusFlow."""
    W, M = cfg.vision.width, cfg.vision.mlp_dim
    return {p + "latent": (1, 1, W), p + "q.weight": (W, W), p + "q.bias": (W,), p + "kv.weight": (2 * W, W),
            p + "kv.bias": (2 * W,), p + "proj.weight": (W, W), p + "proj.bias": (W,), p + "norm.weight": (W,),
            p + "norm.bias": (W,), p + "mlp.fc1.weight": (M, W), p + "mlp.fc1.bias": (M,),
            p + "mlp.fc2.weight": (W, M), p + "mlp.fc2.bias": (W,)}


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Deterministic in (seed, name). Fan-in scaled weights keep activations O(1) through every layer, so
    reduced-precision runs neither overflow nor collapse to zero, as with trained weights."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    if name.endswith("codebook_used"):
        return torch.zeros(shape, dtype=dtype)
    x = torch.randn(shape, generator=g)
    if name.endswith(".bias"):
        x *= 0.02
    elif len(shape) == 1:  # norm scales
        x = 1.0 + 0.05 * x
    elif name in ("gen_embed.weight", "gen_vision_model.quantize.embedding.weight"):
        pass  # 8-dim code embeddings: unit scale, like a trained codebook
    elif name.endswith(("embed_tokens.weight", "pos_embed", "latent")):
        x *= 0.02
    else:  # Linear / Conv weights [out, in, ...]
        x *= math.prod(shape[1:]) ** -0.5
    return x.to(dtype)


# ------------------------------------------------------------------------------------- writers
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _write_safetensors(path: Path, names: list[str], shapes: dict, make, dtype) -> None:
    """Stream a safetensors file: header first (shapes are known), then tensors one at a time."""
    header, off = {}, 0
    esize = torch.empty((), dtype=dtype).element_size()
    for k in names:
        n = esize * math.prod(shapes[k])
        header[k] = {"dtype": _ST_DTYPE[dtype], "shape": list(shapes[k]), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, t in _in_parallel(names, make):
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())


def _in_parallel(names: list[str], make, workers: int | None = None):
    """(name, make(name)) in order, made by a few threads ahead of the writer. torch.randn with a generator runs
    on one core (0.6 s for a 4096 x 11008 fp32 tensor, with 1 or 2 threads alike) and releases the GIL, so
    threads scale it; each tensor keeps its own generator, so the bytes do not change. At most `workers`
    tensors wait at once (Pro-7B's largest is 1.7 GB in fp32)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        it = iter(names)
        for k in it:
            pending.append((k, pool.submit(make, k)))
            if len(pending) >= workers:
                break
        while pending:
            k, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(make, nxt)))
            yield k, fut.result()


def _shard(names: list[str], shapes: dict, esize: int, max_bytes: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for k in names:
        n = esize * math.prod(shapes[k])
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    return shards + ([cur] if cur else [])


def write_weights(out: Path, cfg, fmt: str, seed: int, dtype=torch.bfloat16,
                  max_shard_bytes: int = 4 * 2 ** 30, progress: bool = False) -> list[Path]:
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    shapes = official_tensor_shapes(cfg)
    names = list(shapes)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(names), desc="random weights", unit="tensor", leave=False)

    def make(k):
        t = random_tensor(k, shapes[k], seed, dtype)
        if bar is not None:
            bar.update(1)  # tqdm's update is thread-safe
        return t

    esize = torch.empty((), dtype=dtype).element_size()
    sharded = fmt.startswith("sharded")
    total = sum(esize * math.prod(shapes[k]) for k in names)
    groups = _shard(names, shapes, esize, max_shard_bytes) if sharded else [names]
    if sharded and len(groups) == 1:  # a "sharded" layout of one file would not exercise the index
        groups = _shard(names, shapes, esize, max(1, total // 2))
    ext = "safetensors" if "safetensors" in fmt else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    files, weight_map = [], {}
    for i, group in enumerate(groups):
        fname = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}" if sharded else f"{stem}.{ext}"
        path = out / fname
        if ext == "safetensors":
            _write_safetensors(path, group, shapes, make, dtype)
        else:
            torch.save(dict(_in_parallel(group, make)), path)
        files.append(path)
        weight_map.update({k: fname for k in group})
    if bar is not None:
        bar.close()
    if sharded:
        (out / f"{stem}.{ext}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files


# ------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(with_image_tag: bool, vocab_size: int = 600):
    """A small byte-level BPE tokenizer (trained on a fixed corpus) with the Janus special tokens appended.

    The real one has ~100k entries; ours is small, but it has the same format, the same special strings and
    the same property that matters here: special ids are not at fixed positions."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    specials = [BOS, EOS, PAD, BOI, EOI] + ([IMAGE_TAG] if with_image_tag else []) + ROLE_TOKENS
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def write_tokenizer_files(out: Path, arch: str, num_image_tokens: int, image_size: int) -> None:
    is_old = arch == "janus-1.3b"
    tok = build_tokenizer(with_image_tag=not is_old)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    if not is_old:
        specials = {"additional_special_tokens": [IMAGE_TAG] + ROLE_TOKENS, **specials}
    files = {
        "tokenizer_config.json": {"bos_token": BOS, "clean_up_tokenization_spaces": False, "eos_token": EOS,
                                  "model_max_length": 16384, "pad_token": None, "tokenizer_class": "LlamaTokenizer",
                                  "unk_token": None, "use_default_system_prompt": True},
        "special_tokens_map.json": specials,
        "processor_config.json": {"add_special_token": False, "ignore_id": -100, "image_tag": IMAGE_TAG,
                                  "mask_prompt": True, "num_image_tokens": num_image_tokens,
                                  "processor_class": "VLChatProcessor", "sft_format": TEMPLATES[arch]},
        "preprocessor_config.json": {"background_color": [127, 127, 127], "do_normalize": True,
                                     "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "VLMImageProcessor",
                                     "image_size": image_size, "image_std": [0.5, 0.5, 0.5], "min_size": 14,
                                     "processor_class": "VLChatProcessor", "rescale_factor": 1 / 255},
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def init_random(arch: str, out: str | Path, fmt: str | None = None, seed: int = 0, progress: bool = False,
                max_shard_bytes: int = 4 * 2 ** 30, config: JanusConfig | None = None) -> Path:
    """Write config.json, random weights and tokenizer/processor files for a preset into `out`. config: a
    variant of the preset's config to write instead (test models: another codebook size, more layers)."""
    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    cfg = (FLOW_PRESETS[arch]() if arch in FLOW_PRESETS else preset(arch)) if config is None else config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = fmt or DEFAULT_FORMAT[arch]
    d = cfg.to_dict()
    d["architectures"] = ["MultiModalityCausalLM"]
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    write_tokenizer_files(out, arch, cfg.vision.num_patches, cfg.vision.image_size)
    write_weights(out, cfg, fmt, seed, progress=progress, max_shard_bytes=max_shard_bytes)
    if isinstance(cfg, JanusFlowConfig):  # JanusFlow's SDXL VAE, a separate checkpoint, in vae/
        from .models.sdxl_vae import SDXL_VAE, tiny_vae, write_random_vae
        write_random_vae(out / "vae", tiny_vae() if arch.startswith("tiny") else SDXL_VAE, seed=seed)
    return out


def cache_dir() -> Path:
    """fastjanus's cache folder: $FASTJANUS_CACHE, else $XDG_CACHE_HOME/fastjanus, else ~/.cache/fastjanus."""
    base = os.environ.get("FASTJANUS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastjanus")
    return Path(base)


def cached_random_model(arch: str, progress: bool = False, fmt: str | None = None) -> Path:
    """The random checkpoint of a preset, written once into the cache as random-<arch> (the CLI's default model
    and the benchmark's --arch share it). It is written to a temporary folder and marked complete, so an
    interrupted write is never reused; when another process finished the same write first, its copy is kept."""
    d = cache_dir() / f"random-{arch}"
    if (d / "config.json").is_file() and (d / ".complete").is_file():
        return d
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    init_random(arch, tmp, fmt=fmt, seed=0, progress=progress)
    (tmp / ".complete").write_text("ok\n")
    if (d / ".complete").is_file():  # another process won the race: use its copy, which may be in use
        shutil.rmtree(tmp)
        return d
    if d.exists():  # an incomplete leftover
        shutil.rmtree(d)
    tmp.rename(d)
    return d
