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


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:2] if x.isdigit())


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels in a child process here, or None. Triton 3.6's interpreter
    fails with numpy >= 2.4 (the GPU machine has Triton 3.6 and numpy 2.5: two tests failed there in the first
    GPU pass, 2026-11-23)."""
    try:
        import numpy
        import triton
    except ImportError as e:
        return f"Triton's interpreter is not importable: {e}"
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return f"Triton {triton.__version__}'s interpreter does not run with numpy {numpy.__version__} (>= 2.4)"
    return None


requires_interpreter = pytest.mark.skipif(interpreter_problem() is not None, reason=str(interpreter_problem()))
