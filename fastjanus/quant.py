"""8-bit weights (int8 or FP8 e4m3, weight-only: W8A16) and the FP8 KV cache's scales.

Scheme (both weight formats): symmetric, one fp32 scale per output channel (weight row), round to nearest:
  scale[n] = max_k |w[n, k]| / QMAX (127 for int8, 448 for e4m3; an all-zero row gets scale 1)
  q[n, k]  = int8: round(w / scale) clamped to ±127 · e4m3: w / scale cast to e4m3 (round to nearest even)
  w ≈ q · scale[n]
Per-output-channel scales commute with stacking rows, so the fused QKV and gate/up weights (`fuse()`) are the
row concatenation of their parts' 8-bit tensors and scales, with no requantization.

What is quantized (`target_modules`): the LLM's linear layers (q/k/v/o, gate/up/down of every layer) and, with
`heads`, the two heads (gen_head's two Linears, lm_head). Embeddings, norms, SigLIP, the aligners and the VQ
model stay in the model dtype.

How a quantized Linear runs (`qlinear`):
- decode step on the triton backend (≤ 64 rows): the skinny GEMM loads the 8-bit weight and dequantizes in
  registers; the scale multiplies the fp32 accumulator (`kernels.skinny_gemm`, w_scale=). No full-precision
  copy of a weight is ever made per step (it would be slower than bf16: it reads 8-bit, writes and re-reads
  16-bit).
- everything else (the prefill, the torch backend, > 64 rows): the reference, dequantize-then-matmul in
  chunks of output rows (≤ 64 MiB of scratch): the prefill is compute-bound, so a transient dequantized
  chunk costs little next to its GEMM.
- W8A8 (fp8 weights, sm_89+): `w8a8_linear` quantizes the activations per row (dynamic e4m3 scales) and runs
  `torch._scaled_mm`. It is used only for the (GPU, row count) pairs in `W8A8_ROWS`, filled from a GPU
  measurement (`bench.kernels`, rows `w8a8_scaled_mm[fp8]` with winner "scaled_mm"). On an H100 (2026-11-23,
  bench/results/h100-80gb-hbm3-2026-11-23-kernels.json) W8A8 lost at every decode shape measured (Pro-1B and
  Pro-7B, 2/8/32 rows: 1.5-4.6x slower than the W8A16 kernel; the activation quantization is extra launches and
  _scaled_mm's row-wise path is not tuned for skinny shapes), so the table is empty and every fp8 GEMM is
  weight-only. It also adds the activations' rounding (3 mantissa bits) to the error: a table entry should
  come with `--quality` numbers.

On disk (`fastjanus quantize`): the official tensor names; `<module>.weight` holds the 8-bit tensor and
`<module>.weight_scale` its fp32 scales [out]; config.json carries a `quantization_config` block
(`QuantConfig.to_dict`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, InputError, arg, setting

QUANT_METHOD = "fastjanus-w8"
SCALE_SUFFIX = "weight_scale"
SCHEMES = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
KV_CACHE = ("fp8",)  # kv_cache= choices besides None (the model dtype)
FP8_MIN_CAPABILITY = (8, 9)  # Triton converts e4m3 on sm_89 (Ada) and newer
MAX_KERNEL_ROWS = 64  # the skinny GEMM's limit (kernels/skinny_gemm.py MAX_M)
_DEQUANT_CHUNK_BYTES = 64 * 2 ** 20


def storage_dtype(scheme: str) -> torch.dtype:
    return SCHEMES[scheme][0]


def check_scheme(scheme, name: str = "quantize") -> str:
    if scheme not in SCHEMES:
        raise InputError(f"{arg(name)} must be one of {', '.join(SCHEMES)} (or left out), got {scheme!r}")
    return scheme


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class QuantConfig:
    weights: str  # "int8" | "fp8"
    heads: bool = False  # gen_head and lm_head quantized too

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "weights": self.weights,
                "weight_dtype": str(storage_dtype(self.weights)).removeprefix("torch."),
                "activations": "unquantized (W8A16)", "symmetric": True,
                "granularity": "per-output-channel", "scale_dtype": "float32", "scale_suffix": SCALE_SUFFIX,
                "scale_shape": "[out_features]", "heads": self.heads,
                "modules": ["language_model.model.layers.*.self_attn.{q,k,v,o}_proj",
                            "language_model.model.layers.*.mlp.{gate,up,down}_proj"]
                + (["language_model.lm_head", "gen_head.output_mlp_projector", "gen_head.vision_head"]
                   if self.heads else [])}

    @classmethod
    def from_dict(cls, d, source: str) -> "QuantConfig":
        where = f"{source}: quantization_config"
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
        if d.get("quant_method") != QUANT_METHOD:
            raise ConfigError(f"{where}.quant_method is {d.get('quant_method')!r}; fastjanus reads only its own "
                              f"{QUANT_METHOD!r} folders (written by `fastjanus quantize`). Quantize the original "
                              "bf16 checkpoint with `fastjanus quantize`, or load it with quantize=")
        w = d.get("weights")
        if w not in SCHEMES:
            raise ConfigError(f"{where}.weights is {w!r}; expected one of {', '.join(SCHEMES)}")
        if not isinstance(d.get("heads", False), bool):
            raise ConfigError(f"{where}.heads must be true or false, got {d.get('heads')!r}")
        return cls(w, d.get("heads", False))

    @classmethod
    def of(cls, cfg, source: str = "config.json") -> "QuantConfig | None":
        """The quantization of a checkpoint from its parsed config (None: not quantized)."""
        d = cfg.extra.get("quantization_config")
        return None if d is None else cls.from_dict(d, source)


def target_modules(cfg, heads: bool) -> list[str]:
    """Names of the Linear modules the scheme quantizes (official names)."""
    names = []
    for i in range(cfg.language.num_hidden_layers):
        p = f"language_model.model.layers.{i}."
        names += [p + f"self_attn.{n}_proj" for n in "qkvo"] + [p + f"mlp.{n}_proj" for n in ("gate", "up", "down")]
    if heads:
        names += ["language_model.lm_head", "gen_head.output_mlp_projector", "gen_head.vision_head"]
    return names


# ------------------------------------------------------------------------------------------ arithmetic
def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype) → (q [N, K] 8-bit, scale [N] fp32): symmetric per-row round to nearest, computed
    in fp32 on w's device, in chunks of rows (≤ 64 MiB of fp32 scratch: quantizing Pro-7B's lm_head at load
    must not need two fp32 copies of it, 3.4 GB, next to the weights already placed)."""
    dt, qmax = SCHEMES[scheme]
    N, K = w.shape
    q = torch.empty(N, K, dtype=dt, device=w.device)
    scale = torch.empty(N, dtype=torch.float32, device=w.device)
    step = max(1, _DEQUANT_CHUNK_BYTES // (K * 4))
    for a in range(0, N, step):
        x = w[a:a + step].to(torch.float32, copy=True)  # a copy even for fp32 w: scaled in place below
        amax = x.abs().amax(dim=1)  # [rows]
        s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        x.div_(s[:, None])
        if scheme == "int8":
            x.round_()
        q[a:a + step] = x.clamp_(-qmax, qmax)  # e4m3: the cast rounds to nearest even; |x| ≤ 448 already
        scale[a:a + step] = s
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [N, K] · scale [N] in fp32, rounded once to dtype."""
    return (q.float() * scale[:, None]).to(dtype)


def is_8bit(dtype) -> bool:
    """Whether a dtype is one of the schemes' storage dtypes (int8, float8_e4m3fn)."""
    return dtype in (dt for dt, _ in SCHEMES.values())


def check_kv_cache(kv_cache) -> None:
    if kv_cache is not None and kv_cache not in KV_CACHE:
        raise InputError(f"{arg('kv_cache')} must be one of {', '.join(KV_CACHE)} (or left out: the model dtype), "
                         f"got {kv_cache!r}")


# GPU name (torch.cuda.get_device_name) → decode-step row counts at which W8A8 beat the W8A16 kernel, measured.
W8A8_ROWS: dict[str, frozenset[int]] = {}


def use_w8a8(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether this fp8 GEMM runs as W8A8 (`w8a8_linear`): only where W8A8_ROWS says a measurement favoured it.
    A host-side lookup when a step is built, never inside a replay."""
    if not W8A8_ROWS or not x.is_cuda or w.dtype != torch.float8_e4m3fn or x.dtype != torch.bfloat16:
        return False  # (_scaled_mm's row-wise scaling gives bf16 outputs on CUDA)
    return x.shape[0] in W8A8_ROWS.get(torch.cuda.get_device_name(x.device), ())


def w8a8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (fp32/fp16/bf16) @ w [N, K] e4m3 (scales [N] fp32)ᵀ → [M, N] in x's dtype, with x quantized per row
    to e4m3 on the fly (scale = max |x_row| / 448; a zero row gets 1): torch._scaled_mm with row-wise scales
    (both operands e4m3, fp32 accumulation). Three small kernels (amax, quantize, GEMM), no host sync, so it
    replays in a CUDA Graph. On CUDA it needs sm_89+ and K, N multiples of 16 (every published shape)."""
    amax = x.abs().amax(dim=1, keepdim=True).float()  # [M, 1]
    xs = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    xq = (x.float() / xs).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=scale[None, :], out_dtype=x.dtype)


def qlinear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None = None,
            backend: str = "torch") -> torch.Tensor:
    """x [..., K] @ w [N, K]ᵀ (+ bias) with w 8-bit and scale [N] fp32, or a plain F.linear when scale is None.

    backend "triton" with ≤ 256 rows (a decode step, a short prefill): the skinny GEMM on the 8-bit weight
    (`w8a16_linear`). Otherwise the dequantize-then-matmul reference, in chunks of output rows so the fp32
    scratch stays ≤ 64 MiB."""
    if scale is None:
        return F.linear(x, w, bias)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if backend == "triton" and 1 <= x2.shape[0] <= 4 * MAX_KERNEL_ROWS:
        y = w8a16_linear(x2.contiguous(), w, scale)
    else:
        N = w.shape[0]
        step = max(1, _DEQUANT_CHUNK_BYTES // (K * 8))  # two fp32 temporaries per chunk
        y = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
        for a in range(0, N, step):
            y[:, a:a + step] = F.linear(x2, dequantize(w[a:a + step], scale[a:a + step], x.dtype))
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, w.shape[0])


