"""JanusFlow's ShallowUViT encoder/decoder (fastjanus/models/uvit.py).

Names and shapes are checked against a list taken from the official modules (tests/data/janusflow-uvit-keys.txt);
the numerics against diffusers' time embedding and against plain re-statements of each formula here.
"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastjanus.flow_config import FLOW_PRESETS, UViTEncoderConfig
from fastjanus.models.uvit import (ConvNextBlock, GlobalResponseNorm, ShallowUViTDecoder, ShallowUViTEncoder,
                                   TimestepEmbedding, timestep_embedding)

KEYS = Path(__file__).parent / "data" / "janusflow-uvit-keys.txt"
T_VALUES = [0.0, 1.0, 33.333332, 500.0, 966.6666, 999.99]


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (a fresh GRN is the identity and a fresh RMSNorm scales by 1, which would hide
    mistakes in them). Scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):  # RMSNorm
                p.copy_(1 + 0.2 * r)
            elif "channelwise_norm" in name:  # GRN
                p.copy_(0.3 * r)
            else:
                p.copy_(r / math.sqrt(max(1, p[0].numel())))
    return module.eval()


def _tiny():
    cfg = FLOW_PRESETS["tiny-flow"]()
    enc = _randomize(ShallowUViTEncoder(cfg.gen_enc), 1)
    dec = _randomize(ShallowUViTDecoder(cfg.gen_dec), 2)
    return cfg, enc, dec


# ----------------------------------------------------------------------------------------- checkpoint layout
def test_state_dict_matches_official_keys():
    want = {}
    for line in KEYS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split()
            want[key] = tuple(int(s) for s in shape.split(","))
    cfg = FLOW_PRESETS["janusflow-1.3b"]()
    with torch.device("meta"):
        enc, dec = ShallowUViTEncoder(cfg.gen_enc), ShallowUViTDecoder(cfg.gen_dec)
    got = {f"vision_gen_enc_model.{k}": tuple(v.shape) for k, v in enc.state_dict().items()}
    got.update({f"vision_gen_dec_model.{k}": tuple(v.shape) for k, v in dec.state_dict().items()})
    assert len(want) == 54
    assert got == want


def test_mid_block_needs_matching_channels():
    with pytest.raises(ValueError, match="block_out_channels"):
        ShallowUViTEncoder(UViTEncoderConfig(block_out_channels=(32, 64), hidden_size=16, layers_in_middle=1))


# ----------------------------------------------------------------------------------------- shapes
def test_shapes_tiny():
    cfg, enc, dec = _tiny()
    L, g = cfg.latent_size, cfg.grid
    z = torch.randn(2, cfg.latent_channels, L, L)
    with torch.no_grad():
        x_emb, t_emb = enc(z, torch.tensor([10.0, 900.0]))
        v = dec(torch.randn(2, cfg.gen_dec.in_channels, g, g), x_emb, t_emb)
    assert (L, g) == (8, 4)
    assert x_emb.shape == (2, cfg.gen_enc.channels, g, g)
    assert t_emb.shape == (2, cfg.language.hidden_size)
    assert v.shape == z.shape
    assert torch.isfinite(v).all()


def test_shapes_janusflow_13b_meta():
    cfg = FLOW_PRESETS["janusflow-1.3b"]()
    with torch.device("meta"):
        enc, dec = ShallowUViTEncoder(cfg.gen_enc), ShallowUViTDecoder(cfg.gen_dec)
        z = torch.empty(2, 4, 48, 48)
        x_emb, t_emb = enc(z, torch.empty(2))
        v = dec(torch.empty(2, 768, 24, 24), x_emb, t_emb)
    assert x_emb.shape == (2, 768, 24, 24) and cfg.num_gen_tokens == 576
    assert t_emb.shape == (2, 2048)
    assert v.shape == (2, 4, 48, 48)


def test_dtypes_bf16_model_fp32_t():
    cfg, enc, dec = _tiny()
    enc, dec = enc.bfloat16(), dec.bfloat16()
    g = cfg.grid
    with torch.no_grad():
        x_emb, t_emb = enc(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([966.6666]))
        v = dec(torch.randn(1, cfg.gen_dec.in_channels, g, g, dtype=torch.bfloat16), x_emb, t_emb)
    assert x_emb.dtype == t_emb.dtype == v.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- time embedding
@pytest.mark.parametrize("dim", [768, 64, 15])
def test_timestep_embedding_matches_diffusers(dim):
    emb = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor(T_VALUES, dtype=torch.float32)
    ref = emb.Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    got = timestep_embedding(t, dim)
    assert got.dtype == torch.float32 and got.shape == (len(T_VALUES), dim)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # cos half first: at t = 0 the first half is 1, the second 0.
    half = dim // 2
    assert torch.equal(got[0, :half], torch.ones(half)) and torch.equal(got[0, half:], torch.zeros(dim - half))


def test_timestep_embedding_keeps_fp32_time():
    t = torch.tensor([966.6666])
    rounded = t.bfloat16().float()  # what the official demo's bf16 t carries
    assert rounded.item() == 968.0
    exact, off = timestep_embedding(t, 768), timestep_embedding(rounded, 768)
    assert (exact - off).abs().max() > 0.5  # the high frequencies see a different time altogether
    with pytest.raises(TypeError, match="float32"):
        timestep_embedding(t.bfloat16(), 768)


@pytest.mark.parametrize("bias", [True, False])
def test_time_embed_matches_diffusers(bias):
    emb = pytest.importorskip("diffusers.models.embeddings")
    ref = emb.TimestepEmbedding(64, 96, sample_proj_bias=bias)
    ours = TimestepEmbedding(64, 96, bias=bias)
    assert set(ref.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_encoder_t_emb_matches_diffusers_pipeline():
    emb = pytest.importorskip("diffusers.models.embeddings")
    cfg, enc, _ = _tiny()
    C, D = cfg.gen_enc.channels, cfg.language.hidden_size
    ref = emb.TimestepEmbedding(C, D)
    ref.load_state_dict(enc.time_embed.state_dict())
    t = torch.tensor(T_VALUES)
    with torch.no_grad():
        want = ref(emb.Timesteps(C, flip_sin_to_cos=True, downscale_freq_shift=0)(t))
        _, got = enc(torch.randn(len(T_VALUES), 4, 8, 8), t)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- formulas
def _rms(x, w, eps):  # over the last dim
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _grn(x, w, b):  # x [B, H, W, C]: ConvNeXt-V2's global response normalisation
    norms = torch.sqrt((x * x).sum(dim=(1, 2), keepdim=True))  # per (batch, channel)
    rel = norms / (norms.mean(-1, keepdim=True) + 1e-6)
    return w * (x * rel) + b + x


def _convnext(blk, x, t_emb):
    C = x.shape[1]
    h = F.conv2d(x, blk.depthwise.weight, blk.depthwise.bias, padding=3, groups=C).permute(0, 2, 3, 1)
    h = _rms(h, blk.norm.weight, blk.norm.eps)
    h = h @ blk.channelwise_linear_1.weight.T + blk.channelwise_linear_1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = _grn(h, blk.channelwise_norm.weight, blk.channelwise_norm.bias)
    h = h @ blk.channelwise_linear_2.weight.T + blk.channelwise_linear_2.bias
    x = x + h.permute(0, 3, 1, 2)
    ss = (t_emb * torch.sigmoid(t_emb)) @ blk.cond_embeds_mapper.weight.T + blk.cond_embeds_mapper.bias
    scale, shift = ss[:, :C], ss[:, C:]
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


def test_grn_formula():
    grn = _randomize(GlobalResponseNorm(12))
    x = torch.randn(2, 5, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(grn(x), _grn(x, grn.weight, grn.bias), rtol=1e-5, atol=1e-5)


def test_convnext_film_formula():
    blk = _randomize(ConvNextBlock(8, hidden_size=16, eps=1e-6, bias=True))
    x, t_emb = torch.randn(3, 8, 6, 6), torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(blk(x, t_emb), _convnext(blk, x, t_emb), rtol=1e-4, atol=1e-4)


def test_encoder_decoder_formula():
    cfg, enc, dec = _tiny()
    e = cfg.gen_enc
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([250.0, 966.6666])
    xin = torch.randn(2, cfg.gen_dec.in_channels, cfg.grid, cfg.grid)
    with torch.no_grad():
        x_emb, t_emb = enc(z, t)
        v = dec(xin, x_emb, t_emb)
        # encoder
        half = e.channels // 2
        ang = t[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half) / half)
        s = torch.cat([ang.cos(), ang.sin()], -1)
        te = enc.time_embed
        h = F.silu(s @ te.linear_1.weight.T + te.linear_1.bias)
        want_t = h @ te.linear_2.weight.T + te.linear_2.bias
        x = F.conv2d(z, enc.in_conv.weight, enc.in_conv.bias, stride=e.stride, padding=e.padding)
        for blk in enc.mid_block.res_blocks:
            x = _convnext(blk, x, want_t)
        torch.testing.assert_close(t_emb, want_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_emb, x, rtol=1e-4, atol=1e-4)
        # decoder (fed our x_emb/t_emb, so only its own error counts)
        y = _rms(xin.permute(0, 2, 3, 1), dec.input_norm.weight, dec.input_norm.eps).permute(0, 3, 1, 2)
        y = torch.cat([y, x_emb], 1)
        for blk in dec.mid_block.res_blocks:
            y = _convnext(blk, y, t_emb)
        for up in dec.out_convs:
            B, _, gh, gw = y.shape
            y = _rms(y.permute(0, 2, 3, 1), up.norm.weight, up.norm.eps)
            y = y @ up.unpatch_conv.weight[:, :, 0, 0].T + up.unpatch_conv.bias  # 1×1 conv, [B, gh, gw, o·4]
            o = y.shape[-1] // 4
            # pixel shuffle: channel c·4 + i·2 + j goes to pixel (2·row + i, 2·col + j) of output channel c
            y = y.reshape(B, gh, gw, o, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, o, 2 * gh, 2 * gw)
        torch.testing.assert_close(v, y, rtol=1e-4, atol=1e-4)


def test_batch_independence():
    cfg, enc, dec = _tiny()
    B, g = 3, cfg.grid
    z, t = torch.randn(B, 4, 8, 8), torch.tensor([0.0, 500.0, 966.6666])
    xin = torch.randn(B, cfg.gen_dec.in_channels, g, g)
    with torch.no_grad():
        x_emb, t_emb = enc(z, t)
        v = dec(xin, x_emb, t_emb)
        for i in range(B):
            xi, ti = enc(z[i:i + 1], t[i:i + 1])
            vi = dec(xin[i:i + 1], xi, ti)
            torch.testing.assert_close(xi, x_emb[i:i + 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ti, t_emb[i:i + 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(vi, v[i:i + 1], rtol=1e-5, atol=1e-5)
