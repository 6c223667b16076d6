"""Window (multi-query decode) attention kernel vs the torch reference: W new tokens per row with the cached prefix
and the window causally, ragged lengths (window slots past the cache dropped), GQA, head dims, dtypes, splits,
rotary, fused-QKV views. A covering subset, not the product: the interpreter costs ~10 ms per program."""
import pytest
import torch

pytest.importorskip("triton")
from fastjanus.kernels.decode_attention import decode_attention  # noqa: E402
from fastjanus.kernels.reference import rope_table, window_attention_ref  # noqa: E402
from fastjanus.kernels.window_attention import window_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# as tests/test_kernel_attention.py: fp32 is the same math in another order; half types round the output once
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
ULP = {torch.float32: 2.0 ** -22, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _case(W, B, H, Hkv, D, S, lengths, dtype, seed, layout="wb"):
    """q, k_new, v_new as views of one fused QKV projection output, window-major [W, B, ·] as the pass computes
    it ("wb") or batch-major [B, W, ·] transposed ("bw": other W and B strides); random caches."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    n = (H + 2 * Hkv) * D
    qkv = r(W, B, n) if layout == "wb" else r(B, W, n).transpose(0, 1)
    q, kn, vn = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    return (q.unflatten(-1, (H, D)), kn.unflatten(-1, (Hkv, D)), vn.unflatten(-1, (Hkv, D)), r(B, Hkv, S, D),
            r(B, Hkv, S, D), torch.tensor(lengths, dtype=torch.int32, device=DEV))


def _check(W, H, Hkv, D, S, lengths, dtype, *, rope, layout="wb", seed=0, **kw):
    B = len(lengths)
    q, kn, vn, kc, vc, L = _case(W, B, H, Hkv, D, S, lengths, dtype, seed, layout)
    table = rope_table(S + W + 4, D, 10000.0, device=DEV) if rope else None
    kc0, vc0, L0 = kc.clone(), vc.clone(), L.clone()
    # the output against fp32; the caches against the reference run in the dtype (one rounding of the rotation)
    ref = window_attention_ref(q.float(), kn.float(), vn.float(), kc.float(), vc.float(), L, rope=table)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    window_attention_ref(q, kn, vn, kc_ref, vc_ref, L, rope=table)
    out = torch.full((W, B, H, D), float("nan"), dtype=dtype, device=DEV)
    assert window_attention(q, kn, vn, kc, vc, L, rope=table, out=out, **kw) is out
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)
    assert torch.equal(L, L0), "lengths must not advance"

    # the window slots inside the cache, and nothing else (a slot past S would land in the next head's slot 0)
    pos = L.long()[None, :] + torch.arange(W, device=DEV)[:, None]  # [W, B]
    window = torch.zeros(B, S, dtype=torch.bool, device=DEV)
    window[torch.arange(B, device=DEV)[None, :].expand(W, B)[pos < S], pos[pos < S]] = True
    for c, c0 in ((kc, kc0), (vc, vc0)):
        assert torch.equal(c.transpose(1, 2)[~window], c0.transpose(1, 2)[~window])
    assert torch.equal(vc, vc_ref)
    if rope:  # the rotation is the reference's fp32 arithmetic; Triton 3.9's interpreter truncates fp32 → bf16
        # (half of random values an ulp away) and a GPU may contract to FMAs: within an ulp, exact otherwise
        torch.testing.assert_close(kc, kc_ref, rtol=ULP[dtype], atol=1e-6)
        assert not torch.equal(kc_ref.transpose(1, 2)[window], kc0.transpose(1, 2)[window])  # something rotated
    if not rope or (DEV == "cpu" and dtype != torch.bfloat16):
        assert torch.equal(kc, kc_ref)


# dtype, H, Hkv, D, W, S, lengths, num_splits, rope, layout. block_n 16 (except the D = 64 case: the launcher's
# choice, one block): lengths 0, unaligned, and near or at S so that some window slots fall past the cache.
CASES = [
    (torch.float32, 4, 4, 16, 3, 37, [0, 17, 35], 1, True, "wb"),
    (torch.float32, 4, 2, 16, 16, 45, [0, 40], 3, True, "bw"),
    (torch.float32, 8, 1, 16, 1, 37, [36, 5, 16], 3, False, "wb"),
    (torch.float32, 6, 2, 16, 16, 45, [44, 7], 1, False, "bw"),
    (torch.float16, 6, 2, 16, 3, 37, [0, 34, 37], 3, True, "bw"),
    (torch.float16, 8, 1, 16, 16, 45, [3, 33], 1, False, "wb"),
    (torch.float16, 4, 4, 64, 3, 37, [36, 9], 1, True, "wb"),
    (torch.bfloat16, 4, 2, 16, 3, 37, [0, 17, 35], 3, False, "wb"),
    (torch.bfloat16, 6, 2, 16, 16, 45, [0, 30], 1, True, "bw"),
    (torch.bfloat16, 4, 4, 128, 16, 37, [1, 30], 3, True, "wb"),
    (torch.bfloat16, 8, 1, 16, 1, 37, [0, 36], 1, True, "bw"),
]


@pytest.mark.parametrize("dtype,H,Hkv,D,W,S,lengths,num_splits,rope,layout", CASES,
                         ids=[f"{str(c[0])[6:]}-H{c[1]}-Hkv{c[2]}-D{c[3]}-W{c[4]}-sp{c[7]}{'-rope' * c[8]}-{c[9]}"
                              for c in CASES])
def test_matches_the_reference(dtype, H, Hkv, D, W, S, lengths, num_splits, rope, layout):
    kw = {} if D == 64 else {"block_n": 16}
    _check(W, H, Hkv, D, S, lengths, dtype, rope=rope, layout=layout, seed=H * D + W, num_splits=num_splits, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_window_is_decode_attention(dtype):
    W, B, H, Hkv, D, S = 1, 3, 4, 2, 32, 37
    q, kn, vn, kc, vc, L = _case(W, B, H, Hkv, D, S, [0, 20, 36], dtype, 3)
    table = rope_table(S, D, 10000.0, device=DEV)
    kc2, vc2 = kc.clone(), vc.clone()
    out = window_attention(q, kn, vn, kc, vc, L, rope=table, sm_scale=0.3, num_splits=2, block_n=16)
    want = decode_attention(q[0], kn[0], vn[0], kc2, vc2, L, rope=table, sm_scale=0.3, num_splits=2, block_n=16)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out[0], want, rtol=rtol, atol=atol)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the same rotation, rounding and slot


def test_launcher_checks_shapes():
    q, kn, vn, kc, vc, L = _case(3, 2, 4, 2, 16, 8, [1, 2], torch.float32, 0)
    with pytest.raises(AssertionError, match="model-dtype caches only"):
        f8 = torch.float8_e4m3fn
        window_attention(q, kn, vn, kc.to(f8), vc.to(f8), L)
    with pytest.raises(AssertionError, match="share a dtype"):
        window_attention(q, kn, vn, kc.half(), vc.half(), L)
    with pytest.raises(AssertionError, match="int32"):
        window_attention(q, kn, vn, kc, vc, L.long())
    with pytest.raises(AssertionError, match="k_new/v_new"):
        window_attention(q, kn[:2], vn[:2], kc, vc, L)
    with pytest.raises(AssertionError, match="head dim"):
        window_attention(q[..., :12], kn[..., :12], vn[..., :12], kc[..., :12], vc[..., :12], L)
    with pytest.raises(AssertionError, match="out must be a contiguous"):
        window_attention(q, kn, vn, kc, vc, L, out=torch.empty(2, 3, 4, 16).transpose(0, 1))
