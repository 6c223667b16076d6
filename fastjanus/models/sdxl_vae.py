"""The SDXL VAE's decoder (diffusers' `AutoencoderKL`, decoder half): JanusFlow's latents [B, 4, 48, 48] → pixels.

Layout (parameter names are diffusers', so the published `diffusion_pytorch_model.safetensors` loads as is):

    latents / scaling_factor (+ shift_factor) → post_quant_conv (1×1)
    → decoder.conv_in → mid_block (resnet, single-head attention, resnet)
    → up_blocks (deepest first; layers_per_block + 1 resnets each; nearest ×2 upsample + 3×3 conv except in the last)
    → conv_norm_out (GroupNorm) → SiLU → conv_out → [B, 3, 8·h, 8·w], raw (roughly [-1, 1]; no clipping here)

Every resnet is pre-norm: x + conv2(silu(GN2(conv1(silu(GN1(x)))))), with a 1×1 `conv_shortcut` on x where the
channel count changes. All GroupNorms use eps 1e-6.

fp16 safety
-----------
The SDXL VAE is known to overflow in fp16: its decoder's activations exceed fp16's largest value (65504), so a
naive fp16 decode returns NaN/black images. The official JanusFlow demo therefore runs the VAE in bf16, and the
community `sdxl-vae-fp16-fix` re-trains the weights to shrink them. We cannot download the real weights, so this
decoder is made safe in fp16 *by construction*, without changing the weights or the result:

* Every GroupNorm is invariant to scaling its input: GN(x / s; eps / s²) = GN(x; eps) exactly in real
  arithmetic, and bit for bit in floating point when s is a power of two (mean, deviation and eps all scale by
  powers of two; nothing else changes) as long as nothing under- or overflows.
* Everything that *reads* the residual stream is a GroupNorm, a residual add, the nearest-neighbour upsample or
  a convolution that *writes* the stream (conv_shortcut, the upsampler's conv). So the stream can be carried as
  x / s: the layers that write into it (decoder.conv_in, each resnet's conv2, conv_shortcut, attention's to_out,
  the upsampler's conv) produce their output divided by s (weight and bias × 1/s, or only the bias where the
  input already is the scaled stream), and the GroupNorms that read it use eps / s².
* Likewise conv1's output is only read by norm2, so it can be carried divided by its own r (conv1's weight and
  bias × 1/r, norm2 with eps / r²).
* The last GroupNorm (conv_norm_out) absorbs the final s, so the output needs no unscaling.

s is chosen dynamically per block, like dynamic loss scaling. The stem (post_quant_conv, conv_in: tiny convs
on the 48×48 latent) runs in fp32; then before the mid block and before each up block the stream's amax is
measured (exactly, in fp32 on the host) and s becomes the power of two that brings it to at most 2^8 = 256,
leaving 256× headroom for growth inside the block. If a block's fp16 output is non-finite it is computed again
once with 2^8 more headroom for both the stream and conv1's output (s × 256, r = 256); if that is still
non-finite (an overflow the scales cannot reach, e.g. inside attention's q/k/v), that one block is recomputed in
fp32 (weights cast on the fly) and its output is scaled back into fp16. The host syncs are one after the stem and
one per block (6 for SDXL: mid block + 4 up blocks; one more per retry), acceptable because the VAE decode runs
once per image, outside any CUDA-graph-captured loop. Scaling a weight by 1/s can push small weights into fp16's
subnormal range, but only where that layer's output is small next to the stream it is added to (s is set by the
stream), so the error stays below the stream's own fp16 rounding.

In fp32 and bf16 (whose range is fp32's) the plain path runs: s = r = 1, no measurement, no syncs. fp16 takes the
safe path by default; `forward(latents, safe=False)` runs the naive fp16 path (for tests and comparisons).

Measured here (CPU, torch 2.13; the cases are in tests/test_sdxl_vae.py): on the tiny test VAE with weights
scaled so that, in fp32, the stream reaches 4.5e5 (conv_in), one resnet's conv2 adds 1.6e5 to a stream of ~30
inside a block, conv1's output reaches 1.3e5, or attention's q reaches 1.1e5, the naive fp16 path returns NaN
in every case; the safe path's output (|out| ~ 3) is within 3.8e-3 of an fp32 decode of the same fp16-rounded
weights (the stream case without any retry, at s = 2048; the in-block growth and conv1 cases with one retry;
the attention case through the fp32 fallback), while the plain fp16 path on the unscaled weights is itself
4.4e-3 from fp32. In fp32 the scaled path equals the plain one bit for bit (powers of two are exact). The real
SDXL VAE's activations were not measured (its weights cannot be downloaded here).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError

UP_BLOCK = "UpDecoderBlock2D"
DOWN_BLOCK = "DownEncoderBlock2D"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
NORM_EPS = 1e-6  # every GroupNorm of the diffusers VAE

# fp16 safe path: the stream is scaled so that its amax is at most 2^STREAM_TARGET_BITS entering a block, and a
# retry adds 2^RETRY_BITS of headroom (to the stream and to conv1's output) before falling back to fp32.
STREAM_TARGET_BITS = 8
RETRY_BITS = 8


# ============================================================================================ config
def _need(cond: bool, source: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class VAEConfig:
    """diffusers `AutoencoderKL` config.json. Defaults are AutoencoderKL's constructor defaults, so a key that a
    config.json leaves out means what it means to diffusers."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None  # kept for to_dict; JanusFlow's decode does not use them
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # kept, not used (see the module docstring for how fp16 is handled)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    extra: dict = field(default_factory=dict, compare=False)  # other keys (_diffusers_version, _name_or_path)
    source: str = field(default="config.json", compare=False, repr=False)  # named in error messages

    def __post_init__(self) -> None:
        src = self.source
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            v = getattr(self, name)
            _need(isinstance(v, (list, tuple)), src, f"{name} must be a list, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None:
                _need(isinstance(v, (list, tuple)) and all(_is_num(x) for x in v), src,
                      f"{name} must be null or a list of numbers, got {v!r}")
                object.__setattr__(self, name, tuple(v))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            v = getattr(self, name)
            _need(_is_int(v) and v > 0, src, f"{name} is {v!r}; it must be a positive integer")
        ss = self.sample_size
        _need((_is_int(ss) and ss > 0) or (isinstance(ss, tuple) and len(ss) > 0 and all(_is_int(x) and x > 0
                                                                                          for x in ss)),
              src, f"sample_size is {ss!r}; it must be a positive integer (or a list of them)")
        for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            v = getattr(self, name)
            _need(isinstance(v, bool), src, f"{name} is {v!r}; it must be true or false")
        _need(_is_num(self.scaling_factor) and self.scaling_factor > 0, src,
              f"scaling_factor is {self.scaling_factor!r}; it must be a positive number (SDXL VAE: 0.13025)")
        _need(self.shift_factor is None or _is_num(self.shift_factor), src,
              f"shift_factor is {self.shift_factor!r}; it must be null or a number (SDXL VAE: null)")
        _need(self.act_fn in ("silu", "swish"), src,
              f"act_fn is {self.act_fn!r}, but only 'silu' is supported (the SDXL VAE's activation); "
              "use the VAE's own config.json")
        boc = self.block_out_channels
        _need(len(boc) > 0 and all(_is_int(c) and c > 0 for c in boc), src,
              f"block_out_channels is {list(boc)!r}; it must be a non-empty list of positive integers")
        for i, c in enumerate(boc):
            _need(c % self.norm_num_groups == 0, src,
                  f"block_out_channels[{i}] is {c}, not a multiple of norm_num_groups {self.norm_num_groups} "
                  "(GroupNorm splits the channels into equal groups); fix block_out_channels or norm_num_groups")
        _need(all(isinstance(t, str) for t in self.down_block_types), src,
              f"down_block_types must be a list of strings, got {list(self.down_block_types)!r}")
        bad = [t for t in self.up_block_types if t != UP_BLOCK]
        if bad:
            raise ConfigError(f"{src}: up_block_types contains {bad[0]!r}; only {UP_BLOCK!r} is supported (the "
                              "SDXL VAE's decoder); use the VAE's own config.json")
        _need(len(self.up_block_types) == len(boc), src,
              f"up_block_types has {len(self.up_block_types)} entries but block_out_channels has {len(boc)}; "
              "they must have one entry per resolution level")

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side (8 for SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)

    # ---- (de)serialisation
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "VAEConfig":
        _need(isinstance(d, dict), source, f"expected a JSON object, got {type(d).__name__}")
        name = d.get("_class_name", "AutoencoderKL")
        _need(name == "AutoencoderKL", source,
              f"_class_name is {name!r}, not 'AutoencoderKL'; pass the VAE's folder (in a diffusers pipeline, "
              "its vae/ subfolder)")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "source"}
        kw = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k != "_class_name"}
        return cls(**kw, extra=extra, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> "VAEConfig":
        """`path`: the VAE folder or its config.json."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            hint = ""
            if (path.parent / "vae" / "config.json").is_file():
                hint = f" (this looks like a pipeline folder: pass {path.parent / 'vae'})"
            raise CheckpointNotFoundError(
                f"{path}: no such file; a VAE folder (diffusers layout) holds config.json and "
                f"{WEIGHT_FILES[0]}{hint}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read as JSON ({e}); download the VAE's config.json again") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """diffusers' layout; `AutoencoderKL.from_config` / `from_pretrained` accept it."""
        d = {"_class_name": "AutoencoderKL", **self.extra}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "source"):
                continue
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


