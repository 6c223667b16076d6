"""`fastjanus quantize`: write an 8-bit copy of a checkpoint folder (schemes in quant.py).

The output is a complete folder that `fastjanus.load` reads as it is: config.json with a `quantization_config`
block, the tokenizer and processor files copied, and sharded safetensors holding the 8-bit weights, their fp32
scales and every other tensor in its stored dtype. Tensors the runtime never reads (SigLIP's attention pool and
unused blocks, the VQ usage counter) are left out.

Streaming: one source tensor at a time is read and quantized, and the output is written in shards of at most
`shard_bytes`, so the peak host memory is about one shard plus one tensor, never the model. The folder is
built under a temporary name beside --out and renamed at the end: an interrupted run leaves no half folder.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .checkpoint import _Reader, check_keys, find_weights, read_shapes
from .config import JanusConfig
from .errors import InputError, path_of
from .quant import SCALE_SUFFIX, QuantConfig, check_scheme, quantize_weight, target_modules

SHARD_BYTES = 2 * 2 ** 30


def check_out_dir(out) -> Path:
    """--out must not exist, or be an empty folder (a quantized copy never overwrites anything)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{path_of('out', out)} exists and is a file; pass a new folder for the quantized "
                             "checkpoint")
        if any(out.iterdir()):
            raise InputError(f"{path_of('out', out)} is not empty; pass a new or empty folder (nothing is "
                             "overwritten)")
    return out


def check_source(model_dir) -> tuple[Path, JanusConfig]:
    from .engine.pipeline import check_model_dir
    src = check_model_dir(model_dir)
    cfg = JanusConfig.from_file(src)
    qc = QuantConfig.of(cfg, str(src / "config.json"))
    if qc is not None:
        raise InputError(f"{path_of('model', src)} is already quantized ({qc.weights} weights); quantize the "
                         "original float checkpoint instead")
    return src, cfg


def quantize_checkpoint(model_dir, out, weights: str, heads: bool = False, progress: bool = False,
                        shard_bytes: int = SHARD_BYTES) -> Path:
    """Quantize the checkpoint in model_dir into the new folder out; returns out. Every check (scheme, source,
    out, the source's keys and shapes against its config) runs before anything is written."""
    from .models.janus import JanusModel, known_unused_key
    check_scheme(weights, "weights")
    src, cfg = check_source(model_dir)
    out = check_out_dir(out)
    if out.resolve() == src.resolve():
        raise InputError(f"{path_of('out', out)} is the source folder; pass a new folder")
    files = find_weights(src)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in JanusModel(cfg).state_dict().items()}
    found = read_shapes(files)
    check_keys(found, expected, lambda k: known_unused_key(k, cfg), str(src))
    targets = {m + ".weight" for m in target_modules(cfg, heads)}
    qc = QuantConfig(weights, heads)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        shards = _write_shards(files, expected, targets, weights, tmp, shard_bytes, progress)
        n = len(shards)
        weight_map = {}
        for i, (path, keys) in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(tmp / name)
            weight_map.update({k: name for k in keys})
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
        raw["quantization_config"] = qc.to_dict()
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        skip = {f.name for f in files.files} | {"config.json"} | ({files.index.name} if files.index else set())
        for p in src.iterdir():  # tokenizer, processor and any other small files, as they are
            if p.is_file() and p.name not in skip and not p.name.endswith((".safetensors", ".bin")):
                shutil.copy2(p, tmp / p.name)
        _public(tmp)
        if out.exists():
            out.rmdir()  # empty (checked)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _public(folder: Path) -> None:
    """The permissions a plain mkdir and open would give (mkdtemp makes 0700, save_file 0600): the quantized
    folder is for every user and service that could read the original."""
    import os
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _write_shards(files, expected: dict, targets: set[str], weights: str, tmp: Path, shard_bytes: int,
                  progress: bool) -> list[tuple[Path, list[str]]]:
    from safetensors.torch import save_file
    shards: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        nonlocal pending, size
        if pending:
            path = tmp / f"shard-{len(shards):05d}.tmp"
            save_file(pending, str(path), metadata={"format": "pt"})
            shards.append((path, list(pending)))
        pending, size = {}, 0

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(expected), desc=f"quantizing to {weights}", unit="tensor", leave=False)
    for f in files.files:
        r = _Reader(f)
        for k in r.shapes():
            if k not in expected:
                continue
            t = r.get(k, "cpu")
            if k in targets:
                q, s = quantize_weight(t, weights)
                new = {k: q, k.removesuffix("weight") + SCALE_SUFFIX: s}
            else:
                new = {k: t.clone()}  # own storage: save_file refuses tensors that share one (.bin views)
            nb = sum(v.numel() * v.element_size() for v in new.values())
            if size and size + nb > shard_bytes:
                flush()
            pending.update(new)
            size += nb
            if bar is not None:
                bar.update(1)
        del r
    flush()
    if bar is not None:
        bar.close()
    return shards
