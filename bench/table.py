"""A Markdown performance table built only from `fastjanus bench --json` files (for the README).

    python -m fastjanus.bench.table bench/results/*-graphs.json bench/results/*-eager.json

One row per (file, scenario): the device, dtype and whether CUDA Graphs were on come from the file itself,
so a table can only say what a run measured. CPU runs are marked as such. Other JSON files given (the pass
report, the kernel microbenchmarks) are skipped with a note on stderr.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def rows(report: dict, source: str) -> list[str]:
    out = []
    cpu = report.get("platform") == "cpu"
    dev = ("CPU RUN (not a GPU figure): " if cpu else "") + report["device"]
    for s in report["scenarios"]:
        base = s.get("baselines", {})
        speed = ", ".join(f"{b} {v['speedup']:.1f}x" for b, v in sorted(base.items())) or "-"
        step = f"{s['decode_step_ms']:.2f} ms" if s.get("decode_step_ms") is not None else "-"
        roof = f"{s['roofline_fraction']:.0%}" if s.get("roofline_fraction") is not None else "-"
        peak = f"{s['peak_mem_bytes'] / 2 ** 30:.1f}" if s.get("peak_mem_bytes") is not None else "-"
        extra = ""
        if "images_per_s" in s:
            extra = f"{s['images_per_s']:.2f} img/s"
        elif "tokens_per_s" in s:
            extra = f"{s['tokens_per_s']:.0f} tok/s"
        runs = s.get("runs", "-")  # fewer than the method's repeats: the run's --time-limit cut it short
        out.append(f"| {dev} | {report['arch']} | {report['dtype']} | {'on' if report['cuda_graphs'] else 'off'} | "
                   f"{s['name']} | {s['num_images'] if s['num_images'] is not None else '-'} | {_s(s['median_s'])} | "
                   f"{runs} | {step} | {roof} | {extra or '-'} | {peak} | {speed} | {source} |")
    return out


HEADER = ("| device | model | dtype | graphs | scenario | images | median | runs | decode step | roofline | rate | "
          "peak GiB | speed-up over | file |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table(paths: list[str], log=lambda s: print(s, file=sys.stderr)) -> str:
    lines = [HEADER]
    for p in paths:
        try:
            rep = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            log(f"skipped {p}: {e}")
            continue
        if not isinstance(rep, dict) or "scenarios" not in rep:
            log(f"skipped {p}: not a fastjanus bench report")
            continue
        if rep.get("partial"):
            log(f"note: {p} is a partial report (its run was stopped before the end)")
        lines += rows(rep, Path(p).name)
    return "\n".join(lines)


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m fastjanus.bench.table REPORT.json ...", file=sys.stderr)
        return 2
    print(table(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
