"""Speculative Jacobi decoding (engine/speculative.py): greedy codes identical to plain greedy decoding, the
sampling distribution preserved (a chi-square test against the exact distribution, and a broken acceptance
rule that fails it), the window pass against plain decode steps, and bad arguments."""
from dataclasses import replace

import pytest
import torch

import fastjanus
from fastjanus.config import preset
from fastjanus.engine import speculative
from fastjanus.engine.sampling import cfg_mix
from fastjanus.errors import InputError
from fastjanus.random_init import init_random

PROMPTS = ["a red cube", "a much longer prompt about a small cat sitting on a mat"]  # ragged lengths
THREE = PROMPTS + ["a boat"]  # 3 images: 6 rows, run padded in the 8-row bucket


def _variant(tmp_path_factory, name: str, **changes) -> fastjanus.JanusPipeline:
    cfg = preset("tiny")
    vq, vision, lang = changes.pop("vq", {}), changes.pop("vision", {}), changes.pop("language", {})
    cfg = replace(cfg, vq=replace(cfg.vq, **vq), vision=replace(cfg.vision, **vision),
                  language=replace(cfg.language, **lang), gen_head=replace(cfg.gen_head, **changes.pop("gen_head", {})),
                  **changes)
    d = init_random("tiny", tmp_path_factory.mktemp(name), seed=1, config=cfg)
    return fastjanus.load(d, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def mid_pipe(tmp_path_factory):
    """Bigger than tiny in every direction that matters here: head dim 64, 4 layers, a 2048-code book and a
    16×16 grid (256 codes per image)."""
    return _variant(tmp_path_factory, "mid", language=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                                          num_attention_heads=4, num_key_value_heads=4),
                    aligner=replace(preset("tiny").aligner, n_embed=256),
                    gen_aligner=replace(preset("tiny").gen_aligner, n_embed=256),
                    gen_head=dict(n_embed=256, image_token_embed=256, image_token_size=2048),
                    vq=dict(codebook_size=2048, image_size=64), vision=dict(image_size=64))


@pytest.fixture(scope="module")
def micro_pipe(tmp_path_factory):
    """A 4-code book and a 4×4 grid: the joint distribution of the first 3 codes has 64 cells."""
    return _variant(tmp_path_factory, "micro", vq=dict(codebook_size=4, image_size=16), vision=dict(image_size=16),
                    gen_head=dict(image_token_size=4))


@pytest.mark.parametrize("window", [1, 2, 3, 4, 5, 7, 8, 13, 16, 32, 64])
def test_greedy_speculative_gives_the_greedy_codes(tiny_pipe, window):
    for prompt, n in (("a cat", 1), (PROMPTS, 2)):  # a single prompt, and a ragged batch of 4 images
        plain = tiny_pipe.generate_image_tokens(prompt, num_images=n, temperature=0, seed=0)
        spec = tiny_pipe.generate_image_tokens(prompt, num_images=n, temperature=0, seed=0, speculative=True,
                                               window=window)
        assert torch.equal(spec, plain)
        t = tiny_pipe.last_timings
        assert t["speculative"] and t["window"] == window and 1 <= t["codes_per_pass"] <= window
        assert t["passes"] <= 63 and (window > 1 or t["passes"] == 63)  # 1 code from the prefill, ≥ 1 per pass


@pytest.fixture(scope="module")
def micro_triton(micro_pipe):
    """The micro model on the triton backend (Triton's interpreter on the CPU): the static runtime's loop,
    the window-attention and verify kernels."""
    return fastjanus.load(micro_pipe.path, device="cpu", dtype=torch.float32, backend="triton", max_rows=8,
                          max_len=128)


# The fused runtime in the interpreter costs ~1 s per pass: these run in .ci/run's slow step (about 2 minutes)
@pytest.mark.slow
@pytest.mark.parametrize("window", [1, 4, 16])
def test_greedy_speculative_on_the_fused_runtime(micro_triton, window):
    plain = micro_triton.generate_image_tokens(THREE, num_images=1, temperature=0, seed=0)
    spec = micro_triton.generate_image_tokens(THREE, num_images=1, temperature=0, seed=0, speculative=True,
                                              window=window)
    assert torch.equal(spec, plain)
    assert any(k[0] == "spec" and k[1] == 8 for k in micro_triton.runtime.decoders)  # the static runtime, padded


@pytest.mark.slow
def test_fused_runtime_sampling_is_seeded_and_top_k_1_or_a_tiny_top_p_is_greedy(micro_triton):
    kw = dict(num_images=2, seed=7, speculative=True, window=4, cfg_weight=1.5)
    a = micro_triton.generate_image_tokens("a dog", top_k=2, **kw)
    assert torch.equal(a, micro_triton.generate_image_tokens("a dog", top_k=2, **kw))
    greedy = micro_triton.generate_image_tokens("a dog", num_images=2, temperature=0, cfg_weight=1.5)
    # sampling among one code: the verify kernel's thresholds (this pass's and the previous pass's q) at work
    assert torch.equal(micro_triton.generate_image_tokens("a dog", top_k=1, **kw), greedy)
    # top_p: the eager loop over the runtime's KV pool, with the reference verify
    assert torch.equal(micro_triton.generate_image_tokens("a dog", top_p=1e-6, **kw), greedy)