def w8a16_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, epilogue: str | None = None) -> torch.Tensor:
    """x [M, K] @ 8-bit w [N, K]ᵀ with its row scales on the skinny GEMM; more than 64 rows (a bucket of over 32
    images) run as 64-row slices of one output, each reading the 8-bit weight once: two slices read as many
    bytes as one bf16 GEMM, still less than dequantizing first."""
    from .kernels.skinny_gemm import skinny_gemm
    M = x.shape[0]
    if M <= MAX_KERNEL_ROWS:
        return skinny_gemm(x, w, w_scale=scale, epilogue=epilogue)
    n_out = w.shape[0] // 2 if epilogue == "silu_mul" else w.shape[0]
    out = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    for a in range(0, M, MAX_KERNEL_ROWS):
        skinny_gemm(x[a:a + MAX_KERNEL_ROWS], w, w_scale=scale, epilogue=epilogue, out=out[a:a + MAX_KERNEL_ROWS])
    return out


class QuantLinear(nn.Module):
    """A Linear whose weight is 8-bit [out, in] with fp32 scales [out] (`weight_scale`); the official names, so
    a quantized state dict is the official one plus the scales. `backend` is set by the pipeline."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=storage_dtype(scheme)),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.backend = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.weight, self.weight_scale, self.bias, self.backend)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme}, bias={self.bias is not None}"


def weight_scale(m: nn.Module) -> torch.Tensor | None:
    """A Linear's scales, or None for a plain (unquantized) one."""
    return getattr(m, "weight_scale", None)


