"""Image input (official VLMImageProcessor semantics) and output (decoded pixels → PIL)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError, arg, path_of
from .tokenizer import ProcessorConfig


def load_image(image) -> Image.Image:
    """A PIL image, or a path to one."""
    # DecompressionBombError is PIL's refusal of absurdly large images; it is not an OSError.
    errors = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)
    if isinstance(image, Image.Image):
        try:
            image.load()  # a lazily opened, truncated or closed image fails here rather than inside resize
        except errors as e:
            raise InputError(f"the PIL image cannot be decoded ({e})") from None
        return image
    if isinstance(image, (str, Path)):
        p = Path(image)
        if not p.is_file():
            raise InputError(f"{path_of('image', p)}: no such image file")
        try:
            img = Image.open(p)
            img.load()
            return img
        except errors as e:
            raise InputError(f"{path_of('image', p)}: cannot be read as an image ({e})") from None
    raise InputError(f"{arg('image')} must be a PIL.Image or a file path, got {type(image).__name__}")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, whatever the mode. High-bit-depth greyscale is scaled to 8 bits rather than clipped (PIL's own
    conversion clips 16-bit values at 255, turning most photos white)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16"):
            a = a / 257.0
        elif a.size and a.max() > 255:
            a = a * (255.0 / a.max())
        elif img.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # 2-D uint8 → "L"
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise InputError(f"cannot convert an image of mode {img.mode!r} to RGB ({e})") from None
    return img


def preprocess(image, cfg: ProcessorConfig) -> torch.Tensor:
    """→ float32 [3, S, S]: longer side resized to S (bicubic), pasted centred on a grey square, scaled, normalised."""
    img = to_rgb(load_image(image))
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InputError(f"image has an empty size {w}×{h}")
    S, long = cfg.image_size, max(w, h)
    new_w = max(int(w / long * S), cfg.min_size)
    new_h = max(int(h / long * S), cfg.min_size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if new_w != new_h:
        side = max(new_w, new_h)
        canvas = Image.new("RGB", (side, side), tuple(cfg.background_color))
        canvas.paste(img, ((side - new_w) // 2, (side - new_h) // 2))
        img = canvas
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) * np.float32(cfg.rescale_factor)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x))


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output [B, 3, S, S] in about [-1, 1] → uint8 [B, S, S, 3], truncating like the official script."""
    return ((pixels.float() + 1) / 2 * 255).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    arr = to_uint8(pixels).cpu().numpy()
    return [Image.fromarray(a) for a in arr]  # [S, S, 3] uint8 → "RGB"
