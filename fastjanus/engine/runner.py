"""The model runner: where a prefill and a decode step are defined, for both backends and both loops (the
static runtime in graphs.py replays `decode`; the torch backend's eager loops in pipeline.py call it too).

A decode step is: embed each row's previous token (text: the LLM's embedding; image: one gather from the
precomputed code table) → `LlamaModel.decode` (9 kernels per layer, KV appended at each row's device-side
length) → head (text: lm_head; image: gen_head) → logits. Sampling is the caller's (engine/sampling.py).

The pipeline stays request-level (validate, tokenize, batch, post-process); it hands token rows here.
"""
from __future__ import annotations

import torch

from ..models.janus import JanusModel
from ..models.llama import KVCache
from .memory import prefill_chunk_rows


class ModelRunner:
    def __init__(self, model: JanusModel, device: torch.device, dtype: torch.dtype, backend: str, pad_id: int,
                 image_id: int):
        self.model, self.cfg = model, model.cfg
        self.device, self.dtype, self.backend = device, dtype, backend
        self.pad_id, self.image_id = pad_id, image_id

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        return self.model.new_cache(rows, capacity)

    # ------------------------------------------------------------------------------------ decode
    def embed(self, tokens: torch.Tensor, paired: bool) -> torch.Tensor:  # [R] → [R, D]
        return self.model.embed_image_codes(tokens) if paired else self.model.embed_text(tokens)

    def head(self, h: torch.Tensor, paired: bool) -> torch.Tensor:  # [R, D] → [R, V]
        return self.model.gen_head(h) if paired else self.model.language_model.lm_head(h)

    def decode(self, tokens: torch.Tensor, cache: KVCache, paired: bool, bound: int | None = None) -> torch.Tensor:
        """One decode step: the previous token of every row [R] → next-token logits [R, V]; appends one token to
        every row of the cache and advances cache.lengths on the device. Reads no host value, so the static
        runtime captures it in a CUDA Graph. bound: see LlamaModel.decode (eager torch loops only)."""
        x = self.embed(tokens, paired)  # [R, D]
        h = self.model.llm.decode(x, cache, self.backend, bound)  # [R, D]
        return self.head(h, paired)

    def window(self, tokens: torch.Tensor, cache: KVCache, window: int, bound: int | None = None) -> torch.Tensor:
        """A speculative pass over paired image rows: tokens [W·R] window-major (row j·R + r is token j of row r,
        at slot lengths[r] + j) → logits [W·R, V]. Writes the window's K/V, leaves cache.lengths alone (the
        verify step advances each row by what it accepts). Reads no host value (graph-capturable)."""
        x = self.embed(tokens, True)  # [W·R, D]
        h = self.model.llm.window(x, cache, window, self.backend, bound)  # [W·R, D]
        return self.head(h, True)

    # ------------------------------------------------------------------------------------ prefill
    def prefill(self, rows: list[list[int]], cache: KVCache, image_embeds: torch.Tensor | None = None,
                keep_all: bool = False):
        """Right-padded prefill of token rows into cache rows 0..len(rows)−1 (the cache has at least that many
        rows). Returns (hidden state of each row's last real token [R, D], all hidden states [R, T, D] if
        keep_all else None). image_embeds [R, n, D] replace the image placeholder tokens (understanding).

        Identical rows are prefilled once: N images of one prompt are N copies of one cond/uncond pair, and
        every prompt of one length shares its unconditional row. The unique rows are prefilled into the first
        cache rows, then each row's KV is copied from its unique row (exact: the same values)."""
        R = len(rows)
        src: list[int] = []  # row r's unique row
        unique: dict[tuple, int] = {}
        for r in rows:
            src.append(unique.setdefault(tuple(r), len(unique)))
        if image_embeds is not None or len(unique) == R:
            return self._prefill(rows, cache, image_embeds, keep_all)
        h, every = self._prefill([list(u) for u in unique], cache.view_rows(len(unique)), None, keep_all)
        T = max(len(r) for r in rows)
        # Spread from the last row down: src[r] <= r (a unique row's index never passes its first occurrence),
        # so each source row is still intact when it is read.
        for r in range(R - 1, -1, -1):
            if src[r] != r:
                cache.k[:, r, :, :T].copy_(cache.k[:, src[r], :, :T])
                cache.v[:, r, :, :T].copy_(cache.v[:, src[r], :, :T])
        cache.lengths[:R].copy_(torch.tensor([len(r) for r in rows], dtype=torch.int32))
        idx = torch.tensor(src, device=h.device)
        return h[idx], every[idx] if keep_all else None

    def _prefill(self, rows, cache: KVCache, image_embeds, keep_all: bool):
        R, T = len(rows), max(len(r) for r in rows)
        tokens = torch.full((R, T), self.pad_id, dtype=torch.long)
        for r, ids in enumerate(rows):
            tokens[r, :len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        tokens, lengths = tokens.to(self.device), lengths.to(self.device)
        # row chunks whose activations stay within the memory plan's prefill budget
        chunk = prefill_chunk_rows(self.cfg, T, self.dtype.itemsize)
        last, every = [], []
        for a in range(0, R, chunk):
            b = min(R, a + chunk)
            x = self.model.embed_text(tokens[a:b])  # [r, T, D]
            if image_embeds is not None:
                x[tokens[a:b] == self.image_id] = image_embeds[a:b].reshape(-1, x.shape[-1]).to(x.dtype)
            h = self.model.llm.prefill(x, cache.view_rows(b - a, a), lengths[a:b])  # [r, T, D]
            last.append(h[torch.arange(b - a, device=self.device), lengths[a:b].long() - 1])  # [r, D]
            if keep_all:
                every.append(h)
        cat = (lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs))  # noqa: E731
        return cat(last), cat(every) if keep_all else None
