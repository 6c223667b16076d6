"""Triton kernels for the decode hot path, each with a plain-torch reference in `reference.py`.

Naming ladder: `_name_kernel` (Triton) → `name(...)` launcher (keyword arguments, asserted shapes/strides,
caller-owned outputs) → the module that uses it. Every kernel reads lengths, steps, seeds and sampling
parameters from device tensors, so a launch can be captured in a CUDA Graph and replayed.

Triton is imported only by the kernel modules, so the torch backend works without it. On the CPU the kernels
run through Triton's interpreter, which must be switched on *before* Triton is first imported
(`TRITON_INTERPRET=1` in the environment): `triton.jit` decides at decoration time.
"""
from __future__ import annotations

import functools
import os


def triton_status() -> tuple[bool, bool, str]:
    """(importable, interpreter on, version or the import error) without failing when Triton is missing."""
    try:
        import triton
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, False, f"{type(e).__name__}: {e}"
    try:
        from triton import knobs
        interp = bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton without knobs
        interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return True, interp, triton.__version__


@functools.lru_cache(maxsize=1)
def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (fixed once Triton is imported), cached for launchers.

    Triton 3.9's interpreter multiplies bf16 tl.dot operands as raw 16-bit integers (a 16×16 test gave errors
    of 1e10), so the launchers widen bf16 dot operands to fp32 there: the same products (bf16 × bf16 is exact
    in fp32) and fp32 accumulation, as the tensor cores do; only the summation order differs."""
    return triton_status()[1]
