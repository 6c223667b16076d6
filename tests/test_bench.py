"""`fastjanus bench`: roofline arithmetic checked against hand-computed counts, and the harness end to end on
the tiny checkpoint (CPU; the numbers are labelled CPU and only checked for consistency)."""
import json
import math

import pytest
import torch
from PIL import Image

from fastjanus.bench import roofline as rl
from fastjanus.bench.harness import SCENARIOS, BenchConfig, cached_random_model, run_bench
from fastjanus.config import preset
from fastjanus.engine import memory as mem
from fastjanus.errors import InputError


def _hand_image_step_params(D, layers, inter, codebook=16384):
    """Per-step weights, counted by hand from the Llama/Janus layer shapes (no bias in the decoder)."""
    layer = 4 * D * D + 3 * D * inter + 2 * D  # q, k, v, o (MHA) + gate, up, down + two RMSNorm weights
    head = (D * D + D) + (D * codebook + codebook)  # gen_head: output_mlp_projector, vision_head (with biases)
    # gen_aligner is not read per step: the code embedding is a [codebook, D] table gathered a row per token
    return layers * layer + D + head  # + final norm


@pytest.mark.parametrize("arch,D,layers,inter,approx_gb,kv_kib", [
    ("janus-pro-1b", 2048, 24, 5632, 2.54, 192),
    ("janus-pro-7b", 4096, 30, 11008, 12.31, 480),
])
def test_decode_step_bytes_by_hand(arch, D, layers, inter, approx_gb, kv_kib):
    cfg = preset(arch)
    w = rl.image_step_weight_bytes(cfg, 2)
    assert w == 2 * _hand_image_step_params(D, layers, inter)
    assert abs(w / 1e9 - approx_gb) / approx_gb < 0.01, w
    assert mem.kv_bytes_per_token(cfg.language, 2) == kv_kib * 1024  # K+V, all layers, one row, bf16
    # one image (2 rows), 100 cached slots: weights + 2 rows × (100 read + 1 written) × per-token KV
    assert rl.image_step_bytes(cfg, 2, 2, 100) == w + 2 * 101 * kv_kib * 1024
    # averaged over the loop: decode steps 0..574 read prompt_len + i slots, mean prompt_len + 287
    assert rl.mean_image_step_bytes(cfg, 2, 16, 40) == rl.image_step_bytes(cfg, 2, 32, 40 + 287)
    text = rl.text_step_weight_bytes(cfg, 2)
    assert text == 2 * (layers * (4 * D * D + 3 * D * inter + 2 * D) + D + 102400 * D)  # + lm_head


def test_memory_arithmetic_by_hand():
    cfg = preset("janus-pro-7b")
    # Pro-7B, 32 rows (16 images), 700 slots, bf16: 32 × 700 × 480 KiB
    assert mem.kv_cache_bytes(cfg.language, 2, 32, 700) == 32 * 700 * 480 * 1024
    # the VQ decoder estimate: 4 fp32 maps of 128 channels at 384²
    assert mem.vq_decode_bytes(cfg, 1, 2) == 4 * 128 * 384 * 384 * 4


def test_count_flops_by_hand():
    lin = torch.nn.Linear(24, 40)
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    x, img = torch.randn(5, 24), torch.randn(2, 3, 16, 16)
    assert rl.count_flops(lambda: lin(x)) == 2 * 5 * 24 * 40
    assert rl.count_flops(lambda: conv(img)) == 2 * (2 * 8 * 4 * 4) * (3 * 4 * 4)  # outputs × MACs per output


def test_device_limits_measured_on_cpu():
    bw, how = rl.copy_bandwidth(torch.device("cpu"))
    tf, how2 = rl.matmul_throughput(torch.device("cpu"), torch.float32)
    assert 0.1 < bw < 10_000 and 1e-4 < tf < 1000
    assert "median" in how and "matmul" in how2


def test_config_validation():
    with pytest.raises(InputError, match="scenario"):
        BenchConfig(scenarios=("t2i-3",))
    with pytest.raises(InputError, match="repeats"):
        BenchConfig(repeats=0)
    with pytest.raises(InputError, match="baseline"):
        BenchConfig(baselines=("official",))
    with pytest.raises(InputError, match="exactly one"):
        BenchConfig(arch="tiny", model="/x")


REQUIRED = {"name", "num_images", "median_s", "min_s", "max_s", "decode_step_ms", "bytes_per_step",
            "bandwidth_gbs", "roofline_fraction", "peak_mem_bytes", "baselines"}


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def report(tiny_dir):
    cfg = BenchConfig(arch=None, model=str(tiny_dir), device="cpu", repeats=2, warmup=1, max_batch=4,
                      text_tokens=8, progress=False, baselines=("transformers",) if _has_transformers() else ())
    return run_bench(cfg, log=lambda s: None)


