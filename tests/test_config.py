import json
from pathlib import Path

import pytest

from fastjanus.config import JanusConfig, preset, PRESETS
from fastjanus.errors import ConfigError

CONFIGS = Path(__file__).parent / "data" / "configs"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs"


def _ref(name):
    # Prefer the team's reference copy beside the checkout; the vendored copy keeps the test running without it.
    p = SHARED / name
    return p if p.is_file() else CONFIGS / name


@pytest.mark.parametrize("name,arch", [("janus-1.3b.config.json", "janus-1.3b"),
                                       ("janus-pro-1b.config.json", "janus-pro-1b"),
                                       ("janus-pro-7b.config.json", "janus-pro-7b")])
def test_official_configs_parse_and_match_presets(name, arch):
    cfg = JanusConfig.from_file(_ref(name))
    p = preset(arch)
    assert cfg.language == p.language
    assert (cfg.vision, cfg.aligner, cfg.vq, cfg.gen_aligner, cfg.gen_head) == \
           (p.vision, p.aligner, p.vq, p.gen_aligner, p.gen_head)
    assert cfg.num_image_tokens == 576 and cfg.vision.num_patches == 576 and cfg.vision.layers_used == 24


def test_pro_7b_minimal_language_config_takes_llama_defaults():
    raw = json.loads(_ref("janus-pro-7b.config.json").read_text())
    assert "hidden_size" not in raw["language_config"]  # the recovered file really is the minimal one
    L = JanusConfig.from_file(_ref("janus-pro-7b.config.json")).language
    assert (L.hidden_size, L.num_hidden_layers, L.num_attention_heads, L.num_key_value_heads,
            L.intermediate_size, L.vocab_size) == (4096, 30, 32, 32, 11008, 102400)
    assert L.rms_norm_eps == 1e-6 and L.rope_theta == 10000.0 and L.head_dim == 128


@pytest.mark.parametrize("arch", sorted(PRESETS))
def test_to_dict_round_trip(arch):
    cfg = preset(arch)
    assert JanusConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _pro1b():
    return json.loads(_ref("janus-pro-1b.config.json").read_text())


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["vision_config"].update(cls="EVA"), "vision_config.cls is 'EVA'"),
    (lambda d: d["gen_vision_config"].update(cls="VQ-8"), "gen_vision_config.cls is 'VQ-8'"),
    (lambda d: d.update(model_type="janus"), "model_type is 'janus'"),
    (lambda d: d["aligner_config"]["params"].update(n_embed=4096), "aligner_config.params.n_embed is 4096"),
    (lambda d: d["gen_head_config"]["params"].update(image_token_size=8192), "image_token_size is 8192"),
    (lambda d: d["gen_aligner_config"]["params"].update(input_dim=16), "gen_aligner_config.params.input_dim"),
    (lambda d: d["language_config"].update(num_attention_heads=15), "not divisible by num_attention_heads 15"),
    (lambda d: d["language_config"].update(num_key_value_heads=5), "not a multiple of num_key_value_heads 5"),
    (lambda d: d["language_config"].update(hidden_size=-1), "hidden_size must be a positive integer"),
    (lambda d: d["language_config"].update(rope_scaling={"type": "linear"}), "rope_scaling"),
    (lambda d: d["language_config"].update(rms_norm_eps="tiny"), "rms_norm_eps must be a number > 0"),
    (lambda d: d["language_config"].update(rope_parameters={"rope_type": "yarn"}), "rope_type 'yarn'"),
    (lambda d: d["aligner_config"]["params"].update(projector_type="linear"), "projector_type 'linear'"),
    (lambda d: d["vision_config"]["params"].update(model_name="eva_giant"), "model_name 'eva_giant' is unknown"),
    (lambda d: d.pop("gen_head_config"), "missing or malformed 'gen_head_config'"),
])
def test_invalid_configs_name_the_problem(mutate, needle, tmp_path):
    d = _pro1b()
    mutate(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        JanusConfig.from_file(tmp_path)
    assert needle in str(e.value) and "config.json" in str(e.value)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        JanusConfig.from_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        JanusConfig.from_file(tmp_path / "nowhere")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'janus-9b'"):
        preset("janus-9b")


def test_unknown_language_keys_warn_and_rope_parameters_are_read(tmp_path):
    d = _pro1b()
    d["language_config"].update(some_new_key=1, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="ignoring keys fastjanus does not use: \\['some_new_key'\\]"):
        cfg = JanusConfig.from_file(tmp_path)
    assert cfg.language.rope_theta == 5e5
