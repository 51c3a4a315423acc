"""Model presets for random-weight runs and benchmarks, and config overrides from the command line.

``preset_config("7b")`` is Qwen2.5-VL-7B's architecture with the released NSA settings (the released VideoNSA);
``"small"`` keeps its widths with 4 text layers and 4 vision blocks; ``"tiny"`` is the test model.
"""

from __future__ import annotations

import json

from configuration_videonsa import NSA_KEYS, VideoNSAConfig, validate_nsa_settings
from processing_videonsa import VideoNSAProcessor

# Qwen2.5-VL-7B-Instruct's architecture (the released VideoNSA) with the released NSA settings.
PRESET_7B = dict(
    text_config=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
        sliding_window=32768, max_window_layers=28, use_sliding_window=False, attention_dropout=0.0,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
        nsa_block_size=64, nsa_block_count=32, nsa_window_size=256, nsa_gate_temperature=0.3,
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, out_hidden_size=3584,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu",
    ),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, tie_word_embeddings=False,
)


# 'small': the 7B's widths, heads, vocabulary and NSA settings with 4 text layers and 4 vision blocks (the last one
# full attention), about 2.2B parameters: every kernel and shape of the 7B at a size that trains in full on one GPU.
SMALL_OVERRIDES = "num_hidden_layers=4,vision_config.depth=4"


def preset_config(name: str) -> VideoNSAConfig:
    if name == "7b":
        return VideoNSAConfig(**PRESET_7B)
    if name == "small":
        return apply_config_overrides(VideoNSAConfig(**PRESET_7B), SMALL_OVERRIDES)
    if name == "tiny":
        from ..testing import tiny_config

        return tiny_config()
    raise ValueError(f"--random_init_preset must be '7b', 'small' or 'tiny', got {name!r}")


def synthetic_processor(config) -> VideoNSAProcessor:
    """A processor for a random model: a byte-level tokenizer carrying Qwen2.5-VL's special tokens at the config's
    ids (all of them at the real ids when the vocabulary is Qwen2.5-VL's)."""
    from ..testing import QWEN2_5_VL_SPECIAL_TOKENS, make_tokenizer

    vocab_size = config.text_config.vocab_size
    if vocab_size >= 151643 + len(QWEN2_5_VL_SPECIAL_TOKENS):
        ids = {token: 151643 + i for i, token in enumerate(QWEN2_5_VL_SPECIAL_TOKENS)}
    else:
        ids = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
               "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id}
    tokenizer = make_tokenizer(ids, vocab_size=vocab_size)
    return VideoNSAProcessor(tokenizer=tokenizer, nsa_block_size=config.text_config.nsa_block_size)



def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def apply_config_overrides(config, overrides: str | None):
    """A new config with ``"key=value,key=value"`` applied. Keys are text-config keys (``num_hidden_layers``, the
    NSA keys such as ``nsa_enabled``), top-level keys, or dotted (``vision_config.depth``); values are JSON
    (``false``, ``4``, ``[16,24,24]``) or plain strings. A changed layer count drops the per-layer lists so that
    they are rebuilt for the new count."""
    if not overrides:
        return config
    data = config.to_dict()
    text = data["text_config"]
    for item in (part.strip() for part in overrides.split(",") if part.strip()):
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        value = _parse_value(value)
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in ("text_config", "vision_config") or sub not in data[section]:
                raise ValueError(f"unknown config key {key!r}")
            data[section][sub] = value
        elif key in text or key in NSA_KEYS:
            text[key] = value
        elif key in data:
            data[key] = value
        else:
            raise ValueError(f"unknown config key {key!r} (not in text_config, vision_config or the top level)")
        if key.endswith("num_hidden_layers") and "layer_types" not in overrides:
            text.pop("layer_types", None)
        if key.endswith("depth") and "fullatt_block_indexes" not in overrides:
            depth = data["vision_config"]["depth"]
            data["vision_config"]["fullatt_block_indexes"] = [
                i for i in data["vision_config"].get("fullatt_block_indexes", []) if i < depth
            ] or [depth - 1]
    new = type(config).from_dict(data)
    validate_nsa_settings(new.text_config)
    return new