def test_report_keys_and_values(report, tiny_dir):
    for k in ("device", "dtype", "arch", "torch", "triton", "scenarios"):
        assert k in report
    assert report["platform"] == "cpu" and report["device"].startswith("CPU")
    assert "not a GPU figure" in report["label"]
    assert report["dtype"] == "float32" and report["backend"] == "torch"
    names = [s["name"] for s in report["scenarios"]]
    assert names == ["t2i-1", "t2i-16", "throughput", "siglip", "vq-decode", "understand-ttft", "understand-decode"]
    cfg = preset("tiny")
    for s in report["scenarios"]:
        assert REQUIRED <= s.keys(), s["name"]
        assert 0 < s["min_s"] <= s["median_s"] <= s["max_s"] < 60
        assert s["peak_mem_bytes"] is None  # not measured on the CPU
        if s["roofline_fraction"] is not None:
            assert 0 < s["roofline_fraction"] and math.isfinite(s["roofline_fraction"])
    by = {s["name"]: s for s in report["scenarios"]}
    for name, n in (("t2i-1", 1), ("t2i-16", 16), ("throughput", 4)):
        s = by[name]
        assert s["num_images"] == n
        bd = s["breakdown"]
        assert bd["prefill_s"] + bd["decode_s"] + bd["vq_decode_s"] <= s["max_s"] * 1.001
        # step time × decode steps is the decode time; bytes come from the shapes and the prompts used
        assert s["decode_step_ms"] * 1e-3 * (cfg.num_image_tokens - 1) == pytest.approx(bd["decode_s"])
        assert s["bytes_per_step"] == rl.mean_image_step_bytes(cfg, 4, n, s["prompt_len"])
        assert s["bandwidth_gbs"] == pytest.approx(s["bytes_per_step"] / (s["decode_step_ms"] * 1e-3) / 1e9)
        assert s["roofline_fraction"] == pytest.approx(s["bandwidth_gbs"] / report["copy_bandwidth_gbs"])
        if _has_transformers():
            hf = s["baselines"]["transformers"]
            assert hf["speedup"] == pytest.approx(hf["median_s"] / s["median_s"])
    assert by["throughput"]["images_per_s"] == pytest.approx(4 / by["throughput"]["median_s"])
    assert by["siglip"]["flops"] > 0 and by["vq-decode"]["flops"] > 0
    dec = by["understand-decode"]
    assert dec["tokens_per_s"] == pytest.approx(7 / dec["median_s"])
    assert ("transformers" in by["understand-ttft"]["baselines"]) == _has_transformers()
    assert report["baselines_failed"] == {}
    assert "torch-eager" in report["baselines_skipped"]
    json.dumps(report)  # serialisable


def test_cli_writes_table_json_and_plot(tiny_dir, tmp_path, capsys):
    from fastjanus.cli import main
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "--model", str(tiny_dir), "--device", "cpu", "--scenario", "t2i-1", "--scenario", "siglip",
               "--repeats", "1", "--warmup", "0", "--baselines", "none", "--quiet",
               "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "CPU RUN" in out and "t2i-1" in out and "siglip" in out
    assert "baseline transformers skipped: not requested" in out
    rep = json.loads(out_json.read_text())
    assert [s["name"] for s in rep["scenarios"]] == ["t2i-1", "siglip"]
    assert Image.open(out_png).size[0] > 500


def test_cli_rejects_bad_output_path(tiny_dir, tmp_path, capsys):
    from fastjanus.cli import main
    rc = main(["bench", "--model", str(tiny_dir), "--device", "cpu", "--json", str(tmp_path), "--quiet"])
    assert rc == 2 and "--json" in (err := capsys.readouterr().err) and "is a folder" in err


def test_random_model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTJANUS_CACHE", str(tmp_path))
    d = cached_random_model("tiny", progress=False)
    assert (d / ".complete").is_file() and (d / "config.json").is_file()
    stamp = (d / "config.json").stat().st_mtime_ns
    assert cached_random_model("tiny", progress=False) == d
    assert (d / "config.json").stat().st_mtime_ns == stamp  # written once, then reused


def test_scenarios_listed_in_cli():
    from fastjanus.cli import build_parser
    p = build_parser()
    args = p.parse_args(["bench"])
    assert args.arch == "tiny" and args.scenario is None
    for s in SCENARIOS:
        p.parse_args(["bench", "--scenario", s])


def test_torch_eager_baseline_with_triton_backend(tiny_dir):
    # The Triton kernels run in the interpreter here (slow), so only a short understanding run.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = BenchConfig(arch=None, model=str(tiny_dir), device=dev, backend="triton", scenarios=("understand",),
                      baselines=("torch-eager",), repeats=1, warmup=0, text_tokens=3, progress=False)
    rep = run_bench(cfg, log=lambda s: None)
    assert rep["backend"] == "triton"
    for s in rep["scenarios"]:
        b = s["baselines"]["torch-eager"]
        assert b["median_s"] > 0 and b["speedup"] == pytest.approx(b["median_s"] / s["median_s"])
    assert rep["baselines_skipped"] == {"transformers": "not requested (--baselines)"}


