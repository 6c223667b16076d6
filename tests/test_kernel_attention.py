"""Flash-decoding attention kernel vs the torch reference: ragged lengths, GQA, head dims, dtypes, splits."""
import pytest
import torch

pytest.importorskip("triton")
from fastjanus.kernels.decode_attention import decode_attention  # noqa: E402
from fastjanus.kernels.reference import decode_attention_ref  # noqa: E402

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
