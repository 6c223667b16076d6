import pytest

from fastjanus.random_init import write_tokenizer_files
from fastjanus.tokenizer import BOI, SYSTEM_PROMPT, JanusTokenizer, render_prompt


def test_templates_render_exactly():
    assert render_prompt("deepseek", " a cat  ") + BOI == "<|User|>: a cat\n\n<|Assistant|>:<begin_of_image>"
    assert render_prompt("deepseek_old", "a cat") == "User: a cat\n\nAssistant:"
    assert render_prompt("deepseek", "<image_placeholder>\nWhat?", SYSTEM_PROMPT) == \
        SYSTEM_PROMPT + "\n\n<|User|>: <image_placeholder>\nWhat?\n\n<|Assistant|>:"


def test_generation_prompt_has_one_bos_and_ends_with_boi(tiny_pipe):
    tk = tiny_pipe.tokenizer
    ids = tk.generation_prompt("a cat")
    assert ids[0] == tk.bos_id and ids.count(tk.bos_id) == 1 and ids[-1] == tk.boi_id
    assert tk.eos_id not in ids
    assert tk.tok.decode(ids, skip_special_tokens=False) == \
        "<｜begin▁of▁sentence｜><|User|>: a cat\n\n<|Assistant|>:<begin_of_image>"


def test_understanding_prompt_expands_the_image(tiny_pipe):
    tk = tiny_pipe.tokenizer
    ids = tk.understanding_prompt("What is this?", 64)
    i = ids.index(tk.boi_id)
    assert ids[i + 1: i + 65] == [tk.image_id] * 64 and ids[i + 65] == tk.eoi_id
    assert ids.count(tk.image_id) == 64 and ids.count(tk.bos_id) == 1


@pytest.mark.parametrize("arch", ["janus-1.3b", "janus-pro-1b"])
def test_special_ids_resolved_by_string(arch, tmp_path):
    write_tokenizer_files(tmp_path, arch, 576, 384)
    tk = JanusTokenizer(tmp_path, vocab_rows=102400)
    if arch == "janus-1.3b":
        # the 1.3B tokenizer lacks the image tag: added like the official processor, at the tokenizer's length
        assert tk.added == ["<image_placeholder>"] and tk.image_id == len(tk) - 1
        assert tk.template == "deepseek_old"
        assert tk.generation_prompt("x")[-1] == tk.boi_id
        assert tk.decode(tk.generation_prompt("x")) == "User: x\n\nAssistant:"
    else:
        assert tk.added == [] and tk.template == "deepseek"
    assert len({tk.bos_id, tk.eos_id, tk.pad_id, tk.image_id, tk.boi_id, tk.eoi_id}) == 6


def test_special_id_beyond_embedding_rows_is_an_error(tmp_path):
    from fastjanus.errors import CheckpointError
    write_tokenizer_files(tmp_path, "janus-pro-1b", 576, 384)
    with pytest.raises(CheckpointError, match="outside the model's 100 embedding rows"):
        JanusTokenizer(tmp_path, vocab_rows=100)


@pytest.mark.parametrize("fname,key,value,needle", [
    ("processor_config.json", "num_image_tokens", 0, "num_image_tokens must be a positive integer"),
    ("preprocessor_config.json", "image_size", "big", "image_size must be a positive integer"),
    ("preprocessor_config.json", "image_std", [0.5, 0.0, 0.5], "image_mean/image_std"),
    ("preprocessor_config.json", "image_mean", "grey", "malformed value"),
])
def test_bad_processor_files(tmp_path, fname, key, value, needle):
    import json
    from fastjanus.errors import ConfigError
    write_tokenizer_files(tmp_path, "janus-pro-1b", 576, 384)
    f = tmp_path / fname
    d = json.loads(f.read_text())
    d[key] = value
    f.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=needle):
        JanusTokenizer(tmp_path, vocab_rows=102400)