SDXL_VAE = VAEConfig(
    in_channels=3, out_channels=3, down_block_types=(DOWN_BLOCK,) * 4, up_block_types=(UP_BLOCK,) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", latent_channels=4,
    norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True, source="SDXL VAE preset")


def tiny_vae() -> VAEConfig:
    """A small VAE with the SDXL VAE's structure (4 levels: 8× downsampling, 4 latent channels), for tests."""
    return VAEConfig(down_block_types=(DOWN_BLOCK,) * 4, up_block_types=(UP_BLOCK,) * 4,
                     block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                     latent_channels=4, sample_size=64, scaling_factor=0.13025, source="tiny VAE preset")


def vae_latent_check(vae: VAEConfig, latent_channels: int, latent_size: int, image_size: int,
                     what: str = "the model") -> None:
    """The VAE must decode `what`'s latents [latent_channels, latent_size, latent_size] to image_size px."""
    src = vae.source
    if vae.latent_channels != latent_channels:
        raise ConfigError(f"{src}: the VAE's latent_channels is {vae.latent_channels} but {what} produces "
                          f"{latent_channels}-channel latents; use the VAE {what} was trained with (the SDXL VAE, "
                          f"latent_channels {latent_channels})")
    if vae.downsample * latent_size != image_size:
        need = (f"{image_size // latent_size}×" if image_size % latent_size == 0
                else f"a non-integer factor {image_size / latent_size:g}")
        raise ConfigError(f"{src}: the VAE upsamples {vae.downsample}× ({len(vae.block_out_channels)} "
                          f"block_out_channels) but {what} decodes {latent_size}×{latent_size} latents to "
                          f"{image_size}×{image_size} px, which needs {need}; use the VAE {what} was trained with "
                          "(the SDXL VAE upsamples 8×)")
    if vae.out_channels != 3:
        raise ConfigError(f"{src}: the VAE's out_channels is {vae.out_channels} but an RGB image needs 3; "
                          f"use the VAE {what} was trained with (the SDXL VAE)")