def test_top_k_1_or_a_tiny_top_p_is_greedy(tiny_pipe):
    greedy = tiny_pipe.generate_image_tokens(PROMPTS, num_images=1, temperature=0)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)):
        spec = tiny_pipe.generate_image_tokens(PROMPTS, num_images=1, seed=3, speculative=True, window=6, **kw)
        assert torch.equal(spec, greedy), kw


@pytest.mark.slow
def test_greedy_speculative_every_window(tiny_pipe):
    plain = tiny_pipe.generate_image_tokens("a cat", temperature=0)
    for window in range(1, 65):
        assert torch.equal(tiny_pipe.generate_image_tokens("a cat", temperature=0, speculative=True, window=window),
                           plain), window


@pytest.mark.slow  # 4-5 s per window: in .ci/run's slow step
@pytest.mark.parametrize("window", [3, 16])
def test_greedy_speculative_on_a_mid_size_model(mid_pipe, window):
    assert mid_pipe.cfg.num_image_tokens == 256 and mid_pipe.cfg.language.head_dim == 64
    for prompt in ("a cat", PROMPTS):  # a single prompt, and a ragged batch
        plain = mid_pipe.generate_image_tokens(prompt, num_images=1, temperature=0, seed=0)
        spec = mid_pipe.generate_image_tokens(prompt, num_images=1, temperature=0, seed=0, speculative=True,
                                              window=window)
        assert torch.equal(spec, plain)


def test_window_pass_matches_plain_decode_steps(tiny_pipe):
    """The window pass's logits at position j are those of j plain decode steps fed the same tokens."""
    runner = tiny_pipe.runner
    rows = tiny_pipe._image_rows(PROMPTS, 1)  # ragged: 4 rows
    R, W, T = len(rows), 5, max(len(r) for r in rows)
    toks = torch.randint(0, tiny_pipe.cfg.vq.codebook_size, (W, R))
    toks[:, 1::2] = toks[:, 0::2]  # both rows of a pair take the same code
    with torch.inference_mode():
        c1, c2 = runner.new_cache(R, T + W + 3), runner.new_cache(R, T + W + 3)
        runner.prefill(rows, c1)
        runner.prefill(rows, c2)
        win = runner.window(toks.flatten(), c1, W)  # [W·R, V]
        steps = torch.stack([runner.decode(toks[j], c2, paired=True) for j in range(W)])  # [W, R, V]
    torch.testing.assert_close(win.view(W, R, -1), steps, rtol=1e-5, atol=1e-5)
    assert torch.equal(c1.lengths + W, c2.lengths)  # the window pass leaves the lengths to the verify step
    for r in range(R):
        L = int(c1.lengths[r])
        torch.testing.assert_close(c1.k[:, r, :, :L + W], c2.k[:, r, :, :L + W], rtol=1e-5, atol=1e-5)


