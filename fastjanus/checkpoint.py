"""Reading the published weight files: single or sharded `.safetensors` / `.bin`, with a strict key and shape check.

Tensors are read one at a time (safetensors lazily, `.bin` memory-mapped) and moved straight to the target device
and dtype, so neither a full fp32 copy on the GPU nor a second full copy in host RAM is ever made.
`.bin` files are only unpickled with `weights_only=True`.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import CheckpointError, CheckpointNotFoundError, strip_ansi

# Search order when a directory holds several layouts.
LAYOUTS = [
    ("sharded-safetensors", "model.safetensors.index.json"),
    ("safetensors", "model.safetensors"),
    ("sharded-bin", "pytorch_model.bin.index.json"),
    ("bin", "pytorch_model.bin"),
]


@dataclass
class WeightFiles:
    format: str  # one of the LAYOUTS names
    files: list[Path]
    index: Path | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def find_weights(model_dir: str | Path) -> WeightFiles:
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointNotFoundError(f"{d}: not a directory; pass the folder that holds config.json and the weights")
    for fmt, name in LAYOUTS:
        p = d / name
        if not p.is_file():
            continue
        if not fmt.startswith("sharded"):
            return WeightFiles(fmt, [p])
        try:
            weight_map = json.loads(p.read_text(encoding="utf-8"))["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{p}: not a valid index file (need a JSON object with 'weight_map'): {e}") from None
        files = [d / s for s in shard_names]
        for f in files:
            if not f.is_file():
                raise CheckpointNotFoundError(f"{f}: shard listed in {p.name} is missing; download it again")
        return WeightFiles(fmt, files, p)
    raise CheckpointNotFoundError(f"{d}: no weights found; expected one of {[n for _, n in LAYOUTS]}")


# ------------------------------------------------------------------------------------------ readers
def _unpickle_reason(e: Exception) -> str:
    """The line of torch's weights_only refusal that names the offending global; not its advice, which is to
    load the file unsafely."""
    lines = [ln.strip() for ln in strip_ansi(str(e)).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return ln.split(" Please use", 1)[0]
    return lines[0] if lines else type(e).__name__


def _bin_load(path: Path) -> dict:
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) torch.save format
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to load: the file contains pickled objects other than tensors, and unpickling them "
            f"could run arbitrary code. Re-save it as a plain state dict of tensors, or convert it to "
            f".safetensors. ({_unpickle_reason(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        why = strip_ansi(str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch file ({why}); download it again") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of parameter name → tensor")
    return sd


# safetensors dtype codes → torch names, so both formats report dtypes alike
_ST_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class _Reader:
    """Uniform access to one weight file: shapes/dtypes without reading data, then tensors one by one."""

    def __init__(self, path: Path):
        self.path = path
        self.is_st = path.suffix == ".safetensors"
        if self.is_st:
            from safetensors import SafetensorError, safe_open
            self._err = SafetensorError
            try:
                self._f = safe_open(str(path), framework="pt", device="cpu")
                self.meta = {k: self._f.get_slice(k) for k in self._f.keys()}
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e}); download it again") from None
        else:
            self._sd = _bin_load(path)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        if self.is_st:
            return {k: (tuple(s.get_shape()), _ST_NAMES.get(s.get_dtype(), s.get_dtype())) for k, s in self.meta.items()}
        return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in self._sd.items()}

    def get(self, key: str, device) -> torch.Tensor:
        if not self.is_st:
            return self._sd[key]
        try:
            # safetensors can place the tensor on the GPU itself; the dtype cast then happens there.
            return self._f.get_tensor(key) if str(device) == "cpu" else self._get_on(key, device)
        except self._err as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} ({e}); the file may be corrupt") from None

    def _get_on(self, key, device):
        from safetensors import safe_open
        if getattr(self, "_dev_f", None) is None:
            self._dev_f = safe_open(str(self.path), framework="pt", device=str(device))
        return self._dev_f.get_tensor(key)


def read_shapes(files: WeightFiles) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """All tensors' (shape, dtype, file) without loading data (for .bin: memory-mapped)."""
    out = {}
    for f in files.files:
        for k, (shape, dt) in _Reader(f).shapes().items():
            out[k] = (shape, dt, f)
    return out


