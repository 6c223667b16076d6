"""The SDXL VAE decoder (fastjanus/models/sdxl_vae.py): parity with diffusers' AutoencoderKL (the oracle; the
runtime never imports diffusers), key sets, fp16 safety, loading and config errors. All on tiny configs, CPU."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastjanus.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from fastjanus.models.sdxl_vae import (SDXL_VAE, WEIGHT_FILES, VAEConfig, VAEDecoder, load_vae, tiny_vae,
                                       vae_latent_check, vae_tensor_shapes, write_random_vae)

ST = WEIGHT_FILES[0]
PARITY_ATOL = 1e-5  # fp32, ours vs diffusers (observed 2.8e-6 on outputs of magnitude ~3)
FP16_ATOL = 1e-2  # safe fp16 vs fp32 on the same fp16 weights (observed <= 3.8e-3; plain fp16, normal weights: 4.4e-3)


def _diffusers():
    return pytest.importorskip("diffusers")


def _ref_decode(ref, cfg: VAEConfig, latents):
    """diffusers' decode convention (SD3/Flux pipelines): decode(latents / scaling_factor + shift_factor)."""
    z = latents / cfg.scaling_factor
    if cfg.shift_factor is not None:
        z = z + cfg.shift_factor
    return ref.decode(z).sample


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """The tiny VAE (seed 3) in each attention-key variant; all hold the same values."""
    cfg = tiny_vae()
    dirs = {}
    for old in (False, True):
        for conv in (False, True):
            dirs[old, conv] = write_random_vae(tmp_path_factory.mktemp(f"vae-{int(old)}{int(conv)}"), cfg, seed=3,
                                               old_attention_names=old, attention_as_conv=conv)
    return dirs


@pytest.fixture(scope="module")
def diffusers_tiny(tiny_dirs):
    d = _diffusers()
    return d.AutoencoderKL.from_pretrained(tiny_dirs[False, False]).eval()


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("old,conv", [(False, False), (True, False), (True, True), (False, True)],
                         ids=["new-names", "old-names", "old-names-conv", "new-names-conv"])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_diffusers(tiny_dirs, diffusers_tiny, batch, old, conv):
    cfg = tiny_vae()
    ours = load_vae(tiny_dirs[old, conv], "cpu", torch.float32)
    latents = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(batch * 10 + old + 2 * conv))
    with torch.no_grad():
        got, want = ours(latents), _ref_decode(diffusers_tiny, cfg, latents)
    assert got.shape == (batch, 3, 64, 64) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= PARITY_ATOL


def test_old_names_agree_with_diffusers_conversion(tiny_dirs):
    """diffusers renames query/key/value/proj_attn itself when loading; its result must equal ours."""
    d = _diffusers()
    ref = d.AutoencoderKL.from_pretrained(tiny_dirs[True, False]).eval()
    ours = load_vae(tiny_dirs[True, False], "cpu", torch.float32)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert (ours(latents) - _ref_decode(ref, tiny_vae(), latents)).abs().max().item() <= PARITY_ATOL


def test_variant_config_matches_diffusers(tmp_path):
    """No mid-block attention, no post_quant_conv, 2 layers per block, a shift_factor, non-square latents."""
    d = _diffusers()
    cfg = VAEConfig(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=3,
                    out_channels=2, scaling_factor=0.5, shift_factor=0.25, use_post_quant_conv=False,
                    mid_block_add_attention=False, use_quant_conv=False)
    write_random_vae(tmp_path, cfg, seed=1)
    ref = d.AutoencoderKL.from_pretrained(tmp_path).eval()
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == vae_tensor_shapes(cfg)
    ours = load_vae(tmp_path, "cpu", torch.float32)
    assert ours.post_quant_conv is None and cfg.downsample == 4
    latents = torch.randn(2, 3, 5, 7)
    with torch.no_grad():
        got, want = ours(latents), _ref_decode(ref, cfg, latents)
    assert got.shape == (2, 2, 20, 28)
    assert (got - want).abs().max().item() <= PARITY_ATOL


