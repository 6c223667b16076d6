"""Tokenizer (`tokenizer.json` through the `tokenizers` library), special ids and the chat templates.

Special ids are resolved by their strings, never hard-coded: the three published models place them
differently. Exactly one BOS is prepended by us (the tokenizer's own post-processor is not used).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import _positive_ints
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE_TAG = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"

SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
# sft_format → (user role, assistant role). Both use "\n\n" between turns (the official "DeepSeek" style).
TEMPLATES = {"deepseek": ("<|User|>", "<|Assistant|>"), "deepseek_old": ("User", "Assistant")}


def render_prompt(template: str, user: str, system: str = "") -> str:
    """One user turn and an open assistant turn, as the official conversation template renders them."""
    if template not in TEMPLATES:
        raise ConfigError(f"unknown chat template (sft_format) {template!r}; known: {sorted(TEMPLATES)}")
    u, a = TEMPLATES[template]
    head = f"{system}\n\n" if system else ""
    user = user.strip()
    # The official template writes an empty message as the bare role and colon, with no separator.
    return f"{head}{u}: {user}\n\n{a}:" if user else f"{head}{u}:{a}:"


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointNotFoundError(f"{path}: no such file")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as JSON ({e})") from None


@dataclass
class ProcessorConfig:
    """processor_config.json + preprocessor_config.json (image preprocessing)."""
    sft_format: str = "deepseek"
    image_tag: str = IMAGE_TAG
    num_image_tokens: int = 576
    image_size: int = 384
    min_size: int = 14
    background_color: tuple[int, int, int] = (127, 127, 127)
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dir(cls, d: Path) -> "ProcessorConfig":
        proc = _read_json(d / "processor_config.json", required=False)
        pre = _read_json(d / "preprocessor_config.json", required=False)
        kw = {k: proc[k] for k in ("sft_format", "image_tag", "num_image_tokens") if k in proc}
        for k in ("image_size", "min_size", "rescale_factor", "do_normalize"):
            if k in pre:
                kw[k] = pre[k]
        for k in ("image_mean", "image_std"):
            if k in pre:
                kw[k] = tuple(pre[k])
        # The official processor ignores the file's background_color and pads with int(mean·255) per channel
        # (127 for the published files either way); do the same.
        where = f"{d}: processor_config.json / preprocessor_config.json"
        try:
            kw["background_color"] = tuple(int(m * 255) for m in kw.get("image_mean", cls.image_mean))
            cfg = cls(**kw)
            colour_ok = (len(cfg.image_mean) == 3 and len(cfg.image_std) == 3 and all(s > 0 for s in cfg.image_std)
                         and isinstance(cfg.rescale_factor, (int, float)) and cfg.rescale_factor > 0)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where} hold a malformed value ({e})") from None
        _positive_ints(cfg, where, ["num_image_tokens", "image_size", "min_size"])
        if not colour_ok:
            raise ConfigError(f"{where}: rescale_factor must be > 0 and image_mean/image_std 3 values (std > 0)")
        if cfg.sft_format not in TEMPLATES:
            raise ConfigError(f"{d / 'processor_config.json'}: sft_format {cfg.sft_format!r} is not one of "
                              f"{sorted(TEMPLATES)}")
        return cfg


class JanusTokenizer:
    def __init__(self, model_dir: str | Path, vocab_rows: int):
        from tokenizers import AddedToken, Tokenizer
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise CheckpointNotFoundError(f"{path}: no such file; the model folder needs the hub's tokenizer.json")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise CheckpointError(f"{path}: cannot be parsed as a tokenizers file ({e})") from None
        self.tok.no_padding()
        self.tok.no_truncation()
        self.processor = ProcessorConfig.from_dir(d)
        smap = _read_json(d / "special_tokens_map.json", required=False)

        def tok_str(name, default):
            v = smap.get(name, default)
            return v.get("content", default) if isinstance(v, dict) else (v or default)
        self.bos_token, self.eos_token = tok_str("bos_token", BOS), tok_str("eos_token", EOS)
        self.pad_token = tok_str("pad_token", PAD)
        # transformers treats every additional_special_tokens entry as special even where tokenizer.json does
        # not; mark the ones the vocabulary already has so that decoding skips them the same way.
        extra = [s for s in smap.get("additional_special_tokens", []) if isinstance(s, str)]
        known = [s for s in extra if self.tok.token_to_id(s) is not None]
        if known:
            self.tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in known])
        self.added: list[str] = []
        # Janus-1.3B's tokenizer lacks the image tag; the official processor adds it as a new special token,
        # which gets the next id (the tokenizer's current length). Do the same.
        if self.tok.token_to_id(self.processor.image_tag) is None:
            self.tok.add_special_tokens([AddedToken(self.processor.image_tag, special=True, normalized=False)])
            self.added.append(self.processor.image_tag)
        ids = {}
        for name, s in [("bos", self.bos_token), ("eos", self.eos_token), ("pad", self.pad_token),
                        ("image", self.processor.image_tag), ("boi", BOI), ("eoi", EOI)]:
            i = self.tok.token_to_id(s)
            if i is None:
                raise CheckpointError(f"{path}: the tokenizer has no token {s!r} ({name}); is this a Janus tokenizer?")
            if i >= vocab_rows:
                raise CheckpointError(f"{path}: token {s!r} has id {i}, outside the model's {vocab_rows} "
                                      "embedding rows")
            ids[name] = i
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.image_id, self.boi_id, self.eoi_id = ids["image"], ids["boi"], ids["eoi"]
        self.template = self.processor.sft_format

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids with exactly one BOS prepended and no EOS."""
        return [self.bos_id] + self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    # ---- the two prompt forms
    def generation_prompt(self, prompt: str) -> list[int]:
        """`<|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>` (empty system prompt)."""
        return self.encode(render_prompt(self.template, prompt) + BOI)

    def understanding_prompt(self, question: str, num_image_tokens: int) -> list[int]:
        """System prompt, one image and the question; each image tag expands to BOI + N tags + EOI."""
        text = render_prompt(self.template, f"{self.processor.image_tag}\n{question}", SYSTEM_PROMPT)
        out: list[int] = []
        for t in self.encode(text):
            out += [self.boi_id] + [self.image_id] * num_image_tokens + [self.eoi_id] if t == self.image_id else [t]
        return out

    def special_ids(self) -> dict[str, int]:
        return {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "image_placeholder": self.image_id,
                "begin_of_image": self.boi_id, "end_of_image": self.eoi_id}
