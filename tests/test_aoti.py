"""The AOTInductor export's modules and checks, without compiling anything (the packages and the C++ runner are
tested in test_aoti_cpp.py, slow): the counter-based sampler, the generator modules run eagerly against the
pipeline, the export's refusals, and `fastjanus tokenize`."""
import json

import pytest
import torch

from fastjanus.cli import main as cli_main
from fastjanus.engine.sampling import cfg_mix
from fastjanus.errors import InputError
from fastjanus.export.aoti_export import check_max_images, export_aoti, parse_parts, resolve_device_dtype
from fastjanus.export.aoti_modules import (GenPrefill, GenStep, _unit, counter_uniform, guided_sample,
                                           request_buffers, run_generator)
from fastjanus.quant import QuantConfig
from fastjanus.random_init import init_random

I64 = dict(dtype=torch.int64)


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(χ² ≥ the statistic) with len(counts) − 1 degrees of freedom (the regularised upper incomplete gamma)."""
    expected = probs.double() * counts.sum()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64), stat / 2).item()


def _t(x, dtype=torch.float32):
    return torch.tensor([x], dtype=dtype)


# ------------------------------------------------------------------------------------ counter-based noise
def test_counter_uniform_is_a_function_of_its_counters():
    a = counter_uniform(_t(7, torch.int64), _t(3, torch.int64), 5, 1000)
    assert a.shape == (5, 1000) and a.dtype == torch.float32
    assert torch.equal(a, counter_uniform(_t(7, torch.int64), _t(3, torch.int64), 5, 1000))  # reproducible
    assert 0 < a.min() and a.max() < 1
    # another seed, step, row or a seed differing only in its high 32 bits: other values
    for other in (counter_uniform(_t(8, torch.int64), _t(3, torch.int64), 5, 1000),
                  counter_uniform(_t(7, torch.int64), _t(4, torch.int64), 5, 1000),
                  counter_uniform(_t(7 + 2 ** 32, torch.int64), _t(3, torch.int64), 5, 1000)):
        assert (other != a).float().mean() > 0.99
    assert (a[0] != a[1]).float().mean() > 0.99
    # the first rows of a larger request are the same noise (the row index is the counter, not the shape)
    assert torch.equal(counter_uniform(_t(7, torch.int64), _t(3, torch.int64), 2, 1000), a[:2])


def test_unit_never_gives_0_or_1():
    """The extreme hashes map strictly inside (0, 1) in fp32, so the Gumbel noise is always finite."""
    u = _unit(torch.tensor([0, 1, 2 ** 9 - 1, 2 ** 31, 2 ** 32 - 2 ** 9, 2 ** 32 - 1], dtype=torch.int64))
    assert 0 < u.min() and u.max() < 1 and torch.isfinite(-torch.log(-torch.log(u))).all()
    assert u[-1] == 1 - 2.0 ** -24 and u[0] == 2.0 ** -24


def test_noise_vectors_of_different_keys_share_no_structure():
    """Two (step, row) keys never give shifted copies of one noise vector: for 64 rows × 3 steps, no pair of
    vectors shares more values than chance allows (with 2^23 levels, a few coincidences among 4096 values)."""
    u = torch.cat([counter_uniform(_t(5, torch.int64), _t(s, torch.int64), 64, 4096) for s in range(3)])
    for i in range(0, u.shape[0], 7):
        for j in range(i + 1, u.shape[0], 11):
            assert len(set(u[i].tolist()) & set(u[j].tolist())) < 20


def test_counter_uniform_is_uniform():
    # 2^18 values in 64 bins; chi-square at a false-alarm rate of 1e-3 (the seed is fixed, so the outcome is too)
    u = counter_uniform(_t(12345, torch.int64), _t(0, torch.int64), 256, 1024).flatten()
    counts = torch.histc(u, bins=64, min=0, max=1)
    assert _chi2_pvalue(counts, torch.full((64,), 1 / 64)) > 1e-3
    # neighbouring columns are not correlated
    x = u.view(256, 1024)
    r = torch.corrcoef(torch.stack([x[:, :-1].flatten(), x[:, 1:].flatten()]))[0, 1].item()
    assert abs(r) < 0.01


# ------------------------------------------------------------------------------------ the guided sampler
def test_guided_sample_greedy_is_the_argmax_of_the_guided_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 37, generator=g)  # 3 images, interleaved cond/uncond; odd codebook size
    for w in (0.0, 1.0, 5.0):
        got = guided_sample(logits, _t(w), _t(0.0), _t(1, torch.int64), _t(0, torch.int64))
        assert torch.equal(got, cfg_mix(logits, w).argmax(-1))


def _draws(sampler, logits, temperature, n_rows=4000, steps=5):
    """Codes drawn for n_rows identical images over several steps (each (step, image) has its own noise)."""
    rows = logits.repeat(n_rows, 1)  # [2·n_rows, K]
    out = [sampler(rows, _t(2.0), _t(temperature), _t(99, torch.int64), _t(s, torch.int64)) for s in range(steps)]
    return torch.cat(out)


def _broken_sample(logits, cfg_weight, temperature, seed, step):
    """A deliberately wrong sampler: uniform noise added instead of Gumbel noise."""
    mixed = cfg_mix(logits, cfg_weight)
    u = counter_uniform(seed, step, *mixed.shape)
    return (mixed / temperature + u).argmax(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_guided_sample_draws_from_the_guided_softmax(temperature):
    """Chi-square of 20000 draws against softmax(guided / T), false-alarm rate 1e-3 per case (fixed seed, so a
    fixed outcome). A sampler with uniform instead of Gumbel noise fails the same test."""
    cond = torch.tensor([0.5, 1.0, -0.3, 0.0, 2.0, -1.0, 0.2, 1.5])
    uncond = torch.tensor([0.0, 0.8, 0.1, -0.2, 1.2, 0.0, 0.0, 0.4])
    logits = torch.stack([cond, uncond])  # one image's pair
    p = (cfg_mix(logits, 2.0)[0] / temperature).softmax(-1)
    counts = lambda draws: torch.bincount(draws, minlength=8)  # noqa: E731
    assert _chi2_pvalue(counts(_draws(guided_sample, logits, temperature)), p) > 1e-3
    assert _chi2_pvalue(counts(_draws(_broken_sample, logits, temperature)), p) < 1e-12


# ------------------------------------------------------------------------------------ the generator modules
def _run_modules(model, rows, pad, cfg_weight, temperature, seed):
    """The generator's prefill + steps, eagerly, as the C++ runner chains them."""
    buf = request_buffers(model.cfg, rows, pad, cfg_weight, temperature, seed)
    with torch.no_grad():
        codes = run_generator(GenPrefill(model), GenStep(model), buf)
    n = model.cfg.num_image_tokens
    assert buf["sampler"][3].item() == n and torch.equal(buf["lengths"], torch.tensor([len(r) + n - 1 for r in rows],
                                                                                     dtype=torch.int32))
    return codes