def test_bin_and_bf16_files_load(tmp_path, tiny_dirs):
    cfg = tiny_vae()
    ref = load_vae(tiny_dirs[False, False], "cpu", torch.float32)
    torch.save(load_file(tiny_dirs[False, False] / ST), tmp_path / WEIGHT_FILES[1])
    (tmp_path / "config.json").write_text((tiny_dirs[False, False] / "config.json").read_text())
    from_bin = load_vae(tmp_path, "cpu", torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), from_bin.state_dict().values()))
    bf = write_random_vae(tmp_path / "bf16", cfg, seed=3, dtype=torch.bfloat16)
    assert load_file(bf / ST)["decoder.conv_in.weight"].dtype == torch.bfloat16
    m = load_vae(bf, "cpu", torch.float32)
    assert m.dtype == torch.float32


# ------------------------------------------------------------------------------------------- keys
def test_sdxl_preset_keys_match_diffusers():
    d = _diffusers()
    with torch.device("meta"):
        ref = d.AutoencoderKL.from_config(SDXL_VAE.to_dict())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert vae_tensor_shapes(SDXL_VAE) == want
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VAEDecoder(SDXL_VAE).state_dict().items()}
    assert ours == {k: v for k, v in want.items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert len(ours) == 140 and SDXL_VAE.downsample == 8


def test_written_file_has_diffusers_full_key_set(tiny_dirs):
    d = _diffusers()
    ref = d.AutoencoderKL(**{k: v for k, v in tiny_vae().to_dict().items() if not k.startswith("_")})
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in load_file(tiny_dirs[False, False] / ST).items()}
    assert got == want
    old = load_file(tiny_dirs[True, True] / ST)
    assert {"decoder.mid_block.attentions.0.query.weight", "encoder.mid_block.attentions.0.proj_attn.bias"} <= set(old)
    assert old["decoder.mid_block.attentions.0.query.weight"].shape == (32, 32, 1, 1)
    assert not any(".to_q." in k for k in old)


def test_config_presets_and_roundtrip(tmp_path):
    d = _diffusers()
    sd = SDXL_VAE.to_dict()
    assert sd["_class_name"] == "AutoencoderKL" and sd["block_out_channels"] == [128, 256, 512, 512]
    assert (sd["layers_per_block"], sd["norm_num_groups"], sd["latent_channels"]) == (2, 32, 4)
    assert (sd["scaling_factor"], sd["sample_size"], sd["force_upcast"]) == (0.13025, 1024, True)
    for cfg in (SDXL_VAE, tiny_vae()):
        assert VAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert cfg.downsample == 8
        dc = d.AutoencoderKL.load_config(_write_config(tmp_path / str(cfg.block_out_channels[0]), cfg.to_dict()))
        assert dc["block_out_channels"] == list(cfg.block_out_channels)
    # keys a config.json leaves out take AutoencoderKL's defaults; unknown ones are kept
    c = VAEConfig.from_dict({"_diffusers_version": "0.18.0", "block_out_channels": [32]})
    assert (c.scaling_factor, c.layers_per_block, c.up_block_types) == (0.18215, 1, ("UpDecoderBlock2D",))
    assert (c.shift_factor, c.use_post_quant_conv, c.mid_block_add_attention, c.downsample) == (None, True, True, 1)
    assert c.extra == {"_diffusers_version": "0.18.0"} and c.to_dict()["_diffusers_version"] == "0.18.0"


def _write_config(d, cfg_dict):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg_dict))
    return d


# ------------------------------------------------------------------------------------------- fp16
def _scaled(m: VAEDecoder, mods) -> VAEDecoder:
    m = copy.deepcopy(m)
    with torch.no_grad():
        for path, k in mods:
            mod = m.get_submodule(path)
            mod.weight.mul_(k)
            mod.bias.mul_(k)
    return m


