"""ONNX export and ONNX Runtime runners (fastjanus.export): `export_onnx` (the `fastjanus export-onnx` command),
`OrtVision` (SigLIP and the VQ decoder on ONNX Runtime), `OrtImageGenerator` (the LLM side of text-to-image on
ONNX Runtime). Imported on first use, so that `import fastjanus.export` costs nothing until then."""

_NAMES = {"export_onnx": "onnx_export", "model_fingerprint": "onnx_export", "OrtVision": "ort_runtime",
          "read_manifest": "ort_runtime", "OrtImageGenerator": "onnx_llm", "quantize_llm_int8": "onnx_llm"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
