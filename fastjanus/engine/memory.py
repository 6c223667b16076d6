"""Memory arithmetic and the memory plan: the KV cache per token, the working set of the decode loop and the
VQ decoder, and how many images fit in the free device memory.

The estimates are deliberately generous (fp32 scratch everywhere, several live feature maps in the VQ
decoder), because the point is to refuse a request before it starts rather than run out of memory at step
400. The benchmark reports measured peaks next to them.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import JanusConfig, LlamaConfig
from ..errors import InputError, arg, setting


def kv_bytes_per_token(cfg: LlamaConfig, elem: int) -> int:
    """K and V of one token of one row over all layers (Pro-1B bf16: 24·2·2048·2 = 192 KiB)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem


def kv_cache_bytes(cfg: LlamaConfig, elem: int, rows: int, max_len: int) -> int:
    return rows * max_len * kv_bytes_per_token(cfg, elem)


def derived_bytes(cfg: JanusConfig, elem: int) -> int:
    """Tables fuse() adds at load: the image-code embedding [codebook, D] in the model dtype and the fp32 rotary
    table [positions, 2, hd/2] (Pro-7B bf16: 128 MiB + 8 MiB)."""
    L = cfg.language
    return cfg.vq.codebook_size * L.hidden_size * elem + L.max_position_embeddings * L.head_dim * 4


def weight_bytes(cfg: JanusConfig, elem: int, quant=None, prefixes: tuple[str, ...] | None = None) -> int:
    """Bytes of the tensors load() places (all, or those whose names start with one of `prefixes`): elem bytes per
    element in the model dtype, and for the Linears an 8-bit scheme quantizes (quant, a `quant.QuantConfig`)
    1 byte per element plus a 4-byte scale per output row. Pro-7B: 14.8 GB in bf16, 8.8 GB with int8 LLM
    linears. Counted from the model's shapes on the meta device (nothing is allocated). The checkpoint's tensors
    only: `derived_bytes` are the tables fuse() adds."""
    import torch

    from ..models.janus import JanusModel
    from ..quant import convert, is_8bit
    with torch.device("meta"):
        model = JanusModel(cfg)
        if quant is not None:
            convert(model, quant)
    n = 0
    for name, t in model.state_dict().items():
        if prefixes is None or name.startswith(prefixes):
            n += t.numel() * (t.element_size() if is_8bit(t.dtype) or name.endswith(".weight_scale") else elem)
    return n


def decode_workspace_bytes(cfg: JanusConfig, rows: int, splits: int = 4) -> int:
    """Transient memory of one decode step, fp32 upper bound: hidden/q/k/v/attention output (≈ 6·D), the MLP
    (3·I), logits over the larger of the text vocabulary and the codebook (twice: raw + guided), and the
    flash-decoding partials (splits × heads × (head_dim + 2))."""
    L = cfg.language
    vocab = max(L.vocab_size, cfg.gen_head.image_token_size)
    per_row = 6 * L.hidden_size + 3 * L.intermediate_size + 2 * vocab
    per_row += splits * L.num_attention_heads * (L.head_dim + 2)
    return rows * per_row * 4


def prefill_workspace_bytes(cfg: JanusConfig, rows: int, length: int, elem: int) -> int:
    """Transient memory of the prefill: per token the hidden state, q/k/v, attention output and the MLP
    (≈ 6·D + 3·I in the model dtype), plus a float32 copy for the norms."""
    L = cfg.language
    return rows * length * ((6 * L.hidden_size + 3 * L.intermediate_size) * elem + 2 * L.hidden_size * 4)


def vq_decode_bytes(cfg: JanusConfig, images: int, elem: int) -> int:
    """The VQ decoder's peak for a batch of images: at most four live feature maps at full resolution (block
    input, normalised copy, conv output, residual sum) with the full-resolution channel count (128 for VQ-16:
    38 MB per bf16 map at 384²), counted at 4 bytes because group norm may upcast. Not yet checked on a GPU."""
    q = cfg.vq
    c_full = q.base_channels * q.channel_multiplier[0]
    return images * 4 * c_full * q.image_size * q.image_size * max(elem, 4)


