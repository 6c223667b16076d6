"""The static decode runtime: decode state in buffers allocated once, one step that reads and writes only
them, and (on CUDA) that step captured as a CUDA Graph per batch bucket and replayed.

A step is the runner's decode step (engine/runner.py: embed the previous token of every row → decoder →
head) followed by the fused sampler (guidance, temperature, top-k, draw; writes the token per row and into a
history at the device-side step). Nothing in it reads a host value, so 575
replays run without the host waiting; the codes are copied back once at the end (or after every row of
the code grid, 24 codes, when a streaming callback asks for them). Text decoding replays the same kind of
step for one row and looks for EOS in the history every TEXT_CHUNK tokens instead of after every token.

Requests are padded to the smallest bucket (2, 4, 8, ... rows) that holds them. Padded rows start at length
0 with a zero hidden state: every op is row-independent, so they cannot change real rows, and their codes
are dropped. The eager mode (graphs off) runs the very same step on the same padded buffers, so graphs on
and off give identical codes for the same seed. All buckets view one KV pool (engine/memory.py): only one
request runs at a time.
"""
from __future__ import annotations

import time

import torch

from ..models.llama import KVCache
from ..errors import InputError, arg
from .memory import MemoryPlan, decode_workspace_bytes
from .runner import ModelRunner
from .sampling import KernelSampler
from .speculative import RowFeed, SpecState

TEXT_CHUNK = 16  # tokens decoded between EOS checks (one host sync each)


class KVPool:
    """One K and one V buffer of `plan.pool_slots` token slots, viewed per bucket as a [layers, rows,
    kv_heads, capacity, head_dim] cache."""

    def __init__(self, model, plan: MemoryPlan):
        L = model.cfg.language
        self.per_slot = L.num_hidden_layers * L.num_key_value_heads * L.head_dim
        self.layers, self.kv_heads, self.head_dim = L.num_hidden_layers, L.num_key_value_heads, L.head_dim
        n = plan.pool_slots * self.per_slot
        self.k = torch.zeros(n, device=model.device, dtype=model.kv_dtype)  # e4m3 with an fp8 KV cache
        self.v = torch.zeros(n, device=model.device, dtype=model.kv_dtype)
        self.scales = model.kv_scales
        self.plan = plan

    def cache(self, rows: int, capacity: int) -> KVCache:
        assert rows * capacity <= self.plan.pool_slots, (rows, capacity, self.plan.pool_slots)
        shape = (self.layers, rows, self.kv_heads, capacity, self.head_dim)
        n = rows * capacity * self.per_slot
        lengths = torch.zeros(rows, device=self.k.device, dtype=torch.int32)
        return KVCache.from_buffers(self.k[:n].view(shape), self.v[:n].view(shape), lengths, self.scales)


def capture_graph(step, device: torch.device, pool=None, side_stream=None) -> "torch.cuda.CUDAGraph":
    """step() recorded in a CUDA Graph on `device` (cuda:1 captures on cuda:1, whatever the current device):
    two eager warm-up runs on a side stream first (they compile the Triton kernels and create cuBLAS handles, and
    torch requires them), then the capture into `pool`. The warm-up runs write whatever step() writes; the
    caller resets its state afterwards."""
    with torch.cuda.device(device), torch.inference_mode():
        s = side_stream or torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            step()
    return g


