"""ONNX export of the SigLIP encoder and the VQ decoder, checked on ONNX Runtime's CPU provider against the torch
modules; the runner (`OrtVision`, `load(onnx_dir=)`); every bad input; the files in a Python without torch.

Tolerances (fp32): image_embeds relative error (max |Δ| / max |ref|) ≤ 1e-4 (seen: 5e-7 on the tiny model);
uint8 images within 1 grey level (a truncation at a boundary can move by one). fp16 graphs on the CPU
provider (ORT runs them there): image_embeds ≤ 2e-3 relative (seen 5e-4), images within 2 levels (seen 1).
"""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastjanus
from fastjanus.errors import FastJanusError, InputError
from fastjanus.random_init import init_random

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fastjanus.export.onnx_export import export_onnx  # noqa: E402
from fastjanus.export.ort_runtime import OrtVision  # noqa: E402

CPU = ["CPUExecutionProvider"]


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = init_random("tiny", tmp_path_factory.mktemp("tiny"), seed=0)
    out = tmp_path_factory.mktemp("onnx")
    lines = []
    manifest = export_onnx(d, out, progress=lines.append)
    return d, out, manifest, lines, fastjanus.load(d, device="cpu", dtype=torch.float32)


def check_against_torch(pipe, onnx_dir, n: int, embeds_tol: float, grey: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S, cfg = pipe.cfg.vision.image_size, pipe.cfg
    vis = ort.InferenceSession(str(onnx_dir / "vision_encoder.onnx"), providers=CPU)
    vq = ort.InferenceSession(str(onnx_dir / "vq_decoder.onnx"), providers=CPU)
    x = torch.randn(n, 3, S, S, generator=g)
    with torch.inference_mode():
        ref = pipe.model.encode_images(x).numpy()
    (emb,) = vis.run(None, {"pixel_values": x.numpy()})
    assert emb.shape == ref.shape == (n, cfg.vision.num_patches, cfg.language.hidden_size)
    assert rel(emb, ref) <= embeds_tol, rel(emb, ref)
    codes = torch.randint(0, cfg.vq.codebook_size, (n, cfg.vq.grid ** 2), generator=g)
    want = np.stack([np.asarray(im) for im in pipe.decode_image_tokens(codes)])  # [n, S, S, 3] uint8
    pixels, images = vq.run(None, {"codes": codes.numpy()})
    assert images.dtype == np.uint8 and images.shape == want.shape
    assert np.abs(images.astype(int) - want).max() <= grey
    with torch.inference_mode():
        px = pipe.decode_image_pixels(codes).numpy()
    assert pixels.shape == px.shape and np.abs(pixels.astype(np.float32) - px).max() <= (1e-4 if grey <= 1 else 1e-2)


@pytest.mark.parametrize("n", [1, 3])
def test_tiny_fp32_matches_torch(tiny, n):
    _, out, _, _, pipe = tiny
    check_against_torch(pipe, out, n, embeds_tol=1e-4, grey=1, seed=n)


def test_manifest_and_files(tiny):
    d, out, m, lines, pipe = tiny
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["format"] == "fastjanus-onnx" and m["dtype"] == "float32" and m["opset"] == 17
    assert m["model"]["fingerprint"].startswith("sha256:") and m["model"]["architecture"]["image_tokens"] == 64
    v, q = m["parts"]["vision"], m["parts"]["vq-decoder"]
    assert v["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert v["outputs"] == [{"name": "image_embeds", "dtype": "float32", "shape": ["batch", 64, 64]}]
    assert q["inputs"] == [{"name": "codes", "dtype": "int64", "shape": ["batch", 64]}]
    assert q["outputs"] == [{"name": "pixels", "dtype": "float32", "shape": ["batch", 3, 32, 32]},
                            {"name": "images", "dtype": "uint8", "shape": ["batch", 32, 32, 3]}]
    proc = pipe.tokenizer.processor
    pre = m["preprocessing"]
    assert (pre["image_size"], pre["image_mean"], pre["image_std"], pre["background_color"]) == \
        (proc.image_size, list(proc.image_mean), list(proc.image_std), list(proc.background_color))
    for part in ("vision", "vq-decoder"):
        f = out / m["parts"][part]["file"]
        onnx.checker.check_model(str(f), full_check=True)  # full_check: shape inference too
        assert m["parts"][part]["external_data"] is None and m["parts"][part]["bytes"] == f.stat().st_size
    assert len(lines) == 4 and lines[0].startswith("vision_encoder.onnx: exporting") and "written" in lines[1]


def test_external_data_past_the_threshold(tiny, tmp_path):
    # the >2 GB path, forced on the tiny model by a low threshold: weights in <file>.data beside the graph
    d, _, _, _, pipe = tiny
    m = export_onnx(d, tmp_path, parts="vq-decoder", external_data_bytes=1000, progress=lambda s: None)
    e = m["parts"]["vq-decoder"]
    data = (tmp_path / "vq_decoder.onnx.data").stat().st_size
    assert e["external_data"] == "vq_decoder.onnx.data" and data > 10 ** 6
    assert (tmp_path / "vq_decoder.onnx").stat().st_size < data / 5  # the graph and tensors under 1 KiB
    vq = OrtVision(tmp_path, providers=CPU, parts=("vq-decoder",))
    codes = np.random.default_rng(0).integers(0, 512, (2, 64))
    want = np.stack([np.asarray(im) for im in pipe.decode_image_tokens(torch.from_numpy(codes))])
    assert np.abs(vq.decode(codes)[1].astype(int) - want).max() <= 1


def test_fp16_export_on_the_cpu_provider(tiny, tmp_path):
    d, _, _, _, pipe = tiny
    m = export_onnx(d, tmp_path, dtype="fp16", progress=lambda s: None)
    assert m["dtype"] == "float16" and m["parts"]["vision"]["outputs"][0]["dtype"] == "float16"
    assert m["parts"]["vision"]["inputs"][0]["dtype"] == "float32"  # the processor's output, cast in the graph
    check_against_torch(pipe, tmp_path, 3, embeds_tol=2e-3, grey=2)


def test_pipeline_with_onnx_dir(tiny):
    d, out, _, _, pipe = tiny
    op = fastjanus.load(d, device="cpu", dtype=torch.float32, onnx_dir=out)
    assert op.onnx.providers == {"vision": "CPUExecutionProvider", "vq-decoder": "CPUExecutionProvider"}
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    assert rel(op.encode_image(img), pipe.encode_image(img)) <= 1e-4
    assert op.answer_ids(img, "What is it?", max_new_tokens=8) == pipe.answer_ids(img, "What is it?", max_new_tokens=8)
    codes = pipe.generate_image_tokens(["a cat", "a dog"], num_images=1, seed=3)
    a = [np.asarray(i, dtype=int) for i in op.decode_image_tokens(codes)]
    b = [np.asarray(i, dtype=int) for i in pipe.decode_image_tokens(codes)]
    assert len(a) == 2 and max(np.abs(x - y).max() for x, y in zip(a, b)) <= 1
    assert rel(op.decode_image_pixels(codes), pipe.decode_image_pixels(codes)) <= 1e-4


def test_providers_auto_and_named(tiny):
    _, out, _, _, _ = tiny
    v = OrtVision(out)  # auto: TensorRT, CUDA, then CPU, whichever this onnxruntime has
    avail = ort.get_available_providers()
    best = next(p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
                if p in avail)
    assert set(v.sessions) == {"vision", "vq-decoder"} and v.sessions["vision"].get_providers()[0] in (
        best, "CPUExecutionProvider")  # a GPU provider that cannot start falls back to the CPU
    with pytest.raises(InputError, match="not available in this onnxruntime"):
        OrtVision(out, providers="NoSuchExecutionProvider")


def test_bad_inputs_are_one_line(tiny, tmp_path, monkeypatch):
    d, out, _, _, _ = tiny

    def err(fn, *a, **k) -> str:
        with pytest.raises(FastJanusError) as e:
            fn(*a, **k)
        msg = str(e.value)
        assert "\n" not in msg
        return msg
    quiet = {"progress": lambda s: None}
    assert "unknown part 'siglip'" in err(export_onnx, d, tmp_path / "a", parts="siglip,vision", **quiet)
    assert "no such directory" in err(export_onnx, tmp_path / "nope", tmp_path / "b", **quiet)
    (tmp_path / "empty").mkdir()
    assert "config.json" in err(export_onnx, tmp_path / "empty", tmp_path / "c", **quiet)
    (tmp_path / "file").write_text("x")
    assert "not a folder" in err(export_onnx, d, tmp_path / "file", **quiet)
    assert "not writable" in err(export_onnx, d, tmp_path / "file" / "sub", **quiet)  # (root writes anywhere else)
    assert "--opset 12 is too low for an op the graphs use" in err(export_onnx, d, tmp_path / "d", opset=12, **quiet)
    assert "above what torch's TorchScript exporter writes" in err(export_onnx, d, tmp_path / "d", opset=99, **quiet)
    assert "--dtype" in err(export_onnx, d, tmp_path / "d", dtype="int4", **quiet)
    assert "'all' stands alone" in err(export_onnx, d, tmp_path / "d", parts="all,vision", **quiet)
    # loading with onnx_dir: no folder, no manifest, a missing graph, another model's export
    assert "no such folder" in err(fastjanus.load, d, device="cpu", onnx_dir=tmp_path / "none")
    assert "no manifest.json" in err(fastjanus.load, d, device="cpu", onnx_dir=tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("manifest.json", "vision_encoder.onnx"):
        (broken / f).write_bytes((out / f).read_bytes())
    assert "vq_decoder.onnx: missing" in err(fastjanus.load, d, device="cpu", onnx_dir=broken)
    other = init_random("tiny", tmp_path / "other", seed=1)
    assert "exported from another model" in err(fastjanus.load, other, device="cpu", onnx_dir=out)
    # onnxruntime (or onnx) not installed: one line naming what to install
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "pip install" in err(OrtVision, out) and "onnxruntime" in err(OrtVision, out)
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert "onnx is not installed" in err(export_onnx, d, tmp_path / "e", **quiet)


def test_cli_export_and_flags(tiny, tmp_path, capsys):
    from fastjanus.cli import main
    d, out, _, _, _ = tiny
    assert main(["export-onnx", "--model", str(d), "--out", str(tmp_path / "x"), "--parts", "vq-decoder"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == str(tmp_path / "x" / "manifest.json") and "vq_decoder.onnx: written" in cap.err
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["manifest.json", "vq_decoder.onnx"]
    assert main(["export-onnx", "--model", str(d), "--out", str(tmp_path / "y"), "--parts", "bogus"]) == 2
    assert "--parts: unknown part 'bogus'" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--prompt", "a cat", "--seed", "1", "--out", str(tmp_path / "png"),
                 "--onnx-dir", str(out), "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert "VQ decoder on ONNX Runtime (CPUExecutionProvider)" in cap.err and cap.out.strip().endswith(".png")


FRESH_SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime as ort
assert "torch" not in sys.modules
d = sys.argv[1]
m = json.load(open(d + "/manifest.json"))
ref = np.load(d + "/expected.npz")
sessions = {part: ort.InferenceSession(d + "/" + e["file"], providers=["CPUExecutionProvider"])
            for part, e in m["parts"].items()}  # every graph of the export loads, the LLM ones too
vis = ort.InferenceSession(d + "/" + m["parts"]["vision"]["file"], providers=["CPUExecutionProvider"])
vq = ort.InferenceSession(d + "/" + m["parts"]["vq-decoder"]["file"], providers=["CPUExecutionProvider"])
emb = vis.run(None, {"pixel_values": ref["pixel_values"]})[0]
pixels, images = vq.run(None, {"codes": ref["codes"]})
err = float(np.abs(emb - ref["image_embeds"]).max() / np.abs(ref["image_embeds"]).max())
grey = int(np.abs(images.astype(int) - ref["images"].astype(int)).max())
loaded = sorted(k for k in sys.modules if k in ("torch", "fastjanus"))
print(json.dumps({"embeds_rel": err, "grey": grey, "modules": loaded, "graphs": len(sessions)}))
"""


@pytest.mark.slow  # a venv and a pip install (15-25 s): .ci/run runs it with the other slow ONNX test
def test_exported_files_run_without_torch(tiny, tmp_path):
    """The files need only onnxruntime and numpy: a fresh venv with nothing else loads every graph of an export
    with --parts all and runs the vision pair against torch's outputs. The venv is made
    with pip (from its cache or the index); without a way to install, the test says so and skips."""
    d, out, _, _, pipe = tiny
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"onnxruntime=={ort.__version__}", f"numpy=={np.__version__}"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"cannot install onnxruntime + numpy into a fresh venv here: {r.stderr.strip()[-300:]}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    codes = torch.randint(0, 512, (2, 64), generator=g)
    with torch.inference_mode():
        emb = pipe.model.encode_images(x).numpy()
    images = np.stack([np.asarray(i) for i in pipe.decode_image_tokens(codes)])
    bundle = tmp_path / "bundle"
    export_onnx(d, bundle, parts="all", progress=lambda s: None)
    np.savez(bundle / "expected.npz", pixel_values=x.numpy(), codes=codes.numpy(), image_embeds=emb, images=images)
    r = subprocess.run([str(py), "-c", FRESH_SCRIPT, str(bundle)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["modules"] == [] and res["embeds_rel"] <= 1e-4 and res["grey"] <= 1 and res["graphs"] == 6
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    assert "torch" not in listed and "fastjanus" not in listed


@pytest.mark.slow
def test_published_shape_vision_and_vq(tmp_path):
    """Pro-1B's SigLIP-L/16 at 384 px and its VQ-16 decoder at 384 px, random weights; the LLM cut to one small
    layer (the export never reads it). fp32, batch 1 and 3, on the CPU provider."""
    from fastjanus.config import preset
    from fastjanus.random_init import write_tokenizer_files, write_weights
    cfg = preset("janus-pro-1b")
    cfg = dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, num_hidden_layers=1,
                                                                intermediate_size=256, vocab_size=1024))
    d = tmp_path / "m"
    d.mkdir()
    c = cfg.to_dict()
    c["architectures"] = ["MultiModalityCausalLM"]
    (d / "config.json").write_text(json.dumps(c))
    write_tokenizer_files(d, "janus-pro-1b", cfg.vision.num_patches, cfg.vision.image_size)
    write_weights(d, cfg, "safetensors", seed=0)
    out = tmp_path / "onnx"
    m = export_onnx(d, out, progress=lambda s: None)
    assert m["parts"]["vision"]["outputs"][0]["shape"] == ["batch", 576, 2048]
    assert m["parts"]["vq-decoder"]["outputs"][1]["shape"] == ["batch", 384, 384, 3]
    pipe = fastjanus.load(d, device="cpu", dtype=torch.float32)
    for n in (1, 3):
        check_against_torch(pipe, out, n, embeds_tol=1e-4, grey=1, seed=n)


def test_bench_engine_onnx_adds_rows(tmp_path, monkeypatch):
    from fastjanus.bench.harness import BenchConfig, run_bench
    with pytest.raises(InputError, match="select the siglip or vq-decode scenario"):
        BenchConfig(arch="tiny", device="cpu", engine="onnx", scenarios=("t2i-1",))
    with pytest.raises(InputError, match="engine"):
        BenchConfig(arch="tiny", device="cpu", engine="tensorrt")
    monkeypatch.setenv("FASTJANUS_CACHE", str(tmp_path / "cache"))
    rep = run_bench(BenchConfig(arch="tiny", device="cpu", engine="onnx", scenarios=("siglip", "vq-decode"),
                                baselines=(), repeats=1, warmup=0, progress=False), log=lambda s: None)
    names = [s["name"] for s in rep["scenarios"]]
    assert names == ["siglip", "siglip[onnx]", "vq-decode", "vq-decode[onnx]"]
    onnx_rows = [s for s in rep["scenarios"] if s["name"].endswith("[onnx]")]
    assert all(s["median_s"] > 0 and s["engine"]["providers"]["vision"] == "CPUExecutionProvider" for s in onnx_rows)
    assert all(s["peak_mem_bytes"] is None and s["roofline_fraction"] is not None for s in onnx_rows)  # CPU/CPU
    assert rep["onnx"]["dtype"] == "float32" and rep["onnx"]["onnxruntime"] == ort.__version__


def test_text_to_image_on_onnx_runtime_alone(tiny, tmp_path, capsys):
    """export-onnx --parts all --quantize int8, then generate --engine onnx: greedy PNGs equal (within a grey
    level) those of the torch engine; the int8 variant's size and first-step error are reported."""
    from fastjanus.cli import main
    d, _, _, _, pipe = tiny
    out = tmp_path / "all"
    assert main(["export-onnx", "--model", str(d), "--out", str(out), "--parts", "all", "--quantize", "int8"]) == 0
    err = capsys.readouterr().err
    assert "int8 first-step logits vs fp32: max abs error" in err and "llm_decode_int8.onnx" in err
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["parts"]) == {"vision", "vq-decoder", "llm_prefill", "llm_decode", "gen_head", "image_embed"}
    q = m["int8"]
    assert all(p["int8_bytes"] < p["fp32_bytes"] for p in q["parts"].values())
    assert 0 < q["first_step"]["max_rel"] < 0.25  # measured 0.048 on the tiny model
    pngs = {}
    for engine in ("torch", "onnx"):
        extra = ["--onnx-dir", str(out)] if engine == "onnx" else ["--device", "cpu"]
        assert main(["generate", "--model", str(d), "--prompt", "a cat", "--prompt", "a lighthouse at dusk",
                     "--temperature", "0", "--seed", "0", "--engine", engine, "--out", str(tmp_path / engine),
                     *extra]) == 0
        pngs[engine] = [np.asarray(Image.open(p), dtype=int) for p in capsys.readouterr().out.split()]
    assert len(pngs["onnx"]) == 2 and all(np.abs(a - b).max() <= 1 for a, b in zip(pngs["onnx"], pngs["torch"]))
    assert main(["generate", "--model", str(d), "--prompt", "a cat", "--engine", "onnx", "--onnx-dir", str(out),
                 "--quantize", "int8", "--seed", "1", "--out", str(tmp_path / "q")]) == 0
    assert "int8 LLM" in capsys.readouterr().err
    for bad, msg in ((["--onnx-dir", str(out), "--dtype", "bf16"], "--dtype: not used by --engine onnx"),
                     ([], "--engine onnx needs --onnx-dir"),
                     (["--onnx-dir", str(out), "--quantize", "fp8"], "int8 graphs only")):
        assert main(["generate", "--model", str(d), "--prompt", "x", "--engine", "onnx", "--out",
                     str(tmp_path / "b"), *bad]) == 2
        assert msg in capsys.readouterr().err
    assert main(["export-onnx", "--model", str(d), "--out", str(tmp_path / "c"), "--quantize", "int8"]) == 2
    assert "--parts all" in capsys.readouterr().err


def test_exports_never_mix(tiny, tmp_path, capsys, monkeypatch):
    """A re-export removes the older export's graphs, a folder without a needed part is refused before any
    work, and a checkpoint changed in the middle of its weights no longer matches its export."""
    import shutil

    from fastjanus.checkpoint import find_weights
    from fastjanus.cli import main
    from fastjanus.export import onnx_llm
    d, _, _, _, _ = tiny
    out = tmp_path / "o"
    export_onnx(d, out, parts="all", progress=lambda s: None)
    assert (out / "llm_decode.onnx").exists() and (out / "llm.json").exists()
    # a bad flag is refused before anything is touched: the export stays whole
    with pytest.raises(InputError):
        export_onnx(d, out, parts="vision", opset=12, progress=lambda s: None)
    assert OrtVision(out).sessions
    # an export that fails halfway leaves no manifest: the folder no longer looks complete
    from fastjanus.export import onnx_export

    def broken(*a, **k):
        raise RuntimeError("disk full")
    with monkeypatch.context() as mp:
        mp.setattr(onnx_export, "export_module", broken)
        with pytest.raises(RuntimeError):
            export_onnx(d, out, parts="vision", progress=lambda s: None)
    with pytest.raises(InputError, match="no manifest.json"):
        OrtVision(out)
    export_onnx(d, out, parts="vision", progress=lambda s: None)  # only SigLIP now
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "vision_encoder.onnx"]
    called = []
    monkeypatch.setattr(onnx_llm.OrtImageGenerator, "generate", lambda *a, **k: called.append(1))
    assert main(["generate", "--model", str(d), "--prompt", "x", "--engine", "onnx", "--onnx-dir", str(out),
                 "--out", str(tmp_path / "png")]) == 2
    assert "exported without vq-decoder, llm_prefill" in capsys.readouterr().err and not called
    with pytest.raises(InputError, match="exported without vq-decoder"):
        fastjanus.load(d, device="cpu", onnx_dir=out)
    # the weights changed in the middle of the file (a retrained tensor): the export no longer matches
    d2 = tmp_path / "changed"
    shutil.copytree(d, d2)
    export_onnx(d2, tmp_path / "o2", progress=lambda s: None)
    f = find_weights(d2).files[0]
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.seek(2 ** 20 + (size - 2 ** 20) // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(InputError, match="changed since this export"):
        fastjanus.load(d2, device="cpu", onnx_dir=tmp_path / "o2")


def test_engine_onnx_from_a_bundle_without_weights(tiny, tmp_path, capsys):
    """An edge bundle: the graphs plus the checkpoint's config and tokenizer files, no weights. --engine onnx
    checks the export against the config then."""
    import shutil

    from fastjanus.checkpoint import find_weights
    from fastjanus.cli import main
    d, _, _, _, _ = tiny
    out = tmp_path / "o"
    export_onnx(d, out, parts="vq-decoder,llm", progress=lambda s: None)
    bundle = tmp_path / "bundle"
    weights = {f.name for f in find_weights(d).files}
    shutil.copytree(d, bundle, ignore=lambda _, names: [n for n in names if n in weights])
    assert main(["generate", "--model", str(bundle), "--prompt", "a cat", "--engine", "onnx", "--onnx-dir", str(out),
                 "--temperature", "0", "--out", str(tmp_path / "png")]) == 0
    assert capsys.readouterr().out.strip().endswith(".png")
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["language_config"]["rms_norm_eps"] = 1e-5  # another model's config
    (bundle / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--model", str(bundle), "--prompt", "a cat", "--engine", "onnx", "--onnx-dir", str(out),
                 "--out", str(tmp_path / "png")]) == 2
    assert "exported from another model" in capsys.readouterr().err
