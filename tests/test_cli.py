import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import fastjanus
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
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
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
    assert "--num-images must be an integer >= 1" in capsys.readouterr().err


def test_default_model_is_tiny_random_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTJANUS_CACHE", str(tmp_path / "cache"))
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "o"), "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "RANDOM checkpoint" in err and "noise" in err
    assert (tmp_path / "cache" / "random-tiny" / "model.safetensors").is_file()
    # one cache folder for the tiny random model: the bench's --arch tiny uses the very same one
    from fastjanus.random_init import cached_random_model
    assert cached_random_model("tiny") == tmp_path / "cache" / "random-tiny"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["random-tiny"]


def test_init_random_cli(tmp_path, capsys):
    assert main(["init-random", "--arch", "tiny", "--out", str(tmp_path / "t"), "--format", "sharded-bin"]) == 0
    assert (tmp_path / "t" / "pytorch_model.bin.index.json").is_file()


def test_unwritable_output_is_one_line(tiny_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--out", str(f)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("fastjanus: error:")


# ------------------------------------------------------------------------ the first ten minutes
def _no_load(monkeypatch):
    """Make any model load fail loudly: the checks under test must come before it."""
    from fastjanus.engine import pipeline

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(pipeline, "load", boom)


@pytest.mark.parametrize("cmd,flags,flag", [
    ("generate", ["--num-images", "0"], "--num-images"),
    ("generate", ["--temperature", "-1"], "--temperature"),
    ("generate", ["--top-p", "2"], "--top-p"),
    ("generate", ["--top-k", "-5"], "--top-k"),
    ("generate", ["--cfg", "-3"], "--cfg"),
    ("generate", ["--seed", "-1"], "--seed"),
    ("generate", ["--cfg", "nan"], "--cfg"),
    ("generate", ["--max-rows", "3"], "--max-rows"),
    ("understand", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("understand", ["--temperature", "-1"], "--temperature"),
    ("understand", ["--top-k", "0"], "--top-k"),
    ("understand", ["--top-p", "0"], "--top-p"),
])
def test_bad_flags_are_refused_before_any_model_load(cmd, flags, flag, tmp_path, monkeypatch, capsys):
    _no_load(monkeypatch)
    monkeypatch.setenv("FASTJANUS_CACHE", str(tmp_path / "cache"))
    img = tmp_path / "i.png"
    Image.new("RGB", (8, 8)).save(img)
    base = ["--prompt", "x", "--out", str(tmp_path / "o")] if cmd == "generate" else \
        ["--image", str(img), "--question", "what?"]
    assert main([cmd, *base, *flags]) == 2  # no --model: not even the tiny checkpoint may be written
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastjanus: error: " + flag) and "\n" not in err
    assert not (tmp_path / "cache").exists()


def test_missing_image_is_refused_before_load(tmp_path, monkeypatch, capsys):
    _no_load(monkeypatch)
    assert main(["understand", "--model", str(tmp_path), "--image", str(tmp_path / "nope.png"),
                 "--question", "what?"]) == 2
    assert f"--image {tmp_path / 'nope.png'}: no such image file" in capsys.readouterr().err


def test_out_is_checked_before_generation(tiny_dir, tmp_path, monkeypatch, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    _no_load(monkeypatch)
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--out", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"--out {f}: exists and is not a folder" in err and "Errno" not in err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--out", str(f / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


def test_errors_speak_in_flags(tiny_dir, tmp_path, monkeypatch, capsys):
    if not torch.cuda.is_available():
        assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "--device cuda was asked for but CUDA is not available here; use --device cpu" in err
        assert "device=" not in err
        assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--device", "cpu",
                     "--cuda-graphs", "on"]) == 2
        err = capsys.readouterr().err
        assert "--cuda-graphs on needs a CUDA device" in err and "use --cuda-graphs off" in err
    from fastjanus.engine import pipeline
    monkeypatch.setattr(pipeline, "triton_status", lambda: (True, False, "3.x"))
    assert main(["understand", "--model", str(tiny_dir), "--image", str(tmp_path), "--question", "q",
                 "--device", "cpu", "--backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert "--backend triton on the CPU" in err and "or use --backend torch" in err and "backend=" not in err
    # the same checks keep their keyword wording in the Python API
    with pytest.raises(fastjanus.InputError, match=r"backend='triton' on the CPU"):
        pipeline.resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(fastjanus.InputError, match=r"^temperature must be"):
        pipeline.check_sampling(-1)


def test_model_that_is_a_file_or_has_a_corrupt_config(tiny_dir, tmp_path, capsys):
    cfg = tiny_dir / "config.json"
    for cmd in (["generate", "--prompt", "x", "--out", str(tmp_path / "o")], ["info"]):
        assert main([*cmd[:1], "--model", str(cfg), *cmd[1:]]) == 2
        assert f"--model {cfg}: this is a file, not a directory" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "config.json").write_text('{"model_type": "multi_modality", ')
    assert main(["generate", "--model", str(bad), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad / "config.json") in err and "cannot be read as JSON" in err and "download config.json again" in err


class Unsafe:  # pickled by reference: a .bin holding it must be refused, not unpickled
    pass


def test_unsafe_pickle_message_has_no_terminal_codes(tmp_path, capsys):
    from fastjanus.random_init import init_random
    d = init_random("tiny", tmp_path / "m", fmt="bin", seed=0)
    torch.save({"x": torch.zeros(1), "y": Unsafe()}, d / "pytorch_model.bin")
    assert main(["generate", "--model", str(d), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "Unsupported global" in err and "Unsafe" in err
    assert "\x1b" not in err and "weights_only` set to `False`" not in err


def test_seed_is_printed_and_repeats_the_run(tiny_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "a fox", "--out", str(tmp_path / "a")]) == 0
    cap = capsys.readouterr()
    m = re.search(r"seed (\d+) \(pass --seed (\d+) to repeat this run\)", cap.err)
    assert m and m.group(1) == m.group(2)
    first = Path(cap.out.split()[0])
    assert f"-s{m.group(1)}-" in first.name
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "a fox", "--out", str(tmp_path / "b"),
                 "--seed", m.group(1)]) == 0
    cap = capsys.readouterr()
    again = Path(cap.out.split()[0])
    assert "pass --seed" not in cap.err  # given, so not announced
    assert Image.open(first).tobytes() == Image.open(again).tobytes()


def test_output_names_never_collide(tmp_path, monkeypatch):
    from fastjanus import cli
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20261122-120000")  # two runs in the same second
    imgs = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(2)]
    a = cli.save_images(imgs, tmp_path, seed=7)
    b = cli.save_images(imgs, tmp_path, seed=7)
    assert [p.name for p in a] == ["janus-20261122-120000-s7-00.png", "janus-20261122-120000-s7-01.png"]
    assert [p.name for p in b] == ["janus-20261122-120000-s7-00-2.png", "janus-20261122-120000-s7-01-2.png"]
    assert len(set(tmp_path.iterdir())) == 4


def test_help_version_and_bare_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: fastjanus" in out and "generate" in out and "understand" in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.match(r"fastjanus \d+\.\d+\.\d+ \(torch ", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for s in ("images per prompt (default: 1)", "guidance weight (default: 5 for Janus, 2 for JanusFlow)",
              "(default: out)", "Euler steps of the flow (default 30)",
              "tiny RANDOM checkpoint", "(default: a new one, printed"):
        assert s in out, s
    with pytest.raises(SystemExit):
        main(["understand", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--top-k" in out and "(default: 256)" in out


def test_understand_streams_its_answer(tiny_dir, tmp_path, capsys):
    img = tmp_path / "i.png"
    Image.new("RGB", (20, 30), (10, 200, 30)).save(img)
    assert main(["understand", "--model", str(tiny_dir), "--image", str(img), "--question", "what is it?",
                 "--temperature", "1", "--top-k", "50", "--seed", "3", "--max-new-tokens", "12",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    pipe = fastjanus.load(tiny_dir, device="cpu")
    assert out == pipe.answer(img, "what is it?", max_new_tokens=12, temperature=1.0, top_k=50, seed=3) + "\n"


def test_request_checks_that_need_the_tokenizer_come_before_the_weights(tiny_dir, tmp_path, monkeypatch, capsys):
    _no_load(monkeypatch)
    img = tmp_path / "i.png"
    Image.new("RGB", (8, 8)).save(img)
    und = ["understand", "--model", str(tiny_dir), "--image", str(img)]
    assert main([*und, "--question", "what is <image_placeholder>?"]) == 2
    assert "--question must not contain the image tag" in capsys.readouterr().err
    assert main([*und, "--question", "what?", "--max-new-tokens", "5000"]) == 2
    err = capsys.readouterr().err  # the tiny model's context is 1024 positions
    assert re.search(r"with --max-new-tokens 5000 that exceeds the model's context of 1024 positions: "
                     r"lower --max-new-tokens to \d+", err), err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "fox " * 1200, "--out", str(tmp_path / "o")]) == 2
    assert "--prompt is" in capsys.readouterr().err


def test_bench_checks_its_flags_before_writing_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTJANUS_CACHE", str(tmp_path / "cache"))
    if not torch.cuda.is_available():
        assert main(["bench", "--arch", "tiny", "--device", "cpu", "--cuda-graphs", "on", "--quiet"]) == 2
        assert "--cuda-graphs on needs a CUDA device" in capsys.readouterr().err
    assert main(["bench", "--arch", "tiny", "--max-rows", "3", "--quiet"]) == 2
    assert "--max-rows must be even" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_bench_errors_name_the_bench_flags(tiny_dir, capsys):
    # a 2-row x 120-slot plan cannot hold the tiny model's understanding prompt (~210 tokens) plus 100 new ones
    # the triton backend on the device the suite's kernels use (on a GPU machine the interpreter is off)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert main(["bench", "--model", str(tiny_dir), "--device", dev, "--backend", "triton", "--max-rows", "2",
                 "--max-len", "120", "--scenario", "understand", "--text-tokens", "100", "--baselines", "none",
                 "--repeats", "1", "--warmup", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "lower --text-tokens to" in err and "max_new_tokens" not in err and "--max-new-tokens" not in err
    assert main(["bench", "--model", str(tiny_dir), "--device", dev, "--backend", "triton", "--max-len", "30",
                 "--quiet"]) == 2
    assert "--max-len 30 holds no image" in capsys.readouterr().err