# ------------------------------------------------------------------------------------------ the plan
GiB = 2 ** 30
MAX_BUCKET_ROWS = 64  # 32 images by default; max_rows= at load raises it
PROMPT_ROOM = 512  # default per-row room for an image prompt beyond the image tokens
PREFILL_BUDGET = 256 * 2 ** 20  # the prefill runs in row chunks whose activations stay under this
VQ_MAX_BATCH = 16  # images per VQ decoder call when memory allows: 16 images (the usual request) in one call


def prefill_chunk_rows(cfg: JanusConfig, length: int, elem: int) -> int:
    """Rows per prefill chunk so that its activations stay within PREFILL_BUDGET (at least 1)."""
    return max(1, PREFILL_BUDGET // max(1, prefill_workspace_bytes(cfg, 1, length, elem)))


def _fmt(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    """The static KV pool shared by every decode bucket, and the buckets it is viewed as.

    The pool holds `pool_slots` token slots (K and V, all layers). A bucket of R rows views it as
    [layers, R, kv_heads, capacity, head_dim] with capacity = min(max_len, pool_slots // R): one request runs
    at a time, so all buckets share the same memory, and a request with a short prompt can use more rows.
    Text decoding (one row) views it with capacity = the power of two ≥ 1024 that holds the request."""
    pool_slots: int
    max_len: int  # per-row cap on an image bucket's capacity (also bounds the attention kernel's grid)
    max_rows: int  # the largest bucket
    kv_bytes_per_token: int
    image_tokens: int
    context: int
    free_bytes: int | None  # device memory free when the plan was made (None: sizes given explicitly)
    reserve_bytes: int
    vq_batch: int
    source: str

    @property
    def pool_bytes(self) -> int:
        return self.pool_slots * self.kv_bytes_per_token

    def capacity(self, rows: int) -> int:
        return min(self.max_len, self.pool_slots // rows)

    @property
    def buckets(self) -> list[int]:
        """Row counts with a graph each: 2, 4, 8, ... and max_rows itself, keeping those that still hold
        an image after a 1-token prompt."""
        out, r = [], 2
        while r < self.max_rows:
            out.append(r)
            r *= 2
        out.append(self.max_rows)
        return [r for r in out if self.capacity(r) >= self.image_tokens + 1]

    def image_bucket(self, rows: int, prompt_len: int, extra: int = 0) -> tuple[int, int]:
        """(bucket rows, capacity) for an image request of `rows` rows (2 per image) and the longest prompt,
        or an InputError that says what fits. extra: slots of room past the image (a speculative pass writes
        its whole window)."""
        need = prompt_len + self.image_tokens + extra
        for r in self.buckets:
            if r >= rows and self.capacity(r) >= need:
                return r, self.capacity(r)
        fit_images = max((r // 2 for r in self.buckets if self.capacity(r) >= need), default=0)
        fit_prompt = max((self.capacity(r) - self.image_tokens - extra for r in self.buckets if r >= rows),
                         default=None)
        msg = (f"{rows // 2} image(s) with a {prompt_len}-token prompt need {rows} rows x {need} KV slots = "
               f"{_fmt(rows * need * self.kv_bytes_per_token)} of KV cache; the memory plan ({self.source}) has a "
               f"{_fmt(self.pool_bytes)} pool of up to {self.max_rows} rows x {self.max_len} slots")
        if fit_images:
            msg += f", which fits at most {fit_images} image(s) at this prompt length"
        else:
            msg += ", which fits no image at this prompt length"
        if fit_prompt is not None and fit_prompt >= 16:  # shorter is no real prompt (the template alone is ~10)
            msg += f", or {rows // 2} image(s) with prompts up to {fit_prompt} tokens"
        msg += (f". Generate fewer images per call, shorten the prompt, or load with a larger {arg('max_rows')}/"
                f"{arg('max_len')} (on a device with the memory for it).")
        raise InputError(msg)

    def text_capacity(self, prompt_len: int, new_tokens: int) -> int:
        need = prompt_len + new_tokens
        cap = min(self.context, self.pool_slots)
        if need > cap:
            if prompt_len >= cap:
                raise InputError(f"the prompt alone is {prompt_len} tokens; the memory plan ({self.source}) holds "
                                 f"{cap} for one row. Shorten the question")
            raise InputError(f"a {prompt_len}-token prompt plus {new_tokens} new tokens needs {need} KV slots; the "
                             f"memory plan ({self.source}) holds {cap} for one row: lower {arg('max_new_tokens')} to "
                             f"{cap - prompt_len}")
        size = 1024
        while size < need:
            size *= 2
        return min(size, cap)


def check_plan_overrides(max_rows, max_len, cfg: JanusConfig | None = None) -> None:
    """max_rows / max_len as given to load(): checked before any weight is read; against the model's context
    and image tokens when its config is given (the CLI checks the rest before it has read one)."""
    for name, v in (("max_rows", max_rows), ("max_len", max_len)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InputError(f"{arg(name)} must be a positive integer (or left out), got {v!r}")
    if max_rows is not None and max_rows % 2:
        raise InputError(f"{arg('max_rows')} must be even (two rows per image: conditional + unconditional), got "
                         f"{max_rows}")
    if cfg is None or max_len is None:
        return
    context = cfg.language.max_position_embeddings
    if max_len > context:
        raise InputError(f"{arg('max_len')} {max_len} exceeds the model's context of {context} positions")
    if max_len < cfg.num_image_tokens + 2:
        raise InputError(f"{arg('max_len')} {max_len} holds no image: one needs its {cfg.num_image_tokens} image "
                         f"tokens plus the prompt; use at least {cfg.num_image_tokens + 64} or leave it out")


def plan_memory(cfg: JanusConfig, elem: int, free_bytes: int | None, *, max_rows: int | None = None,
                max_len: int | None = None) -> MemoryPlan:
    """Size the KV pool from the free device memory (after the weights are loaded), or from max_rows ×
    max_len when both are given. Raises InputError when not even one image fits."""
    L = cfg.language
    context, n_img = L.max_position_embeddings, cfg.num_image_tokens
    kvpt = kv_bytes_per_token(L, elem)
    check_plan_overrides(max_rows, max_len, cfg)
    cap_len = max_len if max_len is not None else min(context, n_img + PROMPT_ROOM)
    rows_cap = max_rows if max_rows is not None else MAX_BUCKET_ROWS
    per_image_vq = vq_decode_bytes(cfg, 1, elem)
    reserve = decode_workspace_bytes(cfg, rows_cap) + PREFILL_BUDGET
    if free_bytes is None:
        slots = rows_cap * cap_len
        return MemoryPlan(slots, cap_len, rows_cap, kvpt, n_img, context, None, reserve, VQ_MAX_BATCH,
                          f"{rows_cap} rows x {cap_len} slots")
    reserve += max(GiB // 2, free_bytes // 20)  # allocator fragmentation, cuBLAS workspaces, graph pools
    avail = free_bytes - reserve - per_image_vq  # the VQ decode runs after the loop, one image at a time at least
    want = rows_cap * cap_len * kvpt
    if max_rows is not None and max_len is not None and want > avail:
        raise InputError(f"{setting('max_rows', max_rows)} x {setting('max_len', max_len)} needs {_fmt(want)} of KV "
                         f"cache, but only {_fmt(max(avail, 0))} of the {_fmt(free_bytes)} free after loading can "
                         "hold it")
    slots = min(rows_cap * cap_len, max(avail, 0) // kvpt)
    if slots < 2 * (n_img + 1):
        raise InputError(f"not enough device memory for one image: {_fmt(free_bytes)} free after loading the "
                         f"weights, {_fmt(2 * (n_img + 1) * kvpt + reserve + per_image_vq)} needed at least; "
                         "use a smaller dtype or model, or free the device")
    left = avail - slots * kvpt + per_image_vq
    vq_batch = int(max(1, min(VQ_MAX_BATCH, left // per_image_vq)))
    return MemoryPlan(slots, cap_len, rows_cap, kvpt, n_img, context, free_bytes, reserve, vq_batch,
                      f"{_fmt(free_bytes)} free at load")