def test_transformers_baseline_samples_the_full_codebook(tiny_pipe, monkeypatch):
    """The baseline must do fastjanus's work: CFG + temperature over all codes, no top-k/top-p warper
    (transformers adds top-k 50 unless told top_k=0)."""
    pytest.importorskip("transformers")
    import transformers.generation.logits_process as lp

    from fastjanus.bench.harness import _hf_t2i
    from fastjanus.bench.hf_port import build_hf_model
    used = []

    def spy(name, orig):
        def call(self, input_ids, scores):  # transformers checks the processors' signatures
            used.append(name)
            return orig(self, input_ids, scores)
        return call
    for name in ("TopKLogitsWarper", "TopPLogitsWarper", "ClassifierFreeGuidanceLogitsProcessor"):
        cls = getattr(lp, name)
        monkeypatch.setattr(cls, "__call__", spy(name, cls.__call__))
    hf = build_hf_model(tiny_pipe.model, tiny_pipe.tokenizer, "cpu", torch.float32)
    r = _hf_t2i(hf, tiny_pipe, 1, "a red fox", 0)
    assert r["total_s"] > 0
    assert set(used) == {"ClassifierFreeGuidanceLogitsProcessor"} and len(used) == 64  # one per code


def test_largest_batch_from_free_memory(monkeypatch):
    from types import SimpleNamespace

    from fastjanus.bench.harness import largest_batch
    cfg7 = preset("janus-pro-7b")
    pipe = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, cfg=cfg7, memory_plan=None,
                           model=SimpleNamespace(kv_dtype=torch.bfloat16))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    free = 40 * 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (free, 80 * 2 ** 30))
    n, why = largest_batch(pipe, BenchConfig(), 40)

    def need(k):  # by hand: KV for 2k rows x (40 + 576) slots at 480 KiB + the workspaces of the estimate
        return (2 * k * 616 * 480 * 1024 + mem.decode_workspace_bytes(cfg7, 2 * k)
                + mem.prefill_workspace_bytes(cfg7, 2 * k, 40, 2) + mem.vq_decode_bytes(cfg7, min(k, 8), 2))
    assert need(n) <= 0.9 * free < need(2 * n) and n == 32 and "40.0 GiB free" in why
    plan = mem.plan_memory(cfg7, 2, None, max_rows=16, max_len=700)
    pipe.memory_plan = plan
    assert largest_batch(pipe, BenchConfig(), 40)[0] == 8  # the static runtime's largest bucket
    assert largest_batch(pipe, BenchConfig(max_batch=3), 40) == (3, "--max-batch")
    pipe.memory_plan, pipe.model.kv_dtype = None, torch.float8_e4m3fn  # an FP8 KV cache: half the KV bytes
    assert largest_batch(pipe, BenchConfig(), 40)[0] == 64


def test_partial_reports_and_the_time_limit(tiny_dir):
    """on_update gets the report after every scenario (a run killed later still leaves one), and a scenario
    whose first run would end past the time limit is not started."""
    updates = []
    cfg = BenchConfig(arch=None, model=str(tiny_dir), device="cpu", scenarios=("t2i-1", "vq-decode"), repeats=1,
                      warmup=0, baselines=(), progress=False)
    rep = run_bench(cfg, log=lambda s: None, on_update=updates.append)
    # one snapshot per scenario, and one more once the kernels per step are counted (after the scenarios)
    assert [[s["name"] for s in u["scenarios"]] for u in updates] == [["t2i-1"], ["t2i-1", "vq-decode"],
                                                                       ["t2i-1", "vq-decode"]]
    assert isinstance(updates[1]["step_kernels"], str) and updates[2]["step_kernels"] == rep["step_kernels"]
    assert all(u["partial"] for u in updates) and rep["partial"] is False and rep["scenarios"][0]["runs"] == 1
    cfg = BenchConfig(arch=None, model=str(tiny_dir), device="cpu", scenarios=("t2i-1", "vq-decode"), repeats=3,
                      warmup=0, baselines=(), progress=False, time_limit=1e-6)
    rep = run_bench(cfg, log=lambda s: None)
    assert rep["scenarios"] == [] and rep["time_limit"]["skipped"] == ["t2i-1", "vq-decode"]


def test_runner_does_not_start_a_run_it_cannot_finish():
    import time

    from fastjanus.bench.harness import OutOfTime, _Runner
    calls = []
    r = _Runner(BenchConfig(warmup=0, progress=False), torch.device("cpu"), deadline=time.perf_counter() + 30)
    with pytest.raises(OutOfTime):  # guessed at 60 s, 30 s left: never started
        r.repeat("baseline", lambda i: calls.append(i), 2, first_guess=60)
    assert calls == []
    rows = r.repeat("quick", lambda i: calls.append(i) or {"i": i}, 3, first_guess=1)
    assert len(rows) == 3 and r.cut == []
