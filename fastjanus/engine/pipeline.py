"""The user-facing pipeline: load a checkpoint, generate images, answer questions about images (plain torch)."""
from __future__ import annotations

import functools
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checkpoint import WeightFiles, load_state_into
from ..config import JanusConfig, read_config_file
from ..checks import (check_count, check_sampling, check_seed, check_speculative,  # noqa: F401 (the CLI imports
                      check_top_k)  # them from here)
from ..flow_config import JanusFlowConfig, is_janusflow
from ..errors import CheckpointNotFoundError, ConfigError, InputError, arg, path_of, setting
from ..image import preprocess, to_pil
from ..kernels import triton_status
from ..models.janus import JanusModel, known_unused_key
from ..quant import QuantConfig, check_device, check_kv_cache, check_scheme, convert, set_backend
from ..tokenizer import JanusTokenizer
from .graphs import DecodeRuntime
from .memory import MemoryPlan, check_plan_overrides, plan_memory
from .runner import ModelRunner
from .sampling import KernelSampler, TorchSampler, cfg_mix, sample
from .speculative import RowFeed, SpecNoise, SpecState, verify_ref

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA when present (bf16 where supported, else fp16), otherwise CPU fp32; both overridable."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"{setting('device', device)} is not a valid torch device ({e}); use cuda, cuda:N or "
                         "cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{setting('device', str(device))} was asked for but CUDA is not available here; use "
                         f"{setting('device', 'cpu')}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"{setting('device', str(device))}: no such device; {torch.cuda.device_count()} CUDA "
                         "device(s) are visible")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"{setting('device', str(device))} is not supported; use cuda or cpu")
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise InputError(f"{setting('dtype', dtype)} is not supported; use one of {', '.join(sorted(_DTYPES))}")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"{arg('dtype')} {dtype} is not supported; use float32, float16 or bfloat16")
    return device, dtype


BACKENDS = ("torch", "triton")


def resolve_backend(backend, device: torch.device) -> str:
    """"triton" on CUDA when Triton imports, else "torch"; an explicit choice is checked and explained."""
    if backend is not None and backend not in BACKENDS:
        raise InputError(f"{arg('backend')} must be one of {', '.join(BACKENDS)} (or left out: automatic), got "
                         f"{backend!r}")
    if backend == "torch":
        return backend
    ok, interp, info = triton_status()
    if backend is None:
        if device.type != "cuda":
            return "torch"
        if not ok:
            warnings.warn(f"Triton is not importable ({info}); using the slower torch backend", stacklevel=3)
            return "torch"
        backend = "triton"
    if not ok:
        raise InputError(f"{setting('backend', 'triton')} needs Triton, which does not import here ({info}); "
                         f"install triton or use {setting('backend', 'torch')}")
    if device.type == "cpu" and not interp:
        raise InputError(f"{setting('backend', 'triton')} on the CPU runs the kernels through Triton's interpreter: "
                         "set TRITON_INTERPRET=1 in the environment before Python starts, or use "
                         f"{setting('backend', 'torch')}")
    if device.type == "cuda" and interp:
        warnings.warn("TRITON_INTERPRET=1 is set: the Triton kernels run in the interpreter on the host, very "
                      "slowly; unset it for real GPU speed", stacklevel=3)
    return backend


def new_seed() -> int:
    """A seed drawn from torch's global RNG, so torch.manual_seed() also makes runs repeatable."""
    return int(torch.randint(0, 2 ** 62, (1,)).item())


