"""How far an 8-bit model (and an FP8 KV cache) is from the unquantized one: guided image-token logits.

Measure: P random prompts (one image each, CFG weight 5), the guided logits u + 5·(c − u) of the first image
token (from the prefill) and of the next `steps − 1` tokens, teacher-forced on the unquantized model's greedy
codes so that every model sees the same inputs. Per prompt and step: the relative L2 error
‖l − l_ref‖ / ‖l_ref‖ and whether the argmax (top-1) agrees.

Compared side by side:
- `rtn`: the unquantized model with its target weights replaced by a plain per-output-channel round-to-nearest
  quantize-dequantize (written here independently of fastjanus/quant.py, as the yardstick): what any correct
  8-bit kernel with these scales reaches. The issue's requirement is fastjanus ≤ 1.2 × rtn.
- `fastjanus`: the model as fastjanus runs it (8-bit tensors, the W8A16 kernels on the triton backend).
- `fastjanus+kv`: the same with the e4m3 KV cache; its decode steps (not the first token, which the prefill
  computes from unquantized keys and values) show what the cache adds.

Random weights have none of the redundancy of trained ones, so these errors overstate what a real checkpoint
loses; the ratio to rtn is the meaningful number here.
"""
from __future__ import annotations

import random

import torch

from ..engine.pipeline import JanusPipeline, image_token_rows, load
from ..engine.sampling import cfg_mix
from ..quant import target_modules
from .harness import random_prompt

CFG_WEIGHT = 5.0


def prompts(n: int, seed: int = 0, words: int = 4) -> list[str]:
    rng = random.Random(seed)
    return [random_prompt(rng, words) for _ in range(n)]


@torch.inference_mode()
def guided_logits(pipe: JanusPipeline, texts: list[str], steps: int,
                  codes: torch.Tensor | None = None) -> torch.Tensor:
    """[steps, P, codebook] fp32 guided logits, teacher-forced on codes [steps, P] (None: greedy, own codes)."""
    rows = image_token_rows(pipe.tokenizer, pipe.cfg, texts, 1)
    T = max(len(r) for r in rows)
    runner = pipe.runner
    cache = runner.new_cache(len(rows), T + steps)
    h, _ = runner.prefill(rows, cache)
    logits, out = runner.head(h, paired=True), []
    for i in range(steps):
        g = cfg_mix(logits, CFG_WEIGHT)  # [P, K]
        out.append(g.float().cpu())
        if i == steps - 1:
            break
        tok = g.argmax(-1) if codes is None else codes[i].to(g.device)
        logits = runner.decode(tok.repeat_interleave(2), cache, paired=True, bound=T + i + 1)
    return torch.stack(out)


