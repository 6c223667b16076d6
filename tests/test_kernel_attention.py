"""Flash-decoding attention kernel vs the torch reference: ragged lengths, GQA, head dims, dtypes, splits."""
import pytest
import torch

pytest.importorskip("triton")
from fastjanus.kernels.decode_attention import decode_attention  # noqa: E402
from fastjanus.kernels.reference import decode_attention_ref, fp8_quantize, rope_ref, rope_table  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 runs the same math in a different order; half types round the output once (and inputs are shared).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _case(B, H, Hkv, D, S, lengths, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    q, kn, vn = r(B, H, D), r(B, Hkv, D), r(B, Hkv, D)
    kc, vc = r(B, Hkv, S, D), r(B, Hkv, S, D)
    return q, kn, vn, kc, vc, torch.tensor(lengths, dtype=torch.int32, device=DEV)


def _check(B, H, Hkv, D, S, lengths, dtype, seed=0, **kw):
    q, kn, vn, kc, vc, L = _case(B, H, Hkv, D, S, lengths, dtype, seed)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = decode_attention_ref(q.float(), kn.float(), vn.float(), kc_ref.float(), vc_ref.float(), L)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kn, vn, kc, vc, L, out=out, **kw)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)
    rows = torch.arange(B, device=DEV)
    # the new token landed at slot lengths[b], bit-exact, and nothing else in the cache moved
    assert torch.equal(kc[rows, :, L.long()], kn) and torch.equal(vc[rows, :, L.long()], vn)
    untouched = torch.ones(B, S, dtype=torch.bool, device=DEV)
    untouched[rows, L.long()] = False
    assert torch.equal(kc.transpose(1, 2)[untouched], kc_ref.transpose(1, 2)[untouched])
    assert torch.equal(vc.transpose(1, 2)[untouched], vc_ref.transpose(1, 2)[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 2), (8, 1)])
def test_ragged_lengths_and_gqa(dtype, H, Hkv):
    # lengths 0 (only the new token), 1, not multiples of the block, and S − 1 (the last free slot)
    _check(B=5, H=H, Hkv=Hkv, D=16, S=71, lengths=[0, 1, 17, 33, 70], dtype=dtype, block_n=16)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_dims_of_the_published_models(D, dtype):
    _check(B=2, H=2, Hkv=2, D=D, S=45, lengths=[44, 9], dtype=dtype, seed=D)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 9])
def test_any_split_count_gives_the_same_answer(num_splits):
    # 9 splits of 16 slots over S = 130: most splits of the short rows are empty and must drop out of the merge
    _check(B=3, H=2, Hkv=1, D=32, S=130, lengths=[129, 5, 64], dtype=torch.float32, block_n=16,
           num_splits=num_splits)


def test_consecutive_steps_match_the_reference_loop():
    B, H, Hkv, D, S = 2, 4, 2, 16, 20
    q, kn, vn, kc, vc, L = _case(B, H, Hkv, D, S, [3, 0], torch.float32, 1)
    kc2, vc2, L2 = kc.clone(), vc.clone(), L.clone()
    for step in range(5):
        q, kn, vn = q.roll(step, -1), kn.roll(1, 0), vn * 0.9
        out = decode_attention(q, kn, vn, kc, vc, L, block_n=16)
        ref = decode_attention_ref(q, kn, vn, kc2, vc2, L2)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
        L += 1
        L2 += 1
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_launcher_checks_shapes():
    q, kn, vn, kc, vc, L = _case(2, 4, 2, 16, 8, [1, 2], torch.float32, 0)
    with pytest.raises(AssertionError, match="int32"):
        decode_attention(q, kn, vn, kc, vc, L.long())
    with pytest.raises(AssertionError, match="k_new/v_new"):
        decode_attention(q, kn[:, :1], vn, kc, vc, L)
    with pytest.raises(AssertionError, match="head dim"):
        decode_attention(q[..., :12], kn[..., :12], vn[..., :12], kc[..., :12], vc[..., :12], L)


