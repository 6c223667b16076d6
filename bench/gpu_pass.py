"""The GPU pass: everything a lent GPU machine should run, in one command per 10-minute device run.

    python -m fastjanus.bench.gpu_pass --out DIR [--arch ARCH ...] [--part tests,kernels,e2e | quant]
                                       [--budget-s S] [--dry-run]

It records the environment (GPU, driver, CUDA, torch, Triton, transformers, onnxruntime, ...), writes the
random checkpoints the benchmark needs, runs the GPU tests (`pytest -m gpu`) and the default suite (whose
kernel tests run on the device there), the kernel microbenchmarks, and `fastjanus bench` for each --arch
twice: CUDA Graphs on (with the torch-eager and transformers baselines) and off (no baselines: they do not
depend on the setting, and running them twice would cost the budget).

What comes back from a device run is at most 8 files of 16 MiB, so everything lands in DIR as at most 8 files
named `<device>-<date>-<what>.<ext>` (bench/README.md): the pass report `...-pass-<tag>.json` (environment,
every step with its status, time and test counts, what was skipped and why), one bundled log
`...-pass-<tag>.log` with every step's output, `...-kernels.json`, and per arch `...-<arch>-graphs|eager.json|png`.
A plan that would write more files is refused before any work.

The budget (--budget-s, default 540 s: a 600 s command less the install and the copy back) is watched: a step
starts only when the time left covers what it needs plus what the steps after it need at least, each step
runs under a timeout of the time it may use, and the benchmark gets that as its --time-limit so that it stops
between runs and still writes its report. Skipped steps are listed with the reason. The report and the log are
rewritten after every step, so a run killed from outside still leaves them.

--dry-run runs the same plumbing on the CPU with the tiny model (CUDA hidden from every step, the kernels in
Triton's interpreter, a handful of tests instead of the suite), in under a minute: CI runs it.

Exit status: 0 when every planned step ran and passed, 1 when one failed, timed out or was skipped, 2 for a bad
command line or a plan that cannot run here.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ARCHES = ("janus-1.3b", "janus-pro-1b", "janus-pro-7b")
PARTS = ("tests", "kernels", "e2e", "quant", "spec", "flow", "aoti")
ROOT = Path(__file__).resolve().parent.parent  # the repository (tests/ is run from here)
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2 ** 20
DEFAULT_BUDGET_S = 540.0
MARGIN_S = 10.0  # kept back at the end for the report, the log and the exit
LOG_KEEP_HEAD = 4 * 2 ** 20  # a log over the file limit keeps its first 4 MiB and its end

# The least time (s) worth starting a step with; a step is skipped when the time left does not cover this plus
# the minimum of every later step. For an H100 with 16 cores. Measured in the first pass (2026-11-23, H100 80GB
# HBM3, bench/results/h100-80gb-hbm3-2026-11-23-pass-*.json): Pro-1B checkpoint 24 s, step-kernels 14 s, the
# kernel microbenchmarks 77 s, the graphs-off bench 38 s (the graphs-on bench with its baselines takes all the
# time it is given: the torch-eager baseline is slow); `pytest -m gpu` did not finish in 404 s (the torch-backend
# Pro-1B cases took over 100 s each; since trimmed). The rest are estimates: Pro-7B writes 15 GB, an 8-bit
# bench quantizes at load and runs the quality check (a float model and the 8-bit one, 32 prompts x 4 steps).
MIN_S = {
    "checkpoint": {"tiny": 2, "janus-1.3b": 30, "janus-pro-1b": 30, "janus-pro-7b": 150},
    "bench": {"tiny": 5, "janus-1.3b": 90, "janus-pro-1b": 90, "janus-pro-7b": 150},
    "bench-quant": {"tiny": 5, "janus-1.3b": 90, "janus-pro-1b": 90, "janus-pro-7b": 180},
    "step-kernels": {"tiny": 5, "janus-1.3b": 20, "janus-pro-1b": 20, "janus-pro-7b": 90},
    "tests-gpu": 300, "kernels": 90, "tests-default": 60,
    # estimates (never run on a GPU yet): 3 windows x 2 buckets, each captured; the bench: 1 and 32 images, twice
    "spec-pass": {"tiny": 5, "janus-1.3b": 60, "janus-pro-1b": 60, "janus-pro-7b": 120},
    "bench-spec": {"tiny": 5, "janus-1.3b": 90, "janus-pro-1b": 90, "janus-pro-7b": 180},
    # estimates (never run on a GPU yet): JanusFlow-1.3B's checkpoint (LLM + SDXL VAE, 4.2 GB; 31 s on the 2-core
    # CPU), and its bench: 1 and 16 images and 1 after a long prompt, 30 steps each, ours (graphs), cached eager
    # and the official loop, plus the VAE
    "checkpoint-flow": 40, "bench-flow": 150,
    # estimates (never run on a GPU yet): the AOTInductor export of the generator and the VQ decoder for CUDA (on
    # the 2-core CPU the tiny model's took 3 min, nearly all of it the C++ compiler), the C++ build (30 s on 2
    # cores), fastjanus-run and the Python runtime at 1 and 16 images
    "aoti": {"tiny": 5, "janus-1.3b": 360, "janus-pro-1b": 360, "janus-pro-7b": 540},
}
DRY_MIN_S = 2.0  # every step of a dry run
BENCH_SCENARIOS = ["t2i-1", "t2i-16", "throughput", "siglip", "vq-decode", "understand"]


@dataclass
class Step:
    name: str
    part: str
    cmd: list[str]
    min_s: float
    outputs: list[str] = field(default_factory=list)  # file names in DIR that the step writes
    env: dict[str, str] = field(default_factory=dict)
    time_limit_flag: bool = False  # pass the step's time as `--time-limit S` (fastjanus bench)
    junit: Path | None = None
    needs: str | None = None  # a step that must have succeeded first
    record: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------- environment
def _run_quiet(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


_GPU_PROBE = """
import json, torch
p = torch.cuda.get_device_properties(0)
free, total = torch.cuda.mem_get_info(0)
print(json.dumps({"name": torch.cuda.get_device_name(0), "sm": f"{p.major}.{p.minor}",
                  "count": torch.cuda.device_count(), "multiprocessors": p.multi_processor_count,
                  "memory_bytes": total, "free_bytes": free}))