# Weights whose activations leave fp16's range (fp32 maxima as measured): GroupNorm renormalises, so the image
# stays well defined (|out| ~ 3) while the naive fp16 path returns NaN.
FP16_CASES = {
    # the stream from conv_in reaches 4.5e5: handled by the per-block scale, no retry
    "stream": ([("decoder.conv_in", 2 ** 14)], [], []),
    # one resnet's conv2 adds 1.6e5 to a stream of ~30 inside up_blocks.1 (block 2): one retry
    "growth-in-block": ([("decoder.up_blocks.1.resnets.0.conv2", 2 ** 16)], [2], []),
    # conv1's output reaches 1.3e5 (read only by norm2) in up_blocks.2 (block 3): one retry with r = 256
    "conv1": ([("decoder.up_blocks.2.resnets.1.conv1", 2 ** 15)], [3], []),
    # q reaches 1.1e5 inside the mid block's attention (k shrunk so the logits stay O(1)): fp32 fallback
    "attention": ([("decoder.mid_block.attentions.0.to_q", 2 ** 15),
                   ("decoder.mid_block.attentions.0.to_k", 2 ** -15)], [0], [0]),
}
FP16_CASES["all"] = (sum((c[0] for c in FP16_CASES.values()), []), [0, 3], [0])


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    return load_vae(write_random_vae(tmp_path_factory.mktemp("vae16"), tiny_vae(), seed=0), "cpu", torch.float16)


def test_fp16_ops_exist_on_this_cpu():
    """The decoder's ops in half precision (CPU torch supports them all, so the fp16 tests run as is)."""
    x = torch.randn(1, 8, 4, 4, dtype=torch.float16)
    torch.nn.functional.group_norm(x, 4, eps=1e-6)
    torch.nn.functional.conv2d(x, torch.randn(8, 8, 3, 3, dtype=torch.float16), padding=1)
    torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    q = torch.randn(1, 1, 16, 8, dtype=torch.float16)
    assert torch.nn.functional.scaled_dot_product_attention(q, q, q).dtype == torch.float16


def test_fp16_normal_weights(tiny_fp16):
    ref = copy.deepcopy(tiny_fp16).float()
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, naive, safe = ref(latents), tiny_fp16(latents, safe=False), tiny_fp16(latents)
    assert safe.dtype == torch.float16
    assert (naive.float() - want).abs().max().item() <= FP16_ATOL
    assert (safe.float() - want).abs().max().item() <= FP16_ATOL
    stats = tiny_fp16.last_decode_stats
    assert stats["scales"] == [1.0] * 5 and stats["retried"] == [] and stats["fp32_blocks"] == []


@pytest.mark.parametrize("case", list(FP16_CASES))
def test_fp16_safe_path_survives_overflow(tiny_fp16, case):
    mods, retried, fp32_blocks = FP16_CASES[case]
    m16 = _scaled(tiny_fp16, mods)
    ref = copy.deepcopy(m16).float()  # fp32 on the same (fp16-rounded) weights
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, naive, safe = ref(latents), m16(latents, safe=False), m16(latents)
    assert want.isfinite().all() and 1 < want.abs().max().item() < 10
    assert not naive.isfinite().all(), "the weights were meant to overflow fp16"
    assert safe.isfinite().all()
    assert (safe.float() - want).abs().max().item() <= FP16_ATOL
    stats = m16.last_decode_stats
    assert stats["retried"] == retried and stats["fp32_blocks"] == fp32_blocks
    assert all(math.log2(s) == int(math.log2(s)) for s in stats["scales"])  # powers of two
    if case in ("stream", "all"):
        assert max(stats["scales"]) >= 2 ** 11


def test_scaled_stream_is_exact_in_fp32(tiny_fp16):
    """The scaling is by powers of two, so in fp32 (no overflow to avoid) the safe path equals the plain one bit
    for bit: the GroupNorm invariance and the 1/s folding are exact."""
    m = _scaled(tiny_fp16, FP16_CASES["stream"][0]).float()
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        plain, safe = m(latents), m(latents, safe=True)
    assert max(m.last_decode_stats["scales"]) > 1
    assert torch.equal(plain, safe)


def test_bf16_takes_plain_path(tiny_fp16):
    m = copy.deepcopy(tiny_fp16).to(torch.bfloat16)
    m.last_decode_stats = {}
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        out = m(latents)
        want = copy.deepcopy(tiny_fp16).float()(latents)
    assert out.dtype == torch.bfloat16 and m.last_decode_stats == {}
    assert (out.float() - want).abs().max().item() < 0.1