class _Graphed:
    """A step over static buffers, run eagerly or captured once as a CUDA Graph and replayed. Subclasses define
    step() (touching only their buffers and the weights) and _reset_for_warmup()."""

    def __init__(self, runner: ModelRunner, use_graph: bool, graph_pool, side_stream):
        self.runner, self.device = runner, runner.device
        self.use_graph, self.graph_pool, self.graph, self.side_stream = use_graph, graph_pool, None, side_stream
        self.compiled = False

    def step(self) -> None:
        raise NotImplementedError

    def _reset_for_warmup(self) -> None:
        raise NotImplementedError

    def _capture(self) -> None:
        """Eager warm-up on a side stream (compiles the Triton kernels, creates cuBLAS handles), then capture.
        The warm-up writes garbage into this bucket's cache and state; start() resets all of it."""
        self._reset_for_warmup()
        self.graph = capture_graph(self.step, self.device, self.graph_pool, self.side_stream)
        self.compiled = True

    def ensure_graph(self) -> None:
        """Capture on first use (before the prefill: the warm-up steps overwrite the start of the cache)."""
        if self.use_graph and self.graph is None:
            self._capture()

    def warm(self) -> None:
        """Ready for a request: captured (graphs on), or on CUDA one eager step run so that the Triton kernels
        are compiled for this bucket's shapes (graphs off). On the CPU (the interpreter) nothing is compiled."""
        if self.use_graph:
            self.ensure_graph()
        elif not self.compiled and self.device.type == "cuda":
            self._reset_for_warmup()
            with torch.inference_mode():
                self.step()
            self.compiled = True

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()


class StaticDecoder(_Graphed):
    """Decode state of one bucket (rows, capacity, paired or not, top_k) and its step, optionally graphed."""

    def __init__(self, runner: ModelRunner, pool: KVPool, rows: int, capacity: int, paired: bool,
                 top_k: int | None, history: int, use_graph: bool, graph_pool=None, side_stream=None):
        super().__init__(runner, use_graph, graph_pool, side_stream)
        self.rows, self.paired = rows, paired
        self.cache = pool.cache(rows, capacity)
        n = rows // 2 if paired else rows
        self.sampler = KernelSampler(n, history, 1.0, 1.0, 0, top_k, paired, runner.device)

    # the step: everything it touches is a buffer of this object (or the model's weights)
    def step(self) -> None:
        logits = self.runner.decode(self.sampler.rows, self.cache, self.paired)  # [R, V]; lengths += 1 on the device
        self.sampler(logits)  # writes sampler.out / rows / codes[:, step]; step += 1 on the device

    def _reset_for_warmup(self) -> None:
        self.cache.lengths.zero_()
        self.sampler.step.zero_()
        self.sampler.rows.zero_()  # torch.empty garbage would index the embedding out of bounds
        self.sampler.out.zero_()

    def start(self, h: torch.Tensor, cfg_weight: float | None, temperature: float, seed: int) -> None:
        """After the prefill (which filled the first h.shape[0] rows of self.cache and their lengths): reset
        the padded rows and the sampler, then sample the first token from h [R_real, D] eagerly."""
        r = h.shape[0]
        self.cache.lengths[r:] = 0
        sp = self.sampler
        sp.cfg_weight.fill_(1.0 if cfg_weight is None else cfg_weight)
        sp.temperature.fill_(temperature)
        sp.seed.fill_(seed)
        sp.step.zero_()
        hh = torch.zeros(self.rows, h.shape[1], device=h.device, dtype=h.dtype)
        hh[:r] = h
        sp(self.runner.head(hh, self.paired))