"""


def environment(dry_run: bool) -> dict:
    """What the numbers depend on, read off this machine. The GPU is probed in a child process: a CUDA
    context in this process would hold about half a GiB of device memory through every step."""
    import torch

    from .harness import package_versions
    env: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
                 "python": sys.executable, "platform": platform.platform(), "cpus": os.cpu_count(),
                 "versions": package_versions(), "cuda_available": torch.cuda.is_available(),
                 "torch_cuda": torch.version.cuda, "dry_run": dry_run}
    repo = str(Path(__file__).resolve().parent.parent)
    env["git_commit"] = _run_quiet(["git", "-C", repo, "rev-parse", "HEAD"])  # None where .git did not travel
    dirty = _run_quiet(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"])
    env["git_dirty"] = None if dirty is None else bool(dirty)
    env["nvidia_smi"] = _run_quiet(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,"
                                    "clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu",
                                    "--format=csv"])
    if torch.cuda.is_available() and not dry_run:
        probe = _run_quiet([sys.executable, "-c", _GPU_PROBE], timeout=120)
        try:
            env["gpu"] = json.loads(probe.splitlines()[-1])
        except (AttributeError, IndexError, json.JSONDecodeError):
            env["gpu"] = {"name": "unknown GPU (the probe failed)"}
    return env


def device_slug(env: dict) -> str:
    """`h100-80gb-hbm3` for 'NVIDIA H100 80GB HBM3'; `cpu` for a dry run."""
    if env.get("dry_run") or "gpu" not in env:
        return "cpu"
    name = env["gpu"]["name"].lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


# --------------------------------------------------------------------------------------------- plan
def plan_steps(out: Path, work: Path, prefix: str, tag: str, parts: list[str], arches: list[str],
               dry_run: bool) -> list[Step]:
    py = sys.executable
    cache_env = {"FASTJANUS_CACHE": str(work / "cache")}
    m = (lambda key, arch=None: DRY_MIN_S) if dry_run else \
        (lambda key, arch=None: MIN_S[key][arch] if arch else MIN_S[key])
    steps: list[Step] = []
    if {"e2e", "quant", "spec", "aoti"} & set(parts):
        for a in arches:
            make = "import sys; from fastjanus.random_init import cached_random_model as c; print(c(sys.argv[1]))"
            part = next(p for p in ("e2e", "quant", "spec", "aoti") if p in parts)
            steps.append(Step(f"checkpoint-{a}", part, [py, "-c", make, a], m("checkpoint", a), env=dict(cache_env)))
    if "tests" in parts:
        gpu_tests = [py, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider"]
        steps.append(Step("tests-gpu", "tests", gpu_tests + ["--junitxml", str(work / "junit-gpu.xml")],
                          m("tests-gpu"), junit=work / "junit-gpu.xml", env=dict(cache_env)))
    if "kernels" in parts:
        cmd = [py, "-m", "fastjanus.bench.kernels", "--dtype", "bf16", "--json", str(out / f"{prefix}-kernels.json")]
        steps.append(Step("kernels", "kernels", cmd + (["--dry-run"] if dry_run else []), m("kernels"),
                          outputs=[f"{prefix}-kernels.json"]))
    if "e2e" in parts:
        for graphs in (True, False):
            for a in arches:
                label = "graphs" if graphs else "eager"
                what = f"{prefix}-{a}-{label}"
                # a dry run is on the CPU, where graphs cannot be on: "auto" (off there) stands in for "on"
                flag = ("on" if not dry_run else "auto") if graphs else "off"
                cmd = [py, "-m", "fastjanus.cli", "bench", "--arch", a, "--cuda-graphs", flag, "--quiet",
                       "--json", str(out / f"{what}.json"), "--plot", str(out / f"{what}.png")]
                # graphs off: only what graphs change, the decode loops (SigLIP and the VQ decoder run no graph);
                # no baselines, which do not depend on the setting
                scenarios = BENCH_SCENARIOS if graphs else [x for x in BENCH_SCENARIOS if x not in ("siglip",
                                                                                                  "vq-decode")]
                if not graphs:
                    cmd += ["--baselines", "none"]
                if dry_run:  # seconds on the CPU: one run each, small batches
                    scenarios = [x for x in scenarios if x not in ("t2i-16", "siglip")]
                    cmd += ["--device", "cpu", "--repeats", "1", "--warmup", "0", "--max-batch", "2",
                            "--text-tokens", "4"]
                else:
                    cmd += ["--dtype", "bf16"]
                cmd += [x for sc in scenarios for x in ("--scenario", sc)]
                steps.append(Step(f"bench-{a}-{label}", "e2e", cmd, m("bench", a), outputs=[f"{what}.json",
                                  f"{what}.png"], env=dict(cache_env), time_limit_flag=True, needs=f"checkpoint-{a}"))
        for a in arches:  # kernels per step at the published shapes, the profiler's count of a graph replay too
            what = f"{prefix}-{a}-kernels-per-step.json"
            cmd = [py, "-m", "fastjanus.bench.step_kernels", "--full-size", "--arch", a, "--json", str(out / what)]
            cmd += ["--device", "cpu"] if dry_run else ["--device", "cuda", "--dtype", "bf16"]
            steps.append(Step(f"step-kernels-{a}", "e2e", cmd, m("step-kernels", a), outputs=[what],
                              env=dict(cache_env), needs=f"checkpoint-{a}"))
    if "quant" in parts:  # 8-bit weights + the FP8 KV cache: 1 and 16 images, peak memory, and the quality check
        for a in arches:
            for w in ("int8", "fp8"):
                what = f"{prefix}-{a}-{w}-kvfp8.json"
                cmd = [py, "-m", "fastjanus.cli", "bench", "--arch", a, "--quantize", w, "--kv-cache", "fp8",
                       "--quality", "--baselines", "none", "--quiet", "--json", str(out / what),
                       "--scenario", "t2i-1", "--scenario", "t2i-16"]
                cmd += ["--device", "cpu", "--repeats", "1", "--warmup", "0"] if dry_run else ["--dtype", "bf16"]
                steps.append(Step(f"bench-{a}-{w}", "quant", cmd, m("bench-quant", a), outputs=[what],
                                  env=dict(cache_env), time_limit_flag=True, needs=f"checkpoint-{a}"))
    if "spec" in parts:  # speculative decoding: a pass against a step at K = 8, 16, 32; end to end with and without
        for a in arches:
            what = f"{prefix}-{a}-spec-pass.json"
            cmd = [py, "-m", "fastjanus.bench.spec_pass", "--arch", a, "--json", str(out / what)]
            cmd += ["--device", "cpu", "--rows", "2", "--windows", "2,4", "--passes", "2", "--repeats", "1"] \
                if dry_run else ["--device", "cuda", "--dtype", "bf16", "--rows", "2,32", "--windows", "8,16,32"]
            steps.append(Step(f"spec-pass-{a}", "spec", cmd, m("spec-pass", a), outputs=[what], env=dict(cache_env),
                              needs=f"checkpoint-{a}"))
            what = f"{prefix}-{a}-spec.json"
            cmd = [py, "-m", "fastjanus.cli", "bench", "--arch", a, "--speculative", "--window", "16",
                   "--baselines", "none", "--quiet", "--json", str(out / what), "--scenario", "t2i-1",
                   "--scenario", "throughput"]
            cmd += ["--device", "cpu", "--repeats", "1", "--warmup", "0", "--max-batch", "2"] if dry_run else \
                ["--dtype", "bf16"]
            steps.append(Step(f"bench-spec-{a}", "spec", cmd, m("bench-spec", a), outputs=[what],
                              env=dict(cache_env), time_limit_flag=True, needs=f"checkpoint-{a}"))
    if "flow" in parts:  # JanusFlow: ours against the official loop (the prompt recomputed every step), 1 and 16 images
        a = "tiny-flow" if dry_run else "janusflow-1.3b"
        make = "import sys; from fastjanus.random_init import cached_random_model as c; print(c(sys.argv[1]))"
        steps.append(Step(f"checkpoint-{a}", "flow", [py, "-c", make, a], m("checkpoint-flow"), env=dict(cache_env)))
        what = f"{prefix}-{a}-flow.json"
        cmd = [py, "-m", "fastjanus.cli", "bench", "--arch", a, "--quiet", "--json", str(out / what)]
        cmd += ["--device", "cpu", "--repeats", "1", "--warmup", "0", "--steps", "2", "--scenario", "t2i-1"] \
            if dry_run else ["--dtype", "bf16"]
        steps.append(Step(f"bench-flow-{a}", "flow", cmd, m("bench-flow"), outputs=[what], env=dict(cache_env),
                          needs=f"checkpoint-{a}"))
    if "aoti" in parts:  # the Python-free runner (export-aoti + CMakeLists.txt) against the Python runtime
        for a in arches:
            what = f"{prefix}-{a}-aoti.json"
            cmd = [py, "-m", "fastjanus.bench.aoti_bench", "--arch", a, "--json", str(out / what), "--work",
                   str(work / f"aoti-{a}")]
            cmd += ["--device", "cpu", "--images", "1,2", "--runs", "1"] if dry_run else \
                ["--device", "cuda", "--dtype", "bf16", "--images", "1,16", "--runs", "3"]
            steps.append(Step(f"aoti-{a}", "aoti", cmd, m("aoti", a), outputs=[what], env=dict(cache_env),
                              needs=f"checkpoint-{a}"))
    if "tests" in parts:
        cmd = [py, "-m", "pytest", "-m", "not slow and not gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
               "--junitxml", str(work / "junit-default.xml")]  # the gpu tests ran in tests-gpu
        if dry_run:  # a few quick tests stand in for the suite (about 5 minutes on 2 cores)
            cmd += ["tests/test_tokenizer.py", "tests/test_bench_kernels.py"]
        steps.append(Step("tests-default", "tests", cmd, m("tests-default"), junit=work / "junit-default.xml",
                          env=dict(cache_env)))
    for s in steps:
        if dry_run:  # nothing of the dry run may touch a GPU, and the kernels run in the interpreter
            s.env.update({"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"})
    return steps


def count_files(steps: list[Step]) -> int:
    return 2 + sum(len(s.outputs) for s in steps)  # + the pass report and the log


# ------------------------------------------------------------------------------------ test results
_TEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.M)


def test_summary(output: str, junit: Path | None) -> dict:
    """Counts, from the JUnit XML when pytest finished, else from its -v lines (a run killed by its timeout)."""
    if junit is not None and junit.is_file():
        try:
            root = ET.parse(junit).getroot()
        except ET.ParseError:
            root = None
        if root is not None:
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            failed = []
            for case in root.iter("testcase"):
                for tag in ("failure", "error"):
                    el = case.find(tag)
                    if el is not None:
                        msg = " ".join((el.get("message") or "").split())[:400]
                        failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                                       "message": msg})
            return {"source": "junit", "passed": tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"],
                    "failed": tot["failures"], "errors": tot["errors"], "skipped": tot["skipped"],
                    "failures": failed}
    counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0}
    failed = []
    for name, status in _TEST_LINE.findall(output):
        counts[status] = counts.get(status, 0) + 1
        if status in ("FAILED", "ERROR"):
            failed.append({"test": name, "kind": status.lower(), "message": ""})
    return {"source": "pytest -v lines (no JUnit file: the run did not finish)", "passed": counts["PASSED"],
            "failed": counts["FAILED"], "errors": counts["ERROR"], "skipped": counts["SKIPPED"], "failures": failed}


# ------------------------------------------------------------------------------------------ running
class Pass:
    def __init__(self, out: Path, prefix: str, tag: str, budget_s: float, env: dict, steps: list[Step],
                 argv: list[str], t0: float, echo=print):
        self.out, self.budget_s, self.env, self.steps, self.t0, self.echo = out, budget_s, env, steps, t0, echo
        self.report_path = out / f"{prefix}-pass-{tag}.json"
        self.log_path = out / f"{prefix}-pass-{tag}.log"
        self.argv = argv
        self.log = open(self.log_path, "w", encoding="utf-8", errors="replace")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def write_report(self, done: bool) -> None:
        rep = {"command": shlex.join(self.argv), "budget_s": self.budget_s, "elapsed_s": round(self.elapsed(), 1),
               "finished": done, "environment": self.env,
               "steps": [{"name": s.name, "part": s.part, "command": shlex.join(s.cmd), "min_s": s.min_s,
                          "outputs": s.outputs, **s.record} for s in self.steps],
               "files": sorted(p.name for p in self.out.iterdir() if p.is_file())}
        rep["skipped"] = [f"{s.name}: {s.record['reason']}" for s in self.steps if s.record.get("status") == "skipped"]
        tmp = self.report_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rep, indent=1))
        tmp.replace(self.report_path)

    def _cap_log(self) -> None:
        """Keep the log within the per-file limit: its first LOG_KEEP_HEAD bytes and its end."""
        self.log.flush()
        size = self.log_path.stat().st_size
        if size <= MAX_FILE_BYTES - 2 ** 16:
            return
        data = self.log_path.read_bytes()
        tail = MAX_FILE_BYTES - LOG_KEEP_HEAD - 2 ** 17
        cut = f"\n\n[... {size - LOG_KEEP_HEAD - tail} bytes of log cut to stay under 16 MiB ...]\n\n".encode()
        self.log.close()
        self.log_path.write_bytes(data[:LOG_KEEP_HEAD] + cut + data[-tail:])
        self.log = open(self.log_path, "a", encoding="utf-8", errors="replace")

    def run(self) -> int:
        self.log.write(f"# fastjanus GPU pass: {shlex.join(self.argv)}\n# environment\n"
                       f"{json.dumps(self.env, indent=1)}\n")
        self.write_report(False)
        by_name = {s.name: s for s in self.steps}
        for i, s in enumerate(self.steps):
            if s.needs is not None and by_name[s.needs].record.get("status") != "ok":
                self._skip(s, f"needs {s.needs}, which did not succeed")
                continue
            later = sum(t.min_s for t in self.steps[i + 1:])
            left = self.budget_s - MARGIN_S - self.elapsed()
            if left < s.min_s + later:
                why = (f"budget: {left:.0f} s left, this step needs about {s.min_s:.0f} s and the later ones "
                       f"{later:.0f} s")
                if left >= s.min_s:  # it alone would fit: a later, cheaper step is what it would starve
                    why += " (run it in a pass of its own, or raise --budget-s)"
                self._skip(s, why)
                continue
            allowed = left - later
            cmd = list(s.cmd)
            if s.time_limit_flag:
                # 30 s for its start (imports), its plot and its exit; its JSON is rewritten after every scenario
                cmd += ["--time-limit", f"{max(1.0, allowed - 30):.0f}"]
            s.cmd = cmd
            self.echo(f"[{self.elapsed():5.0f} s] {s.name}: running (up to {allowed:.0f} s)")
            self.log.write(f"\n\n# ===== {s.name} (t={self.elapsed():.0f} s, up to {allowed:.0f} s)\n"
                           f"# $ {shlex.join(cmd)}\n")
            self.log.flush()
            pos_before = self.log_path.stat().st_size
            t = time.monotonic()
            if s.junit is not None and s.junit.exists():
                s.junit.unlink()  # a stale file from an earlier pass in the same --work would be read as this one's
            rc, st = run_with_timeout(cmd, self.log, dict(os.environ, PYTHONUNBUFFERED="1", **s.env), allowed)
            s.record = {"status": st, "returncode": rc, "seconds": round(time.monotonic() - t, 1),
                        "started_at_s": round(t - self.t0, 1)}
            missing = [o for o in s.outputs if not (self.out / o).is_file()]
            if missing and st == "ok":
                s.record.update(status="failed", reason=f"did not write {', '.join(missing)}")
            if s.junit is not None or s.name.startswith("tests"):
                with open(self.log_path, "rb") as f:
                    f.seek(pos_before)
                    s.record["tests"] = test_summary(f.read().decode("utf-8", "replace"), s.junit)
            if s.time_limit_flag and not missing:  # what the benchmark itself left out, from its report
                s.record["bench"] = bench_notes(self.out / s.outputs[0])
            self.echo(f"[{self.elapsed():5.0f} s] {s.name}: {s.record['status']} in {s.record['seconds']:.0f} s"
                      + (f" ({_fmt_tests(s.record['tests'])})" if "tests" in s.record else ""))
            self._cap_log()
            self.write_report(False)
        self.log.write(f"\n# pass done in {self.elapsed():.0f} s\n")
        self._cap_log()
        self.log.close()
        self.write_report(True)
        return 0 if all(s.record.get("status") == "ok" for s in self.steps) else 1

    def _skip(self, s: Step, why: str) -> None:
        s.record = {"status": "skipped", "reason": why}
        self.echo(f"[{self.elapsed():5.0f} s] {s.name}: skipped ({why})")
        self.write_report(False)


def bench_notes(path: Path) -> dict:
    try:
        rep = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return {"error": f"cannot read {path.name}: {e}"}
    tl = rep.get("time_limit") or {}
    return {"left_out": tl.get("skipped", []), "cut": tl.get("cut", []),
            "baselines_failed": rep.get("baselines_failed", {}), "baselines_skipped": rep.get("baselines_skipped", {})}


def run_with_timeout(cmd: list[str], log, env: dict, timeout: float) -> tuple[int | None, str]:
    """Run cmd with its output into log; past the timeout, kill its whole process group (pytest and the bench
    start processes of their own) and say "timed out"."""
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                         cwd=str(ROOT if (ROOT / "tests").is_dir() else Path.cwd()))
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):  # a chance to exit cleanly, then none
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        return None, "timed out"
    finally:
        log.flush()
    return rc, "ok" if rc == 0 else "failed"


def _fmt_tests(t: dict) -> str:
    return f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"


def summary_table(report: dict) -> str:
    lines = [f"GPU pass: {report['command']}",
             f"{'step':34s} {'status':10s} {'seconds':>8s}  notes"]
    for s in report["steps"]:
        note = s.get("reason", "")
        if "bench" in s:
            b = s["bench"]
            bits = [f"left out: {', '.join(b['left_out'])}" if b.get("left_out") else "",
                    f"cut: {'; '.join(b['cut'])}" if b.get("cut") else "",
                    f"baselines failed: {', '.join(f'{k} ({len(v)})' for k, v in b['baselines_failed'].items())}"
                    if b.get("baselines_failed") else ""]
            note = "; ".join(x for x in bits if x) or note
        if "tests" in s:
            note = _fmt_tests(s["tests"]) + "".join(f"; FAILED {f['test']}" for f in s["tests"]["failures"][:5])
        sec = f"{s['seconds']:.0f}" if "seconds" in s else "-"
        lines.append(f"{s['name']:34s} {s.get('status', 'not run'):10s} {sec:>8s}  {note}")
    lines.append(f"files ({len(report['files'])}): {', '.join(report['files'])}")
    lines.append(f"elapsed {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the CLI
def _csv(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{flag}: {', '.join(bad) or 'nothing given'}; choose from "
                                         f"{', '.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastjanus.bench.gpu_pass", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the result files (on a device run: $OUT)")
    ap.add_argument("--arch", action="append", choices=ARCHES,
                    help="model(s) for the e2e part, repeatable (default: janus-pro-1b)")
    ap.add_argument("--part", default="tests,kernels,e2e",
                    help="comma-separated: tests, kernels, e2e, quant (8-bit benches; a run of its own per --arch), "
                         "spec (speculative decoding: pass vs step, end to end), flow (JanusFlow-1.3B against the "
                         "official loop; independent of --arch), aoti (export-aoti packages run by the C++ "
                         "fastjanus-run against the Python runtime)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help="seconds this pass may take in all; steps that would not fit are skipped and listed")
    ap.add_argument("--work", default=None, help="scratch folder for checkpoints and JUnit files "
                                                 "(default: a fresh temporary folder)")
    ap.add_argument("--dry-run", action="store_true",
                    help="the same plumbing on the CPU with the tiny model, in under a minute (what CI checks)")
    return ap


def main(argv: list[str] | None = None, echo=print) -> int:
    t0 = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        parts = _csv(args.part, PARTS, "--part")
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if not args.budget_s > 0:
        ap.error(f"--budget-s must be > 0, got {args.budget_s}")
    arches = list(dict.fromkeys(args.arch or ["janus-pro-1b"]))
    if args.dry_run:
        arches = ["tiny"]
    else:
        import torch
        if not torch.cuda.is_available():
            print("gpu_pass: error: no CUDA device is visible. This pass is for a GPU machine; --dry-run checks its "
                  "plumbing on the CPU", file=sys.stderr)
            return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"gpu_pass: error: --out {out}: exists and is not a folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        import tempfile
        work = Path(tempfile.mkdtemp(prefix="fastjanus-gpu-pass-"))
    env = environment(args.dry_run)
    prefix = f"{device_slug(env)}-{datetime.date.today().isoformat()}"
    tag = "-".join(p for p in PARTS if p in parts) + ("-" + "-".join(arches) if {"e2e", "quant", "spec"} &
                                                       set(parts) else "")
    steps = plan_steps(out, work, prefix, tag, parts, arches, args.dry_run)
    n = count_files(steps)
    if n > MAX_FILES:
        print(f"gpu_pass: error: this plan writes {n} files, and a device run returns at most {MAX_FILES}: split it "
              f"(one --arch per run with --part e2e, and the tests and kernels in a run of their own; "
              f"bench/README.md gives the commands)", file=sys.stderr)
        return 2
    stale = [p.name for p in out.iterdir() if p.is_file() and p.name.startswith(prefix)]
    if stale:
        echo(f"note: {out} already holds {len(stale)} file(s) of this device and date; same-named ones are replaced")
    env["work"] = str(work)
    ps = Pass(out, prefix, tag, args.budget_s, env, steps, ["python", "-m", "fastjanus.bench.gpu_pass", *argv], t0,
              echo)
    echo(f"GPU pass on {env.get('gpu', {}).get('name', 'the CPU (dry run)')}: {len(steps)} steps, budget "
         f"{args.budget_s:.0f} s, results in {out}")
    rc = ps.run()
    echo(summary_table(json.loads(ps.report_path.read_text())))
    return rc


if __name__ == "__main__":
    sys.exit(main())
