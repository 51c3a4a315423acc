"""NSA keys are validated on one path wherever they are set (issue 17, item 6), and the authors' Qwen2.5-VL
config.json converts to VideoNSA's (item 13)."""

import json
import math

import pytest
import torch

from configuration_videonsa import NSA_KEYS, VideoNSAConfig, VideoNSATextConfig, videonsa_config_dict
from modeling_videonsa import load_nsa_kernels
from videonsa.testing import tiny_config, tiny_model, video_prompt

BAD = [
    ("nsa_gate_temperature", 0.0, "nsa_gate_temperature must be a number > 0"),
    ("nsa_gate_temperature", -0.3, "nsa_gate_temperature must be a number > 0"),
    ("nsa_gate_temperature", math.nan, "nsa_gate_temperature must be a number > 0"),
    ("nsa_block_size", 63, "nsa_block_size must be a power of two >= 16"),
    ("nsa_block_size", 8, "nsa_block_size must be a power of two >= 16"),
    ("nsa_block_count", 0, "nsa_block_count must be a positive integer"),
    ("nsa_block_count", 65, "nsa_block_count rounded up to a power of two must be <= nsa_block_size"),
    ("nsa_window_size", 0, "nsa_window_size must be a positive integer"),
    ("nsa_backend", "cuda", "nsa_backend must be one of"),
]


@pytest.mark.parametrize("place", ["text_config", "top", "text_alone"])
@pytest.mark.parametrize("key, value, message", BAD)
def test_bad_value_is_rejected_wherever_it_is_set(place, key, value, message):
    config = VideoNSATextConfig() if place == "text_alone" else VideoNSAConfig()
    target = config.text_config if place == "text_config" else config
    before = getattr(target, key)
    with pytest.raises(ValueError, match=message):
        setattr(target, key, value)
    assert getattr(target, key) == before  # the rejected value is not kept
    (config if place == "text_alone" else config.text_config).validate()  # still a valid config


def test_text_config_assignment_on_a_model_fails_before_any_forward():
    """`text_config.nsa_gate_temperature = 0` gave all-NaN logits and `nsa_block_size = 63` a shape error later."""
    model = tiny_model()
    inputs = video_prompt([5, (4, 4, 6), 7])
    with torch.no_grad():
        expected = model(**inputs).logits
    for key, value, message in (("nsa_gate_temperature", 0.0, "> 0"), ("nsa_block_size", 63, "power of two")):
        with pytest.raises(ValueError, match=message):
            setattr(model.config.text_config, key, value)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected)


def test_valid_values_set_anywhere_reach_the_model():
    model = tiny_model()
    inputs = video_prompt([5, (4, 4, 6), 7])
    attention = model.model.language_model.layers[0].self_attn
    model.config.text_config.nsa_gate_temperature = 0.6
    assert model.config.nsa_gate_temperature == attention.config.nsa_gate_temperature == 0.6
    hidden = torch.randn(1, 3, model.config.text_config.hidden_size)
    with torch.no_grad():
        logits = attention.gate_logits(hidden)
        raw = attention.g_proj_2(torch.nn.functional.gelu(attention.g_proj_1(hidden))).view(1, 3, -1, 3)
    torch.testing.assert_close(logits, raw / 0.6)
    model.config.nsa_block_count = 1  # through the top-level property: the same path
    assert model.config.text_config.nsa_block_count == 1
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_combination_is_checked_in_either_order():
    config = VideoNSAConfig()  # block 64, 32 blocks
    with pytest.raises(ValueError, match="nsa_block_count rounded up"):
        config.text_config.nsa_block_size = 16  # 32 blocks do not fit a 16-token block's top-k chunks
    config.text_config.nsa_block_count = 16
    config.text_config.nsa_block_size = 16
    assert (config.nsa_block_size, config.nsa_block_count) == (16, 16)