def _fused_case(B, H, Hkv, D, S, lengths, dtype, seed):
    """q, k_new, v_new as views of one [B, (H + 2·Hkv)·D] QKV projection output, as the decode step passes them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    qkv = r(B, (H + 2 * Hkv) * D)
    q = qkv[:, :H * D].view(B, H, D)
    kn = qkv[:, H * D:(H + Hkv) * D].view(B, Hkv, D)
    vn = qkv[:, (H + Hkv) * D:].view(B, Hkv, D)
    return q, kn, vn, r(B, Hkv, S, D), r(B, Hkv, S, D), torch.tensor(lengths, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 16), (6, 2, 32), (2, 2, 128)])
def test_rotary_inside_the_kernel_on_fused_qkv_views(dtype, H, Hkv, D):
    # positions = lengths: 0, odd, the last slot; the table is longer than the cache, as the model's is
    B, S = 3, 37
    lengths = [0, 17, S - 1]
    q, kn, vn, kc, vc, L = _fused_case(B, H, Hkv, D, S, lengths, dtype, seed=H * D)
    table = rope_table(64, D, 10000.0, device=DEV)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = decode_attention_ref(q.float(), kn.float(), vn.float(), kc_ref.float(), vc_ref.float(), L, rope=table)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kn, vn, kc, vc, L, rope=table, out=out, block_n=16, num_splits=3)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)
    rows = torch.arange(B, device=DEV)
    # the cache holds the rotated key, rounded once to the dtype: the reference's values within one ulp (the
    # rotation is the same fp32 arithmetic; a GPU may contract it to an FMA, and Triton 3.9's interpreter
    # truncates fp32 → bf16 instead of rounding to nearest, measured: half of random values differ by an ulp)
    want_k = rope_ref(kn, L, table)
    ulp = {torch.float32: 2.0 ** -22, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    torch.testing.assert_close(kc[rows, :, L.long()], want_k, rtol=ulp, atol=1e-6)
    if DEV == "cpu" and dtype != torch.bfloat16:
        assert torch.equal(kc[rows, :, L.long()], want_k)
    assert torch.equal(vc[rows, :, L.long()], vn)
    # the inputs are not rotated in place
    assert not torch.equal(want_k, kn) and torch.equal(kn, _fused_case(B, H, Hkv, D, S, lengths, dtype, H * D)[1])


def test_rotary_at_position_zero_is_the_identity():
    q, kn, vn, kc, vc, L = _fused_case(2, 2, 2, 16, 9, [0, 0], torch.float32, 5)
    table = rope_table(16, 16, 10000.0, device=DEV)
    kc2, vc2 = kc.clone(), vc.clone()
    a = decode_attention(q, kn, vn, kc, vc, L, rope=table, block_n=16)
    b = decode_attention(q, kn, vn, kc2, vc2, L, block_n=16)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(kc, kc2)


def test_rope_table_matches_the_per_step_computation():
    from fastjanus.models.llama import rotary_cos_sin
    pos = torch.tensor([[0, 1, 7, 511]])
    cos, sin = rotary_cos_sin(pos, 64, 10000.0, torch.float32)  # [1, 1, 4, 64]
    t = rope_table(512, 64, 10000.0)[pos[0]]  # [4, 2, 32]
    assert torch.equal(cos[0, 0, :, :32], t[:, 0]) and torch.equal(sin[0, 0, :, 32:], t[:, 1])


# ---- FP8 (e4m3) cache with per-kv-head fp32 scales ----------------------------------------------------------------
# Measured max |Δ|/(1 + |ref|) against the fp32 dequantize-then-attend reference over FP8_CASES with 8 seeds each
# (CPU, Triton 3.9 interpreter): fp32 q 5.7e-7, fp16 q 8.1e-4, bf16 q 8.6e-3; the saturating case (fp16) 9e-5.
# The error is the dot dtype's: q·scale and the probabilities are rounded to it (the fp8 values are exact in
# it, and the reference reads the same bytes). A kernel ignoring v_scale is off by 137, ignoring k_scale by 1.05.
FP8_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
E4M3_MAX = 0x7E  # the byte of +448: e4m3fn has no infinities and 0x7F/0xFF are NaN


def _fp8_case(B, H, Hkv, D, S, lengths, dtype, seed, spread=1.0):
    """q, k_new, v_new in dtype (views of one fused QKV row, as the decode step passes them); fp8 caches quantized
    from values whose size differs per kv head, with scales amax/448 · spread (spread < 1 saturates some)."""
    q, kn, vn, kf, vf, L = _fused_case(B, H, Hkv, D, S, lengths, torch.float32, seed)
    size = torch.linspace(0.25, 2.0, Hkv, device=DEV)  # one scale per kv head: they must not be mixed up
    kn, vn, kf, vf = kn * size[:, None], vn * size[:, None] * 0.5, kf * size[:, None, None], \
        vf * size[:, None, None] * 0.5
    ks = (kf.abs().amax(dim=(0, 2, 3)) / 448 * spread).contiguous()
    vs = (vf.abs().amax(dim=(0, 2, 3)) / 448 * spread).contiguous()
    kc, vc = fp8_quantize(kf, ks[:, None, None]), fp8_quantize(vf, vs[:, None, None])
    q, kn, vn = torch.cat((q.flatten(1), kn.flatten(1), vn.flatten(1)), 1).to(dtype).split(
        (H * D, Hkv * D, Hkv * D), dim=1)  # views of one fused row again
    return q.unflatten(1, (H, D)), kn.unflatten(1, (Hkv, D)), vn.unflatten(1, (Hkv, D)), kc, vc, L, ks, vs


def _fp8_run(B, H, Hkv, D, S, lengths, dtype, seed=0, rope=False, spread=1.0, kernel_scales=None, **kw):
    """The kernel and the reference on one case: (out, ref, kernel caches, reference caches)."""
    q, kn, vn, kc, vc, L, ks, vs = _fp8_case(B, H, Hkv, D, S, lengths, dtype, seed, spread)
    table = rope_table(S + 7, D, 10000.0, device=DEV) if rope else None
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = decode_attention_ref(q.float(), kn.float(), vn.float(), kc_ref, vc_ref, L, rope=table, k_scale=ks,
                               v_scale=vs)
    out = torch.full_like(q, float("nan"))
    ks_k, vs_k = kernel_scales(ks, vs) if kernel_scales else (ks, vs)
    decode_attention(q, kn, vn, kc, vc, L, rope=table, out=out, k_scale=ks_k, v_scale=vs_k, **kw)
    return out, ref, (kc, vc), (kc_ref, vc_ref)


def _fp8_err(out, ref):
    return ((out.float() - ref).abs() / (1 + ref.abs())).max().item()  # NaN (an unwritten output) fails too


def _fp8_check(out, ref, caches, caches_ref, dtype):
    err = _fp8_err(out, ref)
    assert err <= FP8_TOL[dtype], f"max |Δ|/(1+|ref|) = {err:.3g} > {FP8_TOL[dtype]}"
    # the whole cache, bit for bit: the appended (rotated, quantized) token and every other slot untouched
    for c, c_ref in zip(caches, caches_ref):
        assert torch.equal(c.view(torch.uint8), c_ref.view(torch.uint8))
    return err


# A covering subset, not the product: q dtypes fp32/fp16/bf16, GQA groups 1/2/4, head dims 16..128, odd S with
# lengths 0, unaligned and S − 1, one split and several (9: most of a short row's splits are empty), rope on/off.
FP8_CASES = [
    # dtype, H, Hkv, D, S, lengths, num_splits, rope
    (torch.float32, 4, 4, 16, 71, [0, 1, 17, 33, 70], 1, False),
    (torch.float32, 8, 2, 32, 37, [36, 0, 20], 3, True),
    (torch.float16, 4, 2, 64, 45, [44, 9], 1, True),
    (torch.float16, 4, 1, 16, 71, [70, 5, 40], 5, False),
    (torch.bfloat16, 4, 4, 128, 33, [32, 0], 2, True),
    (torch.bfloat16, 8, 2, 16, 71, [0, 1, 17, 70], 1, False),
    (torch.bfloat16, 6, 3, 32, 130, [129, 5, 64], 9, True),
]


@pytest.mark.parametrize("dtype,H,Hkv,D,S,lengths,num_splits,rope", FP8_CASES,
                         ids=[f"{str(c[0])[6:]}-H{c[1]}-Hkv{c[2]}-D{c[3]}-S{c[4]}-sp{c[6]}{'-rope' * c[7]}"
                              for c in FP8_CASES])
def test_fp8_cache_matches_the_dequantizing_reference(dtype, H, Hkv, D, S, lengths, num_splits, rope):
    out, ref, caches, caches_ref = _fp8_run(len(lengths), H, Hkv, D, S, lengths, dtype, seed=D + H, rope=rope,
                                            block_n=16, num_splits=num_splits)
    _fp8_check(out, ref, caches, caches_ref, dtype)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_saturating_scales_clamp_and_never_give_nan(num_splits):
    # scales at a tenth of amax/448: many cached values and most of the new token saturate at ±448
    B, H, Hkv, D, S, lengths = 3, 4, 2, 32, 37, [36, 0, 20]
    out, ref, (kc, vc), caches_ref = _fp8_run(B, H, Hkv, D, S, lengths, torch.float16, seed=3, rope=True,
                                              spread=0.1, block_n=16, num_splits=num_splits)
    _fp8_check(out, ref, (kc, vc), caches_ref, torch.float16)
    assert torch.isfinite(out).all()
    rows, L = torch.arange(B, device=DEV), torch.tensor(lengths, device=DEV)
    for c in (kc, vc):
        bits = c.view(torch.uint8)
        assert ((bits & 0x7F) != 0x7F).all(), "a NaN byte in the cache"
        new = bits[rows, :, L] & 0x7F  # the appended token's magnitudes
        assert (new == E4M3_MAX).float().mean() > 0.5 and (new <= E4M3_MAX).all()


@pytest.mark.parametrize("broken", ["ignores v_scale", "ignores k_scale"])
def test_fp8_comparison_catches_a_kernel_that_ignores_a_scale(broken):
    # what such a kernel computes: the same launch with that scale replaced by ones (the scales are ~0.01)
    ones = {"ignores v_scale": lambda ks, vs: (ks, torch.ones_like(vs)),
            "ignores k_scale": lambda ks, vs: (torch.ones_like(ks), vs)}[broken]
    out, ref, _, _ = _fp8_run(2, 4, 2, 16, 21, [20, 3], torch.float32, seed=1, kernel_scales=ones, block_n=16)
    assert _fp8_err(out, ref) > 10 * FP8_TOL[torch.bfloat16]  # the output alone fails, even at bf16's tolerance


def test_fp8_consecutive_steps_match_the_reference_loop():
    B, H, Hkv, D, S = 2, 4, 2, 16, 20
    q, kn, vn, kc, vc, L, ks, vs = _fp8_case(B, H, Hkv, D, S, [3, 0], torch.float16, 2)
    kc2, vc2, L2 = kc.clone(), vc.clone(), L.clone()
    table = rope_table(S, D, 10000.0, device=DEV)
    for step in range(4):
        q, kn, vn = q.roll(step, -1), kn.roll(1, 0), vn * 0.9
        out = decode_attention(q, kn, vn, kc, vc, L, rope=table, block_n=16, k_scale=ks, v_scale=vs)
        ref = decode_attention_ref(q.float(), kn.float(), vn.float(), kc2, vc2, L2, rope=table, k_scale=ks,
                                   v_scale=vs)
        _fp8_check(out, ref, (kc, vc), (kc2, vc2), torch.float16)
        L += 1
        L2 += 1


def test_fp8_launcher_checks_scales():
    q, kn, vn, kc, vc, L, ks, vs = _fp8_case(2, 4, 2, 16, 8, [1, 2], torch.bfloat16, 0)
    with pytest.raises(AssertionError, match="both k_scale and v_scale"):
        decode_attention(q, kn, vn, kc, vc, L, k_scale=ks)
    with pytest.raises(AssertionError, match="both k_scale and v_scale"):
        decode_attention(q, kn, vn, kc, vc, L, v_scale=vs)
    with pytest.raises(AssertionError, match="need k_scale and v_scale"):
        decode_attention(q, kn, vn, kc, vc, L)
    with pytest.raises(AssertionError, match=r"k_scale must be a contiguous fp32 \[2\]"):
        decode_attention(q, kn, vn, kc, vc, L, k_scale=ks[:1], v_scale=vs)
    with pytest.raises(AssertionError, match=r"v_scale must be a contiguous fp32 \[2\]"):
        decode_attention(q, kn, vn, kc, vc, L, k_scale=ks, v_scale=vs.half())
    with pytest.raises(AssertionError, match=r"k_scale must be a contiguous fp32 \[2\]"):
        decode_attention(q, kn, vn, kc, vc, L, k_scale=ks.repeat(2)[::2], v_scale=vs)
    with pytest.raises(AssertionError, match=r"v_scale must be a contiguous fp32 \[2\]"):
        decode_attention(q, kn, vn, kc, vc, L, k_scale=ks, v_scale=vs[None])
    with pytest.raises(AssertionError, match="caches must be float8_e4m3fn"):
        decode_attention(q, kn, vn, kc.bfloat16(), vc.bfloat16(), L, k_scale=ks, v_scale=vs)
    with pytest.raises(AssertionError, match="share fp32, fp16 or bf16"):
        decode_attention(q, kn.half(), vn, kc, vc, L, k_scale=ks, v_scale=vs)


def test_fp8_quantize_saturates_and_rounds_to_nearest_even():
    x = torch.tensor([1e6, -1e6, 448.0, 464.0, 0.0, -0.0, 1.0 + 1 / 16, 1.0 + 3 / 16, 2.0 ** -10, 3 * 2.0 ** -10])
    got = fp8_quantize(x, torch.tensor(1.0)).float()
    # ties go to the even mantissa: 1 + 1/16 → 1, 1 + 3/16 → 1.25, 2^−10 (half the smallest subnormal) → 0,
    # 1.5 · 2^−9 → 2^−8
    want = torch.tensor([448.0, -448.0, 448.0, 448.0, 0.0, -0.0, 1.0, 1.25, 0.0, 2.0 ** -8])
    assert torch.equal(got, want) and torch.signbit(got[5])
    assert torch.equal(fp8_quantize(x, torch.tensor(4.0)).float(), (x / 4).clamp(-448, 448).to(torch.float8_e4m3fn)
                       .float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rope", [False, True])
def test_fp8_cache_at_pro_1b_shapes_on_the_gpu(dtype, rope):
    B, H, D, S = 32, 16, 128, 700  # Janus-Pro-1B: 16 heads of 128, no GQA
    q, kn, vn, kc, vc, L, ks, vs = _fp8_case(B, H, H, D, S, [0] * B, dtype, seed=7)
    L.copy_(torch.randint(0, S, (B,), generator=torch.Generator().manual_seed(0), dtype=torch.int32))
    L[0], L[-1] = S - 1, 0
    table = rope_table(S, D, 10000.0, device=DEV) if rope else None
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = decode_attention_ref(q.float(), kn.float(), vn.float(), kc_ref, vc_ref, L, rope=table, k_scale=ks,
                               v_scale=vs)
    for splits in (None, 1):  # the launcher's choice (several on an H100 at these shapes) and one
        kc2, vc2 = kc.clone(), vc.clone()
        out = torch.full_like(q, float("nan"))
        decode_attention(q, kn, vn, kc2, vc2, L, rope=table, out=out, k_scale=ks, v_scale=vs, num_splits=splits)
        err = _fp8_err(out, ref)
        assert err <= FP8_TOL[dtype], f"max |Δ|/(1+|ref|) = {err:.3g}"
        assert torch.equal(vc2.view(torch.uint8), vc_ref.view(torch.uint8))
        if rope:  # the GPU may contract the rotation to FMAs: the key may land one e4m3 step (2^−3) away
            torch.testing.assert_close(kc2.float(), kc_ref.float(), rtol=2.0 ** -3, atol=2.0 ** -9)
        else:
            assert torch.equal(kc2.view(torch.uint8), kc_ref.view(torch.uint8))
