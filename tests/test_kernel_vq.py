"""VQ codebook lookup kernel (normalise + gather + layout, with and without the fused 1×1 conv)."""
import pytest
import torch

pytest.importorskip("triton")
from fastjanus.kernels.reference import vq_lookup_ref  # noqa: E402
from fastjanus.kernels.vq_lookup import vq_lookup  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,grid,K,E,C", [(1, 1, 3, 8, 5), (2, 3, 17, 8, 37), (3, 9, 50, 3, 256), (1, 24, 97, 8, 256)])
@pytest.mark.parametrize("fuse", [False, True])
def test_lookup_matches_reference(dtype, B, grid, K, E, C, fuse):
    g = torch.Generator().manual_seed(B * 100 + grid)
    codes = torch.randint(0, K, (B, grid * grid), generator=g).to(DEV)
    emb = torch.randn(K, E, generator=g).to(DEV, dtype)
    emb[0] = 0.0  # an all-zero entry: F.normalize's eps keeps it zero, not NaN
    codes[0, 0] = 0
    w = torch.randn(C, E, 1, 1, generator=g).to(DEV, dtype) if fuse else None
    b = torch.randn(C, generator=g).to(DEV, dtype) if fuse else None
    out = torch.full((B, C if fuse else E, grid, grid), float("nan"), dtype=dtype, device=DEV)
    vq_lookup(codes, emb, grid=grid, conv_weight=w, conv_bias=b, out=out, block_p=32)
    ref = vq_lookup_ref(codes, emb.float(), grid=grid, conv_weight=None if w is None else w.float(),
                        conv_bias=None if b is None else b.float())
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)


def test_launcher_checks_shapes():
    emb = torch.randn(10, 8, device=DEV)
    with pytest.raises(AssertionError, match="grid²"):
        vq_lookup(torch.zeros(1, 10, dtype=torch.long, device=DEV), emb, grid=3)
    with pytest.raises(AssertionError, match="conv_weight"):
        vq_lookup(torch.zeros(1, 9, dtype=torch.long, device=DEV), emb, grid=3,
                  conv_weight=torch.randn(4, 7, 1, 1, device=DEV), conv_bias=torch.randn(4, device=DEV))
