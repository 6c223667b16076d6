"""JanusFlow's rectified-flow loop: the prompt's K/V computed once, then `steps` Euler steps of 1 + G tokens.

The official loop (demo/app_janusflow.py) feeds [prompt without <begin_of_image>] ‖ t_emb ‖ G latent tokens to
the LLM at every step and, because its cache-slicing loop runs over an empty list, recomputes the prompt each
time. The prompt's part of that computation depends on neither z nor t (causal attention: a prompt token never
sees the tokens after it), so its K/V are the same at every step: here it is computed once per request
(`prompt_prefix`) and each step runs only the 1 + G new tokens over it (`FlowStep`). `recompute_step` is the
official form (prompt and block together), kept as the baseline and as the test oracle.

Rows: B = 2N, the N conditional rows first, then the N unconditional ones (the official `torch.cat([z, z])`).
An unconditional row is the prompt's BOS followed by pad tokens that are masked out as keys (the official
attention mask), so it attends to BOS only; its new tokens still sit at positions L.. (the official
position ids count the masked slots). BOS at position 0 sees only itself, so its K/V are the same in both
rows: the unconditional rows reuse the conditional prefix with a mask that keeps slot 0 alone.

Precision: t and the ODE state z are fp32 here, and so are the guidance mix and the Euler update; the
official demo runs all of it in bf16, which also rounds t (step 29 of 30: 966.67 becomes 968). The model's
layers run in the model dtype.
"""
from __future__ import annotations

import torch

from ..models.janusflow import JanusFlowModel
from .graphs import capture_graph