def _exact_first_codes(pipe, prompt: str, cfg_weight: float, temperature: float) -> torch.Tensor:
    """P(c0, c1, c2) [V, V, V] by teacher forcing every prefix through plain decode steps."""
    runner, V = pipe.runner, pipe.cfg.vq.codebook_size
    rows = pipe._image_rows(prompt, V * V)  # one cond/uncond pair per prefix (c0, c1)
    prob = lambda lg: (cfg_mix(lg, cfg_weight).double() / temperature).softmax(-1)  # noqa: E731
    with torch.inference_mode():
        cache = runner.new_cache(len(rows), len(rows[0]) + 3)
        h, _ = runner.prefill(rows, cache)
        p0 = prob(runner.head(h, paired=True))[0]  # [V]
        c0 = torch.arange(V).repeat_interleave(V)  # pair i = (c0, c1) = (i // V, i % V)
        c1 = torch.arange(V).repeat(V)
        p1 = prob(runner.decode(c0.repeat_interleave(2), cache, paired=True))  # [V², V]: p(c1 | c0)
        p2 = prob(runner.decode(c1.repeat_interleave(2), cache, paired=True))  # [V², V]: p(c2 | c0, c1)
    p1_of = p1.view(V, V, V)[:, 0]  # [V, V]: rows with the same c0 agree
    return p0[:, None, None] * p1_of[:, :, None] * p2.view(V, V, V)


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against probs (the p-value); cells expected < 5 times are pooled."""
    n = counts.sum()
    exp = probs.flatten() * n
    cnt = counts.flatten().double()
    small = exp < 5
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    cnt = torch.cat([cnt[~small], cnt[small].sum()[None]])
    keep = exp > 0
    assert cnt[~keep].sum() == 0, "codes drawn where the exact probability is 0"
    stat = float(((cnt[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))  # chi2 survival function


SAMPLES = 3000
# The false-alarm rate of each chi-square check: 0.1% over seeds; four checks here (plain and speculative at two
# temperatures), so about 0.4% for a run of them with random seeds. The seeds are fixed: the outcome is too.
ALPHA = 1e-3


def _joint_counts(pipe, prompt: str, **kw) -> torch.Tensor:
    V = pipe.cfg.vq.codebook_size
    codes = pipe.generate_image_tokens(prompt, num_images=SAMPLES, seed=1234, **kw)[:, :3]
    return torch.bincount(codes[:, 0] * V * V + codes[:, 1] * V + codes[:, 2], minlength=V ** 3).view(V, V, V)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_speculative_sampling_keeps_the_distribution(micro_pipe, temperature):
    cfg_weight = 1.5  # a mild guidance keeps the 64 cells populated
    exact = _exact_first_codes(micro_pipe, "a dog", cfg_weight, temperature)
    assert abs(float(exact.sum()) - 1) < 1e-9 and float(exact.max()) < 0.5  # a spread-out target
    kw = dict(cfg_weight=cfg_weight, temperature=temperature)
    plain = _joint_counts(micro_pipe, "a dog", **kw)
    assert _chi_square_p(plain, exact) > ALPHA  # the exact distribution is the plain sampler's
    spec = _joint_counts(micro_pipe, "a dog", speculative=True, window=4, **kw)
    assert micro_pipe.last_timings["codes_per_pass"] > 1.05  # drafts were accepted, so the rule was exercised
    assert _chi_square_p(spec, exact) > ALPHA


def test_a_broken_acceptance_rule_fails_the_distribution_test(micro_pipe, monkeypatch):
    exact = _exact_first_codes(micro_pipe, "a dog", 1.5, 1.0)
    monkeypatch.setattr(speculative, "accept_rule", lambda u, p, q: torch.ones_like(p, dtype=torch.bool))
    spec = _joint_counts(micro_pipe, "a dog", speculative=True, window=4, cfg_weight=1.5)
    assert _chi_square_p(spec, exact) < 1e-12


def test_same_seed_same_codes_and_callback_per_grid_row(tiny_pipe):
    seen = []
    a = tiny_pipe.generate_image_tokens("a cat", num_images=2, seed=5, speculative=True, window=6,
                                        callback=lambda row, codes: seen.append((row, codes.shape)))
    b = tiny_pipe.generate_image_tokens("a cat", num_images=2, seed=5, speculative=True, window=6)
    assert torch.equal(a, b)
    g = tiny_pipe.cfg.vq.grid
    assert seen == [(r, torch.Size([2, g * (r + 1)])) for r in range(g)]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(window=0), "window must be an integer in [1, 64]"),
    (dict(window=65), "window must be an integer in [1, 64]"),
    (dict(window="8"), "window must be an integer"),
    (dict(speculative="yes"), "speculative must be True or False"),
])
def test_bad_speculative_arguments(tiny_pipe, kwargs, needle):
    kwargs.setdefault("speculative", True)
    with pytest.raises(InputError) as e:
        tiny_pipe.generate_image_tokens("a cat", **kwargs)
    assert needle in str(e.value)


def test_refusals_before_any_work(micro_triton, monkeypatch):
    from dataclasses import replace as dc_replace
    rt = micro_triton.runtime
    # no room kept back for a pass's activations
    monkeypatch.setattr(rt, "plan", dc_replace(rt.plan, reserve_bytes=1))
    with pytest.raises(InputError, match="window 8 with 2 image.* needs about .* GiB of activations per pass"):
        micro_triton.generate_image_tokens(PROMPTS, speculative=True, window=8)
    monkeypatch.undo()
    # the window's slots count in the memory plan: 128 slots hold a 58-token prompt and 16 codes, not 64 more
    with pytest.raises(InputError, match=r"58-token prompt need 2 rows x 138 KV slots .* prompts up to 48 tokens"):
        micro_triton.generate_image_tokens("a " * 50, speculative=True, window=64)
    # the fp8 KV cache (a GPU feature) is refused up front
    monkeypatch.setattr(micro_triton, "kv_cache", "fp8")
    with pytest.raises(InputError, match="does not support the fp8 KV cache"):
        micro_triton.generate_image_tokens("a cat", speculative=True)


@pytest.mark.slow
def test_pass_benchmark_runs(tmp_path, micro_pipe):
    """bench/spec_pass.py end to end on the CPU (the interpreter): its JSON has a step and a pass per window."""
    import json

    from fastjanus.bench import spec_pass
    out = tmp_path / "p.json"
    assert spec_pass.main(["--model", str(micro_pipe.path), "--device", "cpu", "--dtype", "fp32", "--rows", "2",
                           "--windows", "2,4", "--passes", "2", "--repeats", "1", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    (res,) = rep["results"]
    assert res["rows"] == 2 and res["step_ms"] > 0 and set(res["windows"]) == {"2", "4"}
    assert all(v["pass_ms"] > 0 and v["ratio"] == v["pass_ms"] / res["step_ms"] for v in res["windows"].values())
