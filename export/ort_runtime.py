"""Running the exported vision graphs on ONNX Runtime: `OrtVision(dir, providers="auto")`.

`fastjanus.load(path, onnx_dir=DIR)` hands one to the pipeline, whose encode_image, answer and
decode_image_tokens then run SigLIP and the VQ decoder here. The folder is checked before anything loads: its
manifest, the files it names, and that it was exported from this checkpoint (a fingerprint of the
checkpoint's config and weight files).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError, path_of
from .onnx_export import FILES, FORMAT, MANIFEST, VISION, VQ
from .onnx_io import require

# "auto" takes the first of these that the installed onnxruntime offers: TensorRT, then CUDA, then the CPU.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(providers="auto") -> list[str]:
    """"auto", one provider name, or a list of them (each must be available), → the list ORT is given."""
    ort = require("onnxruntime")
    avail = ort.get_available_providers()
    if providers == "auto":
        chosen = [p for p in PROVIDER_ORDER if p in avail]
        if not chosen:
            raise InputError(f"this onnxruntime offers none of {', '.join(PROVIDER_ORDER)} (it has "
                             f"{', '.join(avail)}); reinstall onnxruntime (or onnxruntime-gpu)")
        return chosen
    asked = [providers] if isinstance(providers, str) else list(providers)
    missing = [p for p in asked if p not in avail]
    if missing or not asked:
        raise InputError(f"ONNX Runtime provider {', '.join(missing) or '(none given)'} is not available in this "
                         f"onnxruntime (it has {', '.join(avail)}); use providers='auto'"
                         + ("; for CUDA install onnxruntime-gpu" if any("CUDA" in p or "Tensorrt" in p
                                                                         for p in missing) else ""))
    return asked


def read_manifest(onnx_dir, fingerprint: str | None = None, parts=(), config_sha256: str | None = None,
                  model_dir=None) -> tuple[Path, dict]:
    """The export folder's manifest, checked: present, of this format, its files present, holding `parts`, and
    (given a fingerprint, or only a config digest where the weights are not at hand) exported from that
    checkpoint."""
    d = Path(onnx_dir)
    if not d.is_dir():
        raise InputError(f"{path_of('onnx_dir', d)}: no such folder; write one with `fastjanus export-onnx --model "
                         "MODEL --out DIR`")
    mp = d / MANIFEST
    if not mp.is_file():
        raise InputError(f"{path_of('onnx_dir', d)}: no {MANIFEST} (not an export, or one that did not finish); "
                         "export again with `fastjanus export-onnx`")
    try:
        m = json.loads(mp.read_text(encoding="utf-8"))
        ok = isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("parts"), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise InputError(f"{mp}: not a fastjanus ONNX manifest; export again with `fastjanus export-onnx`")
    for part, e in m["parts"].items():
        for name in [e.get("file")] + ([e["external_data"]] if e.get("external_data") else []):
            if not name or not (d / name).is_file():
                raise InputError(f"{d / str(name)}: missing ({part} in {MANIFEST}); export again with "
                                 "`fastjanus export-onnx`")
    missing = [p for p in parts if p not in m["parts"]]
    if missing:
        which = "all" if set(missing) - {VISION, VQ} else "vision,vq-decoder"
        raise InputError(f"{path_of('onnx_dir', d)}: exported without {', '.join(missing)}; export again with "
                         f"`fastjanus export-onnx --parts {which}`")
    model = m.get("model", {})
    if (fingerprint is not None and model.get("fingerprint") != fingerprint) or \
            (config_sha256 is not None and model.get("config_sha256") != config_sha256):
        was = model.get("path")
        same = model_dir is not None and was is not None and Path(was) == Path(model_dir).resolve()
        raise InputError(f"{path_of('onnx_dir', d)}: " + (
            f"the checkpoint at {was} changed since this export" if same else
            f"exported from another model ({was}), not this checkpoint")
            + "; export it again with `fastjanus export-onnx --model MODEL --out DIR`")
    return d, m


class OrtVision:
    """SigLIP (+ aligner) and the VQ decoder on ONNX Runtime. numpy in, numpy out.

    providers: "auto" (TensorRT, CUDA, then CPU: whichever the installed onnxruntime offers), a name or a list.
    `.providers[part]` says what each session took (ORT falls back to the CPU where a provider cannot start)."""

    def __init__(self, onnx_dir, providers="auto", *, fingerprint: str | None = None, parts=(VISION, VQ),
                 threads: int | None = None, config_sha256: str | None = None, model_dir=None):
        """parts: the graphs to open; each must be in the export (checked now, before any work). fingerprint
        (or config_sha256): the checkpoint's, from export.onnx_export; model_dir names it in errors."""
        ort = require("onnxruntime")
        self.dir, self.manifest = read_manifest(onnx_dir, fingerprint, parts, config_sha256, model_dir)
        chosen = choose_providers(providers)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions, self.providers = {}, {}
        for part in parts:
            if part in (VISION, VQ):
                s = ort.InferenceSession(str(self.dir / self.manifest["parts"][part]["file"]), opts, providers=chosen)
                self.sessions[part], self.providers[part] = s, s.get_providers()[0]

    @property
    def provider(self) -> str:
        """The provider the sessions run on (the first one each took; they agree unless one fell back)."""
        return ", ".join(sorted(set(self.providers.values())))

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def _session(self, part: str):
        if part not in self.sessions:
            raise InputError(f"{self.dir}: {FILES[part]} was not exported; export with --parts vision,vq-decoder")
        return self.sessions[part]

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] (the processor's output) → image_embeds [N, n, D] (the export dtype)."""
        return self._session(VISION).run(["image_embeds"], {"pixel_values": np.ascontiguousarray(
            pixel_values, dtype=np.float32)})[0]

    def decode(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """codes int64 [N, g·g] → (pixels [N, 3, S, S], images uint8 [N, S, S, 3])."""
        pixels, images = self._session(VQ).run(["pixels", "images"], {"codes": np.ascontiguousarray(
            codes, dtype=np.int64)})
        return pixels, images