# ------------------------------------------------------------------------------------------- bad input
def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not a directory"):
        load_vae(tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        load_vae(tmp_path)
    _write_config(tmp_path, tiny_vae().to_dict())
    with pytest.raises(CheckpointNotFoundError) as e:
        load_vae(tmp_path)
    assert WEIGHT_FILES[0] in str(e.value) and WEIGHT_FILES[1] in str(e.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        VAEConfig.from_file(tmp_path)


@pytest.mark.parametrize("change,match", [
    ({"act_fn": "gelu"}, "act_fn is 'gelu'.*'silu'"),
    ({"up_block_types": ["AttnUpDecoderBlock2D"] * 4}, "up_block_types contains 'AttnUpDecoderBlock2D'"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types has 3 entries but block_out_channels has 4"),
    ({"block_out_channels": [16, 16, 30, 32]}, r"block_out_channels\[2\] is 30, not a multiple of norm_num_groups 8"),
    ({"norm_num_groups": 0}, "norm_num_groups is 0"),
    ({"scaling_factor": -1}, "scaling_factor is -1"),
    ({"shift_factor": "x"}, "shift_factor is 'x'"),
    ({"_class_name": "AutoencoderTiny"}, "not 'AutoencoderKL'"),
    ({"layers_per_block": 1.5}, "layers_per_block is 1.5"),
])
def test_bad_config(tmp_path, change, match):
    p = _write_config(tmp_path, {**tiny_vae().to_dict(), **change}) / "config.json"
    with pytest.raises(ConfigError, match=match) as e:
        VAEConfig.from_file(tmp_path)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def _edit_weights(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / ST)
    edit(sd)
    save_file(sd, dst / ST)
    return dst


def test_bad_weights(tmp_path, tiny_dirs):
    new, old = tiny_dirs[False, False], tiny_dirs[True, False]
    d = _edit_weights(new, tmp_path / "missing", lambda sd: sd.pop("decoder.conv_out.bias"))
    with pytest.raises(CheckpointError, match="1 missing key.*decoder.conv_out.bias"):
        load_vae(d)
    d = _edit_weights(new, tmp_path / "shape", lambda sd: sd.update({"decoder.conv_in.bias": torch.zeros(5)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped.*decoder.conv_in.bias: file \(5,\) vs model \(32,\)"):
        load_vae(d)
    d = _edit_weights(new, tmp_path / "extra", lambda sd: sd.update({"decoder.extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="unexpected key.*decoder.extra.weight"):
        load_vae(d)
    old_sd = load_file(old / ST)
    d = _edit_weights(new, tmp_path / "both", lambda sd: sd.update(
        {k: v for k, v in old_sd.items() if ".attentions.0.query" in k}))
    with pytest.raises(CheckpointError, match="both current .* and older .* attention key names"):
        load_vae(d)
    d = _edit_weights(new, tmp_path / "neither", lambda sd: [sd.pop(k) for k in list(sd)
                                                             if k.startswith("decoder.mid_block.attentions.0.to_")])
    with pytest.raises(CheckpointError, match="no attention projections for decoder.mid_block.attentions.0"):
        load_vae(d)
    # the encoder's tensors are not needed
    d = _edit_weights(new, tmp_path / "no-encoder", lambda sd: [sd.pop(k) for k in list(sd)
                                                                if k.startswith(("encoder.", "quant_conv."))])
    assert isinstance(load_vae(d), VAEDecoder)


def test_latent_check():
    vae_latent_check(SDXL_VAE, latent_channels=4, latent_size=48, image_size=384)
    vae_latent_check(tiny_vae(), latent_channels=4, latent_size=8, image_size=64)
    with pytest.raises(ConfigError, match="latent_channels is 4 but JanusFlow produces 16-channel") as e:
        vae_latent_check(SDXL_VAE, 16, 48, 384, what="JanusFlow")
    assert "\n" not in str(e.value) and "SDXL VAE preset" in str(e.value)
    with pytest.raises(ConfigError, match=r"upsamples 8× .* 48×48 latents to 768×768 px, which needs 16×"):
        vae_latent_check(SDXL_VAE, 4, 48, 768)
    with pytest.raises(ConfigError, match="non-integer factor"):
        vae_latent_check(SDXL_VAE, 4, 48, 400)
