"""Compile every kernel for sm_90 (H100) without a GPU: lower to PTX and cubin with Triton's own toolchain.

The interpreter that runs the CPU tests never compiles anything, so GPU-only failures (type errors in the
code generator, unsupported ops, FMA contraction) would otherwise surface only on a lent GPU. A stand-in
driver reports an sm_90 target; launches become `warmup=True` compiles with the same argument
specialisation a GPU launch would get (shapes of the published models). Prints one JSON line.
Run by tests/test_kernel_compile.py in a subprocess (TRITON_INTERPRET must be off before Triton imports).
"""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _Sm90(DriverBase):
    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass


driver.set_active(_Sm90())
PTX: dict[str, list[str]] = {}
_run = JITFunction.run


SHARED: dict[str, int] = {}  # the most shared memory each kernel asked for, bytes
CASE: str | None = None  # set around a launch: its kernels' shared memory is also recorded under this label
SHARED_CASES: dict[str, int] = {}


def _compile_only(self, *args, grid, warmup, **kwargs):
    k = _run(self, *args, grid=grid, warmup=True, **kwargs)
    PTX.setdefault(self.fn.__name__, []).append(k.asm["ptx"])
    SHARED[self.fn.__name__] = max(SHARED.get(self.fn.__name__, 0), int(k.metadata.shared))
    if CASE is not None:
        SHARED_CASES[f"{CASE} {self.fn.__name__}"] = int(k.metadata.shared)
    return k


JITFunction.run = _compile_only

from fastjanus.kernels.activation import silu_mul  # noqa: E402
from fastjanus.kernels.cfg_sample import cfg_sample  # noqa: E402
from fastjanus.kernels.decode_attention import decode_attention  # noqa: E402
from fastjanus.kernels.reference import rope_table  # noqa: E402
from fastjanus.kernels.rmsnorm import add_rmsnorm  # noqa: E402
from fastjanus.kernels.skinny_gemm import skinny_gemm  # noqa: E402
from fastjanus.kernels.vq_lookup import vq_lookup  # noqa: E402
from fastjanus.kernels.window_attention import window_attention  # noqa: E402
from fastjanus.engine.speculative import SpecNoise, SpecState  # noqa: E402
from fastjanus.kernels.spec_verify import spec_verify  # noqa: E402

for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for B, H, Hkv, D in [(32, 32, 32, 128), (2, 16, 16, 128), (3, 12, 4, 64)]:
        S = 701
        r = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
        decode_attention(r(B, H, D), r(B, Hkv, D), r(B, Hkv, D), r(B, Hkv, S, D), r(B, Hkv, S, D),
                         torch.zeros(B, dtype=torch.int32), num_splits=11)
        # the decode step's call: q/k/v views of one QKV output, rotary from the position table
        q, kn, vn = r(B, (H + 2 * Hkv) * D).split((H * D, Hkv * D, Hkv * D), dim=1)
        decode_attention(q.unflatten(1, (H, D)), kn.unflatten(1, (Hkv, D)), vn.unflatten(1, (Hkv, D)),
                         r(B, Hkv, S, D), r(B, Hkv, S, D), torch.zeros(B, dtype=torch.int32),
                         rope=rope_table(16384, D, 10000.0), num_splits=11)
    for n, V, paired in [(16, 16384, True), (1, 102400, False)]:
        w, t = torch.tensor([5.0]), torch.tensor([1.0])
        seed, step = torch.tensor([1], dtype=torch.int64), torch.tensor([0], dtype=torch.int64)
        cfg_sample(torch.randn(2 * n if paired else n, V).to(dtype), cfg_weight=w, temperature=t, seed=seed,
                   step=step, top_k=100, paired=paired, history=torch.zeros(n, 576, dtype=torch.int64))
    vq_lookup(torch.randint(0, 16384, (16, 576)), torch.randn(16384, 8).to(dtype), grid=24,
              conv_weight=torch.randn(256, 8, 1, 1).to(dtype), conv_bias=torch.randn(256).to(dtype))
    vq_lookup(torch.randint(0, 16384, (1, 576)), torch.randn(16384, 8).to(dtype), grid=24)
    for M in (2, 32):
        for D in (2048, 4096):  # hidden sizes of Janus(-Pro)-1B and Janus-Pro-7B
            x, w = torch.randn(M, D).to(dtype), torch.randn(D).to(dtype)
            add_rmsnorm(x, weight=w, eps=1e-6)
            add_rmsnorm(x, weight=w, eps=1e-6, residual=torch.randn(M, D).to(dtype))
        for I in (5632, 11008):  # their MLP intermediate sizes
            silu_mul(torch.randn(M, 2 * I).to(dtype))

# The FP8 (e4m3) KV cache with per-kv-head fp32 scales (sm_89+): bf16 and fp16 q (their e4m3 widening differs),
# the decode step's call (fused-QKV views, the rotary from the table), one split and eleven, at Pro-7B's and a GQA
# shape (the other head counts compile to the same specialisations)
for dtype in (torch.bfloat16, torch.float16):
    for B, H, Hkv, D in [(32, 32, 32, 128), (3, 12, 4, 64)]:
        S = 701
        r = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
        f8 = lambda *s: torch.randn(*s).to(torch.float8_e4m3fn)  # noqa: E731
        ks, vs = torch.rand(Hkv) + 0.01, torch.rand(Hkv) + 0.01
        for splits in (1, 11):
            q, kn, vn = r(B, (H + 2 * Hkv) * D).split((H * D, Hkv * D, Hkv * D), dim=1)
            CASE = f"kv-fp8 {str(dtype)[6:]} D={D} splits={splits}"
            decode_attention(q.unflatten(1, (H, D)), kn.unflatten(1, (Hkv, D)), vn.unflatten(1, (Hkv, D)),
                             f8(B, Hkv, S, D), f8(B, Hkv, S, D), torch.zeros(B, dtype=torch.int32),
                             rope=rope_table(16384, D, 10000.0), num_splits=splits, k_scale=ks, v_scale=vs)