def convert(model: nn.Module, qc: QuantConfig) -> None:
    """Swap the target Linears of a (meta-device) JanusModel for QuantLinears, before its weights are loaded."""
    for name in target_modules(model.cfg, qc.heads):
        owner, _, attr = name.rpartition(".")
        lin = model.get_submodule(name)
        q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, qc.weights)
        setattr(model.get_submodule(owner), attr, q)


def set_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = backend


def check_device(scheme: str | None, kv_cache: str | None, device: torch.device, backend: str) -> None:
    """FP8 needs e4m3 conversions in the kernels: sm_89 (Ada, Hopper) and newer. On older GPUs the error names
    the capability and what works instead; on the CPU both backends handle e4m3 (torch casts, the interpreter)."""
    want = [w for w, on in (("fp8 weights", scheme == "fp8"), ("an fp8 KV cache", kv_cache == "fp8")) if on]
    if not want or device.type != "cuda" or backend != "triton":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        fixes = []
        if scheme == "fp8":
            fixes.append("int8 weights (fastjanus quantize --weights int8 of the original checkpoint, or "
                         f"{setting('quantize', 'int8')})")
        if kv_cache == "fp8":
            fixes.append(f"no {arg('kv_cache')} (the model dtype)")
        raise InputError(f"{' and '.join(want)} need a GPU of compute capability {FP8_MIN_CAPABILITY[0]}."
                         f"{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper) for Triton's e4m3 conversions; "
                         f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}. Use "
                         + " and ".join(fixes) + f" on this GPU, or {setting('backend', 'torch')} (slower)")


