"""8-bit weights and the FP8 KV cache: the scheme's arithmetic, quantize → save → load, both backends, the
quality requirement (fastjanus ≤ 1.2 × plain RTN), the memory arithmetic and every bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastjanus
from fastjanus import quant
from fastjanus.cli import main
from fastjanus.config import preset
from fastjanus.engine.memory import GiB, derived_bytes, plan_memory, weight_bytes
from fastjanus.errors import CheckpointError, InputError
from fastjanus.quant import QuantConfig
from fastjanus.quantize import quantize_checkpoint

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------ arithmetic
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantize_weight_is_per_row_round_to_nearest(scheme):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 301, generator=g) * torch.rand(37, 1, generator=g) * 3  # rows of different ranges
    w[5] = 0  # an all-zero row: scale 1, no division by zero
    w0 = w.clone()
    quant.quantize_weight(w, scheme)
    assert torch.equal(w, w0), "the input must not be modified (fp32: no copy is made by .float())"
    q, s = quant.quantize_weight(w.to(torch.bfloat16), scheme)
    assert q.dtype == quant.storage_dtype(scheme) and s.dtype == torch.float32 and s.shape == (37,)
    wb = w.to(torch.bfloat16).float()
    assert s[5] == 1 and (q[5].float() == 0).all()
    qmax = 127 if scheme == "int8" else 448
    torch.testing.assert_close(s[torch.arange(37) != 5], wb.abs().amax(1)[torch.arange(37) != 5] / qmax)
    err = (quant.dequantize(q, s, torch.float32) - wb).abs()
    if scheme == "int8":
        assert q.abs().max() <= 127 and (q.abs() == 127).any(dim=1)[torch.arange(37) != 5].all()
        assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()  # round to nearest: half a step at most
    else:  # e4m3: 3 mantissa bits, half an ulp relative (2⁻⁴) for normals, plus the subnormal step
        assert (err <= wb.abs() * 2 ** -4 + s[:, None] * 2 ** -10).all()


def test_fused_weights_are_the_parts_rows(tiny_dir):
    """Per-row scales commute with stacking rows: the fused QKV / gate-up 8-bit weights are the parts'."""
    p = fastjanus.load(tiny_dir, device="cpu", dtype=torch.float32, quantize="int8")
    a = p.model.llm.layers[1].self_attn
    assert a.qkv_weight.dtype == torch.int8
    assert torch.equal(a.qkv_weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
    assert torch.equal(a.qkv_scale, torch.cat([a.q_proj.weight_scale, a.k_proj.weight_scale,
                                               a.v_proj.weight_scale]))
    assert a.q_proj.weight.data_ptr() == a.qkv_weight.data_ptr()  # views: no second copy
    m = p.model.llm.layers[0].mlp
    assert torch.equal(m.gate_up_scale, torch.cat([m.gate_proj.weight_scale, m.up_proj.weight_scale]))
    # what stays in the model dtype
    assert p.model.gen_head.vision_head.weight.dtype == torch.float32  # heads only with quantize_heads
    assert p.model.llm.embed_tokens.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------------ folders
@pytest.fixture(scope="module")
def q8_dir(tiny_dir, tmp_path_factory):
    return quantize_checkpoint(tiny_dir, tmp_path_factory.mktemp("q") / "int8", "int8", heads=True)


def test_quantize_writes_a_complete_folder(tiny_dir, q8_dir):
    cfg = json.loads((q8_dir / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["weights"] == "int8" and qc["heads"] is True and qc["granularity"] == "per-output-channel"
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == \
        json.loads((tiny_dir / "config.json").read_text())
    for f in ("tokenizer.json", "processor_config.json", "model.safetensors.index.json"):
        assert (q8_dir / f).is_file(), f
    index = json.loads((q8_dir / "model.safetensors.index.json").read_text())
    sd = {}
    for f in set(index["weight_map"].values()):
        sd.update(load_file(str(q8_dir / f)))
    assert set(sd) == set(index["weight_map"])
    assert sd["language_model.model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert sd["language_model.model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    assert sd["gen_head.vision_head.weight"].dtype == torch.int8 and sd["gen_head.vision_head.bias"].dtype == \
        torch.bfloat16
    assert sd["language_model.model.embed_tokens.weight"].dtype == torch.bfloat16
    assert not any(k.startswith("vision_model.vision_tower.attn_pool.") for k in sd)  # never read: left out


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_round_trip_equals_quantize_at_load(tiny_dir, tmp_path, scheme):
    out = quantize_checkpoint(tiny_dir, tmp_path / scheme, scheme, heads=True, shard_bytes=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # several shards, read back through the index
    a = fastjanus.load(out, device="cpu", dtype=torch.float32)
    b = fastjanus.load(tiny_dir, device="cpu", dtype=torch.float32, quantize=scheme, quantize_heads=True)
    assert a.quantization == b.quantization == QuantConfig(scheme, True)
    prompts = ["a cat", "a lighthouse at dusk"]
    assert torch.equal(a.first_step_logits(prompts), b.first_step_logits(prompts))
    assert torch.equal(a.generate_image_tokens("a cat", temperature=0),
                       b.generate_image_tokens("a cat", temperature=0))


@pytest.mark.slow  # about 65 s in the interpreter: in .ci/run's slow step, keeping the default suite under 10 minutes
def test_greedy_codes_of_the_8bit_model_match_its_torch_path(tiny_dir):
    """The W8A16 kernels (triton backend, interpreter on the CPU) against the eager torch path, int8 weights +
    heads and an FP8 KV cache, two prompts of different lengths in one batch."""
    pytest.importorskip("triton")
    kw = dict(device=DEV, dtype=torch.float32, quantize="int8", quantize_heads=True, kv_cache="fp8")
    ref_pipe = fastjanus.load(tiny_dir, backend="torch", **kw)
    pipe = fastjanus.load(tiny_dir, backend="triton", **kw)
    assert pipe.runtime.pool.k.dtype == torch.float8_e4m3fn
    prompts = ["a cat", "a watercolour painting of a lighthouse at dusk"]
    ref = ref_pipe.generate_image_tokens(prompts, temperature=0, cfg_weight=4.0)
    assert torch.equal(pipe.generate_image_tokens(prompts, temperature=0, cfg_weight=4.0), ref)
    # the text path too: the image's embeddings prefilled into the e4m3 cache, lm_head on the 8-bit kernel
    from PIL import Image
    img = Image.new("RGB", (50, 30), (30, 120, 200))
    ids = ref_pipe.answer_ids(img, "What colour is it?", max_new_tokens=8, ignore_eos=True)
    assert pipe.answer_ids(img, "What colour is it?", max_new_tokens=8, ignore_eos=True) == ids


# ------------------------------------------------------------------------------------------ quality
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quality_is_within_1_2x_of_plain_rtn(tiny_dir, scheme):
    """The issue's requirement on the tiny architecture (Pro-1B: test_quality_pro1b, slow), with the kernels
    (triton backend). Measured here (32 prompts, 4 steps): int8 2.63% mean first-token error, fp8 13.0%,
    each 1.00× RTN; the bounds below are ~2× those, so a broken RTN yardstick also fails."""
    from fastjanus.bench.quant_quality import measure
    rep = measure(tiny_dir, scheme, n_prompts=32, steps=2, kv_cache=False, device=DEV, dtype=torch.float32,
                  backend="triton" if _has_triton() else "torch")
    assert rep["fastjanus"]["first_token"]["mean_rel_l2"] <= 1.2 * rep["rtn"]["first_token"]["mean_rel_l2"]
    assert rep["fastjanus"]["all_steps"]["mean_rel_l2"] <= 1.2 * rep["rtn"]["all_steps"]["mean_rel_l2"]
    assert 0.003 < rep["rtn"]["first_token"]["mean_rel_l2"] < (0.06 if scheme == "int8" else 0.3)


def test_quality_check_fails_for_a_broken_quantizer(tiny_dir, monkeypatch):
    """A deliberately broken variant (truncation toward zero instead of round to nearest: twice the RMS error)
    must fail the 1.2× requirement, or the test above could not fail."""
    from fastjanus.bench.quant_quality import measure

    def truncating(w, scheme):
        wf = w.float()
        s = wf.abs().amax(1) / 127
        return (wf / s[:, None]).trunc().clamp(-127, 127).to(torch.int8), s
    monkeypatch.setattr(quant, "quantize_weight", truncating)
    monkeypatch.setattr("fastjanus.checkpoint.quantize_weight", truncating, raising=False)
    rep = measure(tiny_dir, "int8", n_prompts=32, steps=1, kv_cache=False, device="cpu", dtype=torch.float32,
                  backend="torch")
    assert rep["ratio_to_rtn"] > 1.2


def _has_triton():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------------------ FP8 KV cache
def test_fp8_kv_scales_bound_every_key_and_value(tiny_dir):
    """The scales come from a Cauchy-Schwarz bound: no key or value of any input may exceed 448 · scale, and
    typical ones sit well inside the range (not in the subnormals)."""
    p = fastjanus.load(tiny_dir, device="cpu", dtype=torch.float32, kv_cache="fp8")
    ref = fastjanus.load(tiny_dir, device="cpu", dtype=torch.float32)
    rows = [[5, 6, 7, 300, 301, 12] * 8, list(range(30, 90))]
    cache = ref.runner.new_cache(2, 70)
    ref.runner.prefill(rows, cache)  # float cache: the real keys (rotated) and values
    ks, vs = p.model.kv_k_scale, p.model.kv_v_scale  # [layers, Hkv]
    k = cache.k[:, :, :, :60].abs().amax(dim=(1, 3, 4))  # [layers, Hkv]
    v = cache.v[:, :, :, :60].abs().amax(dim=(1, 3, 4))
    assert (k < 448 * ks).all() and (v < 448 * vs).all()
    assert (k > 448 * ks / 64).all() and (v > 448 * vs / 64).all()  # within 6 binades of the top, not lost
    q = p.runner.new_cache(2, 70)
    assert q.k.dtype == torch.float8_e4m3fn
    p.runner.prefill(rows, q)
    deq = q.k[:, :, :, :60].float() * ks[:, None, :, None, None]
    rel = (deq - cache.k[:, :, :, :60]).norm() / cache.k[:, :, :, :60].norm()
    assert rel < 0.04  # e4m3 round to nearest: ≤ 2⁻⁴ per element, ~2.5% RMS


# ------------------------------------------------------------------------------------------ memory
def test_the_plan_fits_pro7b_x16_on_24gib_with_8bit_weights_and_fp8_kv():
    """The arithmetic behind the README's smallest-card rows: Pro-7B, 16 images, 48-token prompts, a 24 GiB card
    with 0.6 GiB taken by the CUDA context (as in test_runtime.test_smallest_cards_for_the_note)."""
    cfg = preset("janus-pro-7b")

    def images_that_fit(card_gib, weights, kv_elem, prompt=48, context=0.6 * GiB):
        free = int(card_gib * GiB - weights - derived_bytes(cfg, 2) - context)
        best = 0
        for n in (1, 2, 4, 8, 16, 32):
            try:
                plan_memory(cfg, kv_elem, free).image_bucket(2 * n, prompt)
                best = n
            except InputError:
                pass
        return best
    bf16 = weight_bytes(cfg, 2)
    int8 = weight_bytes(cfg, 2, QuantConfig("int8"))
    fp8 = weight_bytes(cfg, 2, QuantConfig("fp8", True))
    assert abs(bf16 / 1e9 - 14.8) < 0.05 and abs(int8 / 1e9 - 8.75) < 0.05  # int8 saves the 6.07 G LLM linears
    assert bf16 - int8 > 5.6 * GiB
    # the README's table: images at 48-token prompts (the plan's largest bucket holds 32)
    assert images_that_fit(24, bf16, 2) == 8 and images_that_fit(20, bf16, 2) == 4
    assert images_that_fit(24, int8, 2) == 16 and images_that_fit(16, int8, 2) == 8
    assert images_that_fit(24, int8, 1) == 32 and images_that_fit(16, int8, 1) == 16
    assert images_that_fit(24, fp8, 1) == 32 and images_that_fit(12, fp8, 1) == 8
    # an FP8 KV cache halves the pool: 16 images x 624 slots of Pro-7B's 480 KiB (bf16) per token
    kv16 = 32 * 624 * 480 * 1024
    assert kv16 / 2 > 4.5 * GiB


# ------------------------------------------------------------------------------------------ bad input
def test_bad_load_options(tiny_dir, q8_dir):
    with pytest.raises(InputError, match="already quantized"):
        fastjanus.load(q8_dir, device="cpu", quantize="int8")
    with pytest.raises(InputError, match="int8, fp8"):
        fastjanus.load(tiny_dir, device="cpu", quantize="int4")
    with pytest.raises(InputError, match="quantize_heads"):
        fastjanus.load(tiny_dir, device="cpu", quantize_heads=True)
    with pytest.raises(InputError, match="kv_cache"):
        fastjanus.load(tiny_dir, device="cpu", kv_cache="int8")


def test_fp8_needs_sm89(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(InputError, match=r"compute capability 8\.9.*A100 is 8\.0.*int8"):
        quant.check_device("fp8", None, torch.device("cuda"), "triton")
    with pytest.raises(InputError, match="an fp8 KV cache"):
        quant.check_device("int8", "fp8", torch.device("cuda"), "triton")
    quant.check_device("int8", None, torch.device("cuda"), "triton")  # int8 works on any GPU
    quant.check_device("fp8", "fp8", torch.device("cpu"), "triton")  # the interpreter and torch cast e4m3


def _edit_shard(folder, fn):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = index["weight_map"]["language_model.model.layers.0.self_attn.q_proj.weight"]
    sd = load_file(str(folder / name))
    fn(sd)
    save_file(sd, str(folder / name))


@pytest.mark.parametrize("damage,match", [
    (lambda sd: sd.pop("language_model.model.layers.0.self_attn.q_proj.weight_scale"),
     r"missing key\(s\): language_model\.model\.layers\.0\.self_attn\.q_proj\.weight_scale"),
    (lambda sd: sd.__setitem__("language_model.model.layers.0.self_attn.q_proj.weight_scale", torch.ones(3)),
     r"mis-shaped: language_model\.model\.layers\.0\.self_attn\.q_proj\.weight_scale"),
    (lambda sd: sd.__setitem__("language_model.model.layers.0.self_attn.q_proj.weight",
                               sd["language_model.model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16)),
     r"q_proj\.weight is bfloat16 \(expected int8\)"),
    (lambda sd: sd.__setitem__("language_model.model.layers.0.self_attn.q_proj.weight_scale",
                               sd["language_model.model.layers.0.self_attn.q_proj.weight_scale"].half()),
     r"q_proj\.weight is float16 \(expected float32\)|weight_scale|float32"),
])
def test_damaged_quantized_folder_is_refused(q8_dir, tmp_path, damage, match):
    bad = tmp_path / "bad"
    shutil.copytree(q8_dir, bad)
    _edit_shard(bad, damage)
    with pytest.raises(CheckpointError, match=match):
        fastjanus.load(bad, device="cpu")


def test_quantize_cli(tiny_dir, q8_dir, tmp_path, capsys):
    out = tmp_path / "cli8"
    assert main(["quantize", "--model", str(tiny_dir), "--out", str(out), "--weights", "fp8"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weights"] == "fp8"
    assert main(["info", "--model", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quantized   fp8 (float8_e4m3fn), per-output-channel float32 scales" in text
    assert main(["info", "--model", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights"]["tensor_bytes_by_dtype"]["float8_e4m3fn"] > 0
    assert info["loaded_bytes_bf16"] < weight_bytes(preset("tiny"), 2)
    # bad input: one line each, exit 2, nothing written
    for argv, msg in [
        (["--model", str(q8_dir), "--out", str(tmp_path / "x"), "--weights", "int8"], "already quantized"),
        (["--model", str(tiny_dir), "--out", str(out), "--weights", "int8"], "is not empty"),
        (["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "y"), "--weights", "int8"], "no such"),
    ]:
        assert main(["quantize", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(tiny_dir), "--out", str(tmp_path / "z"), "--weights", "int4"])


# ------------------------------------------------------------------------------------------ W8A8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_is_fp8_activations_times_fp8_weights(dtype):
    """torch._scaled_mm with per-row e4m3 activations: equal (to fp32 summation order) to dequantize both, then
    matmul; and within e4m3's rounding of the float product."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 96, generator=g) * 3).to(dtype)
    x[2] = 0  # a zero row: scale 1, output 0
    w = torch.randn(48, 96, generator=g) / 96 ** 0.5
    q, s = quant.quantize_weight(w, "fp8")
    y = quant.w8a8_linear(x, q, s)
    assert y.dtype == dtype and y.shape == (5, 48) and (y[2] == 0).all()
    xs = x.float().abs().amax(1, keepdim=True).clamp_min(1e-30) / 448
    xq = (x.float() / xs).to(torch.float8_e4m3fn).float() * xs
    ref = xq @ (q.float() * s[:, None]).T
    torch.testing.assert_close(y.float(), ref, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-5)
    exact = x.float() @ w.T
    assert (y.float() - exact).norm() / exact.norm() < 0.08  # two e4m3 roundings: a few percent


def test_w8a8_only_where_the_table_says(monkeypatch):
    """W8A8_ROWS is empty (no GPU has measured it): fp8 GEMMs stay weight-only; an entry switches them."""
    from fastjanus.kernels import gemm_table
    assert quant.W8A8_ROWS == {}
    x = torch.randn(2, 64)
    q, s = quant.quantize_weight(torch.randn(32, 64), "fp8")
    assert not quant.use_w8a8(x, q)
    monkeypatch.setattr(quant, "use_w8a8", lambda x, w: True)
    torch.testing.assert_close(gemm_table.linear(x, q, s), quant.w8a8_linear(x, q, s))


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_8bit_model_on_the_gpu(scheme):
    """Pro-1B with 8-bit weights and an FP8 KV cache on the GPU: CUDA Graphs give the eager triton loop's codes,
    the weights take the bytes the accounting says, and the guided logits stay near the bf16 model's."""
    from fastjanus.random_init import cached_random_model
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    d = cached_random_model("janus-pro-1b")
    kw = dict(device="cuda", dtype=torch.bfloat16, backend="triton", quantize=scheme, kv_cache="fp8")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    on = fastjanus.load(d, cuda_graphs=True, **kw)
    loaded = torch.cuda.memory_allocated() - before
    expect = weight_bytes(preset("janus-pro-1b"), 2, QuantConfig(scheme))
    assert loaded >= expect and loaded < expect + on.memory_plan.pool_bytes + 512 * 2 ** 20, (loaded, expect)
    off = fastjanus.load(d, cuda_graphs=False, **kw)
    prompts = ["a cat", "a lighthouse on a cliff at dusk, oil painting"]
    a = on.generate_image_tokens(prompts, num_images=2, seed=5, top_k=100)
    b = off.generate_image_tokens(prompts, num_images=2, seed=5, top_k=100)
    assert torch.equal(a, b)
    ref = fastjanus.load(d, device="cuda", dtype=torch.bfloat16, backend="triton")
    la, lr = on.first_step_logits(prompts), ref.first_step_logits(prompts)
    err = ((la - lr).norm(dim=1) / lr.norm(dim=1)).mean().item()
    print(f"\n{scheme}: {loaded / 2 ** 30:.2f} GiB on the GPU after load (plan pool included), first-token "
          f"guided-logit error vs bf16 {100 * err:.2f}%")
    assert err < (0.1 if scheme == "int8" else 0.3)


def test_generate_and_bench_flags(tiny_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--quantize", "int8", "--kv-cache", "fp8",
                 "--temperature", "0", "--out", str(tmp_path / "img")]) == 0
    assert "int8 weights, fp8 KV cache" in capsys.readouterr().err
    assert len(list((tmp_path / "img").glob("*.png"))) == 1
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--quantize-heads",
                 "--out", str(tmp_path / "img2")]) == 2
    assert "--quantize-heads applies with --quantize" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_dir), "--quality"]) == 2
    assert "--quality compares an 8-bit model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ review fixes
def test_more_than_64_rows_run_in_slices():
    """A bucket of more than 32 images: the 8-bit GEMMs run the kernel in 64-row slices of one output."""
    pytest.importorskip("triton")
    from fastjanus.kernels import gemm_table
    from fastjanus.kernels.reference import skinny_gemm_ref
    g = torch.Generator().manual_seed(5)
    x = torch.randn(130, 32, generator=g)
    q, s = quant.quantize_weight(torch.randn(48, 32, generator=g), "int8")
    out = torch.full((130, 48), float("nan"))
    out[:] = gemm_table.linear(x, q, s)
    torch.testing.assert_close(out, skinny_gemm_ref(x, q, w_scale=s), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(gemm_table.linear_silu_mul(x, q, s), skinny_gemm_ref(x, q, w_scale=s,
                                                                                     epilogue="silu_mul"),
                               rtol=2e-5, atol=2e-5)


def test_a_pruned_head_gets_scale_one_not_nan(tiny_dir):
    p = fastjanus.load(tiny_dir, device="cpu", dtype=torch.float32)
    a, H, hd = p.model.llm.layers[0].self_attn, p.cfg.language.num_attention_heads, p.cfg.language.head_dim
    with torch.no_grad():
        a.qkv_weight[H * hd:(H + 1) * hd] = 0  # kv head 0's key rows
        p.model.use_fp8_kv_cache()
    assert p.model.kv_k_scale[0, 0] == 1 and torch.isfinite(p.model.kv_k_scale).all()
    assert torch.isfinite(p.first_step_logits("a cat")).all()
    assert torch.isfinite(p.runner.decode(torch.tensor([1, 2]), _prefilled(p), paired=True)).all()


def _prefilled(p):
    cache = p.runner.new_cache(2, 40)
    p.runner.prefill([[5, 6, 7], [5, 6, 7, 8]], cache)
    return cache


def test_each_pipeline_sets_its_backend_on_the_8bit_linears(tiny_dir):
    from fastjanus.engine.pipeline import JanusPipeline
    p = fastjanus.load(tiny_dir, device="cpu", dtype=torch.float32, backend="triton", quantize="int8",
                       quantize_heads=True)
    lin = p.model.gen_head.vision_head
    assert lin.backend == "triton"
    JanusPipeline(p.model, p.tokenizer, p.device, p.dtype, backend="torch")  # the bench's torch-eager baseline
    assert lin.backend == "torch"


def test_quantized_folder_permissions_and_undeclared_8bit_tensors(q8_dir, tmp_path):
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert q8_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in q8_dir.iterdir())
    # without its quantization_config (and scales) the folder's scales are unexpected keys; a float folder with
    # an 8-bit tensor slipped in is refused by name instead of being cast to garbage
    bad = tmp_path / "noconfig"
    shutil.copytree(q8_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): .*weight_scale"):
        fastjanus.load(bad, device="cpu")

    def to_int8(sd):
        k = "language_model.model.layers.0.self_attn.q_proj.weight"
        sd[k] = sd[k].to(torch.int8)
        del sd[k.replace("weight", "weight_scale")]
    stray = tmp_path / "stray"
    shutil.copytree(q8_dir, stray)
    _edit_shard(stray, to_int8)
    (stray / "config.json").write_text(json.dumps(cfg))
    index = json.loads((stray / "model.safetensors.index.json").read_text())
    for f in set(index["weight_map"].values()):  # keep only that 8-bit tensor, the rest back to float
        sd = load_file(str(stray / f))
        sd = {k: (v.float() if k.endswith(".weight") and v.dtype == torch.int8 and "layers.0.self_attn.q_proj"
                  not in k else v) for k, v in sd.items() if not k.endswith("weight_scale")}
        save_file(sd, str(stray / f))
    with pytest.raises(CheckpointError, match="8-bit but config.json declares no such quantization.*q_proj"):
        fastjanus.load(stray, device="cpu")