def compare(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative L2 errors and top-1 agreement, for the first token and over all steps."""
    err = (logits - ref).norm(dim=-1) / ref.norm(dim=-1)  # [steps, P]
    top1 = logits.argmax(-1) == ref.argmax(-1)
    return {"first_token": {"mean_rel_l2": err[0].mean().item(), "max_rel_l2": err[0].max().item(),
                            "top1_agree": int(top1[0].sum()), "of": int(top1.shape[1])},
            "all_steps": {"mean_rel_l2": err.mean().item(), "max_rel_l2": err.max().item(),
                          "top1_agree": int(top1.sum()), "of": int(top1.numel())},
            "later_steps_mean_rel_l2": err[1:].mean().item() if err.shape[0] > 1 else None}


def rtn_quant_dequant_(model, weights: str, heads: bool) -> None:
    """In place: each target Linear's weight ← the plain per-row absmax round-to-nearest quantize-dequantize."""
    for name in target_modules(model.cfg, heads):
        w = model.get_submodule(name).weight  # a view into the fused weight: fused and official change together
        wf = w.float()
        if weights == "int8":
            s = wf.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127
            deq = torch.round(wf / s).clamp(-127, 127) * s
        else:
            s = wf.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 448
            deq = (wf / s).to(torch.float8_e4m3fn).float() * s
        w.copy_(deq.to(w.dtype))


def measure(model_dir, weights: str | None, heads: bool = False, *, quantized_dir=None, n_prompts: int = 32,
            steps: int = 4, kv_cache: bool = True, device=None, dtype=None, backend=None, seed: int = 0,
            log=lambda s: None) -> dict:
    """Errors of rtn, fastjanus (quantize at load, or the folder quantized_dir) and fastjanus + FP8 KV against
    the unquantized model in model_dir (weights None: the FP8 KV cache alone). Loads the float model once (it
    becomes the rtn model in place) and the 8-bit one once or twice. The reference and rtn run on the torch
    backend (plain torch: the yardsticks), the 8-bit models on `backend` (default: triton on CUDA)."""
    texts = prompts(n_prompts, seed)
    log(f"quality: unquantized reference, {n_prompts} prompts x {steps} steps")
    ref_pipe = load(model_dir, device=device, dtype=dtype, backend="torch")
    ref = guided_logits(ref_pipe, texts, steps)
    codes = ref.argmax(-1)  # [steps, P]: the reference's greedy codes, fed to every model
    rep = {"weights": weights, "heads": heads, "prompts": n_prompts, "steps": steps, "cfg_weight": CFG_WEIGHT,
           "device": str(ref_pipe.device), "dtype": str(ref_pipe.dtype).removeprefix("torch.")}
    if weights is not None:
        with torch.no_grad():
            rtn_quant_dequant_(ref_pipe.model, weights, heads)
        log("quality: plain RTN quantize-dequantize")
        rep["rtn"] = compare(guided_logits(ref_pipe, texts, steps, codes), ref)
    ref_pipe.close()
    del ref_pipe
    if weights is None:
        kw, src, runs = {}, model_dir, (("fastjanus+kv", "fp8"),)
    else:
        kw = {"quantize": weights, "quantize_heads": heads} if quantized_dir is None else {}
        src = model_dir if quantized_dir is None else quantized_dir
        runs = (("fastjanus", None), ("fastjanus+kv", "fp8")) if kv_cache else (("fastjanus", None),)
    for name, kv in runs:
        log(f"quality: {name}")
        pipe = load(src, device=device, dtype=dtype, backend=backend, kv_cache=kv, **kw)
        rep[name] = compare(guided_logits(pipe, texts, steps, codes), ref)
        rep["backend"] = pipe.backend
        pipe.close()
    if weights is not None:
        r, f = rep["rtn"]["first_token"]["mean_rel_l2"], rep["fastjanus"]["first_token"]["mean_rel_l2"]
        rep["ratio_to_rtn"] = f / r if r > 0 else float("inf")
    return rep


def format_report(rep: dict) -> str:
    what = "the FP8 KV cache" if rep["weights"] is None else \
        f"{rep['weights']} weights{' (+ heads)' if rep['heads'] else ''}"
    lines = [f"quality of {what} vs the unquantized model: "
             f"{rep['prompts']} prompts, guided logits (cfg {rep['cfg_weight']:g}), {rep['steps']} steps "
             f"teacher-forced ({rep['device']}, {rep['dtype']}, {rep['backend']} backend)"]
    lines.append(f"  {'':14} {'first token: rel L2 mean / max':>32} {'top-1':>7}   {'all steps: rel L2':>18} "
                 f"{'top-1':>9}")
    for name in ("rtn", "fastjanus", "fastjanus+kv"):
        if name not in rep:
            continue
        a, b = rep[name]["first_token"], rep[name]["all_steps"]
        lines.append(f"  {name:14} {100 * a['mean_rel_l2']:>23.2f}% / {100 * a['max_rel_l2']:.2f}% "
                     f"{a['top1_agree']:>3}/{a['of']:<3}   {100 * b['mean_rel_l2']:>17.2f}% "
                     f"{b['top1_agree']:>4}/{b['of']}")
    if "ratio_to_rtn" in rep:
        lines.append(f"  fastjanus / rtn (first token, mean): {rep['ratio_to_rtn']:.3f} (required <= 1.2)")
    if "fastjanus+kv" in rep and "fastjanus" in rep and rep["fastjanus"]["later_steps_mean_rel_l2"] is not None:
        a, b = rep["fastjanus"]["later_steps_mean_rel_l2"], rep["fastjanus+kv"]["later_steps_mean_rel_l2"]
        lines.append(f"  the FP8 KV cache, decode steps: rel L2 {100 * a:.2f}% -> {100 * b:.2f}%")
    lines.append("  (random weights: errors overstate a trained checkpoint's; the ratio to rtn is what matters)")
    return "\n".join(lines)
