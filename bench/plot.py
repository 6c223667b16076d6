"""`--plot FILE.png`: the latency breakdown and the roofline fraction of every scenario, drawn with Pillow
(already a dependency; no plotting library needed)."""
from __future__ import annotations

from PIL import Image, ImageDraw

_PARTS = (("prefill_s", "prefill", (66, 133, 244)), ("decode_s", "decode loop", (219, 68, 55)),
          ("vq_decode_s", "VQ decode", (244, 180, 0)))
_WHOLE = (120, 120, 120)


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def plot_report(rep: dict, path: str) -> None:
    sc = rep["scenarios"]
    W, row_h, top, left, bar_w = 1360, 26, 70, 150, 360
    H = top + row_h * len(sc) + 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    title = f"fastjanus bench · {rep['arch']} · {rep['device']} · {rep['dtype']} · backend {rep['backend']}"
    d.text((10, 8), title, fill="black")
    if rep.get("platform") == "cpu":
        d.text((10, 24), "CPU RUN: checks the harness, NOT a GPU figure", fill=(200, 0, 0))
    x1 = left
    x2 = left + bar_w + 400
    d.text((x1, top - 22), "latency: share of each part (median total and speed-up over baselines at right)",
           fill="black")
    d.text((x2, top - 22), f"roofline fraction (copy {rep['copy_bandwidth_gbs']:.0f} GB/s, "
                           f"matmul {rep['matmul_tflops']:.1f} TFLOP/s)", fill="black")
    for i, s in enumerate(sc):
        y = top + i * row_h
        d.text((10, y + 6), s["name"] + (f" x{s['num_images']}" if s["num_images"] else ""), fill="black")
        total = s["median_s"]
        bd = s.get("breakdown")
        x = x1
        if bd:
            for key, _, col in _PARTS:
                w = int(round(bar_w * min(bd[key] / total, 1.0)))
                d.rectangle([x, y + 4, x + w, y + row_h - 6], fill=col)
                x += w
        else:
            d.rectangle([x, y + 4, x + bar_w, y + row_h - 6], fill=_WHOLE)
            x += bar_w
        vs = ", ".join(f"{b} {r['speedup']:.1f}x" for b, r in sorted(s["baselines"].items()))
        d.text((x1 + bar_w + 8, y + 6), _ms(total) + (f" (vs {vs})" if vs else ""), fill="black")
        f = s.get("roofline_fraction")
        d.rectangle([x2, y + 4, x2 + bar_w, y + row_h - 6], outline=(180, 180, 180))
        if f is not None:
            d.rectangle([x2, y + 4, x2 + int(bar_w * min(f, 1.0)), y + row_h - 6], fill=(15, 157, 88))
            d.text((x2 + bar_w + 8, y + 6), f"{f:.0%}", fill="black")
        else:
            d.text((x2 + bar_w + 8, y + 6), "n/a", fill="black")
    y = top + row_h * len(sc) + 14
    x = x1
    for _, label, col in _PARTS + (("", "whole (no breakdown)", _WHOLE),):
        d.rectangle([x, y, x + 12, y + 12], fill=col)
        d.text((x + 16, y), label, fill="black")
        x += 170
    d.text((10, y + 24), f"torch {rep['torch']} · triton {rep['triton']} · {rep['date']} · median of "
                         f"{rep['method']['repeats']}", fill=(90, 90, 90))
    img.save(path)
