"""Model configuration: the official Janus `config.json`, parsed into small validated dataclasses.

The hub's `config.json` has six sub-configs. Five are `{cls, model_type, params}`; `language_config` is a
plain Llama dict in which every missing field takes the Llama default (Janus-Pro-7B ships only
`num_hidden_layers`, `vocab_size`, `max_position_embeddings`). `to_dict()` writes the same layout back.

Non-official keys are accepted in `params` so that small test models (the `tiny` preset) can shrink the
vision tower and the VQ model; the published checkpoints never carry them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, CheckpointNotFoundError


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive_ints(obj: Any, where: str, names: list[str]) -> None:
    for n in names:
        v = getattr(obj, n)
        _require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{where}.{n} must be a positive integer, got {v!r}")


# --------------------------------------------------------------------------------------------- LLM
@dataclass
class LlamaConfig:
    """Llama decoder. Defaults are the Llama (7B) defaults that Janus-Pro-7B's config relies on."""
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None → equal to num_attention_heads
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    # Keys of a Llama config that do not change the computation (or that we check separately).
    _IGNORED = {"model_type", "torch_dtype", "_attn_implementation", "architectures", "bos_token_id",
                "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "pretraining_tp",
                "transformers_version", "attention_dropout", "_name_or_path", "hidden_act",
                "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings", "head_dim"}

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        w = "language_config"
        _positive_ints(self, w, ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "vocab_size", "max_position_embeddings"])
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"{w}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                 f"{self.num_attention_heads}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"{w}: num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                 f"{self.num_key_value_heads}")
        _require(self.head_dim % 2 == 0, f"{w}: head_dim {self.head_dim} must be even for rotary embeddings")
        for k in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, k)
            _require(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                     f"{w}.{k} must be a number > 0, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        _require(isinstance(d, dict), f"language_config must be a JSON object, got {type(d).__name__}")
        mt = d.get("model_type", "llama")
        _require(mt == "llama", f"language_config.model_type {mt!r} is not supported (only 'llama')")
        _require(d.get("hidden_act", "silu") == "silu",
                 f"language_config.hidden_act {d.get('hidden_act')!r} is not supported (only 'silu')")
        _require(not d.get("rope_scaling"), f"language_config.rope_scaling {d.get('rope_scaling')!r} is not supported")
        for k in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            _require(not d.get(k, False), f"language_config.{k}=true is not supported (Janus LLMs have none)")
        if "head_dim" in d and d.get("num_attention_heads"):
            _require(d["head_dim"] * d["num_attention_heads"] == d.get("hidden_size", cls.hidden_size),
                     f"language_config.head_dim {d['head_dim']} × heads must equal hidden_size")
        d = dict(d)
        rp = d.pop("rope_parameters", None)  # newer transformers nest rope_theta here
        if isinstance(rp, dict):
            _require(rp.get("rope_type", "default") == "default",
                     f"language_config.rope_parameters.rope_type {rp.get('rope_type')!r} is not supported")
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp["rope_theta"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - cls._IGNORED
        if unknown:  # e.g. keys that a newer transformers adds when it re-saves a config: harmless, but say so
            import warnings
            warnings.warn(f"language_config: ignoring keys fastjanus does not use: {sorted(unknown)}", stacklevel=3)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_type"] = "llama"
        d["torch_dtype"] = "bfloat16"
        return d


# ---------------------------------------------------------------------------------- vision (SigLIP)
# Named SigLIP towers: width, depth, heads, mlp dim, patch size, image size.
SIGLIP_MODELS = {"siglip_large_patch16_384": dict(width=1024, layers=24, heads=16, mlp_dim=4096,
                                                  patch_size=16, image_size=384)}


@dataclass
class VisionConfig:
    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    select_layer: int = -1
    select_feature: str = "same"
    ln_eps: float = 1e-6

    def __post_init__(self) -> None:
        w = "vision_config.params"
        _positive_ints(self, w, ["image_size", "patch_size", "width", "layers", "heads", "mlp_dim"])
        _require(self.image_size % self.patch_size == 0,
                 f"{w}: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _require(self.width % self.heads == 0, f"{w}: width {self.width} is not divisible by heads {self.heads}")
        _require(self.select_feature in ("same", "cls_patch"),
                 f"{w}.select_feature {self.select_feature!r} is not supported (use 'same')")
        _require(isinstance(self.select_layer, int) and self.layers_used >= 1,
                 f"{w}.select_layer {self.select_layer!r} leaves no block of {self.layers}")

    @property
    def layers_used(self) -> int:
        # Official rule: select_layer <= 0 counts from the end (-1 = all blocks), > 0 is a block count.
        if self.select_layer <= 0:
            return min(self.layers, self.layers + self.select_layer + 1)
        return min(self.layers, self.select_layer)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_params(cls, p: dict) -> "VisionConfig":
        name = p.get("model_name", "siglip_large_patch16_384")
        base = dict(SIGLIP_MODELS.get(name, {}))
        explicit = {k: p[k] for k in ("width", "layers", "heads", "mlp_dim", "patch_size") if k in p}
        _require(bool(base) or len(explicit) == 5,
                 f"vision_config.params.model_name {name!r} is unknown; known: {sorted(SIGLIP_MODELS)} "
                 "(or give width, layers, heads, mlp_dim and patch_size explicitly)")
        base.update(explicit)
        for k in ("image_size", "select_layer", "select_feature"):
            if k in p:
                base[k] = p[k]
        return cls(model_name=name, **base)

    def to_params(self) -> dict:
        p = {"image_size": self.image_size, "model_name": self.model_name,
             "select_feature": self.select_feature, "select_layer": self.select_layer}
        named = SIGLIP_MODELS.get(self.model_name, {})
        for k in ("width", "layers", "heads", "mlp_dim", "patch_size"):
            if named.get(k) != getattr(self, k):
                p[k] = getattr(self, k)
        return p


# ------------------------------------------------------------------------------ aligners and heads
@dataclass
class AlignerConfig:
    """MlpProjector with projector_type mlp_gelu: Linear(in→D), then (depth-1) × [GELU, Linear(D→D)]."""
    input_dim: int
    n_embed: int
    depth: int = 2

    def __post_init__(self) -> None:
        _positive_ints(self, "aligner params", ["input_dim", "n_embed", "depth"])

    @classmethod
    def from_params(cls, p: dict, where: str) -> "AlignerConfig":
        pt = p.get("projector_type", "mlp_gelu")
        _require(pt == "mlp_gelu", f"{where}.params.projector_type {pt!r} is not supported (only 'mlp_gelu')")
        try:
            return cls(input_dim=p["input_dim"], n_embed=p["n_embed"], depth=p.get("depth", 2))
        except KeyError as e:
            raise ConfigError(f"{where}.params is missing {e.args[0]!r}") from None

    def to_params(self) -> dict:
        return {"depth": self.depth, "input_dim": self.input_dim, "n_embed": self.n_embed,
                "projector_type": "mlp_gelu"}


@dataclass
class GenHeadConfig:
    """vision_head: Linear(n_embed→image_token_embed) → GELU → Linear(→image_token_size)."""
    n_embed: int
    image_token_embed: int
    image_token_size: int

    def __post_init__(self) -> None:
        _positive_ints(self, "gen_head_config.params", ["n_embed", "image_token_embed", "image_token_size"])


@dataclass
class VQConfig:
    """LlamaGen VQ-16 tokenizer. Only codebook size and embed dim are in the official params."""
    codebook_size: int = 16384
    embed_dim: int = 8
    z_channels: int = 256
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    image_size: int = 384

    _EXTRA = ("z_channels", "base_channels", "channel_multiplier", "num_res_blocks", "image_size")

    def __post_init__(self) -> None:
        w = "gen_vision_config.params"
        self.channel_multiplier = tuple(self.channel_multiplier)
        _positive_ints(self, w, ["codebook_size", "embed_dim", "z_channels", "base_channels", "num_res_blocks",
                                 "image_size"])
        _require(len(self.channel_multiplier) >= 1 and all(isinstance(m, int) and m > 0
                                                           for m in self.channel_multiplier),
                 f"{w}.channel_multiplier must be positive integers, got {self.channel_multiplier}")
        chans = [self.base_channels * m for m in self.channel_multiplier] + [self.z_channels]
        _require(all(c % 32 == 0 for c in chans), f"{w}: channel counts {chans} must be multiples of 32 (GroupNorm)")
        _require(self.image_size % self.downsample == 0,
                 f"{w}: image_size {self.image_size} is not a multiple of the downsampling {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_image_tokens(self) -> int:
        return self.grid ** 2

    @classmethod
    def from_params(cls, p: dict) -> "VQConfig":
        try:
            kw = dict(codebook_size=p["image_token_size"], embed_dim=p["n_embed"])
        except KeyError as e:
            raise ConfigError(f"gen_vision_config.params is missing {e.args[0]!r}") from None
        kw.update({k: p[k] for k in cls._EXTRA if k in p})
        return cls(**kw)

    def to_params(self) -> dict:
        p = {"image_token_size": self.codebook_size, "n_embed": self.embed_dim}
        default = VQConfig()
        for k in self._EXTRA:
            v = getattr(self, k)
            if v != getattr(default, k):
                p[k] = list(v) if isinstance(v, tuple) else v
        return p


# ------------------------------------------------------------------------------- the official layout
def read_config_file(path: str | Path, family: str) -> tuple[dict, Path]:
    """A model folder's (or a file's) config.json as a dict, and its path; a missing or damaged file is explained."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such file; a {family} model directory must contain config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as JSON ({e}). The file is damaged or is not the model's "
                          "config.json: download config.json again from the model's page (the other files of "
                          "the checkpoint can stay)") from None


def sub_config_params(d: dict, table: dict, accepts) -> dict[str, dict]:
    """The `params` of each `{cls, model_type, params}` sub-config named in table (key → (class, model_type)),
    with accepts(cls found, class wanted) deciding the class; language_config must be there too."""
    params = {}
    for key, (want_cls, _) in table.items():
        sub = d.get(key)
        _require(isinstance(sub, dict), f"missing or malformed {key!r}")
        got = sub.get("cls")
        _require(accepts(got, want_cls), f"{key}.cls is {got!r}; the only supported class is {want_cls!r}")
        p = sub.get("params", {})
        _require(isinstance(p, dict), f"{key}.params must be an object")
        params[key] = p
    _require("language_config" in d, "missing 'language_config'")
    return params


# ------------------------------------------------------------------------------------------ Janus
_CLS = {"vision_config": ("CLIPVisionTower", "vision"), "aligner_config": ("MlpProjector", "aligner"),
        "gen_vision_config": ("VQ-16", "gen_vision"), "gen_aligner_config": ("MlpProjector", "gen_aligner"),
        "gen_head_config": ("vision_head", "gen_head")}


@dataclass
class JanusConfig:
    language: LlamaConfig
    vision: VisionConfig
    aligner: AlignerConfig
    vq: VQConfig
    gen_aligner: AlignerConfig
    gen_head: GenHeadConfig
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)  # top-level keys we keep but do not use

    def __post_init__(self) -> None:
        D = self.language.hidden_size
        checks = [
            (self.aligner.input_dim == self.vision.width, "aligner_config.params.input_dim",
             self.aligner.input_dim, f"the vision width {self.vision.width}"),
            (self.aligner.n_embed == D, "aligner_config.params.n_embed", self.aligner.n_embed, f"hidden_size {D}"),
            (self.gen_aligner.input_dim == self.vq.embed_dim, "gen_aligner_config.params.input_dim",
             self.gen_aligner.input_dim, f"gen_vision_config n_embed {self.vq.embed_dim}"),
            (self.gen_aligner.n_embed == D, "gen_aligner_config.params.n_embed", self.gen_aligner.n_embed,
             f"hidden_size {D}"),
            (self.gen_head.n_embed == D, "gen_head_config.params.n_embed", self.gen_head.n_embed, f"hidden_size {D}"),
            (self.gen_head.image_token_size == self.vq.codebook_size, "gen_head_config.params.image_token_size",
             self.gen_head.image_token_size, f"the VQ codebook size {self.vq.codebook_size}"),
        ]
        for ok, key, got, want in checks:
            _require(ok, f"inconsistent config: {key} is {got} but must equal {want}")

    @property
    def num_image_tokens(self) -> int:
        return self.vq.num_image_tokens

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "JanusConfig":
        try:
            return cls._from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def _from_dict(cls, d: dict) -> "JanusConfig":
        _require(isinstance(d, dict), "top level must be a JSON object")
        _require("vision_gen_enc_config" not in d,
                 "this is a JanusFlow checkpoint (vision_gen_enc_config); this feature supports Janus and Janus-Pro "
                 "only (JanusFlow: load, generate, understand, info, bench)")
        mt = d.get("model_type")
        _require(mt == "multi_modality",
                 f"model_type is {mt!r}; fastjanus reads the official Janus layout ('multi_modality'). "
                 "A transformers-format Janus checkpoint ('janus') must be converted back first")
        params = sub_config_params(d, _CLS, lambda got, want: got == want)
        gh = params["gen_head_config"]
        try:
            gen_head = GenHeadConfig(n_embed=gh["n_embed"], image_token_embed=gh["image_token_embed"],
                                     image_token_size=gh["image_token_size"])
        except KeyError as e:
            raise ConfigError(f"gen_head_config.params is missing {e.args[0]!r}") from None
        extra = {k: v for k, v in d.items() if k not in _CLS and k not in ("language_config", "model_type",
                                                                             "torch_dtype")}
        return cls(language=LlamaConfig.from_dict(d["language_config"]),
                   vision=VisionConfig.from_params(params["vision_config"]),
                   aligner=AlignerConfig.from_params(params["aligner_config"], "aligner_config"),
                   vq=VQConfig.from_params(params["gen_vision_config"]),
                   gen_aligner=AlignerConfig.from_params(params["gen_aligner_config"], "gen_aligner_config"),
                   gen_head=gen_head, torch_dtype=d.get("torch_dtype", "bfloat16"), extra=extra)

    @classmethod
    def from_file(cls, path: str | Path) -> "JanusConfig":
        d, path = read_config_file(path, "Janus")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        def sub(key: str, p: dict) -> dict:
            c, mt = _CLS[key]
            return {"cls": c, "model_type": mt, "params": p}
        gh = dataclasses.asdict(self.gen_head)
        d = {
            "aligner_config": sub("aligner_config", self.aligner.to_params()),
            "gen_aligner_config": sub("gen_aligner_config", self.gen_aligner.to_params()),
            "gen_head_config": sub("gen_head_config", {k: gh[k] for k in sorted(gh)}),
            "gen_vision_config": sub("gen_vision_config", self.vq.to_params()),
            "language_config": self.language.to_dict(),
            "model_type": "multi_modality",
            "torch_dtype": self.torch_dtype,
            "vision_config": sub("vision_config", self.vision.to_params()),
        }
        d.update(self.extra)
        return d


# ----------------------------------------------------------------------------------------- presets
def _official(hidden: int, layers: int, intermediate: int, heads: int) -> JanusConfig:
    lang = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=102400,
                       max_position_embeddings=16384)
    return JanusConfig(language=lang, vision=VisionConfig(), aligner=AlignerConfig(1024, hidden),
                       vq=VQConfig(), gen_aligner=AlignerConfig(8, hidden),
                       gen_head=GenHeadConfig(hidden, hidden, 16384))


def _tiny() -> JanusConfig:
    # Small enough that a whole image (64 steps) and a VQ decode run in about a second on a CPU core,
    # but with every structural feature of the real models (GQA, several VQ levels, attention blocks).
    # The vision grid equals the VQ grid (8×8) because the transformers port assumes they match.
    D = 64
    lang = LlamaConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024)
    vision = VisionConfig(model_name="tiny", image_size=32, patch_size=4, width=64, layers=2, heads=4, mlp_dim=128)
    vq = VQConfig(codebook_size=512, embed_dim=8, z_channels=32, base_channels=32, channel_multiplier=(1, 1, 2),
                  num_res_blocks=1, image_size=32)
    return JanusConfig(language=lang, vision=vision, aligner=AlignerConfig(64, D), vq=vq,
                       gen_aligner=AlignerConfig(8, D), gen_head=GenHeadConfig(D, D, 512))


PRESETS = {
    "tiny": _tiny,
    "janus-1.3b": lambda: _official(2048, 24, 5632, 16),
    "janus-pro-1b": lambda: _official(2048, 24, 5632, 16),
    "janus-pro-7b": lambda: _official(4096, 30, 11008, 32),
}
# Chat template of each preset (the processor_config.json "sft_format").
PRESET_TEMPLATES = {"tiny": "deepseek", "janus-1.3b": "deepseek_old", "janus-pro-1b": "deepseek",
                    "janus-pro-7b": "deepseek"}


def preset(name: str) -> JanusConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