class SpecDecoder(_Graphed):
    """Speculative decode state of one image bucket and window (engine/speculative.py): the KV view, the
    SpecState buffers, the previous pass's logits/lse/top-k thresholds (the q's), and one pass = the window
    forward + the fused verify (`kernels.spec_verify`), optionally graphed. Padded images start done, so they
    accept nothing and never hold the loop."""

    def __init__(self, runner: ModelRunner, pool: KVPool, rows: int, capacity: int, window: int, top_k: int | None,
                 n_tok: int, use_graph: bool, graph_pool=None, side_stream=None):
        super().__init__(runner, use_graph, graph_pool, side_stream)
        from ..kernels.cfg_sample import cfg_sample
        from ..kernels.spec_verify import spec_verify
        self._cfg_sample, self._spec_verify = cfg_sample, spec_verify
        dev, n = runner.device, rows // 2
        self.rows, self.window, self.top_k, self.n_tok = rows, window, top_k, n_tok
        self.cache = pool.cache(rows, capacity)
        self.st = SpecState(n, window, n_tok, dev)
        V = runner.cfg.gen_head.image_token_size  # the logits' width (the codebook's size, checked at load)
        f32 = dict(dtype=torch.float32, device=dev)
        self.prev_logits = torch.zeros(window * rows, V, dtype=runner.dtype, device=dev)
        self.lse, self.prev_lse = torch.zeros(n, window, **f32), torch.zeros(n, window, **f32)
        self.thr, self.prev_thr = torch.zeros(window * n, **f32), torch.zeros(window * n, **f32)
        self.cfg_weight, self.temperature = torch.ones(1, **f32), torch.ones(1, **f32)
        self.seed = torch.zeros(1, dtype=torch.int64, device=dev)
        self.pass_count = torch.zeros(1, dtype=torch.int64, device=dev)
        self.first = torch.zeros(n, dtype=torch.int64, device=dev)

    def step(self) -> None:  # one pass
        st = self.st
        logits = self.runner.window(st.tokens, self.cache, self.window)  # [W·R, V]; writes the window's K/V
        self._spec_verify(logits, prev_logits=self.prev_logits, cfg_weight=self.cfg_weight,
                          temperature=self.temperature, seed=self.seed, pass_count=self.pass_count, top_k=self.top_k,
                          codes=st.codes, done=st.done, drafts=st.drafts, q_row=st.q_row, tokens=st.tokens,
                          lengths=self.cache.lengths, passes=st.passes, lse=self.lse, prev_lse=self.prev_lse,
                          thr=self.thr, prev_thr=self.prev_thr)

    def _reset_for_warmup(self) -> None:
        self.cache.lengths.zero_()
        self.st.start(self.first.zero_(), torch.zeros_like(self.st.drafts))

    def start(self, h: torch.Tensor, n_real: int, cfg_weight: float, temperature: float, seed: int) -> None:
        """After the prefill of the first 2·n_real rows: the first code of each image from h [2·n_real, D] by the
        ordinary fused sampler (step 0 of the same Philox stream family), random drafts, padded images done."""
        r = h.shape[0]
        self.cache.lengths[r:] = 0
        self.cfg_weight.fill_(cfg_weight)
        self.temperature.fill_(temperature)
        self.seed.fill_(seed)
        self.pass_count.zero_()
        hh = torch.zeros(self.rows, h.shape[1], device=h.device, dtype=h.dtype)
        hh[:r] = h
        self._cfg_sample(self.runner.head(hh, True), cfg_weight=self.cfg_weight, temperature=self.temperature,
                         seed=self.seed, step=0, top_k=self.top_k, paired=True, out=self.first)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        V = self.prev_logits.shape[1]
        self.st.start(self.first, torch.randint(0, V, self.st.drafts.shape, generator=gen, device=self.device))
        self.st.done[n_real:] = self.n_tok


