"""backend="triton" vs backend="torch" through the whole pipeline on the tiny checkpoint (interpreter on CPU)."""
import pytest
import torch
from PIL import Image

import fastjanus
from fastjanus.engine import pipeline

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def pipes(tiny_dir):
    pytest.importorskip("triton")
    return (fastjanus.load(tiny_dir, device=DEV, dtype=torch.float32, backend="torch"),
            fastjanus.load(tiny_dir, device=DEV, dtype=torch.float32, backend="triton"))


def test_greedy_codes_and_pixels_match_across_backends(pipes):
    torch_pipe, triton_pipe = pipes
    assert (torch_pipe.backend, triton_pipe.backend) == ("torch", "triton")
    # two prompts of different lengths share a batch: ragged KV lengths in the decode kernel
    prompts = ["a cat", "a watercolour painting of a lighthouse at dusk"]
    ref = torch_pipe.generate_image_tokens(prompts, temperature=0, cfg_weight=4.0)
    got = triton_pipe.generate_image_tokens(prompts, temperature=0, cfg_weight=4.0)
    assert got.shape == (2, 64) and torch.equal(got, ref)
    torch.testing.assert_close(triton_pipe.decode_image_pixels(got), torch_pipe.decode_image_pixels(ref),
                               rtol=1e-4, atol=1e-4)


def test_greedy_answers_match_across_backends(pipes):
    torch_pipe, triton_pipe = pipes
    img = Image.new("RGB", (50, 30), (30, 120, 200))
    ref = torch_pipe.answer_ids(img, "What colour is it?", max_new_tokens=12)
    assert triton_pipe.answer_ids(img, "What colour is it?", max_new_tokens=12) == ref


@pytest.mark.slow
def test_seeded_sampling_is_repeatable_with_the_kernel_sampler(pipes):
    _, triton_pipe = pipes
    a = triton_pipe.generate_image_tokens("a dog", seed=11, top_k=20)
    assert torch.equal(a, triton_pipe.generate_image_tokens("a dog", seed=11, top_k=20))
    assert not torch.equal(a, triton_pipe.generate_image_tokens("a dog", seed=12, top_k=20))


def test_backend_choice_is_validated(tiny_dir, monkeypatch):
    with pytest.raises(fastjanus.InputError, match="backend must be one of"):
        fastjanus.load(tiny_dir, device="cpu", backend="cuda")
    assert pipeline.resolve_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setattr(pipeline, "triton_status", lambda: (True, False, "3.x"))
    with pytest.raises(fastjanus.InputError, match="TRITON_INTERPRET=1"):
        pipeline.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setattr(pipeline, "triton_status", lambda: (False, False, "ImportError: no triton"))
    with pytest.raises(fastjanus.InputError, match="needs Triton.*no triton"):
        pipeline.resolve_backend("triton", torch.device("cpu"))
    assert pipeline.resolve_backend("torch", torch.device("cpu")) == "torch"
