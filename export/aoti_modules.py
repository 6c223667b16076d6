"""What the AOTInductor packages compute (`aoti_export.py` exports these; `export/cpp/` runs them).

The generator is two programs over caller-owned buffers (the C++ runtime allocates them once per request):

    prefill  input_ids [R, T] int64 (right-padded rows), lengths [R] int32, k_cache, v_cache [L, R, Hkv, S, hd],
             codes [N, n] int64, cfg_weight [1] fp32, temperature [1] fp32, seed [1] int64, step [1] int64
             → next_embeds [R, D]
    step     inputs_embeds [R, D], k_cache, v_cache, lengths, codes, cfg_weight, temperature, seed, step
             → next_embeds [R, D]

R = 2N rows, interleaved (even: conditional, odd: unconditional), as the Python pipeline batches them. The prefill
fills cache slots 0..T−1 (row r holds lengths[r] tokens), computes the first guided logits from each row's last
real token and samples code 0. A step embeds nothing itself: it runs the decoder on the previous code's embedding
(`inputs_embeds`, the last call's output), appends K/V at slot lengths[r], advances lengths, samples code `step`
and returns that code's embedding for the next call. Every call writes codes[:, step] and advances step, on the
device: the C++ loop is prefill + (n − 1) steps with no host read until the codes are copied out.

These are the Python runtime's own methods with the torch backend (`LlamaModel.prefill`, `LlamaModel.decode`,
`GenHead`, `JanusModel.embed_image_codes`), so the arithmetic is the pipeline's. Only the sampler differs: it
must be reproducible from the C++ side with no torch.Generator state, so its noise is a counter-based hash of
(seed, step, image, code) (`counter_uniform`) turned into Gumbel noise; greedy (temperature 0) is the argmax of
the guided logits, exactly as `engine.sampling.sample`.

The step needs only tensors the prefill also uses (the prefill ends by embedding code 0 with the code table), so
the step package is written without weights and the runtime hands it the prefill's: one copy of the LLM.
"""
from __future__ import annotations

import torch
from torch import nn

from ..engine.sampling import cfg_mix
from ..models.llama import KVCache

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, a: int) -> torch.Tensor:
    """(x · a) mod 2³² for int64 x in [0, 2³²) and a constant a < 2³², without int64 overflow (overflow is
    undefined behaviour in the C++ inductor writes): split a into 16-bit halves, every product stays < 2⁴⁹."""
    lo, hi = a & 0xFFFF, a >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift / multiply, the 'lowbias32' constants): a bijection of [0, 2³²) whose
    output bits each depend on every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes → uniform (0, 1) fp32 from their top 23 bits, centred in their cells: (k + 0.5)·2⁻²³ is exact
    in fp32 for every k < 2²³, so neither 0 nor 1 can occur (with 24 bits, k = 2²⁴ − 1 would round up to 1.0 and
    its Gumbel noise to +inf)."""
    return ((h >> 9).float() + 0.5) * 2.0 ** -23


def counter_uniform(seed: torch.Tensor, step: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Uniform (0, 1) fp32 noise [rows, cols] that depends only on (seed, step, row, col): seed, step [1] int64
    (seed ≥ 0). The column is hashed before it meets the row's key, so no two (step, row) keys give shifted
    copies of one noise vector (a key + col combination would)."""
    dev = seed.device
    s = _mix32(_mix32((seed >> 32) & _M32) ^ (seed & _M32))  # [1]
    s = _mix32((s + (step & _M32)) & _M32)  # [1]
    r = _mix32((s + torch.arange(rows, device=dev, dtype=torch.int64)) & _M32)  # [rows]
    c = _mix32(torch.arange(cols, device=dev, dtype=torch.int64) ^ 0x9E3779B9)  # [cols]
    return _unit(_mix32(r[:, None] ^ c[None]))  # [rows, cols]


def guided_sample(logits: torch.Tensor, cfg_weight: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
                  step: torch.Tensor) -> torch.Tensor:
    """logits [2N, K] (interleaved cond/uncond) → codes [N] int64. Guidance u + w·(c − u) in fp32 (cfg_mix);
    temperature 0: argmax; otherwise Gumbel-max, argmax(mixed / T − log(−log U)), which draws from
    softmax(mixed / T). Both branches are computed: a graph has no data-dependent control flow."""
    mixed = cfg_mix(logits, cfg_weight)  # [N, K] fp32
    N, K = mixed.shape
    gumbel = -torch.log(-torch.log(counter_uniform(seed, step, N, K)))  # [N, K]
    drawn = (mixed / temperature.clamp_min(1e-6) + gumbel).argmax(-1)
    return torch.where(temperature > 0, drawn, mixed.argmax(-1))  # [N]


