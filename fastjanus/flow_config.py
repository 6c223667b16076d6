"""JanusFlow configuration: the official multi-modality `config.json` of JanusFlow-1.3B, and the SDXL VAE's
diffusers `config.json`.

JanusFlow's config has four sub-configs: `vision_und_enc_config` (SigLIP, `CLIPVisionTower`),
`vision_gen_enc_config` (`ShallowUViTEncoder`), `vision_gen_dec_config` (`ShallowUViTDecoder`), each
`{cls, model_type, params}`, and `language_config` (a plain Llama dict). Each `params` block is the keyword
arguments of the official constructor: a key that is absent takes that constructor's default, so any
published values load. The hub's own config.json for JanusFlow-1.3B is not available in this workplace; the
`janusflow-1.3b` preset's UViT values are inferred from the model's geometry (a 4×48×48 SDXL latent, 24×24 =
576 LLM tokens, a 768-channel UViT, a 2048-wide LLM, as the official model code hard-codes), not copied from
that file.

The aligners have no sub-config in the official model (their sizes are hard-coded there: SigLIP 1024 → 2048,
UViT 768 → 2048, 2048 → 768); here they follow from the sub-configs, which gives the official sizes for the
official values and lets small test configs shrink them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import LlamaConfig, VisionConfig, _positive_ints, _require, read_config_file, sub_config_params
from .errors import ConfigError

# The size of the generated picture. The official code hard-codes it (a 48×48 latent of the 8× SDXL VAE); small
# test configs give `image_size` in vision_gen_enc_config.params, which the official constructor's **kwargs
# would ignore.
GEN_IMAGE_SIZE = 384


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_uvit(c, w: str) -> None:
    """What the UViT encoder's and decoder's arguments share: ConvNeXt count, channel list, norm eps."""
    _require(isinstance(c.layers_in_middle, int) and c.layers_in_middle >= 0, f"{w}.layers_in_middle must be an "
             "integer >= 0")
    _require(len(c.block_out_channels) >= 1 and all(isinstance(x, int) and x > 0 for x in c.block_out_channels),
             f"{w}.block_out_channels must be positive integers, got {list(c.block_out_channels)}")
    _require(isinstance(c.norm_eps, (int, float)) and c.norm_eps > 0, f"{w}.norm_eps must be > 0")


@dataclass
class UViTEncoderConfig:
    """ShallowUViTEncoder's constructor arguments, with its defaults."""
    input_channels: int = 3
    stride: int = 4
    kernel_size: int = 7
    padding: int | None = None  # None → ceil(kernel_size − stride), as the official constructor
    block_out_channels: tuple[int, ...] = (768,)
    layers_in_middle: int = 2
    hidden_size: int = 2048
    elementwise_affine: bool = True
    use_bias: bool = True
    norm_eps: float = 1e-6
    dropout: float = 0.0
    use_mid_block: bool = True
    image_size: int = GEN_IMAGE_SIZE  # not an official argument (see GEN_IMAGE_SIZE)

    def __post_init__(self) -> None:
        w = "vision_gen_enc_config.params"
        self.block_out_channels = tuple(self.block_out_channels)
        if self.padding is None:
            self.padding = self.kernel_size - self.stride  # math.ceil of an int, in the official code
        _positive_ints(self, w, ["input_channels", "stride", "kernel_size", "hidden_size", "image_size"])
        _require(isinstance(self.padding, int) and self.padding >= 0, f"{w}.padding must be an integer >= 0")
        _check_uvit(self, w)
        # the official mid block is built for block_out_channels[-1] but fed in_conv's block_out_channels[0]
        _require(not self.use_mid_block or self.block_out_channels[-1] == self.block_out_channels[0],
                 f"{w}.block_out_channels {list(self.block_out_channels)}: with use_mid_block the first and last "
                 "must be equal (the mid block runs on the input convolution's output)")

    @property
    def channels(self) -> int:  # the encoder's output channels (the official code uses block_out_channels[0])
        return self.block_out_channels[0]

    def grid(self, latent: int) -> int:
        return _conv_out(latent, self.kernel_size, self.stride, self.padding)