def _causal(T: int, device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()  # [T, T]


def _sequence_mask(keys: torch.Tensor) -> torch.Tensor:
    """keys [B, S] bool (False: masked out as a key) → [B, 1, S, S]: causal over the keys, and every query sees
    itself, so a masked position's row is never empty (its output is never read back)."""
    S = keys.shape[1]
    mask = (_causal(S, keys.device)[None] & keys[:, None, :])[:, None]
    return mask | torch.eye(S, dtype=torch.bool, device=keys.device)[None, None]


def _token_rows(rows: list[list[int]], width: int, pad_id: int, device) -> torch.Tensor:
    """Token rows right-padded with pad_id to [len(rows), width], on device."""
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
    return tokens.to(device)


class Prompts:
    """The prompt rows of one request: `ids` per prompt (BOS … `<begin_of_image>` dropped), num_images each, in
    prompt order (or, for a chunk of a request, `image_prompt`: the prompt index of each image)."""

    def __init__(self, ids: list[list[int]], num_images: int, pad_id: int, image_prompt: list[int] | None = None):
        self.ids, self.pad_id = ids, pad_id
        self.image_prompt = image_prompt if image_prompt is not None else \
            [p for p in range(len(ids)) for _ in range(num_images)]
        self.lengths = [len(r) for r in ids]  # L per prompt
        self.P = max(self.lengths)

    @property
    def images(self) -> int:  # N: images in the request
        return len(self.image_prompt)

    def chunk(self, a: int, b: int) -> "Prompts":
        """Images a..b−1 alone, with only the prompts they use."""
        used = list(dict.fromkeys(self.image_prompt[a:b]))
        where = {p: i for i, p in enumerate(used)}
        return Prompts([self.ids[p] for p in used], 0, self.pad_id, [where[p] for p in self.image_prompt[a:b]])

    def masks(self, P: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix key mask [2N, P] bool, the new block's first position [2N] long)."""
        N = self.images
        L = torch.tensor([self.lengths[p] for p in self.image_prompt], device=device)  # [N]
        slots = torch.arange(P, device=device)
        cond = slots[None] < L[:, None]  # [N, P]
        uncond = (slots == 0)[None].expand(N, P)  # BOS only
        return torch.cat((cond, uncond)), torch.cat((L, L))


class Prefix:
    """The prompts' K/V, computed once: per layer (k, v) [n_prompts, Hkv, P, hd] (rotated), and which prompt
    each of the flow's 2N rows reads (`rows` [2N]: conditional rows, then unconditional)."""

    def __init__(self, kv, rows: torch.Tensor):
        self.kv, self.rows = kv, rows

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # layer i's (k, v) for the 2N rows: one copy
        k, v = self.kv[i]
        return k[self.rows], v[self.rows]


def prompt_prefix(model: JanusFlowModel, prompts: Prompts) -> Prefix:
    """The K/V of every prompt, computed once (each distinct prompt runs once; its rows read it through
    Prefix.rows), over the longest prompt's P slots."""
    dev, cfg, P, n = model.device, model.cfg.language, prompts.P, len(prompts.ids)
    tokens = _token_rows(prompts.ids, P, prompts.pad_id, dev)
    L = torch.tensor(prompts.lengths, device=dev)
    mask = _sequence_mask(torch.arange(P, device=dev)[None] < L[:, None])  # [n, 1, P, P]
    shape = (n, cfg.num_key_value_heads, P, cfg.head_dim)
    out = [(torch.empty(shape, device=dev, dtype=model.dtype), torch.empty(shape, device=dev, dtype=model.dtype))
           for _ in range(cfg.num_hidden_layers)]
    positions = torch.arange(P, device=dev)[None].expand(n, P)
    model.llm.block(model.embed_text(tokens), positions, mask, out=out)
    return Prefix(out, torch.tensor(prompts.image_prompt * 2, device=dev))  # [2N]: conditional, unconditional


def guided_update(z: torch.Tensor, v: torch.Tensor, w: torch.Tensor, dt: torch.Tensor) -> None:
    """z += dt · (w·v_cond − (w − 1)·v_uncond), in fp32, in place. v [2N, ...] conditional rows first."""
    vc, vu = v.float().chunk(2)
    z.add_(dt * (w * vc - (w - 1) * vu))


class FlowStep:
    """One Euler step of N images over a prompt prefix of P slots, on static buffers: padded rows and slots are
    inert, so a bucket (N_b >= N, P_b >= P) serves every request that fits, and on CUDA the step is captured once
    per bucket in a CUDA Graph and replayed (`capture`). The buffers are the step's only inputs: `load` fills
    them per request, `z` is updated in place by each `step`."""

    def __init__(self, model: JanusFlowModel, images: int, P: int):
        cfg, dev = model.cfg, model.device
        lc = cfg.language
        self.model, self.N, self.P = model, images, P
        self.T = 1 + cfg.num_gen_tokens
        B, C, S = 2 * images, cfg.latent_channels, cfg.latent_size
        self.z = torch.zeros(images, C, S, S, device=dev, dtype=torch.float32)
        self.t = torch.zeros(1, device=dev, dtype=torch.float32)
        self.w = torch.zeros(1, device=dev, dtype=torch.float32)
        self.dt = torch.zeros(1, device=dev, dtype=torch.float32)
        shape = (B, lc.num_key_value_heads, P, lc.head_dim)
        self.prefix = [(torch.zeros(shape, device=dev, dtype=model.dtype),
                        torch.zeros(shape, device=dev, dtype=model.dtype)) for _ in range(lc.num_hidden_layers)]
        self.mask = torch.ones(B, 1, self.T, P + self.T, dtype=torch.bool, device=dev)
        self.mask[..., P:] = _causal(self.T, dev)
        self.positions = torch.zeros(B, self.T, dtype=torch.long, device=dev)
        self.graph = None

    def load(self, prompts: Prompts, prefix: Prefix, z: torch.Tensor, cfg_weight: float, steps: int) -> None:
        """A request's inputs into the buffers: prefix from `prompt_prefix` (slots <= P), z [n, ...] fp32."""
        n, B, dev = prompts.images, 2 * self.N, self.model.device
        assert n <= self.N and prompts.P <= self.P, (n, self.N, prompts.P, self.P)
        pmask, start = prompts.masks(self.P, dev)  # [2n, P], [2n]
        rows = torch.cat((torch.arange(n), self.N + torch.arange(n))).to(dev)  # the request's rows in the bucket
        keep = torch.zeros(B, self.P, dtype=torch.bool, device=dev)
        keep[:, 0] = True  # padded rows: slot 0 alone (finite, never read back)
        keep[rows] = pmask
        self.mask[:, 0, :, :self.P] = keep[:, None, :]
        pos = torch.zeros(B, dtype=torch.long, device=dev)
        pos[rows] = start
        self.positions.copy_(pos[:, None] + torch.arange(self.T, device=dev)[None])
        for i, (k, v) in enumerate(self.prefix):  # one layer at a time: the gathered copy stays one layer's size
            pk, pv = prefix.layer(i)
            k.zero_()
            v.zero_()
            k[rows, :, :pk.shape[2]] = pk
            v[rows, :, :pv.shape[2]] = pv
        self.z.zero_()
        self.z[:n] = z
        self.w.fill_(float(cfg_weight))
        self.dt.fill_(1.0 / steps)

    def _step(self) -> None:
        m = self.model
        z2 = torch.cat((self.z, self.z))  # [2N, C, H, W]: conditional, unconditional
        x, x_emb, t_emb = m.flow_inputs(z2, self.t.expand(z2.shape[0]))  # [2N, T, D]
        h = m.llm.block(x, self.positions, self.mask, prefix=self.prefix)  # [2N, T, D]
        v = m.flow_velocity(h[:, 1:], x_emb, t_emb)  # [2N, C, H, W]
        guided_update(self.z, v, self.w, self.dt)

    def step(self, t: float) -> None:
        self.t.fill_(t)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def capture(self, pool=None) -> None:
        """Record the step in a CUDA Graph (graphs.capture_graph). Its warm-up runs change z; load() sets it again
        before every request."""
        self.graph = capture_graph(self._step, self.model.device, pool)


def recompute_step(model: JanusFlowModel, prompts: Prompts, z: torch.Tensor, t: float, cfg_weight: float,
                   dt: float) -> None:
    """The official step: the whole sequence [prompt ‖ t_emb ‖ latents] through the LLM with the official mask
    (unconditional rows: pad tokens after BOS, masked as keys). Updates z [N, C, H, W] fp32 in place. The
    baseline of `fastjanus bench --arch janusflow-1.3b` and the oracle of the cached step."""
    dev, P, N = model.device, prompts.P, prompts.images
    cond = [prompts.ids[p] for p in prompts.image_prompt]
    tokens = _token_rows(cond + [r[:1] for r in cond], P, prompts.pad_id, dev)  # unconditional: BOS, then pad
    pmask, start = prompts.masks(P, dev)  # [2N, P], [2N]
    z2 = torch.cat((z, z))
    x, x_emb, t_emb = model.flow_inputs(z2, torch.full((2 * N,), t, device=dev, dtype=torch.float32))
    T = x.shape[1]
    seq = torch.cat((model.embed_text(tokens), x), 1)  # [2N, P + T, D]
    keys = torch.cat((pmask, torch.ones(2 * N, T, dtype=torch.bool, device=dev)), 1)  # [2N, P + T]
    mask = _sequence_mask(keys)  # [2N, 1, P + T, P + T]
    positions = torch.cat((torch.arange(P, device=dev)[None].expand(2 * N, P),
                           start[:, None] + torch.arange(T, device=dev)[None]), 1)
    h = model.llm.block(seq, positions, mask)[:, P + 1:]  # [2N, G, D]
    v = model.flow_velocity(h, x_emb, t_emb)
    w = torch.tensor(float(cfg_weight), device=dev)
    guided_update(z, v, w, torch.tensor(dt, device=dev))