# ============================================================================================ layers
# Functional helpers. `s` is the power of two the output (or input) is divided by; weights are cast to the input's
# dtype, a no-op except in the fp32 fallback of the fp16 safe path.
def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _gn(x: torch.Tensor, norm: nn.GroupNorm, s: float = 1.0) -> torch.Tensor:
    """GroupNorm of the true x, given x / s: GN(x / s; eps / s²) = GN(x; eps)."""
    return F.group_norm(x, norm.num_groups, _cast(norm.weight, x.dtype), _cast(norm.bias, x.dtype),
                        norm.eps / (s * s))


def _conv(x: torch.Tensor, conv: nn.Conv2d, s: float = 1.0, input_scaled: bool = False) -> torch.Tensor:
    """conv(x) / s. input_scaled: x is already divided by s (the stream), so only the bias is."""
    w, b = _cast(conv.weight, x.dtype), _cast(conv.bias, x.dtype)
    if s != 1.0:
        w = w if input_scaled else w * (1.0 / s)
        b = None if b is None else b * (1.0 / s)
    return F.conv2d(x, w, b, conv.stride, conv.padding)


def _linear(x: torch.Tensor, lin: nn.Linear, s: float = 1.0) -> torch.Tensor:
    """lin(x) / s."""
    w, b = _cast(lin.weight, x.dtype), _cast(lin.bias, x.dtype)
    if s != 1.0:
        w, b = w * (1.0 / s), b * (1.0 / s)
    return F.linear(x, w, b)