def check_keys(found: dict[str, tuple], expected: dict[str, tuple[int, ...]],
               ignorable: Callable[[str], bool], where: str) -> None:
    """Strict check: every expected key present with its shape; nothing unexpected beyond the known-unused."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not ignorable(k))
    wrong = sorted(f"{k}: file {found[k][0]} vs model {expected[k]}" for k in expected
                   if k in found and tuple(found[k][0]) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return

    def show(items):
        return "; ".join(items[:8]) + (f"; ... ({len(items)} in all)" if len(items) > 8 else "")
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} mis-shaped: {show(wrong)}")
    raise CheckpointError(f"{where}: weights do not match config.json — " + " | ".join(parts) +
                          ". Check that config.json belongs to these weights (official Janus layout).")


def iter_tensors(files: WeightFiles, keys: set[str], device, dtype,
                 keep: Callable[[str], bool] = lambda k: False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor on device in dtype) for the wanted keys, one file and one tensor at a time; keys for
    which keep(name) holds stay in their stored dtype (8-bit weights, fp32 scales, weights to quantize)."""
    for f in files.files:
        r = _Reader(f)
        for k in r.shapes():
            if k in keys:
                t = r.get(k, device)
                yield k, t.to(device=device) if keep(k) else t.to(device=device, dtype=dtype)
        del r


def check_quantized_dtypes(found: dict[str, tuple], weights: set[str], scheme: str, where: str) -> None:
    """A quantized folder: each 8-bit weight in the scheme's dtype, each scale fp32."""
    from .quant import SCALE_SUFFIX, storage_dtype
    want = str(storage_dtype(scheme)).removeprefix("torch.")
    bad = [f"{k} is {found[k][1]} (expected {want})" for k in sorted(weights) if found[k][1] != want]
    bad += [f"{k} is {found[k][1]} (expected float32)" for k in sorted(weights)
            if found[k.removesuffix("weight") + SCALE_SUFFIX][1] != "float32"]
    if bad:
        raise CheckpointError(f"{where}: the {scheme} checkpoint's tensors have the wrong dtype: "
                              + "; ".join(bad[:4]) + (f"; ... ({len(bad)} in all)" if len(bad) > 4 else "")
                              + ". The folder is damaged or was not written by `fastjanus quantize`: quantize the "
                              "original checkpoint again")


def load_state_into(model: torch.nn.Module, model_dir: str | Path, device, dtype,
                    ignorable: Callable[[str], bool], progress: bool = False, quant=None,
                    quantize=None) -> WeightFiles:
    """Fill a model built on the meta device with the checkpoint's tensors (assigned, not copied).

    quant (a QuantConfig): the folder holds 8-bit weights and their scales (the model was `quant.convert`ed);
    their dtypes are checked and kept. quantize (a QuantConfig): the folder holds float weights, and the target
    Linears' are quantized as they arrive, on the device, one tensor at a time."""
    from .quant import SCALE_SUFFIX, is_8bit, quantize_weight, target_modules
    files = find_weights(model_dir)
    qc = quant or quantize
    qweights = {m + ".weight" for m in target_modules(model.cfg, qc.heads)} if qc is not None else set()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if quantize is not None:  # the scales are made here, not read
        expected = {k: v for k, v in expected.items() if not k.endswith("." + SCALE_SUFFIX)}
    found = read_shapes(files)
    check_keys(found, expected, ignorable, str(Path(model_dir)))
    if quant is not None:
        check_quantized_dtypes(found, qweights, quant.weights, str(Path(model_dir)))
    stray = sorted(k for k in expected if k not in qweights and is_8bit(getattr(torch, found[k][1], None)))
    if stray:  # an 8-bit tensor the config does not declare: casting it would load garbage
        raise CheckpointError(f"{model_dir}: {len(stray)} tensor(s) are 8-bit but config.json declares no such "
                              f"quantization for them: {', '.join(stray[:4])}. A folder from `fastjanus quantize` "
                              "keeps its config.json's quantization_config; restore it, or quantize the original "
                              "checkpoint again")
    it = iter_tensors(files, set(expected), device, dtype,
                      keep=lambda k: k in qweights or k.endswith("." + SCALE_SUFFIX))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(expected), desc="quantizing weights" if quantize else "loading weights",
                  unit="tensor", leave=False)
    for name, t in it:
        owner, _, attr = name.rpartition(".")
        mod = model.get_submodule(owner)
        if quantize is not None and name in qweights:
            t, scale = quantize_weight(t, quantize.weights)
            setattr(mod, SCALE_SUFFIX, torch.nn.Parameter(scale, requires_grad=False))
        setattr(mod, attr, torch.nn.Parameter(t, requires_grad=False))
    still_meta = [n for n, p in model.state_dict().items() if p.is_meta]
    if still_meta:  # cannot happen after check_keys; kept as a guard against silent garbage
        raise CheckpointError(f"{model_dir}: tensors not loaded: {still_meta[:5]}")
    return files
