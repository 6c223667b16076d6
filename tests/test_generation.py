import pytest
import torch

from fastjanus.engine.sampling import cfg_mix, filter_top_k_top_p, sample
from fastjanus.errors import InputError


def test_same_seed_same_codes_other_seed_other_codes(tiny_pipe):
    a = tiny_pipe.generate_image_tokens("a cat", num_images=2, seed=7)
    b = tiny_pipe.generate_image_tokens("a cat", num_images=2, seed=7)
    c = tiny_pipe.generate_image_tokens("a cat", num_images=2, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # the two images of one call differ


def test_seed_none_follows_torch_manual_seed(tiny_pipe):
    torch.manual_seed(123)
    a = tiny_pipe.generate_image_tokens("a cat")
    torch.manual_seed(123)
    assert torch.equal(a, tiny_pipe.generate_image_tokens("a cat"))


def test_output_shape_dtype_and_range(tiny_pipe):
    codes = tiny_pipe.generate_image_tokens(["a", "b c d"], num_images=3, seed=0)
    assert codes.shape == (6, 64) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 512


def test_prompt_list_batch_matches_single_prompts(tiny_pipe):
    """Prompts of different lengths share one left-padded batch; each must give what it gives alone."""
    prompts = ["a fox", "a very long prompt about a small cabin in the mountains at sunrise", "x"]
    batch = tiny_pipe.generate_image_tokens(prompts, num_images=2, temperature=0)
    for i, p in enumerate(prompts):
        alone = tiny_pipe.generate_image_tokens(p, num_images=1, temperature=0)
        assert torch.equal(batch[2 * i], alone[0]) and torch.equal(batch[2 * i + 1], alone[0]), p
    lb = tiny_pipe.first_step_logits(prompts)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(lb[i], tiny_pipe.first_step_logits(p)[0], rtol=1e-4, atol=1e-4)


def test_prompt_is_stripped(tiny_pipe):
    assert torch.equal(tiny_pipe.first_step_logits("  a fox \n"), tiny_pipe.first_step_logits("a fox"))


def test_top_k_1_is_greedy_and_top_k_never_outside(tiny_pipe):
    greedy = tiny_pipe.generate_image_tokens("a cat", temperature=0)
    assert torch.equal(tiny_pipe.generate_image_tokens("a cat", temperature=1.0, top_k=1, seed=3), greedy)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    allowed = torch.topk(logits, 5, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        s = sample(logits, 1.0, g, top_k=5)
        assert all(s[r] in allowed[r] for r in range(4))


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_top_k_top_p(logits, None, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_top_k_top_p(logits, None, 0.85))
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top_k_top_p(logits, None, 0.01)).tolist() == [[True, False, False, False]]


def test_cfg_mix_formula_and_interleaving():
    c, u = torch.randn(3, 10), torch.randn(3, 10)
    inter = torch.stack([c, u], 1).reshape(6, 10)  # even rows conditional, odd unconditional
    torch.testing.assert_close(cfg_mix(inter, 5.0), u + 5.0 * (c - u))


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 100)
    assert torch.equal(sample(logits, 0.0, None), logits.argmax(-1))


def test_decode_images(tiny_pipe):
    codes = tiny_pipe.generate_image_tokens("a cat", num_images=2, seed=1)
    imgs = tiny_pipe.decode_image_tokens(codes)
    assert len(imgs) == 2 and imgs[0].size == (32, 32) and imgs[0].mode == "RGB"
    px = tiny_pipe.decode_image_pixels(codes)
    # the PIL images are exactly the truncated ((x+1)/2·255) of the pixels
    ref = ((px.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    import numpy as np
    assert np.array_equal(np.asarray(imgs[1]), ref[1].numpy())
    assert len(tiny_pipe.generate_images(["a", "b"], num_images=1, seed=0)) == 2


@pytest.mark.parametrize("kwargs,needle", [
    (dict(prompt=[]), "prompt list is empty"),
    (dict(prompt=None), "prompt must be a string"),
    (dict(prompt=["ok", 3]), "prompt[1] must be a string"),
    (dict(num_images=0), "num_images must be an integer >= 1"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(cfg_weight=-1.0), "cfg_weight must be a finite number >= 0"),
    (dict(cfg_weight=float("inf")), "cfg_weight must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(top_k=True), "top_k must be a positive integer"),
    (dict(seed=True), "seed must be an integer"),
    (dict(seed=2 ** 70), "seed must be an integer"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(prompt="word " * 2000), "exceeds the model's context of 1024 positions"),
])
def test_bad_generation_arguments(tiny_pipe, kwargs, needle):
    args = dict(prompt="a cat", num_images=1)
    args.update(kwargs)
    with pytest.raises(InputError) as e:
        tiny_pipe.generate_image_tokens(**args)
    assert needle in str(e.value)


@pytest.mark.parametrize("codes,needle", [
    (torch.zeros(2, 63, dtype=torch.long), "shape [N, 64]"),
    (torch.full((1, 64), 512), "in [0, 512)"),
    (torch.full((1, 64), -1), "in [0, 512)"),
    (torch.zeros(1, 64), "must be integers"),
    ("abc", "integer tensor"),
])
def test_bad_codes(tiny_pipe, codes, needle):
    with pytest.raises(InputError) as e:
        tiny_pipe.decode_image_tokens(codes)
    assert needle in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_runs_on_cpu(tiny_dir, dtype):
    """bf16 and fp16 through every part, VQ upsampling included (the official code breaks fp16 there)."""
    import fastjanus
    from PIL import Image
    p = fastjanus.load(tiny_dir, device="cpu", dtype=dtype)
    assert all(t.dtype == dtype for t in p.model.parameters())
    codes = p.generate_image_tokens("a cat", num_images=2, seed=0)
    px = p.decode_image_pixels(codes)
    assert px.dtype == dtype and torch.isfinite(px).all()
    ref = fastjanus.load(tiny_dir, device="cpu", dtype=torch.float32).decode_image_pixels(codes)
    assert (px.float() - ref).abs().max() < 0.1 * ref.abs().max()
    assert isinstance(p.answer(Image.new("RGB", (8, 8)), "hi", max_new_tokens=3), str)


def test_bad_decode_batch_size(tiny_pipe):
    with pytest.raises(InputError, match="batch_size must be an integer >= 1"):
        tiny_pipe.decode_image_pixels(torch.zeros(1, 64, dtype=torch.long), batch_size=0)


def test_empty_prompt_renders_like_the_official_template(tiny_pipe):
    tk = tiny_pipe.tokenizer
    assert tk.tok.decode(tk.generation_prompt("  "), skip_special_tokens=False) == \
        "<｜begin▁of▁sentence｜><|User|>:<|Assistant|>:<begin_of_image>"
    assert tiny_pipe.generate_image_tokens("", seed=0).shape == (1, 64)


def test_bad_device_and_dtype():
    from fastjanus.engine.pipeline import resolve_device_dtype
    with pytest.raises(InputError, match="not a valid torch device"):
        resolve_device_dtype("gpu0")
    with pytest.raises(InputError, match="dtype='int8' is not supported"):
        resolve_device_dtype("cpu", "int8")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device_dtype("cuda")
