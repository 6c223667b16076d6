"""Writing and checking ONNX files: one exporter call per graph, external data past the protobuf limit, the
checker and shape inference, and the input/output description that goes into manifest.json.

The graphs are traced with torch's TorchScript exporter (`torch.onnx.export(..., dynamo=False)`): it needs only
the `onnx` package (the dynamo exporter also needs `onnxscript`, which the lent GPU machine does not list), runs
in well under a second on the tiny model where the dynamo exporter took 4-5 s (torch 2.13, CPU), and gave the
same outputs on ONNX Runtime (SigLIP, tiny: max relative difference 4.7e-7 vs 4.9e-7).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    import torch

# A protobuf message cannot pass 2 GiB: above this many bytes of weights a graph keeps them in a side file
# `<name>.onnx.data` (ONNX's external data), which ONNX Runtime reads from beside the .onnx file.
EXTERNAL_DATA_BYTES = 1_800_000_000
DEFAULT_OPSET = 17  # LayerNormalization (SigLIP) is an opset-17 op; the TorchScript exporter goes up to 20
# The least opset every part exports at: attention (aten::scaled_dot_product_attention) has an ONNX form from
# opset 14 on. Checked before any weight is read; below it the exporter would fail only after loading the model.
MIN_OPSET = 14
MAX_OPSET = 20
INSTALL_HINT = "pip install 'fastjanus[onnx]' (onnx and onnxruntime; on a CUDA host onnxruntime-gpu instead)"


def require(name: str):
    """Import `onnx` or `onnxruntime`, or say in one line which package to install."""
    try:
        return __import__(name)
    except ImportError as e:
        raise InputError(f"{name} is not installed ({e}): {INSTALL_HINT}") from None


def check_opset(opset) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise InputError(f"--opset must be an integer, got {opset!r}")
    if opset < MIN_OPSET:
        raise InputError(f"--opset {opset} is too low for an op the graphs use (attention, "
                         f"aten::scaled_dot_product_attention, needs opset {MIN_OPSET}): use --opset {DEFAULT_OPSET} "
                         "(the default)")
    if opset > MAX_OPSET:
        raise InputError(f"--opset {opset} is above what torch's TorchScript exporter writes ({MAX_OPSET}); use "
                         f"--opset {DEFAULT_OPSET} (the default)")
    return opset


@contextlib.contextmanager
def _quiet():
    """stdout and stderr, at the file-descriptor level, into a scratch file: on a failure the exporter prints the
    whole traced graph (hundreds of lines) from C++ before raising; the error itself is reported in one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def export_module(module: torch.nn.Module, args: tuple, path: Path, *, input_names: list[str],
                  output_names: list[str], dynamic_axes: dict, opset: int,
                  external_data_bytes: int = EXTERNAL_DATA_BYTES, output_shapes: list | None = None) -> dict:
    """Trace `module(*args)` into `path` and check it. Returns {"file", "bytes", "external_data", "seconds"}.

    output_shapes: each output's shape (an int, or a str naming a dynamic axis) where the exporter's own is
    vaguer (the VQ decoder's upsampling leaves its spatial sizes symbolic).

    An op the exporter cannot write at this opset becomes one line naming the opset and what to use instead."""
    import torch  # here, not at the top: onnx_llm's runner imports this module and must not need torch
    onnx = require("onnx")
    path = Path(path)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / path.name
        try:
            with warnings.catch_warnings(), torch.no_grad(), _quiet():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
                torch.onnx.export(module, args, str(raw), input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
        except Exception as e:  # the exporter raises its own error types (SymbolicValueError, UnsupportedOperatorError)
            msg = " ".join(str(e).split())
            if opset < DEFAULT_OPSET and ("opset" in msg.lower() or "unsupported" in msg.lower()):
                raise InputError(f"--opset {opset} is too low for an op of {path.name} ({msg[:200]}): use "
                                 f"--opset {DEFAULT_OPSET} (the default)") from None
            raise InputError(f"{path.name}: the ONNX exporter failed at opset {opset}: {msg[:300]}") from None
        proto = onnx.load(str(raw))  # loads any external data the exporter wrote
    for out, shape in zip(proto.graph.output, output_shapes or []):
        dims = out.type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dims.add().dim_param = d if isinstance(d, str) else ""
            if not isinstance(d, str):
                dims[-1].dim_value = d
    weights = sum(t.ByteSize() for t in proto.graph.initializer)
    data = None
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    if weights > external_data_bytes:
        data = path.name + ".data"
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path))  # a path: works with external data too
    # strict: an inconsistent shape or type raises (the default would skip what it cannot infer silently)
    onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".inferred", check_type=True, strict_mode=True)
    os.replace(str(path) + ".inferred", str(path))  # keeps the inferred shapes (external data stays referenced)
    size = path.stat().st_size + ((path.parent / data).stat().st_size if data else 0)
    return {"file": path.name, "bytes": size, "external_data": data, "seconds": round(time.perf_counter() - t0, 2)}


_ELEM = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64",
         16: "bfloat16"}


def describe(path: Path) -> dict:
    """{"inputs": [...], "outputs": [...]}: each {"name", "dtype", "shape"}, a dynamic axis as its name."""
    onnx = require("onnx")
    proto = onnx.load(str(path), load_external_data=False)

    def one(v):
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": _ELEM.get(t.elem_type, str(t.elem_type)), "shape": shape}
    return {"inputs": [one(v) for v in proto.graph.input], "outputs": [one(v) for v in proto.graph.output]}