def _group_norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """Pre-norm residual block. Given the stream as x / s, returns the new stream / s; conv1's output is carried
    divided by r (only norm2 reads it)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, s: float = 1.0, r: float = 1.0) -> torch.Tensor:  # [B, cin, H, W]
        h = _conv(F.silu(_gn(x, self.norm1, s)), self.conv1, r)  # [B, cout, H, W], divided by r
        h = _conv(F.silu(_gn(h, self.norm2, r)), self.conv2, s)  # [B, cout, H, W], divided by s
        skip = x if self.conv_shortcut is None else _conv(x, self.conv_shortcut, s, input_scaled=True)
        return skip + h  # [B, cout, H, W], divided by s


class Attention(nn.Module):
    """Single-head self-attention over the H·W positions (head dim = C, scale C^-½), with a residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(c, groups)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers' to_out.1 is a Dropout (no parameters)

    def forward(self, x: torch.Tensor, s: float = 1.0) -> torch.Tensor:  # [B, C, H, W], divided by s
        B, C, H, W = x.shape
        h = _gn(x, self.group_norm, s).flatten(2).transpose(1, 2)  # [B, H·W, C], true scale
        q, k, v = (_linear(h, m)[:, None] for m in (self.to_q, self.to_k, self.to_v))  # [B, 1, H·W, C]
        o = F.scaled_dot_product_attention(q, k, v)[:, 0]  # [B, H·W, C]
        o = _linear(o, self.to_out[0], s)  # [B, H·W, C], divided by s
        return x + o.transpose(1, 2).reshape(B, C, H, W)  # [B, C, H, W], divided by s


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, s: float = 1.0) -> torch.Tensor:  # [B, C, H, W], divided by s
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [B, C, 2H, 2W]
        return _conv(x, self.conv, s, input_scaled=True)  # [B, C, 2H, 2W], divided by s


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)]) if attention else None

    def forward(self, x: torch.Tensor, s: float = 1.0, r: float = 1.0) -> torch.Tensor:  # [B, C, h, w]
        x = self.resnets[0](x, s, r)
        if self.attentions is not None:
            x = self.attentions[0](x, s)
        return self.resnets[1](x, s, r)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n_res: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n_res))
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x: torch.Tensor, s: float = 1.0, r: float = 1.0) -> torch.Tensor:  # [B, cin, H, W]
        for res in self.resnets:
            x = res(x, s, r)  # [B, cout, H, W]
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, s)  # [B, cout, 2H, 2W]
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        outs = list(reversed(cfg.block_out_channels))  # deepest level first
        G = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, outs[0], 3, padding=1)
        self.mid_block = MidBlock(outs[0], G, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(outs[max(i - 1, 0)], outs[i], cfg.layers_per_block + 1, G, upsample=i < len(outs) - 1)
            for i in range(len(outs)))
        self.conv_norm_out = _group_norm(outs[-1], G)
        self.conv_out = nn.Conv2d(outs[-1], cfg.out_channels, 3, padding=1)

    def head(self, x: torch.Tensor, s: float = 1.0) -> torch.Tensor:  # [B, C0, H, W], divided by s
        return _conv(F.silu(_gn(x, self.conv_norm_out, s)), self.conv_out)  # [B, out, H, W], true scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, latent, h, w] → [B, out, 8h, 8w]
        x = _conv(z, self.conv_in)  # [B, C3, h, w]
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.head(x)


def _amax(x: torch.Tensor) -> float:
    """max |x| on the host (a sync); NaN/inf when x holds any."""
    return float(x.detach().abs().amax().float().item())