def test_generator_modules_greedy_equal_the_pipeline(tiny_pipe):
    """Eagerly, the prefill and step the packages are made of give the pipeline's greedy codes: a ragged batch
    of two prompts, two images each."""
    prompts = ["a red fox", "a cabin in the woods at night, snow falling"]
    rows = tiny_pipe._image_rows(prompts, 2)
    assert len({len(r) for r in rows}) == 2
    want = tiny_pipe.generate_image_tokens(prompts, 2, cfg_weight=5.0, temperature=0)
    got = _run_modules(tiny_pipe.model, rows, tiny_pipe.tokenizer.pad_id, 5.0, 0.0, 0)
    assert torch.equal(got, want)


def test_generator_modules_sample_reproducibly(tiny_pipe):
    rows = tiny_pipe._image_rows("a red fox", 2)
    a = _run_modules(tiny_pipe.model, rows, tiny_pipe.tokenizer.pad_id, 5.0, 1.0, 3)
    assert torch.equal(a, _run_modules(tiny_pipe.model, rows, tiny_pipe.tokenizer.pad_id, 5.0, 1.0, 3))
    b = _run_modules(tiny_pipe.model, rows, tiny_pipe.tokenizer.pad_id, 5.0, 1.0, 4)
    assert (a != b).float().mean() > 0.5
    assert not torch.equal(a[0], a[1])  # two images of one prompt draw different noise
    assert a.min() >= 0 and a.max() < tiny_pipe.cfg.vq.codebook_size


# ------------------------------------------------------------------------------------ checks before any work
def test_parse_parts_and_options():
    assert parse_parts(None) == ["vision", "vq-decoder", "generator"]
    assert parse_parts("generator, vq-decoder") == ["vq-decoder", "generator"]
    for bad in ("llm", "", "vision,foo"):
        with pytest.raises(InputError, match="--parts"):
            parse_parts(bad)
    for bad in (0, -1, 257, 2.0, True, "4"):
        with pytest.raises(InputError, match="--max-images"):
            check_max_images(bad)
    assert resolve_device_dtype(None, None) == (torch.device("cpu"), torch.float32)
    with pytest.raises(InputError, match="--dtype"):
        resolve_device_dtype("cpu", "int8")
    with pytest.raises(InputError, match="--device"):
        resolve_device_dtype("tpu", None)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no usable CUDA device"):
            resolve_device_dtype("cuda", None)


def test_export_refusals_before_any_work(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        export_aoti(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        export_aoti(tiny_dir, tmp_path / "file")
    flow = init_random("tiny-flow", tmp_path / "flow")
    with pytest.raises(InputError, match="JanusFlow"):
        export_aoti(flow, tmp_path / "out")
    q = tmp_path / "q"
    q.mkdir()
    for f in tiny_dir.iterdir():
        (q / f.name).symlink_to(f)
    (q / "config.json").unlink()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["quantization_config"] = QuantConfig("int8").to_dict()
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="8-bit"):
        export_aoti(q, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_tokenize_cli_writes_the_generation_prompts(tiny_dir, tiny_pipe, tmp_path, capsys):
    out = tmp_path / "ids" / "prompts.txt"
    assert cli_main(["tokenize", "--model", str(tiny_dir), "--prompt", "a red fox", "--prompt", "two cats",
                     "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert [list(map(int, line.split())) for line in lines] == \
        [tiny_pipe.tokenizer.generation_prompt(p) for p in ("a red fox", "two cats")]
    assert cli_main(["tokenize", "--model", str(tiny_dir), "--prompt", "x" * 5000, "--out", "-"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    assert cli_main(["tokenize", "--model", str(tiny_dir), "--prompt", "a", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
