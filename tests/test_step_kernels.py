"""The kernel counter of bench/step_kernels.py: exact on a toy function (views, empty allocations and the
interpreter's own copies left out), consistent when scaled to the published layer counts, and the fusion
budget per step."""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

from fastjanus.bench.step_kernels import count_arch, count_calls
from fastjanus.kernels import triton_status

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU the kernels run in the interpreter

BUDGET = {"janus-pro-1b": 250, "janus-pro-7b": 300}  # the ceiling on kernels per image step (issue 13)


@triton.jit
def _add_one_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < n
    tl.store(out_ptr + o, tl.load(x_ptr + o, mask=m) + 1, mask=m)


class _AllOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("inference", [False, True])  # inference mode hands composite ops (linear) undecomposed
def test_counter_on_a_toy_function(inference):
    x, w = torch.arange(8, dtype=torch.float32, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    out = torch.empty_like(x)

    def toy():
        y = x * 2  # mul
        h = F.linear(y.view(1, 8), w)  # t (a view) + mm
        buf = torch.empty_like(x)  # no data: not a kernel
        _add_one_kernel[(1,)](x, buf, 8, BLOCK=8)  # one Triton launch (its host copies are not counted)
        v = h.reshape(2, 2).t().unsqueeze(0).expand(3, 2, 2)[0].detach()  # views only
        out.copy_(buf)  # copy_
        return v

    with torch.inference_mode(inference):
        res = count_calls(toy)
    assert res["ops"] == {"mul.Tensor": 1, "mm": 1, "copy_": 1, "triton:_add_one_kernel": 1}
    assert (res["aten"], res["triton"], res["total"]) == (3, 1, 4)
    assert torch.equal(out, x + 1)
    if triton_status()[1]:
        with _AllOps() as every:  # what the counter left out: the interpreter's own aten ops around a launch
            _add_one_kernel[(1,)](x, out, 8, BLOCK=8)
        assert every.n > 0


def test_scaled_counts_are_consistent():
    res = count_arch("janus-pro-1b", DEVICE)
    assert res["layers"] == 24
    for kind in ("image", "text"):
        s = res[kind]
        for k in ("aten", "triton", "total"):
            assert s[k] == s["outside"][k] + 24 * s["per_layer"][k], (kind, k)
        assert s["total"] == s["aten"] + s["triton"] == sum(s["ops"].values())
        assert s["per_layer"]["triton"] >= 1  # the attention kernel
    per = res["image"]["per_layer"]["ops"]
    assert any(k.split(".")[0] in ("mm", "addmm", "matmul", "bmm") for k in per), per
    assert res["image"]["outside"]["triton"] >= 1  # the sampler runs once per step


@pytest.mark.parametrize("arch", sorted(BUDGET))
def test_image_step_within_the_fusion_budget(arch):
    res = count_arch(arch, DEVICE)
    assert res["image"]["total"] <= BUDGET[arch]
    # the fused layer (models/llama.py): 2 add+RMSNorm, QKV, attention split + merge, o_proj, gate/up,
    # SiLU·mul, down. Before the fusions: 39 per layer, 967 / 1201 per step (bf16).
    per = res["image"]["per_layer"]
    assert (per["total"], per["aten"], per["triton"]) == (9, 4, 5), per["ops"]
    assert per["ops"].get("mm", per["ops"].get("mm.default")) == 4, per["ops"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_runs_at_least_the_counted_kernels():
    """The profiler's count of one replay of the captured step (CUDA only): every counted launch is a kernel
    there, and cuBLAS may add split-K reduces, so the replay has at least as many."""
    res = count_arch("janus-pro-1b", "cuda")
    g = res["image"]["graph_replay"]
    assert g["kernels"] >= res["image"]["total"], (g, res["image"]["total"])
    assert g["per_layer"]["kernels"] >= res["image"]["per_layer"]["total"]
