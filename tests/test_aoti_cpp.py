"""Python-free deployment, end to end on the CPU (slow: `.ci/run` runs it): the tiny checkpoint exported with
`fastjanus export-aoti`, the C++ targets built by CMakeLists.txt against the installed torch's LibTorch, and
`fastjanus-run` checked against the Python pipeline.

The build and each export happen once per run (session fixtures), and each export holds only the parts its tests
need: about 1.5 min to build, 2.5 min to export the generator and the VQ decoder, 40 s for the vision encoder
(2 cores). Without CMake or a C++ compiler the tests skip and say what to install."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _missing_tools() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake is not installed (Debian: apt install cmake; or pip install cmake)"
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler (Debian: apt install g++)"
    return None


@pytest.fixture(scope="session")
def runner(tmp_path_factory) -> Path:
    """The fastjanus-run binary, built once per run into a temporary folder."""
    why = _missing_tools()
    if why:
        pytest.skip(f"cannot build the C++ runner: {why}")
    import torch.utils
    build = tmp_path_factory.mktemp("cmake-build")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], check=True, capture_output=True)
    r = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exe = build / "fastjanus-run"
    assert exe.is_file()
    return exe


def _export(tiny_dir, out: Path, parts: str) -> Path:
    from fastjanus.export.aoti_export import export_aoti
    export_aoti(tiny_dir, out, parts=parts, progress=lambda s: None)
    return out


@pytest.fixture(scope="session")
def gen_pkg(tiny_dir, tmp_path_factory) -> Path:
    return _export(tiny_dir, tmp_path_factory.mktemp("aoti-gen"), "generator,vq-decoder")


@pytest.fixture(scope="session")
def vision_pkg(tiny_dir, tmp_path_factory) -> Path:
    return _export(tiny_dir, tmp_path_factory.mktemp("aoti-vision"), "vision")


def run(exe, *args, ok=True):
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def _ids_file(path: Path, pipe, prompts) -> Path:
    path.write_text("".join(" ".join(map(str, pipe.tokenizer.generation_prompt(p))) + "\n" for p in prompts))
    return path


def _codes(path: Path) -> torch.Tensor:
    return torch.tensor([list(map(int, line.split())) for line in path.read_text().splitlines() if line.strip()])


def _pngs(prefix: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f"{prefix}-{i}.png").convert("RGB")) for i in range(n)])


def _level_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


PROMPTS = ["a red fox", "a cabin in the woods at night, snow falling"]


def test_generate_greedy_equals_the_python_pipeline(runner, gen_pkg, tiny_pipe, tmp_path):
    """temperature 0: the same codes as pipe.generate_image_tokens (a ragged batch of two prompts, two images
    each) and PNGs equal to decode_image_tokens of those codes (within one grey level: the package's decoder is
    compiled, so its float rounding differs before the truncation to uint8)."""
    ids = _ids_file(tmp_path / "ids.txt", tiny_pipe, PROMPTS)
    r = run(runner, "generate", "--packages", gen_pkg, "--prompt-ids", ids, "--num-images", 2, "--cfg", 5,
            "--temperature", 0, "--seed", 0, "--out", tmp_path / "img")
    assert "ms" in r.stdout
    got = _codes(tmp_path / "img.codes")
    want = tiny_pipe.generate_image_tokens(PROMPTS, 2, cfg_weight=5.0, temperature=0)
    assert torch.equal(got, want)
    ref = np.stack([np.asarray(im) for im in tiny_pipe.decode_image_tokens(want)])
    assert _level_diff(_pngs(tmp_path / "img", 4), ref) <= 1


def _python_package_codes(pkg: Path, model, rows, pad, cfg_weight, temperature, seed) -> torch.Tensor:
    """The generator package run from Python (torch._inductor's loader), chained as the C++ runner does."""
    from fastjanus.export.aoti_export import load_generator_package
    from fastjanus.export.aoti_modules import request_buffers, run_generator
    prefill, step = load_generator_package(pkg / "generator.pt2", model)
    return run_generator(prefill, step, request_buffers(model.cfg, rows, pad, cfg_weight, temperature, seed))


def test_generate_sampled_equals_the_packages_run_from_python(runner, gen_pkg, tiny_pipe, tmp_path):
    """temperature 1: the sampler's noise is a function of (seed, step, image, code), so the C++ runner and the
    same packages driven from Python give the same codes; another seed gives others."""
    ids = _ids_file(tmp_path / "ids.txt", tiny_pipe, PROMPTS[:1])
    run(runner, "generate", "--packages", gen_pkg, "--prompt-ids", ids, "--num-images", 3, "--temperature", 1,
        "--seed", 11, "--out", tmp_path / "a")
    run(runner, "generate", "--packages", gen_pkg, "--prompt-ids", ids, "--num-images", 3, "--temperature", 1,
        "--seed", 12, "--out", tmp_path / "b")
    a, b = _codes(tmp_path / "a.codes"), _codes(tmp_path / "b.codes")
    rows = tiny_pipe._image_rows(PROMPTS[:1], 3)
    want = _python_package_codes(gen_pkg, tiny_pipe.model, rows, tiny_pipe.tokenizer.pad_id, 5.0, 1.0, 11)
    assert torch.equal(a, want)
    assert (a != b).float().mean() > 0.5


def test_decode_equals_decode_image_tokens(runner, gen_pkg, tiny_pipe, tmp_path):
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, tiny_pipe.cfg.vq.codebook_size, (11, tiny_pipe.cfg.num_image_tokens), generator=g)
    (tmp_path / "c.codes").write_text("".join(" ".join(map(str, row.tolist())) + "\n" for row in codes))
    run(runner, "decode", "--packages", gen_pkg, "--codes", tmp_path / "c.codes", "--out", tmp_path / "d")
    ref = np.stack([np.asarray(im) for im in tiny_pipe.decode_image_tokens(codes)])
    got = _pngs(tmp_path / "d", 11)  # 11 images: more than one decoder call (8 per call)
    assert _level_diff(got, ref) <= 1
    assert (got == ref).mean() > 0.99