def _next_code(m, h, codes, cfg_weight, temperature, seed, step) -> torch.Tensor:
    """The end of both programs: gen_head on each row's hidden state h [R, D], code `step` drawn from the guided
    logits and written to codes[:, step], step += 1 (on the device), and the code's embedding per row [R, D]
    (the next step's input)."""
    tok = guided_sample(m.gen_head(h), cfg_weight, temperature, seed, step)  # [N]
    codes.scatter_(1, step.expand(codes.shape[0], 1), tok[:, None])
    step.add_(1)
    return m.embed_image_codes(tok.repeat_interleave(2))  # [R, D]


def request_buffers(cfg, rows: list[list[int]], pad: int, cfg_weight: float, temperature: float, seed: int,
                    dtype=torch.float32, device="cpu") -> dict:
    """The caller-owned inputs of one generator request, as fastjanus-run allocates them (rows: the interleaved
    cond/uncond token rows; the cache holds T + n slots). codes start at −1, so a column no call wrote shows."""
    lm, n = cfg.language, cfg.num_image_tokens
    R, T = len(rows), max(map(len, rows))
    ids = torch.full((R, T), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    k = torch.zeros(lm.num_hidden_layers, R, lm.num_key_value_heads, T + n, lm.head_dim, dtype=dtype, device=device)
    return {"input_ids": ids.to(device), "lengths": torch.tensor([len(r) for r in rows], dtype=torch.int32,
                                                                 device=device),
            "k_cache": k, "v_cache": torch.zeros_like(k),
            "codes": torch.full((R // 2, n), -1, dtype=torch.int64, device=device),
            "sampler": (torch.tensor([float(cfg_weight)], device=device),
                        torch.tensor([float(temperature)], device=device),
                        torch.tensor([int(seed)], dtype=torch.int64, device=device),
                        torch.zeros(1, dtype=torch.int64, device=device))}


def run_generator(prefill, step, buf: dict, after_prefill=None) -> torch.Tensor:
    """The generator's loop as fastjanus-run runs it: prefill, then n − 1 steps each fed the last output, over
    `buf` (request_buffers), which the calls update. prefill/step: the eager modules or the loaded packages (a
    package with one output returns it bare). after_prefill(): called between the two (timing). Returns codes."""
    first = lambda out: out[0] if isinstance(out, (list, tuple)) else out  # noqa: E731
    b = buf
    x = first(prefill(b["input_ids"], b["lengths"], b["k_cache"], b["v_cache"], b["codes"], *b["sampler"]))
    if after_prefill is not None:
        after_prefill()
    for _ in range(b["codes"].shape[1] - 1):
        x = first(step(x, b["k_cache"], b["v_cache"], b["lengths"], b["codes"], *b["sampler"]))
    return b["codes"]


class GenPrefill(nn.Module):
    """The prompt prefill and code 0 (module docstring). `model` is a fused JanusModel."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, lengths, k_cache, v_cache, codes, cfg_weight, temperature, seed, step):
        m = self.model
        cache = KVCache.from_buffers(k_cache, v_cache, lengths)
        h = m.llm.prefill(m.embed_text(input_ids), cache, lengths)  # [R, T, D]; lengths stay (copied onto itself)
        rows = torch.arange(h.shape[0], device=h.device)
        last = h[rows, lengths.long() - 1]  # [R, D]: each row's last real token
        return _next_code(m, last, codes, cfg_weight, temperature, seed, step)


class GenStep(nn.Module):
    """One decode step and its code (module docstring); the runner's decode with the torch backend."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, k_cache, v_cache, lengths, codes, cfg_weight, temperature, seed, step):
        m = self.model
        cache = KVCache.from_buffers(k_cache, v_cache, lengths)
        h = m.llm.decode(inputs_embeds.clone(), cache, "torch")  # [R, D]; advances lengths
        return _next_code(m, h, codes, cfg_weight, temperature, seed, step)


class VQImages(nn.Module):
    """codes int64 [N, g·g] → uint8 images [N, S, S, 3]: the ONNX export's VQDecoder (the torch backend's lookup
    and decode_image_tokens' conversion), images only."""

    def __init__(self, vq: nn.Module):
        super().__init__()
        from .onnx_export import VQDecoder
        self.dec = VQDecoder(vq)

    def forward(self, codes):
        return self.dec(codes)[1]
