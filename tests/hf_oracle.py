"""The `transformers` Janus port as a test oracle (fp32, eager attention, on the CPU).

The mapping from the official layout lives in `fastjanus.bench.hf_port`, shared with the benchmark baseline.
Only tests and the benchmark import it; transformers is never a runtime dependency.
"""
from __future__ import annotations

import torch

from fastjanus.bench.hf_port import hf_config, to_hf_state_dict  # noqa: F401  (re-exported for tests)
from fastjanus.bench.hf_port import build_hf_model as _build


def build_hf_model(pipe) -> torch.nn.Module:
    """A JanusForConditionalGeneration holding exactly the weights of a loaded fastjanus pipeline (fp32, eval)."""
    return _build(pipe.model, pipe.tokenizer, "cpu", torch.float32, attn="eager")
