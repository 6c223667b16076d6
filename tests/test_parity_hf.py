"""fastjanus vs the transformers Janus port (JanusForConditionalGeneration) on the tiny random checkpoint, fp32.

The same weights are mapped from the official layout into the port (tests/hf_oracle.py). Tolerance: 1e-4 of the
largest magnitude (fp32; differences come only from operation order)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastjanus.bench.hf_port import generate_image_codes
from fastjanus.image import preprocess

pytestmark = pytest.mark.filterwarnings("ignore")
RTOL = 1e-4


def _close(a, b):
    a, b = a.float(), b.float()
    assert a.shape == b.shape
    err = (a - b).abs().max().item() / b.abs().max().clamp_min(1e-6).item()
    assert err < RTOL, f"relative error {err:.2e}"


def _image(seed=0, size=(45, 30)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def test_siglip_features(tiny_pipe, hf_model):
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(tiny_pipe.model.vision_model(px), hf_model.model.vision_model(px).last_hidden_state)
        _close(tiny_pipe.model.encode_images(px), hf_model.model.get_image_features(px).pooler_output)


def test_vq_decoded_pixels(tiny_pipe, hf_model):
    codes = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(tiny_pipe.decode_image_pixels(codes), hf_model.model.vqmodel.decode(codes))


def _hf_first_step_logits(hf, tk, prompt, w):
    ids = torch.tensor([tk.generation_prompt(prompt)])
    uncond = ids.clone()
    uncond[:, 1:-1] = tk.pad_id
    with torch.no_grad():
        emb = hf.get_input_embeddings()(torch.cat([ids, uncond]))  # transformers stacks [cond; uncond]
        h = hf.model.language_model(inputs_embeds=emb).last_hidden_state[:, -1]
        logits = hf.model.generation_head(h)
    return logits[1] + w * (logits[0] - logits[1])


@pytest.mark.parametrize("w", [1.0, 5.0])
def test_guided_logits_first_step(tiny_pipe, hf_model, w):
    prompt = "a red fox sitting in the snow"
    _close(tiny_pipe.first_step_logits(prompt, cfg_weight=w)[0], _hf_first_step_logits(hf_model, tiny_pipe.tokenizer,
                                                                                        prompt, w))


def _greedy_image_inputs(tk, prompt):
    """transformers' input ids and settings for greedy CFG-5 image generation of the tiny model's 64 codes."""
    from transformers import GenerationConfig
    gc = GenerationConfig(bos_token_id=tk.bos_id, pad_token_id=tk.pad_id, eos_token_id=tk.eos_id,
                          guidance_scale=5.0, do_sample=False, max_new_tokens=64,
                          generation_kwargs={"boi_token_id": tk.boi_id})
    return torch.tensor([tk.generation_prompt(prompt)]), gc


@pytest.mark.parametrize("prompt", ["a red fox sitting in the snow", "astronaut"])
def test_greedy_codes_whole_grid(tiny_pipe, hf_model, prompt):
    ids, gc = _greedy_image_inputs(tiny_pipe.tokenizer, prompt)
    with torch.no_grad():
        ref = generate_image_codes(hf_model, ids, gc, 64)
    ours = tiny_pipe.generate_image_tokens(prompt, temperature=0, cfg_weight=5.0)
    assert ours.shape == ref.shape == (1, 64)
    assert torch.equal(ours, ref.cpu().long())


def _hf_inputs(pipe, image, question):
    tk = pipe.tokenizer
    ids = torch.tensor([tk.understanding_prompt(question, pipe.cfg.vision.num_patches)])
    return ids, preprocess(image, tk.processor)[None]


def test_understanding_logits(tiny_pipe, hf_model):
    img, q = _image(3), "What is in the picture?"
    ids, px = _hf_inputs(tiny_pipe, img, q)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, pixel_values=px).logits[0]
    _close(tiny_pipe.understanding_logits(img, q), ref)


@pytest.mark.parametrize("seed,question", [(4, "Describe the image."), (5, "How many apples are on the table?")])
def test_greedy_answers(tiny_pipe, hf_model, seed, question):
    img = _image(seed, size=(20, 64))
    ids, px = _hf_inputs(tiny_pipe, img, question)
    eos = tiny_pipe.tokenizer.eos_id
    with torch.no_grad():
        ref = hf_model.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids),
                                max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    ref = ref[0, ids.shape[1]:].tolist()
    if eos in ref:
        ref = ref[:ref.index(eos)]
    assert tiny_pipe.answer_ids(img, question, max_new_tokens=24) == ref
    assert tiny_pipe.answer(img, question, max_new_tokens=24) == tiny_pipe.tokenizer.decode(ref)


def test_image_generation_does_not_need_transformers_own_cache(tiny_pipe, hf_model, monkeypatch):
    """transformers 5.17 (the lent GPU machines' version) cannot build the static cache of its Janus image
    generation (`_prepare_static_cache() missing ... 'prefill_chunk_size'`, fixed in 5.18). The baseline and
    these tests pass their own: break transformers' own construction as 5.17 has it, and generation still
    works and matches."""
    def as_in_5_17(*args, **kwargs):
        raise TypeError("_prepare_static_cache() missing 1 required positional argument: 'prefill_chunk_size'")
    monkeypatch.setattr(type(hf_model), "_prepare_static_cache", as_in_5_17)
    prompt = "a lighthouse at dusk"
    ids, gc = _greedy_image_inputs(tiny_pipe.tokenizer, prompt)
    with torch.no_grad():
        codes = generate_image_codes(hf_model, ids, gc, 64)
        with pytest.raises(TypeError, match="prefill_chunk_size"):  # what the port does without our cache
            hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc, generation_mode="image")
    assert torch.equal(codes.cpu().long(), tiny_pipe.generate_image_tokens(prompt, temperature=0, cfg_weight=5.0))
