"""The inference layout made at load (models/llama.py `fuse`, models/janus.py `code_table`), the runner's prefill
of repeated rows, and the fused decode step of each backend against the other in every dtype."""
import pytest
import torch

import fastjanus
from fastjanus.engine.sampling import cfg_mix
from fastjanus.models.janus import JanusModel

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_fused_weights_keep_the_official_state_dict_without_a_second_copy(tiny_pipe):
    m = tiny_pipe.model
    with torch.device("meta"):
        official = JanusModel(m.cfg).state_dict()
    sd = m.state_dict()
    assert list(sd) == list(official)  # the fused weights and tables are not part of the state dict
    for layer in m.llm.layers:
        a, mlp = layer.self_attn, layer.mlp
        for fused, parts in ((a.qkv_weight, (a.q_proj, a.k_proj, a.v_proj)), (mlp.gate_up_weight,
                                                                                 (mlp.gate_proj, mlp.up_proj))):
            assert torch.equal(fused, torch.cat([p.weight for p in parts]))
            # the official parameters are views into the fused weight: one copy in memory
            for p in parts:
                assert p.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def test_code_table_equals_the_per_step_embedding_fp32(tiny_pipe):
    m = tiny_pipe.model
    codes = torch.arange(m.cfg.vq.codebook_size)
    per_step = m.gen_aligner(m.gen_embed(codes))  # [K, D]: what a step computed before the table
    assert m.gen_code_table.dtype == torch.float32
    # fp32 throughout; only the GEMM's summation order can differ
    torch.testing.assert_close(m.gen_code_table, per_step, rtol=1e-5, atol=1e-6)
    assert torch.equal(m.embed_image_codes(codes[[3, 3, 7]]), m.gen_code_table[[3, 3, 7]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_code_table_in_half_types_is_rounded_once(tiny_dir, dtype):
    pipe = fastjanus.load(tiny_dir, device="cpu", dtype=dtype)
    m = pipe.model
    codes = torch.arange(m.cfg.vq.codebook_size)
    # the exact value, from the same stored (half-precision) weights, in fp64
    x = m.gen_embed.weight.double()
    for mod in m.gen_aligner.layers:
        x = torch.nn.functional.linear(x, mod.weight.double(), mod.bias.double()) \
            if isinstance(mod, torch.nn.Linear) else mod(x)
    table = m.gen_code_table
    assert table.dtype == dtype
    # within one rounding (half an ulp, plus fp32's own error) of the exact value
    ulp = torch.finfo(dtype).eps
    err = ((table.double() - x).abs() / x.abs().clamp_min(1e-3)).max().item()
    assert err <= 0.5 * ulp * 1.01, err
    # and within a few ulps of the per-step computation in the dtype (which rounds after each op)
    per_step = m.gen_aligner(m.gen_embed(codes))
    torch.testing.assert_close(table.float(), per_step.float(), rtol=4 * ulp, atol=4 * ulp)


def test_prefill_of_repeated_rows_matches_a_full_prefill(tiny_pipe):
    runner = tiny_pipe.runner
    # two prompts × two images, interleaved as generate_image_tokens builds them: 8 rows, at most 4 unique
    rows = fastjanus.engine.pipeline.image_token_rows(tiny_pipe.tokenizer, tiny_pipe.cfg, ["a red fox", "a big dog"], 2)
    assert len(rows) == 8 and len({tuple(r) for r in rows}) in (3, 4)  # 3 when both prompts tokenize alike long
    T = max(len(r) for r in rows)
    dedup, full = runner.new_cache(8, T + 4), runner.new_cache(8, T + 4)
    for c in (dedup, full):
        c.k.fill_(float("nan"))
        c.v.fill_(float("nan"))
    h, _ = runner.prefill(rows, dedup)
    h_full, _ = runner._prefill(rows, full, None, False)  # every row prefilled on its own
    torch.testing.assert_close(h, h_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dedup.k[:, :, :, :T], full.k[:, :, :, :T], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dedup.v[:, :, :, :T], full.v[:, :, :, :T], rtol=1e-5, atol=1e-5)
    assert torch.equal(dedup.lengths, full.lengths)
    # repeated rows are exact copies of their first occurrence
    for r, row in enumerate(rows):
        first = rows.index(row)
        assert torch.equal(dedup.k[:, r, :, :T], dedup.k[:, first, :, :T]) and torch.equal(h[r], h[first])


def _step_logits(tiny_dir, dtype, backend):
    """Image logits [4, K] fp32 after the prefill and after each of three decode steps, from one ragged batch
    (prompts of different lengths), with the cache they leave."""
    p = fastjanus.load(tiny_dir, device=DEV, dtype=dtype, backend=backend, cuda_graphs=False)
    rows = fastjanus.engine.pipeline.image_token_rows(p.tokenizer, p.cfg,
                                                      ["fox", "a watercolour of a lighthouse at dusk"], 1)
    cache = p.runner.new_cache(len(rows), max(len(r) for r in rows) + 8)
    h, _ = p.runner.prefill(rows, cache)
    logits = [p.runner.head(h, paired=True).float()]
    for step in torch.tensor([[5, 5, 17, 17], [100, 100, 3, 3], [511, 511, 0, 0]], device=DEV):
        logits.append(p.runner.decode(step, cache, paired=True).float())
    return logits, cache


@pytest.fixture(scope="module")
def fp32_logits(tiny_dir):
    return _step_logits(tiny_dir, torch.float32, "torch")[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_decode_steps_match_across_backends(tiny_dir, fp32_logits, dtype):
    """The triton backend's fused step (kernels) against the torch backend's (their references), both against
    the fp32 result: the kernels may not be less accurate than the references beyond rounding noise.
    Measured on this model: fp16 max |Δ| 0.004 for both backends; bf16 0.024 (torch) vs 0.041 (triton, because
    Triton 3.9's interpreter truncates fp32 → bf16 where a GPU rounds to nearest), logits of magnitude ~2."""
    pytest.importorskip("triton")
    (ref, ref_cache), (got, got_cache) = (_step_logits(tiny_dir, dtype, b) for b in ("torch", "triton"))
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    for i, (a, b, t) in enumerate(zip(ref, got, fp32_logits)):
        assert torch.isfinite(b).all(), i
        err_ref, err_got = (a - t).abs().max().item(), (b - t).abs().max().item()
        if dtype == torch.float32:
            assert err_got < 1e-4, (i, err_got)  # summation order only
        else:
            assert err_got <= 2 * err_ref + 1e-3, (i, err_ref, err_got)
        # and close to each other: guided logits also stay within the dtype's tolerance (w = 4 scales Δ by ≤ 7)
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=f"step {i}")
        torch.testing.assert_close(cfg_mix(b, 4.0), cfg_mix(a, 4.0), rtol=7 * tol, atol=7 * tol, msg=f"step {i}")
    assert torch.equal(got_cache.lengths, ref_cache.lengths)
    torch.testing.assert_close(got_cache.k.float(), ref_cache.k.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("split_k", [1, 3])
def test_decode_step_where_the_table_picks_the_skinny_gemm(tiny_dir, monkeypatch, split_k):
    """kernels/gemm_table.py is empty until a GPU measures the skinny GEMM ahead of cuBLAS; here every decode GEMM
    is routed to it, to check the wiring: same logits, and one launch fewer per layer with one split (the
    SiLU·mul rides in the gate/up GEMM)."""
    pytest.importorskip("triton")
    from fastjanus.bench.step_kernels import count_calls
    from fastjanus.kernels import gemm_table
    pipe = fastjanus.load(tiny_dir, device=DEV, dtype=torch.float32, backend="triton", cuda_graphs=False)
    rows = fastjanus.engine.pipeline.image_token_rows(pipe.tokenizer, pipe.cfg, ["fox", "a lighthouse at dusk"], 1)
    step = torch.tensor([5, 5, 17, 17], device=DEV)

    def run():
        cache = pipe.runner.new_cache(len(rows), max(len(r) for r in rows) + 4)
        pipe.runner.prefill(rows, cache)
        with torch.inference_mode():
            logits = pipe.runner.decode(step, cache, paired=True)
            counts = count_calls(lambda: pipe.runner.decode(step, cache, paired=True))
        return logits, counts

    ref, ref_counts = run()
    monkeypatch.setattr(gemm_table, "lookup", lambda x, w, epilogue: split_k)
    got, counts = run()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    layers = pipe.cfg.language.num_hidden_layers
    assert counts["ops"].get("mm", 0) == 0 and ref_counts["ops"]["mm"] == 4 * layers
    assert counts["ops"]["triton:_skinny_gemm_kernel"] == 4 * layers
    if split_k == 1:
        assert counts["total"] == ref_counts["total"] - layers
