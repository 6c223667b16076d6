import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fastjanus.cli import main


def test_info_json(tiny_dir, capsys):
    assert main(["info", "--model", str(tiny_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    a = info["architecture"]
    assert (a["hidden_size"], a["num_layers"], a["num_heads"], a["num_kv_heads"], a["intermediate_size"],
            a["vocab_rows"]) == (64, 2, 4, 2, 128, 1024)
    assert info["weights"]["format"] == "safetensors" and info["weights"]["dtypes"] == {"bfloat16": 260}
    assert info["parameters"] == 1151595
    assert set(info["tokenizer"]["special_ids"]) >= {"bos", "eos", "pad", "image_placeholder", "begin_of_image"}


def test_info_works_without_weights(tmp_path, capsys):
    from fastjanus.random_init import write_tokenizer_files
    (tmp_path / "config.json").write_text(
        open(os.path.join(os.path.dirname(__file__), "data", "configs", "janus-pro-7b.config.json")).read())
    write_tokenizer_files(tmp_path, "janus-pro-7b", 576, 384)
    assert main(["info", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "hidden 4096, layers 30, heads 32, kv heads 32, intermediate 11008, vocab rows 102400" in out
    assert "weights     none found" in out


def test_generate_and_understand(tiny_dir, tmp_path, capsys):
    out = tmp_path / "png"
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--prompt", "a dog",
                 "--num-images", "2", "--seed", "1", "--out", str(out)]) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 4 and all(Image.open(p).size == (32, 32) for p in paths)
    assert main(["understand", "--model", str(tiny_dir), "--image", paths[0], "--question", "what?",
                 "--max-new-tokens", "4"]) == 0
    assert "torch backend" in capsys.readouterr().err  # the CPU default
    if not torch.cuda.is_available():  # conftest switched the Triton interpreter on
        pytest.importorskip("triton")
        assert main(["understand", "--model", str(tiny_dir), "--image", paths[0], "--question", "what?",
                     "--max-new-tokens", "4", "--backend", "triton"]) == 0
        assert "triton backend" in capsys.readouterr().err


def test_errors_are_one_line_and_nonzero(tmp_path):
    env = dict(os.environ, FASTJANUS_CACHE=str(tmp_path / "cache"))
    for args in (["info", "--model", str(tmp_path / "nope")],
                 ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]):
        r = subprocess.run([sys.executable, "-m", "fastjanus.cli", *args], capture_output=True, text=True, env=env)
        assert r.returncode == 2
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("fastjanus: error:") and "nope" in lines[-1] and "Traceback" not in r.stderr


def test_generate_bad_value_one_line(tiny_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--num-images", "0",
                 "--out", str(tmp_path)]) == 2
    assert "num_images must be an integer >= 1" in capsys.readouterr().err


def test_default_model_is_tiny_random_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTJANUS_CACHE", str(tmp_path / "cache"))
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "o"), "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "RANDOM checkpoint" in err and "noise" in err
    assert (tmp_path / "cache" / "tiny-random" / "model.safetensors").is_file()


def test_init_random_cli(tmp_path, capsys):
    assert main(["init-random", "--arch", "tiny", "--out", str(tmp_path / "t"), "--format", "sharded-bin"]) == 0
    assert (tmp_path / "t" / "pytorch_model.bin.index.json").is_file()


def test_unwritable_output_is_one_line(tiny_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--out", str(f)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("fastjanus: error:")