def test_encode_equals_encode_image(runner, vision_pkg, tiny_pipe, tmp_path):
    s = tiny_pipe.cfg.vision.image_size
    pixels = torch.randn(3, 3, s, s, generator=torch.Generator().manual_seed(1))
    (tmp_path / "px.f32").write_bytes(pixels.numpy().astype("<f4").tobytes())
    run(runner, "encode", "--packages", vision_pkg, "--pixels", tmp_path / "px.f32", "--out", tmp_path / "e.f32")
    got = torch.from_numpy(np.fromfile(tmp_path / "e.f32", dtype="<f4").copy())
    with torch.no_grad():
        want = tiny_pipe.model.encode_images(pixels)
    got = got.view(want.shape)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastjanus-run: error: "), r.stderr
    return lines[0]


def test_errors_are_one_line_and_exit_2(runner, gen_pkg, vision_pkg, tiny_pipe, tmp_path):
    ids = _ids_file(tmp_path / "ids.txt", tiny_pipe, PROMPTS[:1])
    gen = ["generate", "--packages", gen_pkg, "--prompt-ids", ids, "--out", tmp_path / "x"]
    assert "not found" in _error(run(runner, "generate", "--packages", tmp_path / "nothing", "--prompt-ids", ids,
                                     "--out", tmp_path / "x", ok=False))
    (tmp_path / "empty").mkdir()
    assert "manifest.json" in _error(run(runner, "generate", "--packages", tmp_path / "empty", "--prompt-ids", ids,
                                         "--out", tmp_path / "x", ok=False))
    assert "--num-images" in _error(run(runner, *gen, "--num-images", "2x", ok=False))
    assert "--num-images" in _error(run(runner, *gen, "--num-images", 0, ok=False))
    assert "--cfg" in _error(run(runner, *gen, "--cfg", -1, ok=False))
    assert "--temperature" in _error(run(runner, *gen, "--temperature", "nan", ok=False))
    assert "--cfg" in _error(run(runner, *gen, "--cfg", "1e39", ok=False))  # finite in C++, inf as the fp32 input
    assert "--seed" in _error(run(runner, *gen, "--seed", -3, ok=False))
    big = _ids_file(tmp_path / "big.txt", tiny_pipe, ["x"])
    big.write_text(big.read_text().strip() + " 99999\n")
    assert "99999" in _error(run(runner, "generate", "--packages", gen_pkg, "--prompt-ids", big, "--out",
                                 tmp_path / "x", ok=False))
    plain = tmp_path / "plain.txt"  # tokenised text without the generation template: no BOS, no <begin_of_image>
    plain.write_text(" ".join(map(str, tiny_pipe.tokenizer.encode("a red fox"))) + "\n")
    assert "fastjanus tokenize" in _error(run(runner, "generate", "--packages", gen_pkg, "--prompt-ids", plain,
                                              "--out", tmp_path / "x", ok=False))
    # a part that was not exported, and packages of another model
    assert "--parts" in _error(run(runner, "generate", "--packages", vision_pkg, "--prompt-ids", ids, "--out",
                                   tmp_path / "x", ok=False))
    other = tmp_path / "other"
    other.mkdir()
    for f in gen_pkg.iterdir():
        (other / f.name).symlink_to(f)
    (other / "manifest.json").unlink()
    m = json.loads((gen_pkg / "manifest.json").read_text())
    m["model"]["fingerprint"] = "sha256:" + "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    assert "another model" in _error(run(runner, *gen[:2], other, *gen[3:], ok=False))
    bad = tmp_path / "bad.codes"
    bad.write_text(" ".join(["7"] * 5) + "\n")
    assert "codes" in _error(run(runner, "decode", "--packages", gen_pkg, "--codes", bad, "--out", tmp_path / "y",
                                 ok=False))
    assert run(runner, ok=False).returncode == 2
    assert run(runner, "--help").returncode == 0


def test_tokenize_then_run_without_python_in_the_loop(runner, gen_pkg, tiny_dir, tmp_path):
    """The README's flow: `fastjanus tokenize` writes the ids that fastjanus-run reads."""
    ids = tmp_path / "ids.txt"
    subprocess.run([sys.executable, "-m", "fastjanus.cli", "tokenize", "--model", str(tiny_dir), "--prompt",
                    "a red fox", "--out", str(ids)], check=True, capture_output=True)
    run(runner, "generate", "--packages", gen_pkg, "--prompt-ids", ids, "--seed", 1, "--out", tmp_path / "r")
    assert Image.open(tmp_path / "r-0.png").size == (32, 32)