@dataclass
class UViTDecoderConfig:
    """ShallowUViTDecoder's constructor arguments, with its defaults."""
    in_channels: int = 768
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (768,)
    upsamples: int = 2
    layers_in_middle: int = 2
    hidden_size: int = 2048
    elementwise_affine: bool = True
    norm_eps: float = 1e-6
    use_bias: bool = True
    dropout: float = 0.0
    use_mid_block: bool = True

    def __post_init__(self) -> None:
        w = "vision_gen_dec_config.params"
        self.block_out_channels = tuple(self.block_out_channels)
        _positive_ints(self, w, ["in_channels", "out_channels", "upsamples", "hidden_size"])
        _check_uvit(self, w)

    @property
    def channels(self) -> int:
        return self.block_out_channels[-1]


def _params(cls, p: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in p.items() if k in known}  # other keys: the official constructors take **kwargs too
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"{where}.params: {e}") from None


_FLOW_CLS = {"vision_und_enc_config": ("CLIPVisionTower", "vision_und_enc"),
             "vision_gen_enc_config": ("ShallowUViTEncoder", "vision_gen_enc"),
             "vision_gen_dec_config": ("ShallowUViTDecoder", "vision_gen_dec")}


def is_janusflow(d: dict) -> bool:
    """A config.json dict of the JanusFlow layout (rather than Janus's)."""
    return isinstance(d, dict) and "vision_gen_enc_config" in d


@dataclass
class JanusFlowConfig:
    language: LlamaConfig
    vision: VisionConfig
    gen_enc: UViTEncoderConfig
    gen_dec: UViTDecoderConfig
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)
    family = "janusflow"

    def __post_init__(self) -> None:
        D = self.language.hidden_size
        e, d = self.gen_enc, self.gen_dec
        checks = [
            (e.hidden_size == D, "vision_gen_enc_config.params.hidden_size", e.hidden_size, f"hidden_size {D}"),
            (d.hidden_size == D, "vision_gen_dec_config.params.hidden_size", d.hidden_size, f"hidden_size {D}"),
            (e.channels == d.channels, "vision_gen_dec_config.params.block_out_channels[-1]", d.channels,
             f"the encoder's output channels {e.channels} (the decoder concatenates the encoder's features)"),
        ]
        for ok, key, got, want in checks:
            _require(ok, f"inconsistent config: {key} is {got} but must equal {want}")
        _require(self.grid >= 1, f"vision_gen_enc_config.params: the encoder leaves no token of a "
                                 f"{self.latent_size}×{self.latent_size} latent")
        _require(d.out_channels == e.input_channels,
                 f"inconsistent config: vision_gen_dec_config.params.out_channels is {d.out_channels} but the velocity "
                 f"must have the latent's {e.input_channels} channels (vision_gen_enc_config.params.input_channels)")
        out = self.grid * 2 ** d.upsamples
        _require(out == self.latent_size,
                 f"inconsistent config: the UViT decoder writes a {out}×{out} velocity (grid {self.grid} × "
                 f"2^upsamples {d.upsamples}) for a {self.latent_size}×{self.latent_size} latent")

    # ---- geometry of generation
    @property
    def image_size(self) -> int:  # of a generated picture
        return self.gen_enc.image_size

    @property
    def latent_channels(self) -> int:
        return self.gen_enc.input_channels

    @property
    def latent_size(self) -> int:  # the VAE downsamples 8× (SDXL); checked against the VAE's config at load
        return self.image_size // 8

    @property
    def grid(self) -> int:
        return self.gen_enc.grid(self.latent_size)

    @property
    def num_gen_tokens(self) -> int:  # latent tokens per image (576 for JanusFlow-1.3B)
        return self.grid ** 2

    @property
    def num_image_tokens(self) -> int:  # understanding: SigLIP patches per image
        return self.vision.num_patches

    # ---- I/O
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "JanusFlowConfig":
        try:
            return cls._from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def _from_dict(cls, d: dict) -> "JanusFlowConfig":
        _require(isinstance(d, dict), "top level must be a JSON object")
        mt = d.get("model_type")
        _require(mt == "multi_modality", f"model_type is {mt!r}; the official JanusFlow layout has 'multi_modality'")
        # the official model_name_to_cls matches by substring ("CLIPVisionTower" in cls)
        params = sub_config_params(d, _FLOW_CLS, lambda got, want: isinstance(got, str) and want in got)
        v = params["vision_und_enc_config"]
        _require(v.get("pixel_mean") is None and v.get("pixel_std") is None,
                 "vision_und_enc_config.params.pixel_mean/pixel_std are not supported (the processor normalises)")
        # The official tower sets select_feature to 'same' for any SigLIP model (every patch, no class token);
        # CLIPVisionTower's own defaults (image_size 336, select_layer -2) apply where a key is absent.
        vp = {"image_size": 336, "select_layer": -2, **v, "select_feature": "same"}
        extra = {k: x for k, x in d.items() if k not in _FLOW_CLS and k not in ("language_config", "model_type",
                                                                                "torch_dtype")}
        return cls(language=LlamaConfig.from_dict(d["language_config"]), vision=VisionConfig.from_params(vp),
                   gen_enc=_params(UViTEncoderConfig, params["vision_gen_enc_config"], "vision_gen_enc_config"),
                   gen_dec=_params(UViTDecoderConfig, params["vision_gen_dec_config"], "vision_gen_dec_config"),
                   torch_dtype=d.get("torch_dtype", "bfloat16"), extra=extra)

    @classmethod
    def from_file(cls, path: str | Path) -> "JanusFlowConfig":
        d, path = read_config_file(path, "JanusFlow")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        def sub(key: str, p: dict) -> dict:
            c, mt = _FLOW_CLS[key]
            return {"cls": c, "model_type": mt, "params": p}
        enc = dataclasses.asdict(self.gen_enc)
        enc["block_out_channels"] = list(enc["block_out_channels"])
        if enc["image_size"] == GEN_IMAGE_SIZE:
            del enc["image_size"]
        dec = dataclasses.asdict(self.gen_dec)
        dec["block_out_channels"] = list(dec["block_out_channels"])
        d = {"language_config": self.language.to_dict(), "model_type": "multi_modality",
             "torch_dtype": self.torch_dtype,
             "vision_gen_dec_config": sub("vision_gen_dec_config", dec),
             "vision_gen_enc_config": sub("vision_gen_enc_config", enc),
             "vision_und_enc_config": sub("vision_und_enc_config", self.vision.to_params())}
        d.update(self.extra)
        return d


