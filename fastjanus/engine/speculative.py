"""Speculative Jacobi decoding of image codes (SJD, Teng et al. 2024), with the sampling distribution preserved.

Each image keeps its accepted codes and a window of W draft codes after them. One pass runs W tokens per row
(the last accepted code, then the first W − 1 drafts; window-major rows j·R + r) over the cached prefix with
causal attention inside the window (`LlamaModel.window`), which gives the guided distribution p_j of every
window position j under the normal rules (CFG, temperature, top-k, top-p). Then, left to right:

    accept draft x_j with probability min(1, p_j(x_j) / q_j(x_j));
    at the first rejection draw from norm(max(0, p_j − q_j)) and stop.

q_j is the distribution x_j was actually drawn from: one-hot at x_j for a draft initialised at random (then
the rule accepts with probability p_j(x_j) and redraws from p_j without x_j), the previous pass's p at that
position for a draft carried over (x ~ q independently of everything this pass decides, so the output is
distributed as p_j: the speculative-sampling lemma). p_0 is conditioned on accepted codes only, so every pass
accepts at least one code. The drafts after the stopping point are resampled from this pass's p (Jacobi
iteration), carrying that p as their q; positions new to the window get random drafts. Temperature 0 is greedy
Jacobi decoding: accept while draft = argmax, then take the argmax; it gives exactly the greedy codes.

The KV cache keeps only accepted tokens: each row's length advances by its image's accepted count, on the
device (the window's other slots are overwritten by the next pass). An image that is done accepts nothing.
The first code comes from the prefill with the ordinary sampler; a pass needs W slots of room past the image.

This module holds the state and the plain-torch reference of the verify step (`verify_ref`, which the torch
backend runs with a torch.Generator); `kernels/spec_verify.py` is the fused version the static runtime
captures in CUDA Graphs. Both take the randomness as explicit noise tensors in tests, so they can be compared
exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import cfg_mix, filter_top_k_top_p


@dataclass
class SpecNoise:
    """The randomness of one verify step, drawn up front (tests share it between the reference and the kernel).
    accept [N, W] uniforms in [0, 1); fresh [N, W, V] and residual [N, V] standard Gumbel noise (sampling by
    Gumbel-max); init [N, W] random codes for positions new to the window."""
    accept: torch.Tensor
    fresh: torch.Tensor
    residual: torch.Tensor
    init: torch.Tensor

    @staticmethod
    def draw(n: int, w: int, v: int, generator: torch.Generator | None, device) -> "SpecNoise":
        def gumbel(*shape):  # −log(−log U), U in (0, 1): finite
            u = torch.rand(*shape, generator=generator, device=device).clamp_(1e-20, 1.0 - 1e-7)
            return -torch.log(-torch.log(u))
        return SpecNoise(torch.rand(n, w, generator=generator, device=device), gumbel(n, w, v), gumbel(n, v),
                         torch.randint(0, v, (n, w), generator=generator, device=device))


class SpecState:
    """The speculative state of N images (2N rows, window W), all on the device.

    codes [N, n_tok] the accepted codes; done [N] how many; drafts [N, W] the drafts for positions
    done..done+W−1; q_row [N, W] the window index of the previous pass whose p each draft was drawn from
    (−1: one-hot, a random draft); tokens [W·2N] the next pass's inputs (window-major: row j·2N + r holds the
    last accepted code for j = 0, else drafts[r // 2, j − 1]); passes [N] the passes each image took part in.
    prev_logits [W·2N, V]: the previous pass's logits (the q's), None before the first pass."""

    def __init__(self, n: int, window: int, n_tok: int, device):
        i64 = dict(dtype=torch.int64, device=device)
        self.n, self.window, self.n_tok = n, window, n_tok
        self.codes = torch.zeros(n, n_tok, **i64)
        self.done = torch.zeros(n, **i64)
        self.drafts = torch.zeros(n, window, **i64)
        self.q_row = torch.full((n, window), -1, **i64)
        self.tokens = torch.zeros(window * 2 * n, **i64)
        self.passes = torch.zeros(n, **i64)
        self.prev_logits: torch.Tensor | None = None

    def start(self, first: torch.Tensor, init: torch.Tensor) -> None:
        """first [N]: the code sampled from the prefill; init [N, W]: random drafts for positions 1..W."""
        self.codes[:, 0] = first
        self.done.fill_(1)
        self.drafts.copy_(init)
        self.q_row.fill_(-1)
        self.passes.zero_()
        self.prev_logits = None
        self._set_tokens(first)

    def _set_tokens(self, last: torch.Tensor) -> None:
        W = self.window
        t = torch.cat([last[None], self.drafts[:, :W - 1].t()])  # [W, N]: window-major
        self.tokens.copy_(t.repeat_interleave(2, dim=1).flatten())  # both rows of a pair take the image's token


class RowFeed:
    """Progress bar and grid-row callbacks of a speculative loop, which learns only now and then (at its host
    syncs) how many codes every image has: `advance(lo, codes)` hands each grid row completed by then to
    callback(row, codes [N, grid·(row+1)] on the CPU) and moves the bar."""

    def __init__(self, n_tok: int, grid: int, callback, progress: bool):
        self.grid, self.callback, self.lo, self.shown = grid, callback, 1, 0  # the first code is the prefill's
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=n_tok, initial=1, desc="image tokens", unit="tok", leave=False)

    @property
    def per_row(self) -> bool:
        """Whether the loop should stop at every grid row (someone is watching)."""
        return self.callback is not None or self.bar is not None

    def advance(self, lo: int, codes: torch.Tensor) -> None:
        if self.bar is not None:
            self.bar.update(lo - self.lo)
        self.lo = lo
        while self.callback is not None and self.shown < lo // self.grid:
            self.callback(self.shown, codes[:, :self.grid * (self.shown + 1)].to("cpu", copy=True))
            self.shown += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def guided(logits: torch.Tensor, n: int, window: int, cfg_weight: float) -> torch.Tensor:
    """Window-major paired logits [W·2N, V] → guided logits [N, W, V] fp32."""
    return cfg_mix(logits, cfg_weight).view(window, n, -1).transpose(0, 1)


def accept_rule(u: torch.Tensor, p_d: torch.Tensor, q_d: torch.Tensor) -> torch.Tensor:
    """Accept with probability min(1, p/q): u < p/q, written without the division (q > 0 for a drawn draft).
    A module-level function so that the distribution test can break it and see the test fail."""
    return u * q_d < p_d


def residual_sample(p: torch.Tensor, q: torch.Tensor, gumbel: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """A draw from norm(max(0, p − q)) over the last dim by Gumbel-max (log 0 = −inf is never picked); where
    p = q to rounding leaves no residual, `fallback` (a draw from p)."""
    r = (p - q).clamp(min=0)
    return torch.where(r.sum(-1) > 0, (r.log() + gumbel).argmax(-1), fallback)


def verify_ref(st: SpecState, logits: torch.Tensor, *, cfg_weight: float, temperature: float, top_k: int | None,
               top_p: float | None, noise: SpecNoise, lengths: torch.Tensor) -> torch.Tensor:
    """One verify step for the pass whose logits [W·2N, V] (window-major) just ran: accept, write the codes,
    advance `lengths` [2N] (the KV cache's) and st.done, set the next drafts and tokens. Returns the accepted
    counts [N]. No host syncs (the eager loop syncs itself, once per pass)."""
    N, W = st.n, st.window
    dev = logits.device
    j = torch.arange(W, device=dev)
    g = guided(logits, N, W, cfg_weight)  # [N, W, V]
    drafts = st.drafts
    if temperature == 0:  # greedy Jacobi: p is one-hot at the argmax
        fresh = g.argmax(-1)  # [N, W]
        accept = drafts == fresh
        repl = fresh
    else:
        logp = filter_top_k_top_p(g / temperature, top_k, top_p).log_softmax(-1)  # [N, W, V]
        fresh = (logp + noise.fresh).argmax(-1)  # a sample of every p_j: the next drafts
        p_d = logp.gather(-1, drafts[..., None])[..., 0].exp()
        onehot = torch.nn.functional.one_hot(drafts, logp.shape[-1]).float()  # [N, W, V]
        if st.prev_logits is None:
            q = onehot
        else:
            gq = guided(st.prev_logits, N, W, cfg_weight)
            logq = filter_top_k_top_p(gq / temperature, top_k, top_p).log_softmax(-1)  # [N, W, V] by old index
            rows = st.q_row.clamp(min=0)[..., None].expand_as(logq)
            q = torch.where(st.q_row[..., None] < 0, onehot, logq.gather(1, rows).exp())  # [N, W, V] per slot
        q_d = q.gather(-1, drafts[..., None])[..., 0]
        accept = accept_rule(noise.accept, p_d, q_d)
        repl = torch.where(accept, fresh, residual_sample(logp.exp(), q, noise.residual[:, None], fresh))
    a0 = torch.where(accept, W, j).min(-1).values  # [N]: the first rejection, W if none
    a = torch.where(a0 < W, a0 + 1, W)
    a = torch.minimum(a, st.n_tok - st.done)  # never past the image (0 once it is done)
    # the accepted codes: drafts before a0, the replacement at a0
    a0c = a0.clamp(max=W - 1)
    new = torch.where(j < a0[:, None], drafts, repl.gather(1, a0c[:, None]))  # [N, W]
    pos = st.done[:, None] + j  # [N, W]
    keep = j < a[:, None]
    # positions not kept write column 0 (the prefill's code) with its own value: a fixed-shape scatter, no sync
    st.codes.scatter_(1, torch.where(keep, pos, 0), torch.where(keep, new, st.codes[:, :1]))
    last = torch.where(a > 0, new.gather(1, (a - 1).clamp(min=0)[:, None])[:, 0], st.tokens[:2 * N:2])
    # next window: slot t takes position done + a + t, i.e. this window's index a + t when it is still inside
    src = a[:, None] + j  # [N, W]
    inside = src < W
    st.drafts = torch.where(inside, fresh.gather(1, src.clamp(max=W - 1)), noise.init)
    st.q_row = torch.where(inside, src, -1)
    st.passes += (st.done < st.n_tok).long()
    st.done += a
    lengths += a.repeat_interleave(2).to(lengths.dtype)
    st.prev_logits = logits
    st._set_tokens(last)
    return a