def prompt_list(prompt) -> list[str]:
    """A prompt or a non-empty list of them, as a list of strings."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)):
        raise InputError(f"{arg('prompt')} must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompt:
        raise InputError(f"the {arg('prompt')} list is empty; pass at least one prompt")
    for i, p in enumerate(prompt):
        if not isinstance(p, str):
            raise InputError(f"{arg('prompt')}[{i}] must be a string, got {type(p).__name__}")
    return list(prompt)


def image_token_rows(tokenizer: JanusTokenizer, cfg: JanusConfig, prompt, num_images: int) -> list[list[int]]:
    """The interleaved CFG token rows of an image request: per prompt, num_images × (conditional,
    unconditional). Needs only the tokenizer and config files, so the CLI checks a request before it loads."""
    prompts = prompt_list(prompt)
    check_count("num_images", num_images)
    n_tok, limit = cfg.num_image_tokens, cfg.language.max_position_embeddings
    rows: list[list[int]] = []
    for i, p in enumerate(prompts):
        ids = tokenizer.generation_prompt(p)
        if len(ids) + n_tok > limit:
            which = f"{arg('prompt')} {i + 1}" if len(prompts) > 1 else arg("prompt")
            raise InputError(f"{which} is {len(ids)} tokens; with the {n_tok} image tokens that exceeds the model's "
                             f"context of {limit} positions. Shorten it to at most {limit - n_tok} tokens")
        # Unconditional row: every position but the first (BOS) and the last (<begin_of_image>) is pad.
        uncond = [ids[0]] + [tokenizer.pad_id] * (len(ids) - 2) + [ids[-1]]
        rows += [ids, uncond] * num_images
    return rows


def question_ids(tokenizer: JanusTokenizer, cfg: JanusConfig, question, max_new_tokens: int) -> list[int]:
    """The understanding prompt's token ids (system prompt, image placeholders, question), checked against the
    context. Needs only the tokenizer and config files."""
    if not isinstance(question, str):
        raise InputError(f"{arg('question')} must be a string, got {type(question).__name__}")
    tag = tokenizer.processor.image_tag
    if tag in question:
        raise InputError(f"{arg('question')} must not contain the image tag {tag!r}; the image is inserted for you")
    ids = tokenizer.understanding_prompt(question, cfg.vision.num_patches)
    limit = cfg.language.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        fix = (f"lower {arg('max_new_tokens')} to {limit - len(ids)}" if len(ids) < limit else
               f"shorten the {arg('question')}")
        raise InputError(f"the {arg('question')} with its image is {len(ids)} tokens; with {arg('max_new_tokens')} "
                         f"{max_new_tokens} that exceeds the model's context of {limit} positions: {fix}")
    return ids


def _serialised(method):
    """One request at a time per pipeline: the static decode state (KV pool, sampler buffers, graphs) is shared
    by every call, so concurrent calls from several threads queue here. The lock is re-entrant for the
    pipeline's own nesting (generate_images → generate_image_tokens), but a user callback that calls back into
    the pipeline it is called from is refused: it would run in the middle of the request and overwrite it."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            if self._in_callback:
                raise InputError(f"{method.__name__}() was called from a callback of a request on the same "
                                 "pipeline; it would overwrite that request's decode state. Collect what you need "
                                 "in the callback and make the call after the request returns")
            if self._closed:
                raise InputError("this pipeline was closed (pipe.close() or the end of its `with` block); "
                                 "load the model again with fastjanus.load()")
            return method(self, *args, **kwargs)
    return wrapper


class _TextStream:
    """Turns answer token ids, as they are decoded, into new pieces of text for a stream(piece) callback. The
    whole answer is re-decoded each time (byte-level BPE: a piece can end inside a UTF-8 sequence, which
    decodes to U+FFFD until its last byte arrives, so such a tail is held back)."""

    def __init__(self, tokenizer, emit):
        self.tokenizer, self.emit, self.ids, self.sent = tokenizer, emit, [], ""

    def __call__(self, new_ids: list[int]) -> None:
        self.ids += new_ids
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._send(text)

    def _send(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent):], text
            self.emit(piece)

    def finish(self, text: str) -> None:
        self._send(text)


