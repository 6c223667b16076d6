import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import fastjanus
from fastjanus.checkpoint import find_weights
from fastjanus.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from fastjanus.random_init import FORMATS, init_random, official_tensor_shapes, random_tensor


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(fmt, tmp_path, tiny_pipe):
    d = init_random("tiny", tmp_path / fmt, fmt=fmt, seed=0, max_shard_bytes=600_000)
    wf = find_weights(d)
    assert wf.format == fmt
    if fmt.startswith("sharded"):
        assert len(wf.files) >= 2 and wf.index is not None
    p = fastjanus.load(d, device="cpu", dtype=torch.float32)
    ref = tiny_pipe.model.state_dict()
    got = p.model.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # values are exactly the random tensors init-random promised, rounded to the stored bf16: every tensor, so
    # the threads that make them ahead of the writer (random_init._in_parallel) cannot have mixed them up
    assert all(torch.equal(got[k], random_tensor(k, tuple(got[k].shape), 0).float()) for k in got)


def test_load_casts_to_requested_dtype(tiny_dir):
    p = fastjanus.load(tiny_dir, device="cpu", dtype="bf16")
    assert {t.dtype for t in p.model.parameters()} == {torch.bfloat16}
    assert not any(t.is_meta for t in p.model.parameters())


def test_known_unused_keys_are_accepted(tiny_dir):
    shapes = official_tensor_shapes(fastjanus.preset("tiny"))
    assert "vision_model.vision_tower.attn_pool.latent" in shapes
    assert "gen_vision_model.quantize.codebook_used" in shapes  # written by init-random, ignored by load
    fastjanus.load(tiny_dir)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(d, fn):
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors")


def test_missing_key_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _rewrite(d, lambda sd: sd.pop("gen_head.vision_head.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): gen_head.vision_head.bias"):
        fastjanus.load(d)


def test_unexpected_key_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _rewrite(d, lambda sd: sd.update({"language_model.model.layers.7.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): language_model.model.layers.7.extra.weight"):
        fastjanus.load(d)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _rewrite(d, lambda sd: sd.update({"gen_embed.weight": torch.zeros(512, 9)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped: gen_embed.weight: file \(512, 9\) vs model \(512, 8\)"):
        fastjanus.load(d)


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated or corrupt"):
        fastjanus.load(d)


def test_garbage_safetensors(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        fastjanus.load(d)


def test_truncated_bin(tmp_path):
    d = init_random("tiny", tmp_path / "b", fmt="bin")
    f = d / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 4096])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: truncated or corrupt"):
        fastjanus.load(d)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bin_needing_unsafe_unpickling_is_refused(tmp_path, capsys):
    d = init_random("tiny", tmp_path / "b", fmt="bin")
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd["evil"] = Evil()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load.*arbitrary code"):
        fastjanus.load(d)
    assert "pwned" not in capsys.readouterr().out


def test_missing_shard_and_bad_index(tmp_path):
    d = init_random("tiny", tmp_path / "s", fmt="sharded-bin", max_shard_bytes=600_000)
    idx = d / "pytorch_model.bin.index.json"
    shard = sorted(d.glob("pytorch_model-*.bin"))[1]
    shard.rename(shard.with_suffix(".bak"))
    with pytest.raises(CheckpointNotFoundError, match=f"{shard.name}: shard listed in {idx.name} is missing"):
        fastjanus.load(d)
    idx.write_text("[]")
    with pytest.raises(CheckpointError, match="not a valid index file"):
        fastjanus.load(d)


def test_missing_files(tiny_dir, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        fastjanus.load(tmp_path / "does-not-exist")
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="no weights found"):
        fastjanus.load(d)
    d2 = _copy(tiny_dir, tmp_path / "m2")
    (d2 / "tokenizer.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="tokenizer.json"):
        fastjanus.load(d2)


def test_unknown_model_class(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["gen_head_config"]["cls"] = "mystery_head"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="gen_head_config.cls is 'mystery_head'"):
        fastjanus.load(d)


def test_processor_files_must_agree_with_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    proc = json.loads((d / "processor_config.json").read_text())
    proc["num_image_tokens"] = 576
    (d / "processor_config.json").write_text(json.dumps(proc))
    with pytest.raises(ConfigError, match="576 image tokens"):
        fastjanus.load(d)