CASE = None

# Window attention (speculative Jacobi decoding), the pass's call: W = 16 tokens of 2 rows as views of one fused
# QKV output, the rotary from the table, bf16, at Pro-1B's (16 heads of 128) and Pro-7B's (32) shapes (no GQA);
# one split (the output directly) and eleven (partials, then the merge)
for H in (16, 32):
    W, B, D, S = 16, 2, 128, 701
    r = lambda *s: torch.randn(*s).to(torch.bfloat16)  # noqa: E731
    for splits in (1, 11):
        q, kn, vn = r(W, B, 3 * H * D).split((H * D, H * D, H * D), dim=-1)
        window_attention(q.unflatten(-1, (H, D)), kn.unflatten(-1, (H, D)), vn.unflatten(-1, (H, D)),
                         r(B, H, S, D), r(B, H, S, D), torch.zeros(B, dtype=torch.int32),
                         rope=rope_table(16384, D, 10000.0), num_splits=splits)

# The speculative verify step (kernels/spec_verify.py): 16 images × a 16-code window at the image vocabulary, bf16
# logits, without and with top-k (threshold masks), Philox and the tests' explicit noise (NOISE switches the loads)
N, W, V = 16, 16, 16384
st = SpecState(N, W, 576, "cpu")
for top_k in (None, 100):
    for noise in (None, SpecNoise.draw(N, W, V, None, "cpu")):
        spec_verify(torch.randn(W * 2 * N, V).to(torch.bfloat16),
                    prev_logits=torch.randn(W * 2 * N, V).to(torch.bfloat16), cfg_weight=torch.tensor([5.0]),
                    temperature=torch.tensor([1.0]), seed=torch.tensor([1]),
                    pass_count=torch.zeros(1, dtype=torch.int64), top_k=top_k, codes=st.codes, done=st.done,
                    drafts=st.drafts, q_row=st.q_row, tokens=st.tokens,
                    lengths=torch.zeros(2 * N, dtype=torch.int32), passes=st.passes, lse=torch.zeros(N, W),
                    prev_lse=torch.zeros(N, W), thr=torch.zeros(W * N), prev_thr=torch.zeros(W * N), noise=noise)

# The skinny GEMM (bf16 and fp32: fp16 takes bf16's path), Pro-1B's decode GEMMs (D 2048, I 5632): plain on the
# QKV and down shapes, silu_mul on gate_up; one split (one launch) and three (partials + reduce); 2 rows, and
# the most shared memory it can ask for (64 rows, the launcher's limit, with silu_mul's two weight tiles).
# Every published N and K is a multiple of 16, so the other GEMMs and Pro-7B's compile to the same
# specialisations. Measured: every shape × 3 dtypes × 2 and 32 rows took 44 s here and found nothing more.
for dtype in (torch.bfloat16, torch.float32):
    for N, K, silu in ((3 * 2048, 2048, False), (2048, 5632, False), (2 * 5632, 2048, True)):
        for split in (1, 3):
            skinny_gemm(torch.empty(2, K, dtype=dtype), torch.empty(N, K, dtype=dtype),
                        epilogue="silu_mul" if silu else None, split_k=split)
    skinny_gemm(torch.empty(64, 2048, dtype=dtype), torch.empty(2 * 5632, 2048, dtype=dtype), epilogue="silu_mul",
                split_k=1)

# The weight-only 8-bit GEMM (w_scale): bf16 activations (fp16 takes the same path) with int8 and e4m3 weights
# (different widening code), default blocks (block_k 256). Pairwise, not all 8 combinations (a compile takes ~5 s
# here): each weight dtype with plain and silu_mul, one split and three, each combination of epilogue × split
# once. Then the most shared memory the 8-bit path can ask for: 64 rows with silu_mul, both weight dtypes, and
# fp32 activations (block_k 128 there). Each case's shared memory goes into the report's "shared_cases".
for wdtype, silu, split in ((torch.int8, False, 1), (torch.int8, True, 3), (torch.float8_e4m3fn, False, 3),
                            (torch.float8_e4m3fn, True, 1)):
    N, K = (2 * 5632, 2048) if silu else (3 * 2048, 2048)
    CASE = f"w8[{str(wdtype)[6:]}] bf16 M=2 {'silu_mul' if silu else 'plain'} split={split}"
    skinny_gemm(torch.empty(2, K, dtype=torch.bfloat16), torch.empty(N, K, dtype=wdtype), w_scale=torch.empty(N),
                epilogue="silu_mul" if silu else None, split_k=split)
for wdtype, dtype in ((torch.int8, torch.bfloat16), (torch.float8_e4m3fn, torch.bfloat16),
                      (torch.int8, torch.float32)):
    CASE = f"w8[{str(wdtype)[6:]}] {'bf16' if dtype == torch.bfloat16 else 'fp32'} M=64 silu_mul split=1"
    skinny_gemm(torch.empty(64, 2048, dtype=dtype), torch.empty(2 * 5632, 2048, dtype=wdtype),
                w_scale=torch.empty(2 * 5632), epilogue="silu_mul", split_k=1)
CASE = None

json.dump({"triton": triton.__version__, "compiled": {k: len(v) for k, v in PTX.items()}, "shared": SHARED,
           "shared_cases": SHARED_CASES,
           "fma_in": sorted(k for k, v in PTX.items() if any("fma.rn.f32" in p for p in v))}, sys.stdout)
