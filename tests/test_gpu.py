"""GPU checks (skipped without CUDA): the published architectures in bf16 and fp16."""
import time

import pytest
import torch

import fastjanus
from fastjanus.random_init import cached_random_model, init_random

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def pro1b_dir():
    # written once into the cache ($FASTJANUS_CACHE: the GPU pass points it at its work folder) and shared
    return cached_random_model("janus-pro-1b")


# The torch backend in bf16 only: it is the same code in fp16, and its eager loop is the slow one (the first GPU
# pass, 2026-11-23 on an H100, spent over 100 s in each torch case before the decode reference stopped using
# cuDNN attention; the GPU tests must fit a 10-minute device run).
@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize("backend,dtype", [("triton", torch.bfloat16), ("triton", torch.float16),
                                           ("torch", torch.bfloat16)])
def test_pro1b_generation(pro1b_dir, dtype, n, backend):
    p = fastjanus.load(pro1b_dir, device="cuda", dtype=dtype, backend=backend)
    p.generate_image_tokens("warm-up", num_images=1, temperature=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    codes = p.generate_image_tokens("a red fox in the snow", num_images=n, seed=0)
    imgs = p.decode_image_pixels(codes)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert codes.shape == (n, 576) and torch.isfinite(imgs).all()
    print(f"\n[gpu] {torch.cuda.get_device_name()} {dtype} {backend} janus-pro-1b {n} image(s): {dt:.2f} s wall "
          f"(prefill {p.last_timings['prefill_s']:.3f} s, 576 steps {p.last_timings['decode_s']:.2f} s)")


def test_greedy_gpu_matches_cpu_fp32_tiny(tmp_path):
    d = init_random("tiny", tmp_path / "t", seed=0)
    cpu = fastjanus.load(d, device="cpu", dtype=torch.float32).generate_image_tokens("a cat", temperature=0)
    gpu = fastjanus.load(d, device="cuda", dtype=torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    assert torch.equal(gpu.generate_image_tokens("a cat", temperature=0), cpu)
