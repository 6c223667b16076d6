"""Request checks (sampling parameters, counts, seeds), shared by the pipeline, the CLI (which refuses bad flags
before it loads a model) and the ONNX Runtime generator. Torch-free: the generator's runner path needs only
onnxruntime and numpy. Messages name the argument with errors.arg(), which renders as the flag under the CLI."""
from __future__ import annotations

import math

from .errors import InputError, arg


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def check_sampling(temperature, top_k=None, top_p=None, cfg_weight=None) -> None:
    if not _number(temperature) or temperature < 0:
        raise InputError(f"{arg('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if cfg_weight is not None and (not _number(cfg_weight) or cfg_weight < 0):
        raise InputError(f"{arg('cfg_weight')} must be a finite number >= 0, got {cfg_weight!r}")
    check_top_k(top_k)
    if top_p is not None and (not _number(top_p) or not 0 < top_p <= 1):
        raise InputError(f"{arg('top_p')} must be in (0, 1] (or left out), got {top_p!r}")


def check_top_k(top_k) -> None:
    if top_k is not None and not _positive_int(top_k):
        raise InputError(f"{arg('top_k')} must be a positive integer (or left out), got {top_k!r}")


def check_count(name: str, value) -> None:
    """num_images, max_new_tokens, batch_size: an integer >= 1."""
    if not _positive_int(value):
        raise InputError(f"{arg(name)} must be an integer >= 1, got {value!r}")


def check_seed(seed) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63):
        raise InputError(f"{arg('seed')} must be an integer in [0, 2**63) (or left out), got {seed!r}")


MAX_WINDOW = 64  # draft codes per pass: past ~32 a pass stops being memory-bound at any batch size


def check_speculative(speculative, window) -> None:
    if not isinstance(speculative, bool):
        raise InputError(f"{arg('speculative')} must be True or False, got {speculative!r}")
    if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= MAX_WINDOW:
        raise InputError(f"{arg('window')} must be an integer in [1, {MAX_WINDOW}] (draft codes per pass), got "
                         f"{window!r}")
