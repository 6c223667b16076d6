"""Flash-decoding attention kernel vs the torch reference: ragged lengths, GQA, head dims, dtypes, splits."""
import pytest
import torch

pytest.importorskip("triton")
from fastjanus.kernels.decode_attention import decode_attention  # noqa: E402
from fastjanus.kernels.reference import decode_attention_ref, rope_ref, rope_table  # noqa: E402

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
