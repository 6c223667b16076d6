"""Text → image codes on ONNX Runtime (export/onnx_llm.py) against the torch path, on the tiny checkpoint (CPU)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fastjanus.engine.pipeline import image_token_rows  # noqa: E402
from fastjanus.errors import InputError  # noqa: E402
from fastjanus.export import onnx_llm  # noqa: E402
from fastjanus.export.onnx_io import DEFAULT_OPSET  # noqa: E402

RAGGED = ["a cat", "a red fox sitting in the snow at sunrise, highly detailed, soft light, oil on canvas", "dog"]


@pytest.fixture(scope="module")
def exported(tiny_pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_llm")
    entries = onnx_llm.export_llm(tiny_pipe.model, tiny_pipe.cfg, out, opset=DEFAULT_OPSET, dtype=torch.float32,
                                  progress=lambda _: None)
    return out, entries


@pytest.fixture(scope="module")
def generator(exported):
    return onnx_llm.OrtImageGenerator(exported[0])


@pytest.fixture(scope="module")
def int8_report(exported):
    return onnx_llm.quantize_llm_int8(exported[0], progress=lambda _: None)


def test_manifest_entries(exported, tiny_pipe):
    out, entries = exported
    assert set(entries) == set(onnx_llm.PARTS)
    cfg, lm = tiny_pipe.cfg, tiny_pipe.cfg.language
    for part, e in entries.items():
        assert (out / e["file"]).stat().st_size == e["bytes"] > 0 and e["dtype"] == "float32"
        assert all(v["shape"][0] == "rows" or v["name"].startswith("kv_cache") for v in e["inputs"] + e["outputs"])
    io = lambda part, key: {v["name"]: v["shape"] for v in entries[part][key]}  # noqa: E731
    L, Hkv, hd, D = lm.num_hidden_layers, lm.num_key_value_heads, lm.head_dim, lm.hidden_size
    assert io("llm_prefill", "inputs") == {"input_ids": ["rows", "tokens"], "lengths": ["rows"]}
    assert io("llm_prefill", "outputs") == {"hidden": ["rows", D], "kv_cache": [L, 2, "rows", Hkv, "tokens", hd]}
    cache = [L, 2, "rows", Hkv, "slots", hd]
    assert io("llm_decode", "inputs") == {"inputs_embeds": ["rows", D], "lengths": ["rows"], "kv_cache": cache}
    assert io("llm_decode", "outputs") == {"hidden": ["rows", D], "kv_cache_out": cache}
    assert io("gen_head", "outputs") == {"logits": ["rows", cfg.vq.codebook_size]}
    assert io("image_embed", "inputs") == {"codes": ["rows"]}
    settings = json.loads((out / "llm.json").read_text())
    assert settings["image_tokens"] == cfg.num_image_tokens and settings["max_len"] == lm.max_position_embeddings


@pytest.mark.parametrize("prompt,n", [("a red fox", 1), ("a red fox", 2), (RAGGED, 1)], ids=["1", "2", "ragged"])
def test_greedy_codes_equal_torch(generator, tiny_pipe, prompt, n):
    rows = image_token_rows(tiny_pipe.tokenizer, tiny_pipe.cfg, prompt, n)
    if isinstance(prompt, list):
        assert len({len(r) for r in rows}) == len(prompt)  # really ragged: every prompt its own length
    ref = tiny_pipe.first_step_logits(prompt, n).numpy()
    np.testing.assert_allclose(generator.first_step_logits(rows), ref, rtol=0, atol=1e-4)
    codes = generator.generate(rows, temperature=0)
    expect = tiny_pipe.generate_image_tokens(prompt, num_images=n, temperature=0).numpy()
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, expect)


def test_sampling_valid_and_seeded(generator, tiny_pipe):
    rows = image_token_rows(tiny_pipe.tokenizer, tiny_pipe.cfg, ["a red fox", "a cat"], 1)
    a = generator.generate(rows, temperature=1.0, seed=3)
    assert a.shape == (2, tiny_pipe.cfg.num_image_tokens) and a.dtype == np.int64
    assert 0 <= a.min() and a.max() < tiny_pipe.cfg.vq.codebook_size
    np.testing.assert_array_equal(generator.generate(rows, temperature=1.0, seed=3), a)
    assert (generator.generate(rows, temperature=1.0, seed=4) != a).any()
    # top-k 1 keeps only the guided argmax: greedy whatever the draw
    greedy = generator.generate(rows, temperature=0)
    np.testing.assert_array_equal(generator.generate(rows, temperature=0.7, top_k=1, seed=5), greedy)


def test_sample_top_k_numpy():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]] * 4000, dtype=np.float32))
    got = onnx_llm.sample(logits, 1.0, 2, rng)
    assert set(np.unique(got)) == {2, 3}  # top-2 only
    assert abs((got == 3).mean() - 4 / 7) < 0.03  # renormalised over the kept two


def test_runner_needs_no_torch(exported, generator, tiny_pipe, tmp_path):
    """The generator in a Python where `import torch` fails (the package __init__ imports torch, so the
    fastjanus and fastjanus.export packages are stubbed: this checks onnx_llm's own runner path)."""
    import fastjanus
    rows = image_token_rows(tiny_pipe.tokenizer, tiny_pipe.cfg, "a red fox", 1)
    script = f"""
import importlib.abc, json, sys, types
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
for name, where in (("fastjanus", {str(Path(fastjanus.__file__).parent)!r}),
                    ("fastjanus.export", {str(Path(onnx_llm.__file__).parent)!r})):
    m = types.ModuleType(name)
    m.__path__ = [where]
    sys.modules[name] = m
from fastjanus.export import onnx_llm
g = onnx_llm.OrtImageGenerator({str(exported[0])!r})
codes = g.generate({rows!r}, temperature=0)
assert "torch" not in sys.modules
print(json.dumps(codes.tolist()))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_array_equal(np.array(json.loads(run.stdout)), generator.generate(rows, temperature=0))


def test_errors(exported, generator, tmp_path):
    with pytest.raises(InputError, match="odd count"):
        generator.generate([[1, 2, 3]], temperature=0)
    with pytest.raises(InputError, match="temperature"):
        generator.generate([[1, 2], [1, 2]], temperature=-1)
    with pytest.raises(InputError, match=r"token ids outside"):
        generator.generate([[1, 10 ** 6], [1, 2]])
    copy = tmp_path / "onnx"
    shutil.copytree(exported[0], copy)
    settings = json.loads((copy / "llm.json").read_text())
    (copy / "llm.json").write_text(json.dumps({**settings, "max_len": settings["image_tokens"] + 4}))
    with pytest.raises(InputError, match="max_len"):
        onnx_llm.OrtImageGenerator(copy).generate([[1] * 5, [1] * 5])
    (copy / "llm_decode.onnx").unlink()
    with pytest.raises(InputError, match=r"llm_decode\.onnx is missing.*export-onnx --parts all"):
        onnx_llm.OrtImageGenerator(copy)
    with pytest.raises(InputError, match="llm.json is missing"):
        onnx_llm.OrtImageGenerator(tmp_path)


def test_export_refuses(tiny_pipe, tmp_path):
    with pytest.raises(InputError, match="float16"):
        onnx_llm.export_llm(tiny_pipe.model, tiny_pipe.cfg, tmp_path, opset=17, dtype=torch.bfloat16)
    with pytest.raises(InputError, match="max_len"):
        onnx_llm.export_llm(tiny_pipe.model, tiny_pipe.cfg, tmp_path, opset=17, dtype=torch.float32, max_len=10)


def test_int8(exported, int8_report, tiny_pipe):
    out = exported[0]
    for part in onnx_llm.INT8_PARTS:
        p = int8_report["parts"][part]
        assert (out / p["file"]).is_file() and p["file"] == f"{part}_int8.onnx"
        assert p["int8_bytes"] < p["fp32_bytes"]
    for key in ("first_step", "first_step_cfg", "decode_step"):
        err = int8_report[key]
        assert np.isfinite(err["max_abs"]) and 0 < err["max_rel"] < 0.25, (key, err)  # measured ~0.05
    g = onnx_llm.OrtImageGenerator(out, int8=True)
    rows = image_token_rows(tiny_pipe.tokenizer, tiny_pipe.cfg, "a red fox", 1)
    codes = g.generate(rows, temperature=0)
    assert codes.shape == (1, tiny_pipe.cfg.num_image_tokens)
    assert 0 <= codes.min() and codes.max() < tiny_pipe.cfg.vq.codebook_size


def test_float16_export(tiny_pipe, generator, tmp_path):
    entries = onnx_llm.export_llm(tiny_pipe.model, tiny_pipe.cfg, tmp_path, opset=DEFAULT_OPSET,
                                  dtype=torch.float16, progress=lambda _: None)
    assert all(e["dtype"] == "float16" for e in entries.values())
    g = onnx_llm.OrtImageGenerator(tmp_path)
    rows = image_token_rows(tiny_pipe.tokenizer, tiny_pipe.cfg, RAGGED, 1)
    np.testing.assert_allclose(g.first_step_logits(rows), generator.first_step_logits(rows), atol=0.1)
    codes = g.generate(rows, temperature=0)
    assert codes.shape == (3, tiny_pipe.cfg.num_image_tokens) and codes.max() < tiny_pipe.cfg.vq.codebook_size
    with pytest.raises(InputError, match="float32 graphs"):
        onnx_llm.quantize_llm_int8(tmp_path)
