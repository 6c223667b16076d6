"""JanusFlow's user-facing pipeline: rectified-flow text-to-image (diffusers' convention: latents, then a VAE
decode) and image understanding, on the Janus runtime's loaders, tokenizer and text decode loop.

`fastjanus.load(path)` returns this class when config.json has the JanusFlow layout. The flow loop is in
engine/flow.py; understanding reuses JanusPipeline's (the eager decode loop, with either backend's decode ops).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..checks import check_count
from ..errors import CheckpointNotFoundError, InputError, arg, path_of, setting
from ..flow_config import JanusFlowConfig
from ..image import to_pil
from ..models.janusflow import JanusFlowModel
from .flow import FlowStep, Prompts, prompt_prefix, recompute_step
from .pipeline import (JanusPipeline, _serialised, check_processor, finish_load, prompt_list, question_ids,
                       resolve_cuda_graphs)

# Images per flow step: a larger request runs in chunks of this many. At 16 images a Pro-size step is 32 rows
# × 577 tokens ≈ 18k tokens through the 1.3B LLM (≈ 45 TFLOP), well inside the compute-bound regime (arithmetic,
# not measured), so larger chunks would only cost memory.
FLOW_MAX_IMAGES = 16
FLOW_SLOT_ALIGN = 64  # prefix slots + the block's tokens are rounded up to this (prompt-length buckets)
FLOW_GRAPHS_KEPT = 4  # captured steps kept (least recently used dropped): each holds its prefix K/V buffers
VAE_BATCH = 8  # images per VAE decoder call


def flow_prompt_ids(tokenizer, cfg: JanusFlowConfig, prompt) -> list[list[int]]:
    """Each prompt's ids as the LLM reads them: the generation prompt without its final `<begin_of_image>`
    (the official loop drops it and puts the timestep embedding there). Checked against the context."""
    prompts = prompt_list(prompt)
    out, limit, block = [], cfg.language.max_position_embeddings, 1 + cfg.num_gen_tokens
    for i, p in enumerate(prompts):
        ids = tokenizer.generation_prompt(p)
        assert ids[-1] == tokenizer.boi_id, "the generation prompt ends with <begin_of_image>"
        ids = ids[:-1]
        if len(ids) + block > limit:
            which = f"{arg('prompt')} {i + 1}" if len(prompts) > 1 else arg("prompt")
            raise InputError(f"{which} is {len(ids)} tokens; with the timestep and {cfg.num_gen_tokens} latent tokens "
                             f"that exceeds the model's context of {limit} positions. Shorten it to at most "
                             f"{limit - block} tokens")
        out.append(ids)
    return out


def check_steps(steps) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"{arg('steps')} must be an integer >= 1 (Euler steps of the flow; the official default is "
                         f"30), got {steps!r}")


def check_cfg_weight(cfg_weight) -> None:
    ok = isinstance(cfg_weight, (int, float)) and not isinstance(cfg_weight, bool) and math.isfinite(cfg_weight)
    if not ok or cfg_weight < 0:
        raise InputError(f"{arg('cfg_weight')} must be a finite number >= 0 (1: the conditional velocity alone; the "
                         f"official default is 2), got {cfg_weight!r}")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_latents(latents, n: int, cfg: JanusFlowConfig, what: str = "latents") -> torch.Tensor:
    """A [n, C, S, S] floating-point tensor of finite values → fp32 on the CPU."""
    C, S = cfg.latent_channels, cfg.latent_size
    if not isinstance(latents, torch.Tensor):
        raise InputError(f"{arg(what)} must be a torch.Tensor [{n}, {C}, {S}, {S}], got {type(latents).__name__}")
    if latents.dtype not in _FLOATS:
        raise InputError(f"{arg(what)} must be a floating-point tensor (float32, float16, bfloat16 or float64), got "
                         f"{latents.dtype}")
    if tuple(latents.shape) != (n, C, S, S):
        raise InputError(f"{arg(what)} has shape {list(latents.shape)}; expected [{n}, {C}, {S}, {S}] "
                         f"({'images of this request' if what == 'latents' else 'images'}, latent channels, "
                         f"latent size)")
    x = latents.detach().to("cpu", torch.float32, copy=True)  # a copy: the loops update z in place
    if not torch.isfinite(x).all():
        raise InputError(f"{arg(what)} holds NaN or infinite values")
    return x


class JanusFlowPipeline(JanusPipeline):
    """A loaded JanusFlow model, its VAE and its flow runtime. Requests run one at a time (a lock), as in
    JanusPipeline. Image generation: generate_image_latents → decode_image_latents, or generate_images."""

    def __init__(self, model: JanusFlowModel, tokenizer, device, dtype, vae, weights=None, path=None,
                 backend: str = "torch", cuda_graphs: bool = False, vae_dir: Path | None = None):
        super().__init__(model, tokenizer, device, dtype, weights, path, backend, cuda_graphs=False, memory_plan=None)
        self.cfg: JanusFlowConfig = model.cfg
        self.cuda_graphs = cuda_graphs  # the flow step's graphs (text decodes in the eager loop)
        self.vae, self.vae_dir = vae, vae_dir
        # (images, prefix slots) → a captured step, least recently used first. A bucket is the request's exact
        # image count (padding rows would cost compute in a compute-bound step) and its prompt length rounded up.
        self._steps: dict[tuple[int, int], FlowStep] = {}
        self._pool = None  # the graphs' shared memory pool

    def close(self) -> None:
        with self._lock:
            self._steps.clear()
            self.vae = None
            super().close()

    # ---------------------------------------------------------------------------------- the flow step
    def _bucket(self, images: int, P: int) -> tuple[int, int]:
        T = 1 + self.cfg.num_gen_tokens
        return images, -(-(P + T) // FLOW_SLOT_ALIGN) * FLOW_SLOT_ALIGN - T

    def _static_step(self, images: int, P: int) -> FlowStep:
        """The captured step of the bucket holding (images, P), made on first use; at most FLOW_GRAPHS_KEPT are
        kept (the least recently used is dropped, its buffers and graph freed)."""
        key = self._bucket(images, P)
        st = self._steps.pop(key, None)
        if st is None:
            while len(self._steps) >= FLOW_GRAPHS_KEPT:
                self._steps.pop(next(iter(self._steps)))
            st = FlowStep(self.model, *key)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            st.capture(self._pool)
        self._steps[key] = st  # now the most recently used
        return st

    @_serialised
    def warmup(self, num_images: int = 1, prompt_len: int = 64) -> list[tuple[int, int]]:
        """With CUDA Graphs: capture the flow step for requests of num_images images (per chunk: at most
        FLOW_MAX_IMAGES) and prompts up to prompt_len tokens now, so that such a request does not pay for it.
        Returns the buckets held (images, prefix slots); [] without graphs (nothing to prepare)."""
        check_count("num_images", num_images)
        check_count("prompt_len", prompt_len)
        limit = self.cfg.language.max_position_embeddings - 1 - self.cfg.num_gen_tokens
        if prompt_len > limit:
            raise InputError(f"{arg('prompt_len')} {prompt_len} leaves no room for the {self.cfg.num_gen_tokens} "
                             f"latent tokens in the context of {self.cfg.language.max_position_embeddings}; at most "
                             f"{limit}")
        if not self.cuda_graphs:
            return []
        with torch.inference_mode():
            self._static_step(min(num_images, FLOW_MAX_IMAGES), prompt_len)
        return sorted(self._steps)

    # ------------------------------------------------------------------------------ text → latents
    @_serialised
    @torch.inference_mode()
    def generate_image_latents(self, prompt, num_images: int = 1, cfg_weight: float = 2.0, steps: int = 30,
                               seed: int | None = None, latents: torch.Tensor | None = None, progress: bool = False,
                               cache_prompt: bool = True) -> torch.Tensor:
        """Latents [N, 4, 48, 48] fp32 on the CPU (N = len(prompts) × num_images, in prompt order): `steps` Euler
        steps of the rectified flow from t = 0 (noise) with guidance v = w·v_cond − (w − 1)·v_uncond.

        latents: the starting noise [N, 4, 48, 48] (any float dtype; for reproducing another implementation's
        run); otherwise drawn from `seed` with a CPU generator (the same on every device). Give one or neither.
        cache_prompt=False recomputes the prompt at every step as the official loop does (the same result; for
        benchmarks). More than FLOW_MAX_IMAGES images run in chunks of that many, one after the other.

        last_timings: prompt_s (the prompts' K/V), capture_s (CUDA Graph captures, first use of a bucket),
        steps_s and step_s (the Euler steps, per step), total_s."""
        t0 = time.perf_counter()
        ids = flow_prompt_ids(self.tokenizer, self.cfg, prompt)
        check_count("num_images", num_images)
        check_cfg_weight(cfg_weight)
        check_steps(steps)
        if not isinstance(cache_prompt, bool):
            raise InputError(f"{arg('cache_prompt')} must be True or False, got {cache_prompt!r}")
        prompts = Prompts(ids, num_images, self.tokenizer.pad_id)
        N, C, S = prompts.images, self.cfg.latent_channels, self.cfg.latent_size
        if latents is not None:
            if seed is not None:
                raise InputError(f"{arg('seed')} and {arg('latents')} both choose the starting noise; give one")
            z = check_latents(latents, N, self.cfg)
        else:
            seed = self._seed(seed)
            z = torch.randn(N, C, S, S, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        z = z.to(self.device)
        chunks = [(a, min(N, a + FLOW_MAX_IMAGES)) for a in range(0, N, FLOW_MAX_IMAGES)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=steps * len(chunks), desc="flow steps", unit="step", leave=False)
        times = {"prompt_s": 0.0, "capture_s": 0.0, "steps_s": 0.0}
        for a, b in chunks:
            z[a:b] = self._flow(prompts.chunk(a, b), z[a:b], cfg_weight, steps, cache_prompt, bar, times)
        out = z.cpu()
        if bar is not None:
            bar.close()
        self.last_timings = {**times, "step_s": times["steps_s"] / steps, "total_s": time.perf_counter() - t0,
                             "images": N, "steps": steps, "prompt_len": prompts.P, "cache_prompt": cache_prompt,
                             "cuda_graphs": self.cuda_graphs and cache_prompt, "seed": seed}
        return out

    def _flow(self, prompts: Prompts, z: torch.Tensor, cfg_weight: float, steps: int, cache_prompt: bool, bar,
              times: dict) -> torch.Tensor:
        """`steps` Euler steps of one chunk from z [n, C, S, S] fp32 (device) → its final latents (device)."""
        def tick():
            if bar is not None:
                bar.update(1)
        t0 = time.perf_counter()
        if not cache_prompt:  # the official loop
            z = z.clone()
            for i in range(steps):
                recompute_step(self.model, prompts, z, i / steps * 1000.0, cfg_weight, 1.0 / steps)
                tick()
            self._sync()
            times["steps_s"] += time.perf_counter() - t0
            return z
        if self.cuda_graphs:
            st = self._static_step(prompts.images, prompts.P)
            self._sync()
            t1 = time.perf_counter()
            times["capture_s"] += t1 - t0
            t0 = t1
        else:  # eager: the request's exact sizes (no padded slots to compute)
            st = FlowStep(self.model, prompts.images, prompts.P)
        st.load(prompts, prompt_prefix(self.model, prompts), z, cfg_weight, steps)
        self._sync()
        t1 = time.perf_counter()
        times["prompt_s"] += t1 - t0
        for i in range(steps):
            st.step(i / steps * 1000.0)
            tick()
        out = st.z[:prompts.images].clone()
        self._sync()
        times["steps_s"] += time.perf_counter() - t1
        return out

    # ------------------------------------------------------------------------------ latents → images
    @_serialised
    @torch.inference_mode()
    def decode_image_pixels(self, latents, batch_size: int | None = None) -> torch.Tensor:
        """Latents [N, 4, 48, 48] → the VAE's output [N, 3, 384, 384] in about [-1, 1] (on the device)."""
        batch_size = VAE_BATCH if batch_size is None else batch_size
        check_count("batch_size", batch_size)
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
            raise InputError(f"{arg('latents')} must be a torch.Tensor [N, {self.cfg.latent_channels}, "
                             f"{self.cfg.latent_size}, {self.cfg.latent_size}]")
        vae = self._need_vae()
        z = check_latents(latents, latents.shape[0], self.cfg).to(self.device)
        return torch.cat([vae(b) for b in z.split(batch_size)])  # fp32 in: the VAE divides by its scaling first

    def _need_vae(self):
        if self.vae is None:
            raise CheckpointNotFoundError(missing_vae_message(self.path, None))
        return self.vae

    @_serialised
    def decode_image_latents(self, latents, batch_size: int | None = None):
        """Latents → PIL images (384×384 for JanusFlow-1.3B), post-processed as the official demo: clipped to
        [-1, 1], scaled to 0..255 and truncated to uint8 (the demo's 1024² LANCZOS resize for display is not
        applied)."""
        t0 = time.perf_counter()
        images = to_pil(self.decode_image_pixels(latents, batch_size))
        self.last_timings = {"vae_s": time.perf_counter() - t0, "images": len(images)}
        return images

    @_serialised
    def generate_images(self, prompt, num_images: int = 1, cfg_weight: float = 2.0, steps: int = 30,
                        seed: int | None = None, latents: torch.Tensor | None = None, progress: bool = False,
                        cache_prompt: bool = True):
        """generate_image_latents, then decode_image_latents: a list of PIL images in prompt order. last_timings
        has both's timings."""
        self._need_vae()  # before the flow, not after it
        z = self.generate_image_latents(prompt, num_images, cfg_weight, steps, seed, latents, progress, cache_prompt)
        timings = self.last_timings
        images = self.decode_image_latents(z)
        self.last_timings = {**timings, "vae_s": self.last_timings["vae_s"]}
        return images

    # ------------------------------------------------------------------------------ understanding
    def _understanding_inputs(self, image, question: str, max_new_tokens: int):
        """The official JanusFlow input: `<begin_of_image>` takes the begin-of-understanding embedding and the
        placeholders the aligned SigLIP features; here that position gets the image id, so that one replacement
        of image ids by [beg_of_und, features] does both."""
        ids = question_ids(self.tokenizer, self.cfg, question, max_new_tokens)
        first = ids.index(self.tokenizer.image_id)
        assert ids[first - 1] == self.tokenizer.boi_id
        ids[first - 1] = self.tokenizer.image_id
        return ids, self.model.understanding_embeds(self._pixels(image))  # [1, 1 + n_img, D]

    # ------------------------------------------------------------------------------ not for JanusFlow
    def _no_codes(self, *args, **kwargs):
        raise InputError("JanusFlow makes images by rectified flow over continuous latents, not with image codes: "
                         "use generate_images (or generate_image_latents and decode_image_latents)")

    first_step_logits = generate_image_tokens = decode_image_tokens = encode_image_to_codes = _no_codes


def _refuse(name: str, value, default) -> None:
    if value is not default and value != default:
        raise InputError(f"{arg(name)} does not apply to JanusFlow checkpoints (only Janus and Janus-Pro); drop it")


VAE_LAYOUT = "config.json + diffusion_pytorch_model.safetensors (diffusers' AutoencoderKL layout, e.g. " \
             "stabilityai/sdxl-vae)"


def missing_vae_message(path: Path, vae) -> str:
    d = Path(vae) if vae is not None else path / "vae"
    where = path_of("vae", d) if vae is not None else f"{d}"
    return (f"{where}: no VAE folder. JanusFlow decodes its latents with the SDXL VAE, a separate download: put its "
            f"{VAE_LAYOUT} in {path / 'vae'}, or pass {setting('vae', 'DIR')}")


def resolve_vae_dir(path: Path, vae, required: bool = True) -> Path | None:
    """The VAE's folder: vae= when given (it must exist), else vae/ inside the model folder. Without either:
    an error when required, else None (understanding and latents need no VAE; decoding says what is missing)."""
    d = Path(vae) if vae is not None else path / "vae"
    if not d.is_dir():
        if vae is None and not required:
            return None
        raise CheckpointNotFoundError(missing_vae_message(path, vae))
    if not (d / "config.json").is_file():
        raise CheckpointNotFoundError(f"{d}: no config.json; the VAE folder needs {VAE_LAYOUT}")
    return d


def load_janusflow(path: Path, cfg: JanusFlowConfig, dev: torch.device, dt: torch.dtype, backend: str, cuda_graphs,
                   progress: bool, warmup: bool, vae=None, **unsupported) -> JanusFlowPipeline:
    """load() for a JanusFlow folder (its config read, its device, dtype and backend resolved). Without a VAE (no
    vae= and no vae/ folder) it loads for understanding and latents; decoding then names what is missing."""
    from ..checkpoint import load_state_into
    from ..models.janusflow import flow_known_unused_key
    from ..models.sdxl_vae import VAEConfig, load_vae, vae_latent_check
    from ..tokenizer import JanusTokenizer
    for name, (value, default) in unsupported.items():
        _refuse(name, value, default)
    t0 = time.perf_counter()
    vae_dir = resolve_vae_dir(path, vae, required=False)
    if vae_dir is not None:  # checked before any weight is read
        vae_latent_check(VAEConfig.from_file(vae_dir), cfg.latent_channels, cfg.latent_size, cfg.image_size)
    graphs = resolve_cuda_graphs(cuda_graphs, dev, backend, needs_triton=False)
    tokenizer = JanusTokenizer(path, cfg.language.vocab_size)
    check_processor(path, tokenizer, cfg)
    with torch.device("meta"):
        model = JanusFlowModel(cfg)
    files = load_state_into(model, path, dev, dt, lambda k: flow_known_unused_key(k, cfg), progress=progress)
    model.eval()
    with torch.no_grad():
        model.fuse()
    vae_model = load_vae(vae_dir, dev, dt, progress=progress) if vae_dir is not None else None
    pipe = JanusFlowPipeline(model, tokenizer, dev, dt, vae_model, files, path, backend, graphs, vae_dir)
    return finish_load(pipe, t0, warmup)