def _stream_scale(amax: float) -> float:
    """The power of two s ≥ 1 with amax / s ≤ 2^STREAM_TARGET_BITS."""
    target = 2.0 ** STREAM_TARGET_BITS
    return 1.0 if amax <= target else 2.0 ** math.ceil(math.log2(amax / target))


class VAEDecoder(nn.Module):
    """AutoencoderKL's decoding half: `post_quant_conv.*` and `decoder.*`, named as in diffusers."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        L = cfg.latent_channels
        self.post_quant_conv = nn.Conv2d(L, L, 1) if cfg.use_post_quant_conv else None
        self.decoder = Decoder(cfg)
        self.last_decode_stats: dict = {}  # fp16 safe path: scales, retries and fallbacks of the last call

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def forward(self, latents: torch.Tensor, safe: bool | None = None) -> torch.Tensor:
        """latents [B, L, h, w] as the flow produces them (not yet divided by scaling_factor) → the decoder's raw
        output [B, out_channels, 8h, 8w] in the module dtype. safe: None → the fp16-safe path when the module is
        fp16 (see the module docstring), the plain path otherwise; False forces the plain path."""
        cfg = self.cfg
        z = latents.float() / cfg.scaling_factor  # [B, L, h, w], fp32
        if cfg.shift_factor is not None:
            z = z + cfg.shift_factor  # diffusers' pipelines: latents / scaling_factor + shift_factor
        if safe is None:
            safe = self.dtype == torch.float16
        if safe:
            return self._safe_forward(z)
        z = z.to(self.dtype)
        if self.post_quant_conv is not None:
            z = _conv(z, self.post_quant_conv)
        return self.decoder(z)

    # ---- fp16-safe path (module docstring)
    def _safe_forward(self, z: torch.Tensor) -> torch.Tensor:
        dec, dt = self.decoder, self.dtype
        stats = {"scales": [], "retried": [], "fp32_blocks": []}
        # Stem in fp32: 1×1 and 3×3 convs from L channels on the latent grid, a negligible cost.
        if self.post_quant_conv is not None:
            z = _conv(z, self.post_quant_conv)
        x32 = _conv(z, dec.conv_in)  # [B, C3, h, w] fp32
        s = _stream_scale(_amax(x32))
        x = (x32 * (1.0 / s)).to(dt)
        for i, block in enumerate([dec.mid_block, *dec.up_blocks]):
            stats["scales"].append(s)
            x, s = self._safe_block(i, block, x, s, stats)
        self.last_decode_stats = stats
        return dec.head(x, s)  # conv_norm_out absorbs s

    def _safe_block(self, i: int, block: nn.Module, x: torch.Tensor, s: float, stats: dict):
        """Run one block on the stream x (= true / s, module dtype). Returns (output / s', s') with s' chosen
        from the output's amax."""
        dt = x.dtype
        for attempt in range(2):
            h = 2.0 ** (RETRY_BITS * attempt)  # extra headroom on the retry, for the stream and conv1's output
            y = block(x if h == 1.0 else x * (1.0 / h), s * h, h)
            a = _amax(y)
            if math.isfinite(a):
                break
            if attempt == 0:
                stats["retried"].append(i)
        else:  # still non-finite: this block in fp32, from the same input
            stats["fp32_blocks"].append(i)
            h = 1.0
            y = block(x.float(), s, 1.0)
            a = _amax(y)
        s_in = s * h
        s_out = _stream_scale(a * s_in) if math.isfinite(a) else s_in
        y = y if s_out == s_in else y * (s_in / s_out)  # a power of two: exact
        return y.to(dt), s_out


# ============================================================================================ weights
ATTN_NEW = ("to_q", "to_k", "to_v", "to_out.0")
ATTN_OLD = ("query", "key", "value", "proj_attn")  # diffusers' names before 0.14, still in some published files