def read_config_dict(path: Path) -> dict:
    """config.json of a model folder as a dict (for telling the Janus and JanusFlow layouts apart)."""
    p = path / "config.json" if path.is_dir() else path
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # the Janus reader reports the damage with its own message


# ----------------------------------------------------------------------------------------- presets
def _janusflow_13b() -> JanusFlowConfig:
    lang = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=102400, max_position_embeddings=16384)
    enc = UViTEncoderConfig(input_channels=4, stride=2, kernel_size=2, padding=0, block_out_channels=(768,),
                            layers_in_middle=2, hidden_size=2048)
    dec = UViTDecoderConfig(in_channels=768, out_channels=4, block_out_channels=(768,), upsamples=1,
                            layers_in_middle=2, hidden_size=2048)
    vision = VisionConfig(image_size=384, select_layer=-1)
    return JanusFlowConfig(language=lang, vision=vision, gen_enc=enc, gen_dec=dec)


def _tiny_flow() -> JanusFlowConfig:
    # A 64 px picture: an 8×8 latent from a small 8× VAE (written by init-random) and a 4×4 = 16-token grid:
    # enough to exercise the causal block, the CFG rows and a batch while a whole image takes a moment on a CPU.
    D = 64
    lang = LlamaConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024)
    vision = VisionConfig(model_name="tiny", image_size=32, patch_size=4, width=64, layers=2, heads=4, mlp_dim=128)
    enc = UViTEncoderConfig(input_channels=4, stride=2, kernel_size=2, padding=0, block_out_channels=(32,),
                            layers_in_middle=1, hidden_size=D, image_size=64)
    dec = UViTDecoderConfig(in_channels=24, out_channels=4, block_out_channels=(32,), upsamples=1,
                            layers_in_middle=1, hidden_size=D)
    return JanusFlowConfig(language=lang, vision=vision, gen_enc=enc, gen_dec=dec)


FLOW_PRESETS = {"janusflow-1.3b": _janusflow_13b, "tiny-flow": _tiny_flow}
FLOW_TEMPLATES = {"janusflow-1.3b": "deepseek", "tiny-flow": "deepseek"}
