"""JanusFlow: the cached-prompt flow step against the official full recomputation, the padded (graph) buckets,
batches against single prompts, the LLM block against transformers' Llama with the official attention mask,
the pipeline (seeds, latents, decode, understanding) and every bad input. Tiny configs, fp32, on the CPU."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import fastjanus
from fastjanus.engine.flow import FlowStep, Prompts, prompt_prefix, recompute_step
from fastjanus.errors import CheckpointNotFoundError, ConfigError, InputError
from fastjanus.flow_config import FLOW_PRESETS, JanusFlowConfig
from fastjanus.models.janusflow import JanusFlowModel
from fastjanus.random_init import init_random, random_tensor

# fp32 on the CPU: the cached step and the recomputation differ only in the order of floating-point sums
# (attention over P + T keys in one softmax vs the same keys in a longer sequence). Measured max |Δ| after 3
# steps: ~1e-6 on latents of unit scale; 2e-5 leaves room across CPUs without hiding a real difference (a wrong
# mask or position moves latents by 1e-2 or more, see test_wrong_mask_is_caught).
ATOL = 2e-5


def _model(seed: int = 0, cfg: JanusFlowConfig | None = None) -> JanusFlowModel:
    cfg = cfg or FLOW_PRESETS["tiny-flow"]()
    with torch.device("meta"):
        m = JanusFlowModel(cfg)
    sd = {k: random_tensor(k, tuple(v.shape), seed, torch.float32) for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    m.eval()
    m.fuse()
    return m


@pytest.fixture(scope="module")
def model():
    return _model()


def _noise(m, n, seed=1):
    c = m.cfg
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c.latent_channels, c.latent_size, c.latent_size, generator=g)


def _recompute(m, prompts, z0, steps, w):
    z = z0.clone()
    for i in range(steps):
        recompute_step(m, prompts, z, i / steps * 1000, w, 1 / steps)
    return z


def _cached(m, prompts, z0, steps, w, images=None, P=None):
    st = FlowStep(m, images or prompts.images, P or prompts.P)
    st.load(prompts, prompt_prefix(m, prompts), z0, w, steps)
    for i in range(steps):
        st.step(i / steps * 1000)
    return st.z[:prompts.images].clone()


PROMPTS = {"one": [[1, 7, 9, 11, 13, 2]], "ragged": [[1, 7, 9, 11, 13, 2, 5, 8], [1, 4, 6]]}


@pytest.mark.parametrize("which", sorted(PROMPTS))
@pytest.mark.parametrize("num_images", [1, 2])
@torch.inference_mode()
def test_cached_steps_equal_full_recomputation(model, which, num_images):
    pr = Prompts(PROMPTS[which], num_images, pad_id=0)
    z0 = _noise(model, pr.images)
    ref = _recompute(model, pr, z0, 3, 2.5)
    got = _cached(model, pr, z0, 3, 2.5)
    assert (ref - z0).abs().max() > 0.1  # the flow moved the latents
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_padded_bucket_equals_exact_sizes(model):
    """A graph bucket: more image rows and prompt slots than the request; the extra ones are inert."""
    pr = Prompts(PROMPTS["ragged"], 1, pad_id=0)
    z0 = _noise(model, 2)
    exact = _cached(model, pr, z0, 2, 3.0)
    padded = _cached(model, pr, z0, 2, 3.0, images=4, P=pr.P + 13)
    torch.testing.assert_close(padded, exact, atol=ATOL, rtol=0)
    # and a bucket reused by a second, smaller request gives that request's own result
    st = FlowStep(model, 4, pr.P + 13)
    st.load(pr, prompt_prefix(model, pr), z0, 3.0, 2)
    st.step(0.0)
    one = Prompts([PROMPTS["one"][0]], 1, pad_id=0)
    st.load(one, prompt_prefix(model, one), z0[:1], 3.0, 2)
    for i in range(2):
        st.step(i / 2 * 1000)
    torch.testing.assert_close(st.z[:1], _cached(model, one, z0[:1], 2, 3.0), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_batch_of_prompts_equals_each_alone(model):
    pr = Prompts(PROMPTS["ragged"], 2, pad_id=0)
    z0 = _noise(model, 4)
    both = _cached(model, pr, z0, 3, 2.0)
    for p, ids in enumerate(PROMPTS["ragged"]):
        alone = _cached(model, Prompts([ids], 2, pad_id=0), z0[2 * p:2 * p + 2], 3, 2.0)
        torch.testing.assert_close(both[2 * p:2 * p + 2], alone, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_wrong_mask_is_caught(model, monkeypatch):
    """A broken variant: unconditional rows that see the whole prompt (no masking). The comparison above must
    fail for it, or it could not catch a wrong mask."""
    pr = Prompts(PROMPTS["one"], 1, pad_id=0)
    z0 = _noise(model, 1)
    ref = _recompute(model, pr, z0, 2, 3.0)
    real = Prompts.masks

    def no_uncond_mask(self, P, device):
        keep, start = real(self, P, device)
        n = self.images
        keep[n:] = keep[:n]
        return keep, start
    monkeypatch.setattr(Prompts, "masks", no_uncond_mask)
    bad = _cached(model, pr, z0, 2, 3.0)
    assert (bad - ref).abs().max() > 100 * ATOL


@torch.inference_mode()
def test_guidance_and_time_matter(model):
    pr = Prompts(PROMPTS["one"], 1, pad_id=0)
    z0 = _noise(model, 1)
    a, b = _cached(model, pr, z0, 2, 1.0), _cached(model, pr, z0, 2, 4.0)
    assert (a - b).abs().max() > 1e-3
    st = FlowStep(model, 1, pr.P)  # the same state at two times: different steps
    st.load(pr, prompt_prefix(model, pr), z0, 2.0, 2)
    st.step(0.0)
    st2 = FlowStep(model, 1, pr.P)
    st2.load(pr, prompt_prefix(model, pr), z0, 2.0, 2)
    st2.step(500.0)
    assert (st.z - st2.z).abs().max() > 1e-3
    # w = 1: the conditional velocity alone; the unconditional rows do not enter
    st = FlowStep(model, 1, pr.P)
    st.load(pr, prompt_prefix(model, pr), z0, 1.0, 1)
    st.prefix[0][0][1:].normal_()  # garbage in the unconditional row's prefix K/V: with w = 1 it does not enter
    st.step(0.0)
    torch.testing.assert_close(st.z, _cached(model, pr, z0, 1, 1.0), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_llm_block_matches_transformers_llama_with_the_official_mask(model):
    """The official step runs transformers' LlamaModel on [prompt ‖ t_emb ‖ latents] with a 2-D attention mask
    (unconditional rows: the prompt after BOS masked) and default position ids. Ours: LlamaModel.block."""
    transformers = pytest.importorskip("transformers")
    lc = model.cfg.language
    hf_cfg = transformers.LlamaConfig(
        hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size, num_hidden_layers=lc.num_hidden_layers,
        num_attention_heads=lc.num_attention_heads, num_key_value_heads=lc.num_key_value_heads,
        vocab_size=lc.vocab_size, max_position_embeddings=lc.max_position_embeddings, rms_norm_eps=lc.rms_norm_eps,
        rope_theta=lc.rope_theta, attn_implementation="eager")
    hf = transformers.LlamaModel(hf_cfg).eval()
    sd = {k.removeprefix("language_model.model."): v for k, v in model.state_dict().items()
          if k.startswith("language_model.model.")}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    ids = PROMPTS["one"][0]
    L, T = len(ids), 1 + model.cfg.num_gen_tokens
    tokens = torch.tensor([ids, [ids[0]] + [0] * (L - 1)])  # conditional, unconditional (BOS + pad)
    x = torch.randn(2, T, lc.hidden_size, generator=torch.Generator().manual_seed(3))
    seq = torch.cat((model.embed_text(tokens), x), 1)
    mask2d = torch.ones(2, L + T, dtype=torch.long)
    mask2d[1, 1:L] = 0
    ref = hf(inputs_embeds=seq, attention_mask=mask2d).last_hidden_state[:, L:]
    keys = mask2d.bool()
    mask = (torch.ones(L + T, L + T, dtype=torch.bool).tril()[None] & keys[:, None, :])[:, None]
    mask |= torch.eye(L + T, dtype=torch.bool)[None, None]
    got = model.llm.block(seq, torch.arange(L + T)[None].expand(2, -1), mask)[:, L:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    return init_random("tiny-flow", tmp_path_factory.mktemp("tiny-flow"), seed=0)


@pytest.fixture(scope="module")
def pipe(flow_dir):
    return fastjanus.load(flow_dir, device="cpu", dtype=torch.float32)


def test_load_gives_a_flow_pipeline_with_the_vae(pipe, flow_dir):
    from fastjanus.engine.flow_pipeline import JanusFlowPipeline
    assert isinstance(pipe, JanusFlowPipeline) and pipe.vae_dir == flow_dir / "vae"
    assert pipe.cfg.latent_size == 8 and pipe.cfg.num_gen_tokens == 16


def test_seed_and_latents_reproduce(pipe):
    a = pipe.generate_image_latents("a red fox", 2, steps=3, seed=7)
    assert a.shape == (2, 4, 8, 8) and a.dtype == torch.float32
    torch.testing.assert_close(pipe.generate_image_latents("a red fox", 2, steps=3, seed=7), a, atol=0, rtol=0)
    assert (pipe.generate_image_latents("a red fox", 2, steps=3, seed=8) - a).abs().max() > 0.1
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))  # what seed=7 draws
    torch.testing.assert_close(pipe.generate_image_latents("a red fox", 2, steps=3, latents=noise), a, atol=0, rtol=0)
    # any float dtype of latents is taken (converted to fp32)
    b = pipe.generate_image_latents("a red fox", 2, steps=3, latents=noise.double())
    torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_pipeline_batch_and_the_official_loop(pipe):
    prompts = ["a red fox sitting in the snow at sunrise", "a cabin"]
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    both = pipe.generate_image_latents(prompts, 2, cfg_weight=3.0, steps=4, latents=noise)
    official = pipe.generate_image_latents(prompts, 2, cfg_weight=3.0, steps=4, latents=noise, cache_prompt=False)
    torch.testing.assert_close(both, official, atol=ATOL, rtol=0)
    assert pipe.last_timings["cache_prompt"] is False
    for p, text in enumerate(prompts):
        alone = pipe.generate_image_latents(text, 2, cfg_weight=3.0, steps=4, latents=noise[2 * p:2 * p + 2])
        torch.testing.assert_close(both[2 * p:2 * p + 2], alone, atol=ATOL, rtol=0)


def test_generate_images_is_latents_then_vae(pipe):
    imgs = pipe.generate_images(["a fox", "a cabin"], 1, steps=2, seed=3)
    assert [i.size for i in imgs] == [(64, 64)] * 2 and imgs[0].mode == "RGB"
    z = pipe.generate_image_latents(["a fox", "a cabin"], 1, steps=2, seed=3)
    again = pipe.decode_image_latents(z)
    assert all(list(a.getdata()) == list(b.getdata()) for a, b in zip(imgs, again))
    assert "vae_s" in pipe.last_timings
    px = pipe.decode_image_pixels(z)  # the official post-processing: clip to [-1, 1], scale, truncate
    want = ((px.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(torch.from_numpy(__import__("numpy").array(imgs[1])), want[1])


def _image(seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (40, 30, 3), generator=g, dtype=torch.uint8).numpy())


@torch.inference_mode()
def test_understanding_uses_begin_of_understanding_at_the_image_start(pipe):
    """The official prepare_inputs_embeds: <begin_of_image> and the placeholders (images_seq_mask) take
    [beg_of_und_embed, aligned SigLIP features]; the LLM then runs causally over the whole prompt."""
    from fastjanus.engine.pipeline import question_ids
    from fastjanus.image import preprocess
    tk, m = pipe.tokenizer, pipe.model
    ids = question_ids(tk, pipe.cfg, "What is this?", 1)
    x = m.embed_text(torch.tensor([ids]))  # [1, T, D]
    seq = torch.tensor(ids)
    where = (seq == tk.image_id) | (seq == tk.boi_id)
    feats = m.vision_und_enc_aligner(m.vision_und_enc_model(preprocess(_image(), tk.processor)[None]))
    x[0, where] = torch.cat((m.beg_of_und_embed, feats[0]))
    T = len(ids)
    h = m.llm.block(x, torch.arange(T)[None], torch.ones(T, T, dtype=torch.bool).tril()[None, None])
    want = m.language_model.lm_head(h[0])
    got = pipe.understanding_logits(_image(), "What is this?")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert pipe.encode_image(_image()).shape == (pipe.cfg.vision.num_patches, pipe.cfg.language.hidden_size)


def test_answer_on_both_backends(pipe, flow_dir):
    a = pipe.answer(_image(1), "Describe the image.", max_new_tokens=6)
    t = fastjanus.load(flow_dir, device="cpu", dtype=torch.float32, backend="triton")
    assert t.answer(_image(1), "Describe the image.", max_new_tokens=6) == a
    assert isinstance(a, str)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw,msg", [
    ({"steps": 0}, "steps must be an integer >= 1"), ({"steps": 2.5}, "steps must be"), ({"steps": True}, "steps"),
    ({"cfg_weight": -1.0}, "cfg_weight must be a finite number >= 0"), ({"cfg_weight": float("nan")}, "cfg_weight"),
    ({"num_images": 0}, "num_images"), ({"seed": -1}, "seed"), ({"cache_prompt": 1}, "cache_prompt"),
    ({"latents": torch.zeros(1, 4, 8, 9)}, "shape [1, 4, 8, 9]; expected [1, 4, 8, 8]"),
    ({"latents": torch.zeros(2, 4, 8, 8)}, "expected [1, 4, 8, 8]"),
    ({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.int64)}, "floating-point"),
    ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, "NaN"),
    ({"latents": [[0.0]]}, "must be a torch.Tensor"),
    ({"latents": torch.zeros(1, 4, 8, 8), "seed": 3}, "seed and latents both choose the starting noise"),
])
def test_bad_generation_inputs(pipe, kw, msg):
    args = {"prompt": "a fox", "steps": 2, **kw}
    with pytest.raises(InputError, match=__import__("re").escape(msg)):
        pipe.generate_image_latents(**args)


def test_bad_decode_inputs_and_janus_only_methods(pipe):
    with pytest.raises(InputError, match="floating-point"):
        pipe.decode_image_latents(torch.zeros(1, 4, 8, 8, dtype=torch.int32))
    with pytest.raises(InputError, match=r"expected \[1, 4, 8, 8\]"):
        pipe.decode_image_latents(torch.zeros(1, 3, 8, 8))
    for name in ("generate_image_tokens", "decode_image_tokens", "first_step_logits"):
        with pytest.raises(InputError, match="rectified flow"):
            getattr(pipe, name)("a fox")
    with pytest.raises(InputError, match="prompt"):
        pipe.generate_image_latents([], steps=1)
    with pytest.raises(InputError, match="context"):
        pipe.generate_image_latents("fox " * 2000, steps=1)


def test_missing_or_mismatched_vae(flow_dir, tmp_path, capsys):
    d = tmp_path / "novae"
    shutil.copytree(flow_dir, d)
    shutil.rmtree(d / "vae")
    # without a VAE: understanding and latents work; anything that decodes says what is missing, before the flow
    p = fastjanus.load(d, device="cpu")
    assert p.vae is None and isinstance(p.answer(_image(), "What is this?", max_new_tokens=2), str)
    assert p.generate_image_latents("a fox", steps=1, seed=0).shape == (1, 4, 8, 8)
    for call in (lambda: p.generate_images("a fox", steps=1), lambda: p.decode_image_latents(torch.zeros(1, 4, 8, 8))):
        with pytest.raises(CheckpointNotFoundError, match=r"no VAE folder.*SDXL VAE.*vae='DIR'"):
            call()
    from fastjanus.cli import main
    assert main(["generate", "--model", str(d), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert "no VAE folder" in capsys.readouterr().err and not list((tmp_path / "o").glob("*.png"))
    with pytest.raises(CheckpointNotFoundError, match="vae"):  # an explicit vae= must exist
        fastjanus.load(d, device="cpu", vae=tmp_path / "nowhere")
    # vae= elsewhere works
    assert fastjanus.load(d, device="cpu", vae=flow_dir / "vae").vae is not None
    bad = tmp_path / "vae8"
    shutil.copytree(flow_dir / "vae", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["latent_channels"] = 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="latent_channels is 8 but the model produces 4"):
        fastjanus.load(d, device="cpu", vae=bad)


@pytest.mark.parametrize("kw,name", [({"quantize": "int8"}, "quantize"), ({"kv_cache": "fp8"}, "kv_cache"),
                                     ({"max_rows": 8}, "max_rows"), ({"onnx_dir": "x"}, "onnx_dir")])
def test_janus_only_load_options_refused(flow_dir, kw, name):
    with pytest.raises(InputError, match=f"{name}.*does not apply to JanusFlow"):
        fastjanus.load(flow_dir, device="cpu", **kw)


def test_vae_option_refused_for_janus(tiny_dir, flow_dir):
    with pytest.raises(InputError, match="vae.*JanusFlow"):
        fastjanus.load(tiny_dir, device="cpu", vae=flow_dir / "vae")


# ------------------------------------------------------------------------------------------ config
def _flow_dict():
    return FLOW_PRESETS["janusflow-1.3b"]().to_dict()


def test_config_round_trip_and_official_defaults():
    for name, make in FLOW_PRESETS.items():
        c = make()
        assert JanusFlowConfig.from_dict(c.to_dict()) == c
    d = _flow_dict()
    d["vision_gen_enc_config"]["params"] = {"input_channels": 4, "kernel_size": 2, "stride": 2}  # the rest: defaults
    c = JanusFlowConfig.from_dict(d)
    assert c.gen_enc.padding == 0 and c.gen_enc.block_out_channels == (768,) and c.gen_enc.norm_eps == 1e-6
    d["vision_und_enc_config"]["params"] = {"model_name": "siglip_large_patch16_384"}  # CLIPVisionTower defaults
    c = JanusFlowConfig.from_dict(d)
    assert c.vision.image_size == 336 and c.vision.layers_used == 23


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d["vision_gen_enc_config"].update(cls="Other"), "vision_gen_enc_config.cls is 'Other'"),
    (lambda d: d.pop("vision_gen_dec_config"), "missing or malformed 'vision_gen_dec_config'"),
    (lambda d: d["vision_gen_enc_config"]["params"].update(hidden_size=1024), "hidden_size is 1024 but must equal"),
    (lambda d: d["vision_gen_dec_config"]["params"].update(block_out_channels=[512]), "block_out_channels[-1] is 512"),
    (lambda d: d["vision_gen_dec_config"]["params"].update(upsamples=2), "writes a 96×96 velocity"),
    (lambda d: d["vision_gen_enc_config"]["params"].update(block_out_channels=[768, 512]),
     "with use_mid_block the first and last must be equal"),
    (lambda d: d["vision_gen_enc_config"]["params"].update(stride=0), "stride must be a positive integer"),
    (lambda d: d["vision_gen_dec_config"]["params"].update(out_channels=3), "out_channels is 3 but the velocity"),
])
def test_bad_configs(edit, msg):
    d = _flow_dict()
    edit(d)
    with pytest.raises(ConfigError, match=__import__("re").escape(msg)):
        JanusFlowConfig.from_dict(d)


# ------------------------------------------------------------------------------------------ CLI and bench
def test_cli_generate_info_and_refusals(flow_dir, tmp_path, capsys):
    from fastjanus.cli import main
    out = tmp_path / "png"
    assert main(["generate", "--model", str(flow_dir), "--prompt", "a fox", "--num-images", "2", "--steps", "2",
                 "--seed", "5", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 2
    err = capsys.readouterr().err
    assert "2 flow steps" in err and "VAE decode" in err
    for flags, msg in ((["--temperature", "0"], "--temperature: JanusFlow makes images by rectified flow"),
                       (["--steps", "0"], "--steps must be an integer >= 1"),
                       (["--cfg", "-1"], "--cfg must be a finite number >= 0"),
                       (["--speculative"], "--speculative: JanusFlow"),
                       (["--engine", "onnx"], "--engine onnx: JanusFlow")):
        assert main(["generate", "--model", str(flow_dir), "--prompt", "x", "--out", str(out), *flags]) == 2
        assert msg in capsys.readouterr().err
    assert main(["info", "--model", str(flow_dir)]) == 0
    text = capsys.readouterr().out
    assert "JanusFlow" in text and "VAE" in text and "16 LLM tokens" in text
    img = tmp_path / "img.png"
    _image(2).save(img)
    assert main(["understand", "--model", str(flow_dir), "--image", str(img), "--question", "What is this?",
                 "--max-new-tokens", "3"]) == 0
    assert "tokens in" in capsys.readouterr().err


def test_cli_steps_and_vae_refused_for_janus(tiny_dir, flow_dir, tmp_path, capsys):
    from fastjanus.cli import main
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--steps", "3", "--out", str(tmp_path)]) == 2
    assert "--steps sets JanusFlow" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--vae", str(flow_dir / "vae"),
                 "--out", str(tmp_path)]) == 2
    assert "--vae applies to JanusFlow" in capsys.readouterr().err
    # Janus-only commands name the reason
    assert main(["quantize", "--model", str(flow_dir), "--out", str(tmp_path / "q"), "--weights", "int8"]) == 2
    assert "this is a JanusFlow checkpoint" in capsys.readouterr().err


def test_large_requests_run_in_chunks(pipe, monkeypatch):
    from fastjanus.engine import flow_pipeline
    prompts = ["a red fox sitting in the snow", "a cabin"]
    noise = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    whole = pipe.generate_image_latents(prompts, 3, steps=2, latents=noise)
    monkeypatch.setattr(flow_pipeline, "FLOW_MAX_IMAGES", 4)  # chunks of 4 + 2 images, the first spanning prompts
    torch.testing.assert_close(pipe.generate_image_latents(prompts, 3, steps=2, latents=noise), whole,
                               atol=ATOL, rtol=0)


def test_flow_bench_runs_both_loops(flow_dir):
    from fastjanus.bench.flow_bench import format_report, run_flow_bench
    rep = run_flow_bench(flow_dir, device="cpu", dtype="fp32", scenarios=("t2i-1",), steps=2, repeats=1, warmup=0,
                         progress=False, log=lambda s: None)
    (row,) = rep["scenarios"]
    assert set(row["variants"]) == {"ours", "official loop"}
    assert row["max_abs_latent_diff_vs_official_loop"] < ATOL and row["step_flops"] > 0
    for v in row["variants"].values():
        assert v["step_ms"] > 0 and v["vae_s"] > 0 and 0 < v["matmul_fraction"]
    assert "official loop" in format_report(rep)


def test_latents_are_not_changed(pipe):
    noise = torch.randn(1, 4, 8, 8)
    keep = noise.clone()
    for cache in (True, False):
        pipe.generate_image_latents("a fox", 1, steps=2, latents=noise, cache_prompt=cache)
        assert torch.equal(noise, keep)


def test_graph_buckets_on_the_cpu(flow_dir, monkeypatch):
    """The CUDA-Graph path's bookkeeping without a GPU: capture stubbed out, so each bucket's static step runs
    eagerly on its padded buffers. Buckets are reused for shorter prompts, at most FLOW_GRAPHS_KEPT are kept
    (least recently used dropped), and every result equals the exact-size eager run."""
    from fastjanus.engine import flow_pipeline
    captured = []
    monkeypatch.setattr(FlowStep, "capture", lambda self, pool=None: captured.append((self.N, self.P)))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(flow_pipeline, "FLOW_GRAPHS_KEPT", 2)
    g = fastjanus.load(flow_dir, device="cpu", dtype=torch.float32)
    e = fastjanus.load(flow_dir, device="cpu", dtype=torch.float32)
    g.cuda_graphs = True
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for prompts, n in ((["a red fox in the snow"], 2), (["a dog"], 2), (["a cabin", "a boat", "sea"], 1),
                       (["a tree"], 1), (["a red fox in the snow"], 2)):
        k = len(prompts) * n
        got = g.generate_image_latents(prompts, n, steps=2, latents=noise[:k])
        torch.testing.assert_close(got, e.generate_image_latents(prompts, n, steps=2, latents=noise[:k]),
                                   atol=ATOL, rtol=0)
        assert g.last_timings["cuda_graphs"] and len(g._steps) <= 2
    T = 1 + g.cfg.num_gen_tokens
    assert all((P + T) % 64 == 0 for _, P in captured)
    # (2, P) was reused by the shorter prompt, then dropped as least recently used and captured again
    assert [n for n, _ in captured] == [2, 3, 1, 2]