def _resnet_shapes(p: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    d = {f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,), f"{p}.conv1.weight": (cout, cin, 3, 3),
         f"{p}.conv1.bias": (cout,), f"{p}.norm2.weight": (cout,), f"{p}.norm2.bias": (cout,),
         f"{p}.conv2.weight": (cout, cout, 3, 3), f"{p}.conv2.bias": (cout,)}
    if cin != cout:
        d.update({f"{p}.conv_shortcut.weight": (cout, cin, 1, 1), f"{p}.conv_shortcut.bias": (cout,)})
    return d


def _attention_shapes(p: str, c: int) -> dict[str, tuple[int, ...]]:
    d = {f"{p}.group_norm.weight": (c,), f"{p}.group_norm.bias": (c,)}
    for n in ATTN_NEW:
        d.update({f"{p}.{n}.weight": (c, c), f"{p}.{n}.bias": (c,)})
    return d


def _encoder_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """diffusers' Encoder (DownEncoderBlock2D levels, double_z) and quant_conv; built here, not from diffusers."""
    boc = cfg.block_out_channels
    d = {"encoder.conv_in.weight": (boc[0], cfg.in_channels, 3, 3), "encoder.conv_in.bias": (boc[0],)}
    cin = boc[0]
    for i, cout in enumerate(boc):
        for j in range(cfg.layers_per_block):
            d.update(_resnet_shapes(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout))
        if i < len(boc) - 1:
            d.update({f"encoder.down_blocks.{i}.downsamplers.0.conv.weight": (cout, cout, 3, 3),
                      f"encoder.down_blocks.{i}.downsamplers.0.conv.bias": (cout,)})
        cin = cout
    c = boc[-1]
    d.update(_resnet_shapes("encoder.mid_block.resnets.0", c, c))
    if cfg.mid_block_add_attention:
        d.update(_attention_shapes("encoder.mid_block.attentions.0", c))
    d.update(_resnet_shapes("encoder.mid_block.resnets.1", c, c))
    L2 = 2 * cfg.latent_channels
    d.update({"encoder.conv_norm_out.weight": (c,), "encoder.conv_norm_out.bias": (c,),
              "encoder.conv_out.weight": (L2, c, 3, 3), "encoder.conv_out.bias": (L2,)})
    if cfg.use_quant_conv:
        d.update({"quant_conv.weight": (L2, L2, 1, 1), "quant_conv.bias": (L2,)})
    return d


def decoder_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """The VAEDecoder's parameters (post_quant_conv.*, decoder.*) and their shapes."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in VAEDecoder(cfg).state_dict().items()}


def vae_tensor_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a diffusers AutoencoderKL checkpoint (current attention names), encoder included."""
    return {**_encoder_shapes(cfg), **decoder_shapes(cfg)}


def _attention_prefixes(keys) -> set[str]:
    return {k.split(".attentions.0.")[0] + ".attentions.0" for k in keys if ".attentions.0." in k}


def _old_name(key: str) -> str:
    """The pre-0.14 diffusers name of an attention projection key (others unchanged)."""
    head, sep, tail = key.partition(".attentions.0.")
    for new, old in zip(ATTN_NEW, ATTN_OLD):
        if sep and tail.startswith(new + "."):
            return f"{head}{sep}{old}.{tail[len(new) + 1:]}"
    return key