class JanusPipeline:
    """A loaded model and its decode runtime. Thread-safe: requests on one pipeline run one at a time (a lock),
    because they share the static decode state. `close()` (or a `with` block) frees the device memory now;
    otherwise it is freed when the last reference to the pipeline goes."""

    def __init__(self, model: JanusModel, tokenizer: JanusTokenizer, device: torch.device, dtype: torch.dtype,
                 weights: WeightFiles | None = None, path: Path | None = None, backend: str = "torch",
                 cuda_graphs: bool = False, memory_plan: MemoryPlan | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.cfg: JanusConfig = model.cfg
        self.device, self.dtype, self.weights, self.path = device, dtype, weights, path
        self.backend, self.cuda_graphs, self.memory_plan = backend, cuda_graphs, memory_plan
        self.quantization: QuantConfig | None = None  # 8-bit weights (set by load)
        self.kv_cache: str | None = None  # "fp8": an e4m3 KV cache
        self.onnx = None  # an export.ort_runtime.OrtVision: SigLIP and the VQ decoder on ONNX Runtime (set by load)
        self._timings = threading.local()  # last_timings: per thread, so that each sees its own request's
        self.load_timings: dict[str, float] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._in_callback = False
        # The runner (engine/runner.py) defines the prefill and the decode step. The static runtime
        # (engine/graphs.py) drives the triton backend's loops with it; the torch backend keeps the plain eager
        # loops below (the reference), which call the same step.
        set_backend(model, backend)  # the 8-bit Linears' GEMMs (quant.QuantLinear) follow this pipeline's backend
        self.runner = ModelRunner(model, device, dtype, backend, tokenizer.pad_id, tokenizer.image_id)
        self.runtime = DecodeRuntime(self.runner, memory_plan, cuda_graphs) if backend == "triton" and memory_plan \
            else None

    # ------------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the device memory now: the KV pool, the captured graphs and (this pipeline's reference to) the
        weights. Later calls raise. Safe to call twice; `with fastjanus.load(...) as pipe:` calls it."""
        with self._lock:
            if self._in_callback:
                raise InputError("close() was called from a callback of a request on this pipeline; close it after "
                                 "the request returns")
            if self._closed:
                return
            self._closed = True
            if self.runtime is not None:
                self.runtime.close()
            self.runtime = None
            self.runner = None
            self.model = None
            self.onnx = None  # the ONNX Runtime sessions (host memory, or device memory on a GPU provider)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the freed blocks back to the device, not only to torch's cache

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def last_timings(self) -> dict:
        """Timings of the last request that finished in this thread (prefill, decode, first token, ...)."""
        return getattr(self._timings, "value", {})

    @last_timings.setter
    def last_timings(self, value: dict) -> None:
        self._timings.value = value

    def _guard(self, fn):
        """A user callback, marked as such while it runs (see _serialised)."""
        if fn is None:
            return None

        def call(*args):
            self._in_callback = True
            try:
                return fn(*args)
            finally:
                self._in_callback = False
        return call

    def __enter__(self) -> "JanusPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _seed(seed: int | None) -> int:
        check_seed(seed)
        return new_seed() if seed is None else seed

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @_serialised
    def warmup(self, top_k: int | None = None) -> list[int]:
        """Build the static decode state of every image bucket now (and, with CUDA Graphs, capture each one,
        largest first, so the smaller graphs reuse the largest one's memory), plus the one-row text state of
        the usual size. Otherwise this happens on each bucket's first request, inside its time.
        `load(..., warmup=True)` calls this. Returns the image bucket sizes in rows; [] without the runtime."""
        check_top_k(top_k)
        return self.runtime.warmup(top_k) if self.runtime is not None else []

    # -------------------------------------------------------------------------- text → image codes
    def _image_rows(self, prompt, num_images: int) -> list[list[int]]:
        return image_token_rows(self.tokenizer, self.cfg, prompt, num_images)

    def _image_prefill(self, prompt, num_images: int):
        """Prefill the interleaved CFG batch. Returns (last hidden [2N, D], cache, longest prompt T).
        With the static runtime the cache is a view of its KV pool (the eager loops stay inside the plan)."""
        rows = self._image_rows(prompt, num_images)
        R, T = len(rows), max(len(r) for r in rows)
        if self.runtime is not None:
            cache = self.runtime.kv_cache(R, self.memory_plan.image_bucket(R, T)[1])
        else:
            cache = self.runner.new_cache(R, T + self.cfg.num_image_tokens)
        h, _ = self.runner.prefill(rows, cache)
        return h, cache, T

    @_serialised
    @torch.inference_mode()
    def first_step_logits(self, prompt, num_images: int = 1, cfg_weight: float = 5.0) -> torch.Tensor:
        """Guided logits of the first image token, [N, codebook] fp32 (for inspection and tests)."""
        check_sampling(1.0, None, None, cfg_weight)
        h, _, _ = self._image_prefill(prompt, num_images)
        return cfg_mix(self.runner.head(h, paired=True), cfg_weight)

    @_serialised
    @torch.inference_mode()
    def generate_image_tokens(self, prompt, num_images: int = 1, cfg_weight: float = 5.0, temperature: float = 1.0,
                              seed: int | None = None, top_k: int | None = None, top_p: float | None = None,
                              progress: bool = False, callback=None, speculative: bool = False,
                              window: int = 16) -> torch.LongTensor:
        """Image codes [N, 576] (row-major 24×24 grid), N = len(prompts) × num_images, in prompt order.

        callback(row, codes): called after each completed row of the code grid (every 24 codes for the
        published models) with the codes so far [N, 24·(row+1)] on the CPU, for progressive previews. It
        costs one host copy per call; without it the loop never waits for the host.

        speculative=True: speculative Jacobi decoding (engine/speculative.py) with `window` draft codes per
        pass: the same distribution of codes (the same codes when greedy) in fewer LLM passes, how many fewer
        depending on the model's entropy. last_timings then has "passes" and "codes_per_pass"."""
        check_sampling(temperature, top_k, top_p, cfg_weight)
        if cfg_weight is None:  # (text has no guidance; an image request needs a weight)
            raise InputError(f"{arg('cfg_weight')} must be a finite number >= 0 (1: the conditional logits alone), "
                             "got None")
        check_speculative(speculative, window)
        if speculative and self.kv_cache == "fp8":
            raise InputError(f"{arg('speculative')} does not support the fp8 KV cache yet; load without "
                             f"{arg('kv_cache')} or generate without {arg('speculative')}")
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be callable or None, got {type(callback).__name__}")
        callback = self._guard(callback)
        seed = self._seed(seed)
        n_tok = self.cfg.num_image_tokens
        t0 = time.perf_counter()
        if speculative:
            return self._speculative_codes(prompt, num_images, cfg_weight, temperature, seed, top_k, top_p, window,
                                           progress, callback, t0)
        if self.runtime is not None and top_p is None:
            rows = self._image_rows(prompt, num_images)
            marks: dict[str, float] = {}
            codes = self.runtime.image_codes(rows, cfg_weight, temperature, seed, top_k, callback, marks, progress)
            codes = codes.to("cpu", copy=True)  # never hand out the static buffer (on the CPU .cpu() would alias it)
            t2 = time.perf_counter()
            self.last_timings = {"prefill_s": marks["prefill_end"] - t0, "decode_s": t2 - marks["prefill_end"],
                                 "steps": n_tok, "cuda_graphs": self.cuda_graphs, "seed": seed}
            return codes
        h, cache, T = self._image_prefill(prompt, num_images)
        self._sync()
        t1 = time.perf_counter()
        steps = range(n_tok)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="image tokens", unit="tok", leave=False)
        sampler = self._sampler(h.shape[0] // 2, n_tok, cfg_weight, temperature, seed, top_k, top_p, paired=True)
        logits = self.runner.head(h, paired=True)  # [2N, K]
        for i in steps:
            sampler(logits)  # [N] codes, written to sampler.codes[:, i] and, per row, to sampler.rows [2N]
            if callback is not None and (i + 1) % self.cfg.vq.grid == 0:  # a row of the code grid is complete
                callback((i + 1) // self.cfg.vq.grid - 1, sampler.codes[:, :i + 1].to("cpu", copy=True))
            if i == n_tok - 1:
                break
            logits = self.runner.decode(sampler.rows, cache, paired=True, bound=T + i + 1)
        out = sampler.codes.cpu()
        t2 = time.perf_counter()
        self.last_timings = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "steps": n_tok, "cuda_graphs": False,
                             "seed": seed}
        return out

    def _speculative_codes(self, prompt, num_images, cfg_weight, temperature, seed, top_k, top_p, window, progress,
                           callback, t0) -> torch.LongTensor:
        """Speculative decoding: the static runtime's loop (fused verify, CUDA Graphs, few host syncs), or with the
        torch backend or top_p the eager loop here (the reference verify, one host sync per pass)."""
        rows = self._image_rows(prompt, num_images)
        if self.runtime is not None and top_p is None:
            marks: dict[str, float] = {}
            codes, st, passes = self.runtime.spec_image_codes(rows, cfg_weight, temperature, seed, top_k, window,
                                                              callback, marks, progress)
            codes = codes.to("cpu", copy=True)
            t2 = time.perf_counter()
            self.last_timings = {"prefill_s": marks["prefill_end"] - t0, "decode_s": t2 - marks["prefill_end"],
                                 "steps": self.cfg.num_image_tokens, "cuda_graphs": self.cuda_graphs, "seed": seed,
                                 **spec_stats(st, passes, len(rows) // 2)}
            return codes
        R, T = len(rows), max(len(r) for r in rows)
        n_tok, N = self.cfg.num_image_tokens, len(rows) // 2
        if self.runtime is not None:
            cache = self.runtime.kv_cache(R, self.memory_plan.image_bucket(R, T, extra=window)[1])
        else:
            cache = self.runner.new_cache(R, T + n_tok + window)
        h, _ = self.runner.prefill(rows, cache)
        self._sync()
        t1 = time.perf_counter()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        first = sample(cfg_mix(self.runner.head(h, paired=True), cfg_weight), temperature, gen, top_k, top_p)  # [N]
        V = self.cfg.vq.codebook_size
        st = SpecState(N, window, n_tok, self.device)
        st.start(first, torch.randint(0, V, (N, window), generator=gen, device=self.device))
        feed = RowFeed(n_tok, self.cfg.vq.grid, callback, progress)
        passes, longest = 0, T  # longest: the longest row's KV length (the attention's bound)
        while feed.lo < n_tok:
            logits = self.runner.window(st.tokens, cache, window, bound=longest + window)  # [W·2N, V]
            verify_ref(st, logits, cfg_weight=cfg_weight, temperature=temperature, top_k=top_k, top_p=top_p,
                       noise=SpecNoise.draw(N, window, V, gen, self.device), lengths=cache.lengths)
            passes += 1
            lo, longest = torch.stack([st.done.min(), cache.lengths.max().long()]).tolist()  # the pass's host sync
            feed.advance(lo, st.codes)
        feed.close()
        out = st.codes.cpu()
        t2 = time.perf_counter()
        self.last_timings = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "steps": n_tok, "cuda_graphs": False,
                             "seed": seed, **spec_stats(st, passes)}
        return out

    def _sampler(self, n: int, steps: int, cfg_weight, temperature, seed: int, top_k, top_p, paired: bool):
        if self.backend == "triton" and top_p is None:
            return KernelSampler(n, steps, cfg_weight, temperature, seed, top_k, paired, self.device)
        return TorchSampler(n, steps, cfg_weight, temperature, seed, top_k, top_p, paired, self.device)

    # ---------------------------------------------------------------------------- codes → pixels
    def _check_codes(self, codes) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor):
            try:
                codes = torch.as_tensor(codes)
            except (TypeError, ValueError, RuntimeError) as e:
                raise InputError(f"image codes must be an integer tensor [N, {self.cfg.num_image_tokens}] ({e})") \
                    from None
        n_tok, K = self.cfg.num_image_tokens, self.cfg.vq.codebook_size
        if codes.dim() == 1:
            codes = codes[None]
        if codes.dim() != 2 or codes.shape[1] != n_tok or codes.shape[0] < 1:
            raise InputError(f"image codes must have shape [N, {n_tok}], got {list(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise InputError(f"image codes must be integers, got {codes.dtype}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= K:
            raise InputError(f"image codes must be in [0, {K}), got values in [{lo}, {hi}]")
        return codes.long()

    @_serialised
    @torch.inference_mode()
    def decode_image_pixels(self, codes, batch_size: int | None = None) -> torch.Tensor:
        """codes [N, 576] → float pixels [N, 3, 384, 384] in about [-1, 1] (model dtype, on the device).
        batch_size: images per VQ decoder call (default: what the memory plan leaves room for, at most 16; 8
        without a plan)."""
        batch_size = self._vq_batch(batch_size)
        if self.onnx is not None:
            return torch.from_numpy(self._onnx_decode(codes, batch_size)[0]).to(self.device, self.dtype)
        codes = self._check_codes(codes).to(self.device)
        vq = self.model.gen_vision_model
        return torch.cat([vq.decode_codes(c, self.backend) for c in codes.split(batch_size)])

    def _vq_batch(self, batch_size: int | None) -> int:
        """Images per VQ decoder call: what the memory plan leaves room for (at most 16), 8 without a plan."""
        if batch_size is None:
            batch_size = self.memory_plan.vq_batch if self.memory_plan is not None else 8
        check_count("batch_size", batch_size)
        return batch_size

    def _onnx_decode(self, codes, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The VQ decoder graph, batch by batch: (pixels [N, 3, S, S], images uint8 [N, S, S, 3]). The codes stay
        on the host: ONNX Runtime takes numpy."""
        out = [self.onnx.decode(c.numpy()) for c in self._check_codes(codes).cpu().split(batch_size)]
        return np.concatenate([p for p, _ in out]), np.concatenate([i for _, i in out])

    @_serialised
    def decode_image_tokens(self, codes, batch_size: int | None = None):
        t0 = time.perf_counter()
        if self.onnx is not None:  # the graph's own uint8 output (the same conversion as to_pil, in the graph)
            images = [Image.fromarray(a) for a in self._onnx_decode(codes, self._vq_batch(batch_size))[1]]
        else:
            images = to_pil(self.decode_image_pixels(codes, batch_size))
        self.last_timings["vq_decode_s"] = time.perf_counter() - t0
        return images

    @_serialised
    def generate_images(self, prompt, num_images: int = 1, cfg_weight: float = 5.0, temperature: float = 1.0,
                        seed: int | None = None, top_k: int | None = None, top_p: float | None = None,
                        progress: bool = False, callback=None, speculative: bool = False, window: int = 16):
        """List of PIL images (384×384 for the published models), len(prompts) × num_images, in prompt order.
        speculative, window: see generate_image_tokens."""
        codes = self.generate_image_tokens(prompt, num_images, cfg_weight, temperature, seed, top_k, top_p, progress,
                                           callback, speculative, window)
        return self.decode_image_tokens(codes)

    @_serialised
    @torch.inference_mode()
    def encode_image_to_codes(self, image) -> torch.LongTensor:
        """An image → its VQ codes [576] (the VQ encoder; input resized/padded like the understanding path)."""
        vq = self.cfg.vq
        x = preprocess(image, _vq_processor(self.tokenizer.processor, vq.image_size))
        return self.model.gen_vision_model.encode_to_codes(x[None].to(self.device))[0].cpu()

    # ------------------------------------------------------------------------------ understanding
    def _pixels(self, image) -> torch.Tensor:
        return preprocess(image, self.tokenizer.processor)[None].to(self.device, self.dtype)

    def _image_embeds(self, image) -> torch.Tensor:  # → [1, n_img, D]: SigLIP + aligner, in torch or on ORT
        if self.onnx is not None:
            x = preprocess(image, self.tokenizer.processor)[None].numpy()  # float32, as the graph takes it
            return torch.from_numpy(self.onnx.encode(x)).to(self.device, self.dtype)
        return self.model.encode_images(self._pixels(image))

    @_serialised
    @torch.inference_mode()
    def encode_image(self, image) -> torch.Tensor:
        """Aligned image embeddings [576, D] (what replaces the image placeholders in the LLM input)."""
        return self._image_embeds(image)[0]

    def _understanding_inputs(self, image, question: str, max_new_tokens: int):
        ids = question_ids(self.tokenizer, self.cfg, question, max_new_tokens)
        return ids, self._image_embeds(image)  # [1, n_img, D]

    @_serialised
    @torch.inference_mode()
    def understanding_logits(self, image, question: str) -> torch.Tensor:
        """Text logits over the whole prompt [T, vocab] (fp32): the first answer token is the last row."""
        ids, img = self._understanding_inputs(image, question, 1)
        _, h = self.runner.prefill([ids], self.runner.new_cache(1, len(ids) + 1), image_embeds=img, keep_all=True)
        return self.runner.head(h[0], paired=False).float()

    @_serialised
    @torch.inference_mode()
    def answer_ids(self, image, question: str, max_new_tokens: int = 256, temperature: float = 0.0,
                   seed: int | None = None, top_k: int | None = None, top_p: float | None = None,
                   ignore_eos: bool = False, callback=None) -> list[int]:
        """Answer token ids (EOS excluded). ignore_eos=True always decodes max_new_tokens (for benchmarks).

        callback(new_ids): called with the answer's next token ids as they are decoded (EOS excluded; their
        concatenation is the result): every token in the eager loop, every TEXT_CHUNK tokens with the static
        runtime, which looks at the host only that often."""
        check_count("max_new_tokens", max_new_tokens)
        check_sampling(temperature, top_k, top_p)
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be callable or None, got {type(callback).__name__}")
        callback = self._guard(callback)
        seed = self._seed(seed)
        t0 = time.perf_counter()
        ids, img = self._understanding_inputs(image, question, max_new_tokens)
        T = len(ids)
        if self.runtime is not None and top_p is None:
            marks: dict[str, float] = {}
            out = self.runtime.text_tokens(ids, img, max_new_tokens, temperature, seed, top_k, self.tokenizer.eos_id,
                                           ignore_eos, on_first=lambda: marks.setdefault("first", time.perf_counter()),
                                           callback=callback)
            t_end = time.perf_counter()
            self.last_timings = {"time_to_first_token_s": marks["first"] - t0, "total_s": t_end - t0,
                                 "new_tokens": len(out), "prompt_len": T, "cuda_graphs": self.cuda_graphs,
                                 "seed": seed}
            return out
        if self.runtime is not None:  # top_p: the eager loop, inside the memory plan
            cache = self.runtime.kv_cache(1, self.memory_plan.text_capacity(T, max_new_tokens))
        else:
            cache = self.runner.new_cache(1, T + max_new_tokens)
        h, _ = self.runner.prefill([ids], cache, image_embeds=img)
        logits, out = self.runner.head(h, paired=False), []
        sampler = self._sampler(1, max_new_tokens, None, temperature, seed, top_k, top_p, paired=False)
        t_first = None
        for i in range(max_new_tokens):
            tok = sampler(logits)  # [1]
            t = int(tok)  # host sync per token: the eager path checks EOS every step
            if t_first is None:
                t_first = time.perf_counter()
            if t == self.tokenizer.eos_id and not ignore_eos:
                break
            out.append(t)
            if callback is not None:
                callback([t])
            if i == max_new_tokens - 1:
                break
            logits = self.runner.decode(tok, cache, paired=False, bound=T + i + 1)
        t_end = time.perf_counter()
        self.last_timings = {"time_to_first_token_s": t_first - t0, "total_s": t_end - t0, "new_tokens": len(out),
                             "prompt_len": T, "cuda_graphs": False, "seed": seed}
        return out

    @_serialised
    def answer(self, image, question: str, max_new_tokens: int = 256, temperature: float = 0.0,
               seed: int | None = None, top_k: int | None = None, top_p: float | None = None, stream=None) -> str:
        """Answer a question about an image; stops at EOS. Greedy by default.

        stream(piece): called with each new piece of the answer's text as it is decoded; the pieces add up
        to the returned string."""
        if stream is not None and not callable(stream):
            raise InputError(f"stream must be callable or None, got {type(stream).__name__}")
        ts = _TextStream(self.tokenizer, self._guard(stream)) if stream is not None else None
        text = self.tokenizer.decode(self.answer_ids(image, question, max_new_tokens, temperature, seed, top_k, top_p,
                                                     callback=ts))
        if ts is not None:
            ts.finish(text)
        return text


def spec_stats(st: SpecState, passes: int, n: int | None = None) -> dict:
    """What a speculative request reports: the passes the loop ran (what costs time), the most any image needed,
    and the codes each of the
    first n images (the real ones) accepted per pass it took part in (the first code comes from the prefill, so
    (codes − 1) / passes). On random weights these say little about a trained checkpoint: acceptance depends on
    the model's entropy."""
    took = st.passes[:n]
    per_image = (st.n_tok - 1) / took.clamp(min=1).double()
    # passes_needed < passes when the static loop's last run went on after every image was done (its runs are
    # sized from the acceptance so far, so that the host syncs rarely; see DecodeRuntime.spec_image_codes)
    return {"speculative": True, "window": st.window, "passes": passes, "passes_needed": int(took.max()),
            "codes_per_pass": float(per_image.mean())}


def _vq_processor(proc, size):
    from dataclasses import replace
    return replace(proc, image_size=size, do_normalize=True, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)


def resolve_cuda_graphs(cuda_graphs, device: torch.device, backend: str, needs_triton: bool = True) -> bool:
    """"auto": on for CUDA with the triton backend. True is checked and explained. needs_triton=False: what is
    captured is plain torch (JanusFlow's flow step), so any backend; "auto" is on for CUDA."""
    if cuda_graphs not in (True, False, "auto"):
        raise InputError(f"{arg('cuda_graphs')} must be True, False or 'auto', got {cuda_graphs!r}")
    if cuda_graphs == "auto":  # not with TRITON_INTERPRET=1: the interpreter copies to the host every launch
        return device.type == "cuda" and (not needs_triton or backend == "triton" and not triton_status()[1])
    if cuda_graphs and device.type != "cuda":
        raise InputError(f"{setting('cuda_graphs', True)} needs a CUDA device, but the device is {device}; use "
                         f"{setting('cuda_graphs', False)}")
    if cuda_graphs and needs_triton and backend != "triton":
        raise InputError(f"{setting('cuda_graphs', True)} needs {setting('backend', 'triton')}: the torch "
                         "backend's sampler reads host values every step and cannot be captured")
    return bool(cuda_graphs)


def check_static_options(backend: str, max_rows, max_len, cfg: JanusConfig | None = None) -> None:
    """max_rows / max_len: valid, and only with the triton backend (whose static state they size). With cfg,
    also against the model (context, image tokens)."""
    check_plan_overrides(max_rows, max_len, cfg)
    if backend != "triton" and (max_rows is not None or max_len is not None):
        raise InputError(f"{arg('max_rows')}/{arg('max_len')} size the static decode state of the triton backend; "
                         f"the torch backend allocates per request. Drop them or use {setting('backend', 'triton')}")


def check_model_dir(path) -> Path:
    """The checkpoint folder must exist and be a folder (a file here is a common slip: config.json itself)."""
    path = Path(path)
    if path.is_file():
        raise CheckpointNotFoundError(f"{path_of('model', path)}: this is a file, not a directory; pass the "
                                      "checkpoint folder (the one that holds config.json and the weights)")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path_of('model', path)}: no such directory; pass the checkpoint "
                                      "folder (the one that holds config.json and the weights)")
    return path


def check_processor(path: Path, tokenizer: JanusTokenizer, cfg) -> None:
    """The processor files and config.json's vision tower must agree on the understanding image."""
    proc, v = tokenizer.processor, cfg.vision
    if proc.num_image_tokens != v.num_patches or proc.image_size != v.image_size:
        raise ConfigError(f"{path}: processor files say {proc.num_image_tokens} image tokens at {proc.image_size} px "
                          f"but config.json's vision tower gives {v.num_patches} at {v.image_size} px")


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device now (CUDA), or the host's available RAM (Linux), else None."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached by torch's allocator are free for the plan too
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import os
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def resolve_quantization(cfg: JanusConfig, path: Path, quantize, quantize_heads, kv_cache):
    """(the folder's own QuantConfig or None, the one to apply while loading or None), with the load options
    checked against the folder before any weight is read."""
    folder = QuantConfig.of(cfg, str(path / "config.json"))
    if not isinstance(quantize_heads, bool):
        raise InputError(f"{arg('quantize_heads')} must be True or False, got {quantize_heads!r}")
    check_kv_cache(kv_cache)
    if quantize is None:
        if quantize_heads:
            raise InputError(f"{arg('quantize_heads')} applies with {arg('quantize')}; pass quantize='int8' or "
                             "'fp8' too, or drop it")
        return folder, None
    check_scheme(quantize)
    if folder is not None:
        raise InputError(f"{path_of('model', path)} is already quantized ({folder.weights} weights); load it "
                         f"without {arg('quantize')}")
    return None, QuantConfig(quantize, quantize_heads)


def load(path, device=None, dtype=None, progress: bool = False, backend: str | None = None,
         cuda_graphs: bool | str = "auto", max_rows: int | None = None, max_len: int | None = None,
         warmup: bool = False, quantize: str | None = None, quantize_heads: bool = False,
         kv_cache: str | None = None, onnx_dir=None, onnx_providers="auto", vae=None) -> JanusPipeline:
    """Load a Janus checkpoint folder in the official hub layout (config.json, weights, tokenizer files).

    backend: "triton" (fused kernels; the default on CUDA) or "torch" (plain torch; the default on the CPU).
    "triton" on the CPU needs TRITON_INTERPRET=1 and is slow but exact: it is how CI tests the kernels.
    cuda_graphs: "auto" (on for CUDA + triton), True or False. With the triton backend the decode state is
    static and sized by a memory plan made here from the free device memory: max_rows (2 per image) and
    max_len (KV slots per row) override it. A request that does not fit fails before it starts.
    warmup=True builds the static decode state of every batch bucket now and, with CUDA Graphs, captures it
    (seconds), so that no request pays for it: what a server or a benchmark wants. The default leaves that to
    each bucket's first request (cheaper for one-off runs). `pipe.load_timings` has both times.

    8-bit weights (fastjanus/quant.py): a folder written by `fastjanus quantize` loads as it is; quantize="int8"
    or "fp8" quantizes a float checkpoint's LLM linears while loading (quantize_heads=True: gen_head and
    lm_head too). kv_cache="fp8": an e4m3 KV cache with per-layer, per-head scales bounded from the weights.
    FP8 needs sm_89+ with the triton backend on a GPU.

    onnx_dir: a folder written by `fastjanus export-onnx` from this checkpoint; encode_image, answer and
    decode_image_tokens then run SigLIP and the VQ decoder on ONNX Runtime (onnx_providers: "auto" takes
    TensorRT, CUDA, then CPU, whichever onnxruntime offers; `pipe.onnx.providers` says what each took).

    JanusFlow (a config.json with `vision_gen_enc_config`) loads as a JanusFlowPipeline (engine/flow_pipeline.py):
    its SDXL VAE from `vae` (a diffusers AutoencoderKL folder) or else the model folder's vae/. The 8-bit,
    fp8-KV, ONNX and max_rows/max_len options are Janus-only and refused for it.

    The pipeline serialises its requests (a lock) and frees its device memory on close(), at the end of a
    `with` block, or when the last reference to it goes."""
    if not isinstance(warmup, bool):
        raise InputError(f"{arg('warmup')} must be True or False, got {warmup!r}")
    t0 = time.perf_counter()
    path = check_model_dir(path)
    d, cfg_file = read_config_file(path, "Janus")  # read once; its layout says which family this is
    if is_janusflow(d):
        from .flow_pipeline import load_janusflow
        dev, dt = resolve_device_dtype(device, dtype)
        return load_janusflow(path, JanusFlowConfig.from_dict(d, source=str(cfg_file)), dev, dt,
                              resolve_backend(backend, dev), cuda_graphs, progress, warmup, vae,
                              max_rows=(max_rows, None), max_len=(max_len, None), quantize=(quantize, None),
                              quantize_heads=(quantize_heads, False), kv_cache=(kv_cache, None),
                              onnx_dir=(onnx_dir, None))
    if vae is not None:
        raise InputError(f"{arg('vae')} applies to JanusFlow checkpoints; {path} is a Janus checkpoint, whose "
                         "images are decoded by its own VQ model: drop it")
    cfg = JanusConfig.from_dict(d, source=str(cfg_file))
    dev, dt = resolve_device_dtype(device, dtype)
    backend = resolve_backend(backend, dev)
    folder_quant, load_quant = resolve_quantization(cfg, path, quantize, quantize_heads, kv_cache)
    qc = folder_quant or load_quant
    check_device(qc.weights if qc else None, kv_cache, dev, backend)
    ort_vision = None
    if onnx_dir is not None:  # checked (and its sessions made) before the weights load
        from ..export.onnx_export import model_fingerprint
        from ..export.ort_runtime import OrtVision
        ort_vision = OrtVision(onnx_dir, onnx_providers, fingerprint=model_fingerprint(path), model_dir=path)
    graphs = resolve_cuda_graphs(cuda_graphs, dev, backend)
    tokenizer = JanusTokenizer(path, cfg.language.vocab_size)
    check_processor(path, tokenizer, cfg)
    with torch.device("meta"):
        model = JanusModel(cfg)
        if qc:
            convert(model, qc)
    check_static_options(backend, max_rows, max_len, cfg)
    files = load_state_into(model, path, dev, dt, lambda k: known_unused_key(k, cfg), progress=progress,
                            quant=folder_quant, quantize=load_quant)
    model.eval()
    # the inference layout (models/llama.py, models/janus.py). no_grad, not inference_mode: inference tensors
    # could not be changed in place later outside inference mode
    with torch.no_grad():
        model.fuse()
    if kv_cache == "fp8":
        model.use_fp8_kv_cache()
    plan = None
    if backend == "triton":
        plan = plan_memory(cfg, model.kv_dtype.itemsize, free_memory(dev), max_rows=max_rows, max_len=max_len)
    pipe = JanusPipeline(model, tokenizer, dev, dt, files, path, backend, graphs, plan)
    pipe.quantization, pipe.kv_cache, pipe.onnx = qc, kv_cache, ort_vision
    return finish_load(pipe, t0, warmup)


def finish_load(pipe: JanusPipeline, t0: float, warmup: bool) -> JanusPipeline:
    """load_timings (load since t0, and the warm-up when asked for), then the pipeline."""
    t1 = time.perf_counter()
    pipe.load_timings = {"load_s": t1 - t0, "warmup_s": 0.0}
    if warmup:
        pipe.warmup()
        pipe._sync()
        pipe.load_timings["warmup_s"] = time.perf_counter() - t1
    return pipe
