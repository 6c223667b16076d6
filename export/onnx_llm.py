"""Text → image codes on ONNX Runtime: the LLM side of image generation as four graphs, and a numpy runner.

Graphs (written by `export_llm`, each with a dynamic rows axis R):

  llm_prefill.onnx   input_ids [R, T] int64 (right-padded), lengths [R] int64
                     → hidden [R, D] (normed, of each row's last real token), kv_cache [L, 2, R, Hkv, T, hd]
  llm_decode.onnx    inputs_embeds [R, D], lengths [R] int64, kv_cache [L, 2, R, Hkv, S, hd]
                     → hidden [R, D], kv_cache_out [L, 2, R, Hkv, S, hd]
  gen_head.onnx      hidden [R, D] → logits [R, codebook]
  image_embed.onnx   codes [R] int64 → inputs_embeds [R, D]  (a gather from the model's gen_code_table)

The KV cache follows the torch runtime (models/llama.py): row r holds lengths[r] tokens at slots
0..lengths[r]−1; a decode step rotates its query and key at position lengths[r], writes its key/value at slot
lengths[r], attends over slots 0..lengths[r] and returns the whole cache, so a runner feeds each step's output
back unchanged (on a GPU provider it never leaves the device). S, the cache capacity, is the caller's: the
runner pads the prefill's T slots to T + image_tokens once. `llm.json` beside the graphs holds what the runner
needs to know (image tokens, codebook, dtype, max_len).

The export half imports torch inside its functions only: `OrtImageGenerator` and the sampling helpers need
onnxruntime and numpy alone.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np

from ..checks import check_sampling, check_seed
from ..errors import InputError, arg
from .onnx_io import check_opset, describe, export_module, require

PARTS = ("llm_prefill", "llm_decode", "gen_head", "image_embed")
INT8_PARTS = ("llm_prefill", "llm_decode", "gen_head")  # image_embed is a table lookup: nothing to multiply
SETTINGS = "llm.json"
EXPORT_HINT = "run `fastjanus export-onnx --parts all` to write it"


def graph_file(part: str, int8: bool = False) -> str:
    return f"{part}_int8.onnx" if int8 and part in INT8_PARTS else f"{part}.onnx"


# =============================================================================================== export (torch)
def export_llm(model, cfg, out_dir: Path, *, opset: int, dtype, max_len: int | None = None,
               progress=print) -> dict[str, dict]:
    """Write the four graphs and llm.json into out_dir. Returns the manifest entries {part: {"file", "bytes",
    "external_data", "seconds", "inputs", "outputs", "dtype"}}.

    model: a loaded (fused) float JanusModel; cfg: its JanusConfig. dtype: torch.float32 or torch.float16 (the
    weights are cast; ids stay int64). max_len: the most positions (prompt + image tokens) a row may reach,
    which sizes the rotary table inside the graphs; default the model's context."""
    import torch

    check_opset(opset)
    if dtype not in (torch.float32, torch.float16):
        raise InputError(f"ONNX export of the LLM supports float32 and float16, got {dtype}; bfloat16 has no "
                         "ONNX Runtime CPU kernels: use float16 for a GPU provider")
    lm, n_tok = cfg.language, cfg.num_image_tokens
    max_len = lm.max_position_embeddings if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not n_tok + 2 <= max_len <= \
            lm.max_position_embeddings:
        raise InputError(f"max_len must be an integer in [{n_tok + 2}, {lm.max_position_embeddings}] (a prompt "
                         f"plus the {n_tok} image tokens, within the model's context), got {max_len!r}")
    _check_exportable(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    W = _wrappers()
    weights = W.LlamaWeights(model, dtype, max_len)
    R, T, S = 3, 5, 7  # example sizes: distinct from every fixed size of tiny (2 layers, 2 kv heads, hd 16)
    Hkv, hd, L, D = lm.num_key_value_heads, lm.head_dim, lm.num_hidden_layers, lm.hidden_size
    dev = model.device
    ids = torch.zeros(R, T, dtype=torch.long, device=dev)
    lengths = torch.tensor([T, T - 2, 1], dtype=torch.long, device=dev)
    rows = {0: "rows"}
    jobs = {
        "llm_prefill": (W.Prefill(weights), (ids, lengths), ["input_ids", "lengths"], ["hidden", "kv_cache"],
                        {"input_ids": {0: "rows", 1: "tokens"}, "lengths": rows, "hidden": rows,
                         "kv_cache": {2: "rows", 4: "tokens"}}),
        "llm_decode": (W.Decode(weights), (torch.zeros(R, D, dtype=dtype, device=dev), lengths,
                                           torch.zeros(L, 2, R, Hkv, S, hd, dtype=dtype, device=dev)),
                       ["inputs_embeds", "lengths", "kv_cache"], ["hidden", "kv_cache_out"],
                       {"inputs_embeds": rows, "lengths": rows, "hidden": rows,
                        "kv_cache": {2: "rows", 4: "slots"}, "kv_cache_out": {2: "rows", 4: "slots"}}),
        "gen_head": (W.GenHead(model.gen_head, dtype), (torch.zeros(R, D, dtype=dtype, device=dev),),
                     ["hidden"], ["logits"], {"hidden": rows, "logits": rows}),
        "image_embed": (W.ImageEmbed(model.gen_code_table, dtype), (torch.zeros(R, dtype=torch.long, device=dev),),
                        ["codes"], ["inputs_embeds"], {"codes": rows, "inputs_embeds": rows}),
    }
    entries = {}
    for part, (module, args, inputs, outputs, axes) in jobs.items():
        path = out_dir / graph_file(part)
        info = export_module(module.eval(), args, path, input_names=inputs, output_names=outputs,
                             dynamic_axes=axes, opset=opset)
        entries[part] = {**info, **describe(path), "dtype": str(dtype).removeprefix("torch.")}
        progress(f"{path.name}: {info['bytes'] / 2 ** 20:.1f} MiB in {info['seconds']} s")
    settings = {"image_tokens": n_tok, "codebook_size": cfg.vq.codebook_size, "vocab_size": lm.vocab_size,
                "hidden_size": D, "layers": L, "kv_heads": Hkv, "head_dim": hd, "max_len": max_len,
                "dtype": entries["llm_decode"]["dtype"], "opset": opset,
                "kv_cache": "[layers, 2 (k, v), rows, kv_heads, slots, head_dim]"}
    (out_dir / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return entries


def _check_exportable(model) -> None:
    if getattr(model, "gen_code_table", None) is None or model.llm.rope is None:
        raise InputError("the model is not in its inference layout: export a model from fastjanus.load() (which "
                         "calls model.fuse())")
    attn, mlp = model.llm.layers[0].self_attn, model.llm.layers[0].mlp
    heads = [getattr(m, "weight_scale", None) for m in (model.gen_head.output_mlp_projector,
                                                        model.gen_head.vision_head)]
    if attn.qkv_scale is not None or mlp.gate_up_scale is not None or any(s is not None for s in heads):
        raise InputError("the model has 8-bit weights; export the float checkpoint and make the int8 graphs with "
                         "quantize_llm_int8 (ONNX Runtime's own int8 kernels)")


@functools.cache
def _wrappers():
    """The export-time modules. Defined on first use so that importing this file does not import torch.

    They hold the model's own tensors (cast only for a float16 export of a float32 model) and restate the
    prefill and decode step in ops the TorchScript exporter traces into plain ONNX: no in-place cache writes
    (the decode step selects the new key/value into the cache with `where`), gathers instead of advanced
    indexing, and grouped-query attention by broadcasting (the SDPA symbolic has no enable_gqa)."""
    import types

    import torch
    import torch.nn.functional as F
    from torch import nn

    from ..kernels.reference import add_rmsnorm_ref, rope_ref, silu_mul_ref
    from ..models.llama import apply_rotary

    def norm(x, w, eps):  # the Llama RMSNorm (fp32 statistics, rounded to the dtype, then the scale)
        return add_rmsnorm_ref(x, weight=w, eps=eps)

    def attend(q, k, v, mask):
        """q [R, Hkv, G, T, hd], k/v [R, Hkv, S, hd], mask bool broadcastable to [R, Hkv, G, T, S] → [R, Hkv,
        G, T, hd]. Each kv head serves its G query heads by broadcasting (no repeated K/V); the softmax runs
        in fp32, as the torch kernels accumulate, so a float16 graph neither overflows nor loses the tail."""
        scores = torch.matmul(q * q.shape[-1] ** -0.5, k.unsqueeze(2).transpose(-1, -2))  # [R, Hkv, G, T, S]
        p = scores.float().masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
        return torch.matmul(p, v.unsqueeze(2))

    class Layer(nn.Module):
        def __init__(self, layer, dtype):
            super().__init__()
            cast = lambda t: t.detach().to(dtype)  # the model's tensor itself when the dtype agrees
            self.register_buffer("ln1", cast(layer.input_layernorm.weight))
            self.register_buffer("qkv", cast(layer.self_attn.qkv_weight))  # [(H + 2·Hkv)·hd, D]
            self.register_buffer("o", cast(layer.self_attn.o_proj.weight))
            self.register_buffer("ln2", cast(layer.post_attention_layernorm.weight))
            self.register_buffer("gate_up", cast(layer.mlp.gate_up_weight))  # [2·I, D]
            self.register_buffer("down", cast(layer.mlp.down_proj.weight))

    class LlamaWeights(nn.Module):
        def __init__(self, model, dtype, max_len):
            super().__init__()
            llm, lm = model.llm, model.cfg.language
            self.layers = nn.ModuleList(Layer(layer, dtype) for layer in llm.layers)
            self.register_buffer("embed", llm.embed_tokens.weight.detach().to(dtype))
            self.register_buffer("norm", llm.norm.weight.detach().to(dtype))
            self.register_buffer("rope", llm.rope[:max_len])  # [max_len, 2, hd/2] fp32, as the model's table
            self.eps, self.H, self.Hkv, self.hd, self.D = lm.rms_norm_eps, lm.num_attention_heads, \
                lm.num_key_value_heads, lm.head_dim, lm.hidden_size

        def qkv(self, layer, x):
            """x [..., D] → q [..., Hkv, G, hd], k, v [..., Hkv, hd]."""
            H, Hkv, hd = self.H, self.Hkv, self.hd
            q, k, v = F.linear(x, layer.qkv).split((H * hd, Hkv * hd, Hkv * hd), dim=-1)
            return q.unflatten(-1, (Hkv, H // Hkv, hd)), k.unflatten(-1, (Hkv, hd)), v.unflatten(-1, (Hkv, hd))

    class Prefill(nn.Module):
        """LlamaModel.prefill from token ids: slots 0..T−1 of every row, rotary and attention in the dtype."""

        def __init__(self, weights):
            super().__init__()
            self.w = weights

        def forward(self, input_ids, lengths):  # [R, T] int64, [R] int64
            w = self.w
            x = F.embedding(input_ids, w.embed)  # [R, T, D]
            T = input_ids.shape[1]
            c, s = w.rope[:T, 0], w.rope[:T, 1]  # [T, hd/2] fp32
            cos = torch.cat((c, c), -1).to(x.dtype)[:, None, None]  # [T, 1, 1, hd]: over heads and groups
            sin = torch.cat((s, s), -1).to(x.dtype)[:, None, None]
            pos = torch.arange(T, device=x.device)
            causal = pos[:, None] >= pos[None, :]  # [T, T]
            kv = []
            for layer in w.layers:
                q, k, v = w.qkv(layer, norm(x, layer.ln1, w.eps))  # [R, T, Hkv, G, hd], [R, T, Hkv, hd] ×2
                q = apply_rotary(q, cos, sin).permute(0, 2, 3, 1, 4)  # [R, Hkv, G, T, hd]
                k = apply_rotary(k, cos[:, 0], sin[:, 0]).transpose(1, 2)  # [R, Hkv, T, hd]
                v = v.transpose(1, 2)
                kv.append(torch.stack((k, v)))  # [2, R, Hkv, T, hd]
                o = attend(q, k, v, causal)  # [R, Hkv, G, T, hd]
                x = x + F.linear(o.permute(0, 3, 1, 2, 4).flatten(2), layer.o)  # [R, T, D]
                g, u = F.linear(norm(x, layer.ln2, w.eps), layer.gate_up).chunk(2, dim=-1)
                x = x + F.linear(F.silu(g) * u, layer.down)  # as MLP.forward (the prefill's rounding)
            x = norm(x, w.norm, w.eps)
            last = (lengths - 1)[:, None, None].expand(-1, 1, w.D)  # [R, 1, D] (a fixed D keeps the output's D fixed)
            return torch.gather(x, 1, last)[:, 0], torch.stack(kv)  # [R, D], [L, 2, R, Hkv, T, hd]

    class Decode(nn.Module):
        """LlamaModel.decode with the torch backend's arithmetic: rotary in fp32 at position lengths[r]
        (rope_ref), the new key/value at slot lengths[r], attention over slots 0..lengths[r], SiLU·mul in
        fp32; the residual stream and the norms as add_rmsnorm. Returns the whole updated cache."""

        def __init__(self, weights):
            super().__init__()
            self.w = weights

        def forward(self, inputs_embeds, lengths, kv_cache):  # [R, D], [R] int64, [L, 2, R, Hkv, S, hd]
            w, R = self.w, inputs_embeds.shape[0]
            slots = torch.arange(kv_cache.shape[4], device=lengths.device)[None, :]  # [1, S]
            new = (slots == lengths[:, None])[:, None, :, None]  # [R, 1, S, 1]: the slot this step writes
            seen = (slots <= lengths[:, None])[:, None, None, None, :]  # [R, 1, 1, 1, S]: the slots it reads
            residual = inputs_embeds
            h = norm(residual, w.layers[0].ln1, w.eps)
            out = []
            for i, layer in enumerate(w.layers):
                q, k, v = w.qkv(layer, h)  # [R, Hkv, G, hd], [R, Hkv, hd] ×2
                q = rope_ref(q.flatten(1, 2), lengths, w.rope).unflatten(1, (w.Hkv, -1))
                k = rope_ref(k, lengths, w.rope)
                k = torch.where(new, k[:, :, None], kv_cache[i, 0])  # [R, Hkv, S, hd]
                v = torch.where(new, v[:, :, None], kv_cache[i, 1])
                out.append(torch.stack((k, v)))
                o = attend(q[:, :, :, None], k, v, seen)  # [R, Hkv, G, 1, hd]
                residual = residual + F.linear(o.reshape(R, -1), layer.o)
                h = norm(residual, layer.ln2, w.eps)
                residual = residual + F.linear(silu_mul_ref(F.linear(h, layer.gate_up)), layer.down)
                nxt = w.layers[i + 1].ln1 if i + 1 < len(w.layers) else w.norm
                h = norm(residual, nxt, w.eps)
            return h, torch.stack(out)  # [R, D], [L, 2, R, Hkv, S, hd]

    class GenHead(nn.Module):
        """GenHead as MatMul + Add (F.linear of a 2-D input exports as Gemm, which ONNX Runtime's dynamic
        int8 quantization does not cover)."""

        def __init__(self, head, dtype):
            super().__init__()
            for name, lin in (("proj", head.output_mlp_projector), ("out", head.vision_head)):
                self.register_buffer(name + "_w", lin.weight.detach().to(dtype))
                self.register_buffer(name + "_b", lin.bias.detach().to(dtype))

        def forward(self, hidden):  # [R, D] → [R, K]
            x = F.gelu(torch.matmul(hidden, self.proj_w.t()) + self.proj_b)
            return torch.matmul(x, self.out_w.t()) + self.out_b

    class ImageEmbed(nn.Module):
        def __init__(self, table, dtype):
            super().__init__()
            self.register_buffer("table", table.detach().to(dtype))  # [codebook, D] gen_aligner(gen_embed(c))

        def forward(self, codes):  # [R] int64 → [R, D]
            return F.embedding(codes, self.table)

    return types.SimpleNamespace(LlamaWeights=LlamaWeights, Prefill=Prefill, Decode=Decode, GenHead=GenHead,
                                 ImageEmbed=ImageEmbed)


# ========================================================================================= runner (numpy + ORT)
def read_settings(onnx_dir: Path) -> dict:
    path = Path(onnx_dir) / SETTINGS
    if not path.is_file():
        raise InputError(f"{path} is missing (the LLM graphs' settings): {EXPORT_HINT}")
    keys = ("image_tokens", "codebook_size", "vocab_size", "max_len", "dtype")
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(s, dict) and all(k in s for k in keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise InputError(f"{path}: damaged (need a JSON object with {', '.join(keys)}): {EXPORT_HINT}")
    return s


def cfg_mix(logits: np.ndarray, cfg_weight: float) -> np.ndarray:
    """[2N, K] interleaved (even = conditional, odd = unconditional) → u + w·(c − u) [N, K] fp32, as
    engine/sampling.cfg_mix."""
    c, u = logits[0::2].astype(np.float32), logits[1::2].astype(np.float32)
    return u + np.float32(cfg_weight) * (c - u)


def sample(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> np.ndarray:
    """[N, K] fp32 → codes [N] int64. temperature 0: argmax (the first of equal maxima, as torch). Otherwise
    top-k filtering (ties with the k-th kept, as engine/sampling), a softmax in float64 and one uniform draw
    per row through the cumulative distribution. The stream is numpy's, not torch's: the same seed gives
    the same codes here, not the torch path's codes."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    K = z.shape[-1]
    if top_k is not None and top_k < K:
        kth = np.partition(z, K - top_k, axis=-1)[:, K - top_k, None]  # [N, 1]: the k-th largest
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    cdf = np.cumsum(p, -1)  # [N, K]
    u = rng.random(len(z)) * cdf[:, -1]  # [N], in [0, total)
    return np.argmax(cdf > u[:, None], axis=-1).astype(np.int64)  # a zero-probability code is never the first


class OrtImageGenerator:
    """Image codes from the four LLM graphs on ONNX Runtime; numpy does the guidance and the sampling.

    providers: ONNX Runtime execution providers in order of preference; default CUDA when this onnxruntime
    has it, then CPU. `.provider` is the one the decode graph took. int8=True loads the *_int8.onnx graphs
    (quantize_llm_int8) for the prefill, decode and head."""

    def __init__(self, onnx_dir, providers=None, *, int8: bool = False):
        ort = require("onnxruntime")
        self.dir = Path(onnx_dir)
        self.settings = read_settings(self.dir)
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()]
            providers.append("CPUExecutionProvider")
        self.sessions = {}
        for part in PARTS:
            path = self.dir / graph_file(part, int8)
            if not path.is_file():
                extra = " with --quantize int8 (the int8 graphs)" if int8 and part in INT8_PARTS else ""
                raise InputError(f"{path} is missing: {EXPORT_HINT}{extra}")
            self.sessions[part] = ort.InferenceSession(str(path), providers=list(providers))
        self.provider = self.sessions["llm_decode"].get_providers()[0]
        # where outputs that feed the next graph stay (the KV cache, hidden states, embeddings)
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self._ort = ort

    # ------------------------------------------------------------------------------------------ graphs
    def _run(self, part: str, feeds: dict, keep: tuple[str, ...] = ()):
        """Run one graph. Outputs named in `keep` stay OrtValues on self.device (fed to the next graph as
        they are); the others come back as numpy arrays."""
        sess = self.sessions[part]
        b = sess.io_binding()
        for name, value in feeds.items():
            if isinstance(value, self._ort.OrtValue):
                b.bind_ortvalue_input(name, value)
            else:
                b.bind_cpu_input(name, np.ascontiguousarray(value))
        names = [o.name for o in sess.get_outputs()]
        for name in names:
            b.bind_output(name, self.device if name in keep else "cpu")
        sess.run_with_iobinding(b)
        return [v if name in keep else v.numpy() for name, v in zip(names, b.get_outputs())]

    def _check_rows(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """Token rows → right-padded ids [R, T] int64 and lengths [R] int64."""
        s = self.settings
        if not isinstance(rows, (list, tuple)) or not rows:
            raise InputError("rows must be a non-empty list of token-id lists (image_token_rows builds them)")
        if len(rows) % 2:
            raise InputError(f"rows must come in (conditional, unconditional) pairs as image_token_rows builds "
                             f"them; got {len(rows)} rows, an odd count")
        for i, r in enumerate(rows):
            if not isinstance(r, (list, tuple)) or not r or not all(isinstance(t, (int, np.integer))
                                                                    and not isinstance(t, bool) for t in r):
                raise InputError(f"rows[{i}] must be a non-empty list of integer token ids")
            if min(r) < 0 or max(r) >= s["vocab_size"]:
                raise InputError(f"rows[{i}] has token ids outside [0, {s['vocab_size']}): {min(r)}..{max(r)}")
        T = max(len(r) for r in rows)
        if T + s["image_tokens"] > s["max_len"]:
            raise InputError(f"the longest row is {T} tokens; with the {s['image_tokens']} image tokens that passes "
                             f"the {s['max_len']} positions these graphs were exported for (max_len): shorten "
                             f"the prompt to at most {s['max_len'] - s['image_tokens']} tokens or export again "
                             "with a larger max_len")
        # The padding value is never read: causal attention keeps it from every real token, and decode step 0
        # writes over slot lengths[r] before any query reads it.
        ids = np.zeros((len(rows), T), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        return ids, np.array([len(r) for r in rows], dtype=np.int64)

    def prefill(self, rows):
        """Token rows → (last hidden [R, D] on self.device, KV cache [L, 2, R, Hkv, T + image_tokens, hd] on
        self.device, lengths [R] int64)."""
        ids, lengths = self._check_rows(rows)
        h, kv = self._run("llm_prefill", {"input_ids": ids, "lengths": lengths}, keep=("hidden",))
        shape = list(kv.shape)
        shape[4] += self.settings["image_tokens"]  # room for every image token (the last one is never written)
        cache = np.zeros(shape, dtype=kv.dtype)
        cache[:, :, :, :, :kv.shape[4]] = kv
        return h, self._ort.OrtValue.ortvalue_from_numpy(cache, self.device, 0), lengths

    def head(self, h) -> np.ndarray:  # [R, D] → logits [R, K] (the graph's dtype)
        return self._run("gen_head", {"hidden": h})[0]

    def first_step_logits(self, rows, cfg_weight: float = 5.0) -> np.ndarray:
        """Guided logits of the first image token, [N, codebook] fp32 (as pipe.first_step_logits)."""
        h, _, _ = self.prefill(rows)
        return cfg_mix(self.head(h), cfg_weight)

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, rows: list[list[int]], *, cfg_weight: float = 5.0, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0) -> np.ndarray:
        """Image codes [N, image_tokens] int64 from the interleaved (conditional, unconditional) token rows of
        `engine.pipeline.image_token_rows` (2N rows). Greedy (temperature 0) follows the torch path's
        arithmetic; sampled codes are reproducible per seed."""
        check_sampling(temperature, top_k, None, cfg_weight)
        if seed is None:  # a sampled stream is reproducible only from a given seed
            raise InputError(f"{arg('seed')} must be an integer in [0, 2**63), got None")
        check_seed(seed)
        n_tok = self.settings["image_tokens"]
        h, cache, lengths = self.prefill(rows)
        rng = np.random.default_rng(seed)
        codes = np.empty((len(lengths) // 2, n_tok), dtype=np.int64)
        for i in range(n_tok):
            codes[:, i] = sample(cfg_mix(self.head(h), cfg_weight), temperature, top_k, rng)
            if i == n_tok - 1:
                break
            x, = self._run("image_embed", {"codes": np.repeat(codes[:, i], 2)}, keep=("inputs_embeds",))
            h, cache = self._run("llm_decode", {"inputs_embeds": x, "lengths": lengths, "kv_cache": cache},
                                 keep=("hidden", "kv_cache_out"))
            lengths = lengths + 1
        return codes


# ============================================================================================ int8 (ORT's own)
def _weight_matmuls(proto) -> list[str]:
    """MatMul nodes whose second input is a stored weight: the projections, not the attention products."""
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def _files_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _logit_error(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    err = float(np.abs(got - ref).max())
    return {"max_abs": err, "max_rel": err / float(np.abs(ref).max()),
            "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def quantize_llm_int8(onnx_dir, *, per_channel: bool = True, reduce_range: bool = True, progress=print) -> dict:
    """ONNX Runtime's dynamic quantization of llm_prefill, llm_decode and gen_head, written as *_int8.onnx beside
    them: the projection weights int8 (per output channel), activations quantized to uint8 per call; the
    attention products, norms and the embedding table stay float. Needs the float32 graphs.

    reduce_range: 7-bit weights. ORT's x86 u8·s8 kernels without VNNI add pairs of products in int16 and can
    saturate; with per-channel 8-bit weights that wrecked the tiny model (hidden-state rms error 0.27 against
    0.054 with reduce_range, 0.039 per tensor; fp32 hidden rms ~1).

    Returns {"parts": {part: {"file", "fp32_bytes", "int8_bytes", "inputs", "outputs"}}, "first_step":
    {"max_abs", "max_rel", "argmax_agree"}, "first_step_cfg": same for the guided logits (cfg 5), "decode_step":
    same after one decode step}: the int8 graphs against the float32 ones on a fixed random-token prompt pair
    (int8_error); max_rel is max_abs over the largest |fp32 logit|."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_dir = Path(onnx_dir)
    settings = read_settings(onnx_dir)
    if settings["dtype"] != "float32":
        raise InputError(f"int8 quantization starts from the float32 graphs; {onnx_dir} holds {settings['dtype']} "
                         "ones: export again with float32")
    parts = {}
    for part in INT8_PARTS:
        src, dst = onnx_dir / graph_file(part), onnx_dir / graph_file(part, int8=True)
        if not src.is_file():
            raise InputError(f"{src} is missing: {EXPORT_HINT}")
        proto = onnx.load(str(src), load_external_data=False)
        external = src.with_name(src.name + ".data").is_file()
        with _QuietQuantizer():
            quantize_dynamic(src, dst, per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             nodes_to_quantize=_weight_matmuls(proto), use_external_data_format=external)
        parts[part] = {"file": dst.name, "fp32_bytes": _files_bytes(src), "int8_bytes": _files_bytes(dst),
                       **describe(dst)}
        progress(f"{dst.name}: {parts[part]['int8_bytes'] / 2 ** 20:.1f} MiB "
                 f"(float32 {parts[part]['fp32_bytes'] / 2 ** 20:.1f} MiB)")
    return {"parts": parts, **int8_error(onnx_dir)}


class _QuietQuantizer(logging.Filter):
    """Drops the quantizer's 'consider pre-processing' advice (logged on the root logger once per graph): it
    concerns static quantization's calibration, not these dynamic graphs."""

    def filter(self, record) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    def __enter__(self):
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def int8_error(onnx_dir, providers=None) -> dict:
    """Logit errors of the int8 graphs against the float32 ones (see quantize_llm_int8): the first step (prefill
    + head, raw and guided), then one decode step fed the float32 path's greedy code."""
    s = read_settings(onnx_dir)
    ids = np.random.default_rng(0).integers(0, s["vocab_size"], 16).tolist()
    rows = [ids, [ids[0]] + [0] * 14 + [ids[-1]]]  # a prompt pair: the second keeps only its first and last ids
    logits, code = {}, None
    for name in ("fp32", "int8"):
        g = OrtImageGenerator(onnx_dir, providers, int8=name == "int8")
        h, cache, lengths = g.prefill(rows)
        first = g.head(h)  # [2, K]
        if code is None:
            code = np.repeat(cfg_mix(first, 5.0).argmax(-1), 2)  # [2]: one code for both rows
        x, = g._run("image_embed", {"codes": code})
        h, _ = g._run("llm_decode", {"inputs_embeds": x, "lengths": lengths, "kv_cache": cache})
        logits[name] = (first, g.head(h))
    (f_first, f_dec), (q_first, q_dec) = logits["fp32"], logits["int8"]
    return {"first_step": _logit_error(f_first, q_first),
            "first_step_cfg": _logit_error(cfg_mix(f_first, 5.0), cfg_mix(q_first, 5.0)),
            "decode_step": _logit_error(f_dec, q_dec)}