def write_random_vae(out_dir: str | Path, cfg: VAEConfig, seed: int = 0, old_attention_names: bool = False,
                     dtype: torch.dtype = torch.float32, attention_as_conv: bool = False) -> Path:
    """config.json + diffusion_pytorch_model.safetensors with random values for every AutoencoderKL tensor.

    Values depend on (seed, current key name) only, so the old-name and conv-shaped variants hold the same
    model. old_attention_names: store attention projections as query/key/value/proj_attn. attention_as_conv:
    store their weights as 1×1 conv weights [C, C, 1, 1]."""
    from safetensors.torch import save_file

    from ..random_init import random_tensor
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype}: write float32, bfloat16 or float16")
    bad = [t for t in cfg.down_block_types if t != DOWN_BLOCK]
    if bad or len(cfg.down_block_types) != len(cfg.block_out_channels):
        raise ConfigError(f"{cfg.source}: down_block_types is {list(cfg.down_block_types)}; random weights are "
                          f"written for one {DOWN_BLOCK!r} per block_out_channels entry only")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, shape in vae_tensor_shapes(cfg).items():
        t = random_tensor(k, shape, seed, dtype)
        name = _old_name(k) if old_attention_names else k
        if attention_as_conv and _old_name(k) != k and t.dim() == 2:  # an attention projection's weight
            t = t[:, :, None, None]
        tensors[name] = t.contiguous()
    save_file(tensors, str(out / WEIGHT_FILES[0]), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out


def find_vae_weights(d: str | Path):
    """The weight file of a diffusers VAE folder, as a checkpoint.WeightFiles."""
    from ..checkpoint import WeightFiles
    d = Path(d)
    for name, fmt in zip(WEIGHT_FILES, ("safetensors", "bin")):
        if (d / name).is_file():
            return WeightFiles(fmt, [d / name])
    raise CheckpointNotFoundError(f"{d}: no VAE weights; expected {WEIGHT_FILES[0]} or {WEIGHT_FILES[1]} "
                                  "(diffusers layout) next to config.json")


_find_vae_weights = find_vae_weights  # the name fastjanus/cli.py imports


def _translate(found: dict, expected: dict, where: str):
    """File keys → our keys: old attention names renamed, 1×1-conv-shaped projection weights viewed as [C, C].
    Returns (found under our names, our name → file key)."""
    out, src = {}, {}
    renames = {}
    for p in _attention_prefixes(k for k in expected):
        has_new = {n for n in ATTN_NEW if any(k.startswith(f"{p}.{n}.") for k in found)}
        has_old = {o for o in ATTN_OLD if any(k.startswith(f"{p}.{o}.") for k in found)}
        if has_new and has_old:
            raise CheckpointError(f"{where}: {p} has both current ({', '.join(sorted(has_new))}) and older "
                                  f"({', '.join(sorted(has_old))}) attention key names; the file is inconsistent, "
                                  "download it again")
        if not has_new and not has_old:
            raise CheckpointError(f"{where}: no attention projections for {p}: expected {p}.to_q/to_k/to_v/"
                                  "to_out.0 (or the older query/key/value/proj_attn); the file is not an "
                                  "AutoencoderKL checkpoint for this config.json, or it is damaged")
        for n, o in zip(ATTN_NEW, ATTN_OLD):
            for suffix in ("weight", "bias"):
                renames[f"{p}.{o}.{suffix}"] = f"{p}.{n}.{suffix}"
    for k, (shape, dt, f) in found.items():
        mk = renames.get(k, k)
        want = expected.get(mk)
        if want is not None and len(want) == 2 and tuple(shape) == (*want, 1, 1):
            shape = tuple(want)  # a Linear stored as a 1×1 conv
        out[mk] = (tuple(shape), dt, f)
        src[mk] = k
    return out, src


def load_vae(vae_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
             progress: bool = False) -> VAEDecoder:
    """The decoder of a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors or
    .bin), built on the meta device and filled with the file's tensors in `dtype` on `device`. The encoder's
    tensors (encoder.*, quant_conv.*) are skipped."""
    from ..checkpoint import check_keys, iter_tensors, read_shapes
    d = Path(vae_dir)
    if not d.is_dir():
        raise CheckpointNotFoundError(f"{d}: not a directory; pass the VAE folder that holds config.json and "
                                      f"{WEIGHT_FILES[0]} (diffusers layout)")
    cfg = VAEConfig.from_file(d)
    files = find_vae_weights(d)
    where = str(files.files[0])
    with torch.device("meta"):
        model = VAEDecoder(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found, src = _translate(read_shapes(files), expected, where)
    check_keys(found, expected, lambda k: k.startswith(("encoder.", "quant_conv.")), where)
    file_to_ours = {src[k]: k for k in expected}
    it = iter_tensors(files, set(file_to_ours), device, dtype)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(expected), desc="loading VAE", unit="tensor", leave=False)
    for fk, t in it:
        name = file_to_ours[fk]
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(t.reshape(expected[name]), requires_grad=False))
    still_meta = [n for n, p in model.state_dict().items() if p.is_meta]
    if still_meta:  # cannot happen after check_keys
        raise CheckpointError(f"{where}: tensors not loaded: {still_meta[:5]}")
    return model.eval()
