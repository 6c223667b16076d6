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
    # three prompts of different lengths share a batch: ragged KV lengths in the decode kernel, and 6 rows
    # padded to the static runtime's 8-row bucket (the padded rows must not change the real ones)
    prompts = ["a cat", "a watercolour painting of a lighthouse at dusk", "fox"]
    seen = {"torch": [], "triton": []}
    ref = torch_pipe.generate_image_tokens(prompts, temperature=0, cfg_weight=4.0,
                                           callback=lambda row, c: seen["torch"].append((row, c)))
    got = triton_pipe.generate_image_tokens(prompts, temperature=0, cfg_weight=4.0,
                                            callback=lambda row, c: seen["triton"].append((row, c)))
    assert triton_pipe.runtime is not None and max(k[0] for k in triton_pipe.runtime.decoders) == 8
    assert got.shape == (3, 64) and torch.equal(got, ref)
    # streaming: one call per completed row of the 8 × 8 grid, with the codes so far
    for calls in seen.values():
        assert [r for r, _ in calls] == list(range(8))
        for r, c in calls:
            assert c.device.type == "cpu" and torch.equal(c, ref[:, :8 * (r + 1)])
    torch.testing.assert_close(triton_pipe.decode_image_pixels(got), torch_pipe.decode_image_pixels(ref),
                               rtol=1e-4, atol=1e-4)


def test_greedy_answers_match_across_backends(pipes):
    torch_pipe, triton_pipe = pipes
    img = Image.new("RGB", (50, 30), (30, 120, 200))
    # 21 tokens: the first, then EOS checks after chunks of 16 and 4 in the static runtime
    ref = torch_pipe.answer_ids(img, "What colour is it?", max_new_tokens=21)
    assert triton_pipe.answer_ids(img, "What colour is it?", max_new_tokens=21) == ref
    full = torch_pipe.answer_ids(img, "What colour is it?", max_new_tokens=21, ignore_eos=True)
    assert len(full) == 21 and full[:len(ref)] == ref
    assert triton_pipe.answer_ids(img, "What colour is it?", max_new_tokens=21, ignore_eos=True) == full


def test_eos_found_inside_and_across_chunks(pipes, monkeypatch):
    """The static runtime checks for EOS every 16 tokens: pretend a sampled answer token is EOS and check that
    each path stops right before its first occurrence, whether that is the first token, inside the first
    chunk or in the second. (Sampled, because the tiny model's greedy answer repeats one token.)"""
    img = Image.new("RGB", (50, 30), (30, 120, 200))
    q, kw = "What colour is it?", dict(max_new_tokens=21, temperature=1.0, seed=3)
    for p in pipes:
        full = p.answer_ids(img, q, ignore_eos=True, **kw)
        first = {}
        for i, t in enumerate(full):
            first.setdefault(t, i)
        picks = {0: full[0]}
        for want in (5, 17):
            pos = min((i for i in first.values() if i >= want), default=None)
            if pos is not None:
                picks[pos] = full[pos]
        assert len(picks) == 3, (p.backend, full)
        for pos, tok in picks.items():
            monkeypatch.setattr(p.tokenizer, "eos_id", tok)
            assert p.answer_ids(img, q, **kw) == full[:pos], (p.backend, pos)


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
