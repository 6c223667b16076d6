import numpy as np
import pytest
import torch
from PIL import Image

from fastjanus.errors import InputError
from fastjanus.image import preprocess, to_rgb
from fastjanus.tokenizer import ProcessorConfig

CFG = ProcessorConfig()  # the published 384 px settings
GREY = (127 / 255 - 0.5) / 0.5


def test_square_image_exact_values():
    a = (np.arange(384 * 384 * 3) % 256).astype(np.uint8).reshape(384, 384, 3)
    x = preprocess(Image.fromarray(a), CFG)
    assert x.shape == (3, 384, 384) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), (a.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_wide_image_is_resized_and_centred_on_grey():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    x = preprocess(img, CFG)
    # 200×100 → 384×192, pasted at y = (384-192)//2 = 96
    assert torch.allclose(x[:, :96], torch.full_like(x[:, :96], GREY), atol=1e-6)
    assert torch.allclose(x[:, 96 + 192:], torch.full_like(x[:, 96 + 192:], GREY), atol=1e-6)
    mid = x[:, 96 + 10: 96 + 182, 10:374]
    assert torch.allclose(mid[0], torch.ones_like(mid[0]), atol=1e-5) and torch.allclose(mid[1], -torch.ones_like(mid[1]), atol=1e-5)


def test_do_normalize_false_is_honoured():
    from dataclasses import replace
    x = preprocess(Image.new("RGB", (10, 10), (255, 255, 255)), replace(CFG, do_normalize=False))
    assert torch.allclose(x, torch.ones_like(x))


def _u16():
    return Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))


@pytest.mark.parametrize("make", [
    lambda: Image.new("RGB", (1, 1), (10, 20, 30)),
    lambda: Image.new("CMYK", (40, 30), (0, 255, 0, 0)),
    lambda: Image.new("RGBA", (30, 40), (0, 0, 255, 128)),
    lambda: Image.new("P", (33, 17)),
    lambda: Image.new("LA", (17, 33)),
    lambda: Image.new("1", (9, 5)),
    lambda: Image.new("L", (5000, 3)),  # very wide: short side clamps to min_size 14
    _u16,
    lambda: Image.fromarray(np.full((8, 8), 3.0e5, dtype=np.int32)),
    lambda: Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)),
])
def test_unusual_images_are_processed(make):
    x = preprocess(make(), CFG)
    assert x.shape == (3, 384, 384) and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1


def test_16bit_is_scaled_not_clipped():
    rgb = np.asarray(to_rgb(_u16()))
    assert rgb.dtype == np.uint8 and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 100 < rgb.mean() < 155  # a ramp, not a white image (PIL's own conversion clips at 255)


def test_image_paths(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGB", (20, 10), (1, 2, 3)).save(p)
    assert torch.equal(preprocess(p, CFG), preprocess(str(p), CFG))
    with pytest.raises(InputError, match="no such image file"):
        preprocess(tmp_path / "missing.png", CFG)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="bad.png: cannot be read as an image"):
        preprocess(tmp_path / "bad.png", CFG)
    with pytest.raises(InputError, match="PIL.Image or a file path"):
        preprocess(123, CFG)


def test_understanding_bad_input(tiny_pipe):
    img = Image.new("RGB", (8, 8))
    with pytest.raises(InputError, match="max_new_tokens"):
        tiny_pipe.answer(img, "hi", max_new_tokens=0)
    with pytest.raises(InputError, match="must not contain the image tag"):
        tiny_pipe.answer(img, "<image_placeholder> hi")
    with pytest.raises(InputError, match="exceeds the model's context"):
        tiny_pipe.answer(img, "word " * 1000)
    with pytest.raises(InputError, match="temperature"):
        tiny_pipe.answer(img, "hi", temperature=-1)


def test_encode_image(tiny_pipe):
    img = Image.new("RGB", (30, 20), (200, 10, 10))
    e = tiny_pipe.encode_image(img)
    assert e.shape == (64, 64) and e.dtype == torch.float32
    torch.testing.assert_close(e, tiny_pipe.model.encode_images(preprocess(img, tiny_pipe.tokenizer.processor)[None])[0])


def test_understanding_sampling_seeded(tiny_pipe):
    img = Image.new("RGB", (30, 20), (200, 10, 10))
    a = tiny_pipe.answer_ids(img, "hi", max_new_tokens=12, temperature=1.0, seed=5)
    assert a == tiny_pipe.answer_ids(img, "hi", max_new_tokens=12, temperature=1.0, seed=5)
    assert len(a) <= 12


def test_vq_encode_round_trip_shape(tiny_pipe):
    codes = tiny_pipe.encode_image_to_codes(Image.new("RGB", (32, 32), (0, 128, 255)))
    assert codes.shape == (64,) and codes.min() >= 0 and codes.max() < 512
    assert len(tiny_pipe.decode_image_tokens(codes)) == 1


def test_truncated_and_oversized_images(tmp_path, monkeypatch):
    p = tmp_path / "t.jpg"
    noise = (np.random.RandomState(0).rand(256, 256, 3) * 255).astype(np.uint8)
    Image.fromarray(noise).save(p, quality=95)
    p.write_bytes(p.read_bytes()[: p.stat().st_size * 6 // 10])  # header intact, pixel data cut
    with pytest.raises(InputError, match="cannot be read as an image"):
        preprocess(p, CFG)
    lazy = Image.open(p)  # opened lazily by the caller: decoding fails inside fastjanus
    with pytest.raises(InputError, match="cannot be decoded"):
        preprocess(lazy, CFG)
    big = tmp_path / "big.png"
    Image.new("L", (400, 400)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 400² > 2 × limit → DecompressionBombError
    with pytest.raises(InputError, match="big.png: cannot be read as an image"):
        preprocess(big, CFG)
