import os
import sys
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. It must be on before Triton is first imported
# (triton.jit decides at decoration time), so it is set here, before any test module imports a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # for hf_oracle

from fastjanus.random_init import init_random  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return init_random("tiny", tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    import fastjanus
    return fastjanus.load(tiny_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_model(tiny_pipe):
    pytest.importorskip("transformers")
    from hf_oracle import build_hf_model
    return build_hf_model(tiny_pipe)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