class DecodeRuntime:
    """The pool, the decoders per bucket, and the loops that drive them (owned by a JanusPipeline). It holds the
    model runner, never the pipeline, so that a dropped pipeline frees its KV pool (13.7 GB for Pro-1B, 34 GB
    for Pro-7B) at once rather than whenever the cycle collector runs."""

    def __init__(self, runner: ModelRunner, plan: MemoryPlan, use_graphs: bool):
        self.runner, self.device = runner, runner.device
        self.plan, self.use_graphs = plan, use_graphs
        # Allocated now, at load, so that what the plan promised is held (nothing else can take it meanwhile).
        self.pool = KVPool(runner.model, plan)
        self.decoders: dict[tuple, StaticDecoder] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if use_graphs else None
        # One stream for every capture's eager warm-up: cuBLAS keeps a workspace (32 MiB on Hopper) per stream it
        # has run on, which empty_cache() never returns, so a new stream per bucket would leave one per bucket.
        self.side_stream = torch.cuda.Stream(runner.device) if use_graphs else None

    def close(self) -> None:
        """Drop the graphs first (they point into the pool), then the pool."""
        for d in self.decoders.values():
            d.graph = None
        self.decoders.clear()
        self.pool = None
        self.graph_pool = None
        self.side_stream = None

    def _decoder(self, rows: int, capacity: int, paired: bool, top_k, history: int) -> StaticDecoder:
        # One decoder (and graph) per bucket and top_k value: top_k sets the sampler's launch configuration.
        key = (rows, capacity, paired, top_k)
        d = self.decoders.get(key)
        if d is None:
            d = StaticDecoder(self.runner, self.pool, rows, capacity, paired, top_k, history, self.use_graphs,
                              self.graph_pool, self.side_stream)
            self.decoders[key] = d
        return d

    @torch.inference_mode()
    def warmup(self, top_k=None) -> list[int]:
        """Make every image bucket ready now (captured with graphs on, kernels compiled with graphs off), largest
        first so that smaller graphs reuse the largest one's pool; then the one-row text state of the usual
        size. Returns the image buckets."""
        done = []
        for rows in sorted(self.plan.buckets, reverse=True):
            d = self._decoder(rows, self.plan.capacity(rows), True, top_k, self.plan.image_tokens)
            d.warm()
            done.append(rows)
        # the smallest text capacity the plan hands out (1024 slots, or less on a small plan): what text_tokens()
        # asks for whenever prompt + answer fit it, as a ~600-token question with 256 new tokens does
        cap = self.plan.text_capacity(1, 1)
        self._decoder(1, cap, False, top_k, cap).warm()
        return done

    def image_codes(self, rows_tokens: list[list[int]], cfg_weight: float, temperature: float, seed: int,
                    top_k, callback=None, timings: dict | None = None, progress: bool = False) -> torch.Tensor:
        """Codes [N, image_tokens] for the interleaved cond/uncond token rows: a view of the bucket's static
        history (copy it before the next request)."""
        runner, n_tok = self.runner, self.plan.image_tokens
        R, T = len(rows_tokens), max(len(r) for r in rows_tokens)
        bucket, cap = self.plan.image_bucket(R, T)
        d = self._decoder(bucket, cap, True, top_k, n_tok)
        d.ensure_graph()
        h, _ = runner.prefill(rows_tokens, d.cache)  # [R, D]: fills cache rows 0..R−1
        d.start(h, cfg_weight, temperature, seed)
        if timings is not None:
            runner.sync()
            timings["prefill_end"] = time.perf_counter()
        codes = d.sampler.codes[: R // 2]
        every = runner.cfg.vq.grid  # codes per row of the grid (24 for the published models)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=n_tok, initial=1, desc="image tokens", unit="tok", leave=False)
        chunked = callback is not None or bar is not None  # a host sync per grid row, only when asked for
        done = 1
        while done < n_tok:
            k = min(n_tok - done, every - done % every) if chunked else n_tok - done
            d.run(k)
            done += k
            if chunked and done % every == 0:
                if callback is not None:
                    callback(done // every - 1, codes[:, :done].to("cpu", copy=True))
                if bar is not None:
                    runner.sync()
                    bar.update(every if done > every else every - 1)
        if bar is not None:
            bar.close()
        return codes

    def spec_decoder(self, rows: int, capacity: int, window: int, top_k) -> SpecDecoder:
        """The speculative state of a bucket for one window and top_k (a graph of its own). One per bucket is
        kept: another window or top_k replaces it (its buffers and graph grow with the window, and the memory
        plan counts one). Not made by warmup(): the first speculative request of each captures it."""
        key = ("spec", rows, capacity, window, top_k)
        d = self.decoders.get(key)
        if d is None:
            for old in [k for k in self.decoders if k[0] == "spec" and k[1] == rows]:
                self.decoders.pop(old).graph = None
            d = SpecDecoder(self.runner, self.pool, rows, capacity, window, top_k, self.plan.image_tokens,
                            self.use_graphs, self.graph_pool, self.side_stream)
            self.decoders[key] = d
        return d

    def spec_image_codes(self, rows_tokens: list[list[int]], cfg_weight: float, temperature: float, seed: int,
                         top_k, window: int, callback=None, timings: dict | None = None,
                         progress: bool = False) -> tuple[torch.Tensor, SpecState, int]:
        """Speculative decoding (engine/speculative.py) of the interleaved cond/uncond rows: (codes [N, image_tokens]
        (a view of the bucket's static state: copy it), the state, the passes run). The host looks at the
        device only between runs of passes, each run as long as the remaining codes allow for sure (a pass
        accepts at most W codes per image), or shorter to reach the next grid row for a callback."""
        runner, n_tok = self.runner, self.plan.image_tokens
        R, T = len(rows_tokens), max(len(r) for r in rows_tokens)
        bucket, cap = self.plan.image_bucket(R, T, extra=window)
        # A pass carries W·rows tokens through the layers (its transient memory) and keeps the previous pass's
        # logits (the q's): both must fit what the plan keeps back beside the KV pool
        V = runner.cfg.gen_head.image_token_size
        need = decode_workspace_bytes(runner.cfg, window * bucket) + window * bucket * V * runner.dtype.itemsize
        if need > self.plan.reserve_bytes:
            raise InputError(f"{arg('window')} {window} with {R // 2} image(s) needs about "
                             f"{need / 2 ** 30:.2f} GiB of activations per pass, more than the "
                             f"{self.plan.reserve_bytes / 2 ** 30:.2f} GiB the memory plan keeps back for them; use a "
                             f"smaller {arg('window')} or fewer images per call")
        d = self.spec_decoder(bucket, cap, window, top_k)
        d.ensure_graph()
        h, _ = runner.prefill(rows_tokens, d.cache)  # [R, D]: fills cache rows 0..R−1
        d.start(h, R // 2, cfg_weight, temperature, seed)
        if timings is not None:
            runner.sync()
            timings["prefill_end"] = time.perf_counter()
        every, n = runner.cfg.vq.grid, R // 2
        done, codes = d.st.done[:n], d.st.codes[:n]
        feed = RowFeed(n_tok, every, callback, progress)
        passes = 0
        while feed.lo < n_tok:  # feed.lo: codes every image has (known on the host)
            # At least the fewest passes that can finish (or reach the next grid row), and half of what the slowest
            # image's rate so far predicts: ~log2(576) syncs instead of ~100. If acceptance rises a lot, the
            # last run can go on after every image is done (those passes accept nothing; spec_stats reports both)
            lo = feed.lo
            target = min(n_tok, (lo // every + 1) * every) if feed.per_row else n_tok
            k = -(-(target - lo) // window)
            if passes:
                k = max(k, min(target - lo, (target - lo) * passes // max(lo - 1, 1) // 2))
            d.run(k)
            passes += k
            feed.advance(int(done.min()), codes)  # the host sync
        feed.close()
        return codes, d.st, passes

    def kv_cache(self, rows: int, capacity: int) -> KVCache:
        """A cache over the pool for the eager loops (top_p), so they stay inside the memory plan too."""
        return self.pool.cache(rows, capacity)

    def text_tokens(self, prompt_ids: list[int], image_embeds, max_new_tokens: int, temperature: float, seed: int,
                    top_k, eos_id: int, ignore_eos: bool, on_first=None, callback=None) -> list[int]:
        T = len(prompt_ids)
        cap = self.plan.text_capacity(T, max_new_tokens)
        d = self._decoder(1, cap, False, top_k, cap)
        d.ensure_graph()
        h, _ = self.runner.prefill([prompt_ids], d.cache, image_embeds=image_embeds)
        d.start(h, None, temperature, seed)
        hist = d.sampler.codes[0]
        first = int(hist[0])  # the first token: one sync (time to first token)
        if on_first is not None:
            on_first()
        if first == eos_id and not ignore_eos:
            return []
        if callback is not None:
            callback([first])
        done = 1
        while done < max_new_tokens:
            k = min(TEXT_CHUNK, max_new_tokens - done)
            d.run(k)
            done += k
            if ignore_eos and callback is None:
                continue  # nothing to look at: no host sync until the end
            new = hist[done - k:done].tolist()  # one copy per chunk: the EOS check and the streamed tokens
            stop = not ignore_eos and eos_id in new
            if stop:
                new = new[:new.index(eos_id)]
            if callback is not None and new:
                callback(new)
            if stop:
                break
        out = hist[:done].tolist()
        if not ignore_eos and eos_id in out:
            out = out[:out.index(eos_id)]
        return out