def test_construction_and_from_pretrained_validate(tmp_path):
    with pytest.raises(ValueError, match="nsa_gate_temperature must be a number > 0"):
        VideoNSATextConfig(nsa_gate_temperature=0.0)
    with pytest.raises(ValueError, match="nsa_block_size must be a power of two"):
        VideoNSAConfig(text_config={"nsa_block_size": 63})
    tiny_config().save_pretrained(tmp_path)
    assert VideoNSAConfig.from_pretrained(tmp_path, nsa_window_size=64).text_config.nsa_window_size == 64
    with pytest.raises(ValueError, match="nsa_window_size must be a positive integer"):
        VideoNSAConfig.from_pretrained(tmp_path, nsa_window_size=0)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["text_config"]["nsa_gate_temperature"] = 0.0
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="nsa_gate_temperature must be a number > 0"):
        VideoNSAConfig.from_pretrained(tmp_path)


def test_kernels_binding_is_not_serialised(tmp_path):
    model = tiny_model()
    kernels = load_nsa_kernels(model.config)
    for sub in (model.config.text_config, model.config.vision_config):
        assert load_nsa_kernels(sub) is kernels
    for sub in ("text_config", "vision_config"):
        assert not [key for key in model.config.to_dict()[sub] if "kernels" in key], sub
    assert not [k for k in model.config.to_dict() if "kernels" in k]
    model.config.save_pretrained(tmp_path)
    assert "kernels" not in (tmp_path / "config.json").read_text()


# --------------------------------------------------------------------------------------------------------------
# The authors' config.json
# --------------------------------------------------------------------------------------------------------------
def test_flat_release_config_converts():
    flat = {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_size": 256,
            "num_attention_heads": 8, "num_key_value_heads": 4, "block_counts": 16, "window_size": 128,
            "vision_config": {"model_type": "qwen2_5_vl", "window_size": 112, "depth": 1}}
    values = videonsa_config_dict(flat)
    assert flat["block_counts"] == 16 and flat["model_type"] == "qwen2_5_vl"  # the input is not changed
    assert values["model_type"] == "videonsa" and values["architectures"] == ["VideoNSAForConditionalGeneration"]
    assert values["auto_map"]["AutoModel"] == "modeling_videonsa.VideoNSAForConditionalGeneration"
    config = VideoNSAConfig.from_dict(values)
    assert (config.text_config.nsa_block_count, config.text_config.nsa_window_size) == (16, 128)
    assert config.text_config.hidden_size == 256 and config.vision_config.window_size == 112  # the vision key stays
    assert not hasattr(config, "block_counts") and not hasattr(config.text_config, "block_counts")
    assert (config.nsa_block_size, config.nsa_gate_temperature) == (64, 0.3)  # the release's constants


def test_nested_release_config_converts_and_plain_qwen_keeps_defaults():
    nested = {"model_type": "qwen2_5_vl", "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 256,
                                                          "num_attention_heads": 8, "num_key_value_heads": 4,
                                                          "block_counts": 8, "window_size": 64}}
    config = VideoNSAConfig.from_dict(videonsa_config_dict(nested))
    assert isinstance(config.text_config, VideoNSATextConfig)
    assert (config.nsa_block_count, config.nsa_window_size) == (8, 64)
    plain = VideoNSAConfig.from_dict(videonsa_config_dict({"model_type": "qwen2_5_vl"}))
    defaults = VideoNSAConfig()
    assert all(getattr(plain, key) == getattr(defaults, key) for key in NSA_KEYS)


def test_release_config_errors():
    with pytest.raises(ValueError, match="model_type 'llava' is neither 'videonsa' nor 'qwen2_5_vl'"):
        videonsa_config_dict({"model_type": "llava"})
    with pytest.raises(ValueError, match="block_counts .* and nsa_block_count"):
        videonsa_config_dict({"model_type": "qwen2_5_vl", "block_counts": 16, "nsa_block_count": 8})
    with pytest.raises(ValueError, match="nsa_window_size must be a positive integer"):
        VideoNSAConfig.from_dict(videonsa_config_dict({"model_type": "qwen2_5_vl", "window_size": 0}))
