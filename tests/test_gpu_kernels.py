"""The kernels at the published models' shapes (skipped without CUDA)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

pytest.importorskip("triton")
from fastjanus.engine.sampling import cfg_mix  # noqa: E402
from fastjanus.kernels.cfg_sample import cfg_sample, topk_threshold  # noqa: E402
from fastjanus.kernels.activation import silu_mul  # noqa: E402
from fastjanus.kernels.decode_attention import decode_attention  # noqa: E402
from fastjanus.kernels.reference import (add_rmsnorm_ref, decode_attention_ref, rope_ref, rope_table,  # noqa: E402
                                         silu_mul_ref, vq_lookup_ref)
from fastjanus.kernels.rmsnorm import add_rmsnorm  # noqa: E402
from fastjanus.kernels.vq_lookup import vq_lookup  # noqa: E402

TOL = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [2, 32])
@pytest.mark.parametrize("heads", [16, 32])  # Pro-1B: 16 × 128; Pro-7B: 32 × 128
def test_decode_attention_real_shapes(dtype, rows, heads):
    S, D = 700, 128
    g = torch.Generator(device="cuda").manual_seed(rows + heads)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    q, kn, vn, kc, vc = r(rows, heads, D), r(rows, heads, D), r(rows, heads, D), r(rows, heads, S, D), \
        r(rows, heads, S, D)
    L = torch.randint(0, S, (rows,), generator=g, device="cuda", dtype=torch.int32)
    L[0], L[-1] = S - 1, 0
    kc2, vc2 = kc.float(), vc.float()
    ref = decode_attention_ref(q.float(), kn.float(), vn.float(), kc2, vc2, L)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kn, vn, kc, vc, L, out=out)
    torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    assert torch.equal(kc.float(), kc2.to(dtype).float()) and torch.equal(vc.float(), vc2.to(dtype).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pairs", [1, 16])
def test_cfg_sample_real_shapes(dtype, pairs):
    V = 16384
    g = torch.Generator(device="cuda").manual_seed(pairs)
    logits = (torch.randn(2 * pairs, V, generator=g, device="cuda") * 4).to(dtype)
    guided = cfg_mix(logits, 5.0)
    assert torch.equal(cfg_sample(logits, cfg_weight=5.0, temperature=0.0), guided.argmax(-1))
    assert torch.equal(topk_threshold(logits, k=100, cfg_weight=5.0), torch.topk(guided, 100, -1).values[:, -1])
    allowed = torch.topk(guided, 100, -1).indices
    for step in range(20):
        tok = cfg_sample(logits, cfg_weight=5.0, temperature=30.0, seed=1, step=step, top_k=100)
        assert (allowed == tok[:, None]).any(-1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vq_lookup_real_shapes(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    codes = torch.randint(0, 16384, (16, 576), generator=g, device="cuda")
    emb = torch.randn(16384, 8, generator=g, device="cuda").to(dtype)
    w, b = torch.randn(256, 8, 1, 1, generator=g, device="cuda").to(dtype), torch.randn(256, device="cuda").to(dtype)
    out = torch.full((16, 256, 24, 24), float("nan"), device="cuda", dtype=dtype)
    vq_lookup(codes, emb, grid=24, conv_weight=w, conv_bias=b, out=out)
    ref = vq_lookup_ref(codes, emb.float(), grid=24, conv_weight=w.float(), conv_bias=b.float())
    torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype][0], atol=TOL[dtype][1] * 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [2, 32])
@pytest.mark.parametrize("heads", [16, 32])
def test_decode_attention_with_rope_on_fused_qkv_real_shapes(dtype, rows, heads):
    """The decode step's call: q/k/v views of one QKV output, rotary from the 16384-position table, tensor-core
    dots (compiled, unlike the interpreter's fp32 stand-in)."""
    S, D = 700, 128
    g = torch.Generator(device="cuda").manual_seed(rows * heads)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    qkv = r(rows, 3 * heads * D)
    q, kn, vn = (t.view(rows, heads, D) for t in qkv.split(heads * D, dim=1))
    kc, vc = r(rows, heads, S, D), r(rows, heads, S, D)
    L = torch.randint(0, S, (rows,), generator=g, device="cuda", dtype=torch.int32)
    L[0], L[-1] = S - 1, 0
    table = rope_table(16384, D, 10000.0, device="cuda")
    kc2, vc2 = kc.float(), vc.float()
    ref = decode_attention_ref(q.float(), kn.float(), vn.float(), kc2, vc2, L, rope=table)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kn, vn, kc, vc, L, rope=table, out=out)
    torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    rows_i = torch.arange(rows, device="cuda")
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    torch.testing.assert_close(kc[rows_i, :, L.long()], rope_ref(kn, L, table), rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [2, 32])
@pytest.mark.parametrize("D,inter", [(2048, 5632), (4096, 11008)])
def test_add_rmsnorm_and_silu_mul_real_shapes(dtype, rows, D, inter):
    g = torch.Generator(device="cuda").manual_seed(D + rows)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    x, res, w = r(rows, D), r(rows, D), r(D)
    res_ref = res.clone()
    out = torch.full_like(x, float("nan"))
    add_rmsnorm(x, weight=w, eps=1e-6, residual=res, out=out)
    ref = add_rmsnorm_ref(x, weight=w, eps=1e-6, residual=res_ref)
    torch.testing.assert_close(res, res_ref, rtol=0, atol=0)  # one fp32 add, rounded: bit-exact
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype][0], atol=TOL[dtype][1])
    gu = r(rows, 2 * inter)
    got = torch.full((rows, inter), float("nan"), device="cuda", dtype=dtype)
    silu_mul(gu, out=got)
    torch.testing.assert_close(got.float(), silu_mul_ref(gu).float(), rtol=TOL[dtype][0], atol=TOL[dtype][1])