# ------------------------------------------------------------------------------------------ KV cache
def kv_cache_scales(llm, margin: float = 1.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales of an e4m3 KV cache, per layer and kv head: (k_scale, v_scale) [layers, Hkv] fp32.

    How they are chosen: from the weights alone, as a bound no key or value can exceed, so the cache never
    saturates whatever the input. A key is k = W_k (g ⊙ x̂) where x̂ is the RMS-normalised input (‖x̂‖₂ ≤ √D
    exactly: its mean square is ≤ 1) and g the input norm's weight, so by Cauchy-Schwarz
    |k_j| ≤ ‖W_k[j] ⊙ g‖₂ · √D. Rotary mixes channel j with j + hd/2 by a rotation, so the rotated key obeys
    |k_j| ≤ √(B_j² + B_{j+hd/2}²); values have no rotary. The scale is the head's largest bound × `margin`
    (2%: the bf16 roundings of x̂, g and the GEMM output) / 448.
    Why not a calibration: no data is needed, no input can overflow, and e4m3 keeps the same relative
    precision (3 mantissa bits) over 2^17 of range, so a loose bound costs nothing until typical values fall
    below 2^-6 · scale; the bound is about √D above a typical value (a random alignment), i.e. typical
    values sit near 448/√D ≈ 10 (D 2048), 9 binades above the subnormals.
    Computed in fp32 from the weights in use (8-bit weights dequantized, one layer at a time)."""
    cfg = llm.cfg
    H, Hkv, hd, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    ks, vs = [], []
    for layer in llm.layers:
        g = layer.input_layernorm.weight.float()  # [D]
        w = layer.self_attn.qkv_weight
        s = layer.self_attn.qkv_scale
        wf = w.float() if s is None else w.float() * s[:, None]
        wk, wv = wf[H * hd:(H + Hkv) * hd], wf[(H + Hkv) * hd:]  # [Hkv·hd, D] each
        bk = ((wk * g).norm(dim=1) * math.sqrt(D)).view(Hkv, hd)
        bv = ((wv * g).norm(dim=1) * math.sqrt(D)).view(Hkv, hd)
        bk = torch.sqrt(bk[:, :hd // 2] ** 2 + bk[:, hd // 2:] ** 2)  # after the rotary: pairs (j, j + hd/2)
        ks.append(bk.amax(dim=1))
        vs.append(bv.amax(dim=1))
    qmax = SCHEMES["fp8"][1]
    k, v = torch.stack(ks), torch.stack(vs)
    # a head whose bound is 0 (all-zero rows, a pruned head) holds only zeros: scale 1, not 0/0 = NaN
    k, v = (torch.where(b > 0, b * margin / qmax, torch.ones_like(b)) for b in (k, v))
    return k, v
