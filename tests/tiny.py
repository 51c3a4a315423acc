"""Tiny random VideoNSA checkpoints and inputs for tests: Qwen2.5-VL's real structure at toy sizes.

The text decoder keeps the 7B head layout (28 query heads over 4 kv heads, so the NSA padding is 28 -> 64)
with head dim 8; NSA blocks are 16 tokens so that short prompts span several blocks and selection has to choose.
"""

from __future__ import annotations

import torch

from configuration_videonsa import VideoNSAConfig

VOCAB = 1000
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 990, 991, 992, 993
PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch


def tiny_config(num_layers: int = 2, **text_overrides) -> VideoNSAConfig:
    text = dict(
        hidden_size=224,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        nsa_block_size=16,
        nsa_block_count=2,
        nsa_window_size=32,
    )
    text.update(text_overrides)
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=224,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[0],
        tokens_per_second=2,
    )
    return VideoNSAConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def tiny_model(num_layers: int = 2, seed: int = 0, **text_overrides):
    from modeling_videonsa import VideoNSAForConditionalGeneration

    torch.manual_seed(seed)
    model = VideoNSAForConditionalGeneration(tiny_config(num_layers, **text_overrides)).eval()
    with torch.no_grad():  # random, non-trivial gates (the default init makes every gate logit ~0)
        for layer in model.model.language_model.layers:
            layer.self_attn.g_proj_2.bias.normal_(0.0, 1.0)
    return model


def video_prompt(segments, seed: int = 0) -> dict:
    """One sample from a list of segments: ``int`` n -> n random text tokens, ``(t, h, w)`` -> a video whose
    grid is t temporal patches of h x w patches (``t*h*w/4`` merged tokens), wrapped in vision start/end."""
    generator = torch.Generator().manual_seed(seed)
    ids, types, pixels, grids = [], [], [], []
    for segment in segments:
        if isinstance(segment, int):
            ids += torch.randint(3, 900, (segment,), generator=generator).tolist()
            types += [0] * segment
        else:
            t, h, w = segment
            tokens = t * h * w // 4
            ids += [VISION_START] + [VIDEO_TOKEN] * tokens + [VISION_END]
            types += [0] + [2] * tokens + [0]
            pixels.append(torch.randn(t * h * w, PATCH_DIM, generator=generator))
            grids.append([t, h, w])
    sample = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "mm_token_type_ids": torch.tensor([types]),
    }
    if grids:
        sample["pixel_values_videos"] = torch.cat(pixels)
        sample["video_grid_thw"] = torch.tensor(grids)
    return sample


def left_pad_batch(samples: list[dict]) -> dict:
    """Stack samples with left padding, as a processor with ``padding_side="left"`` returns them."""
    length = max(s["input_ids"].shape[1] for s in samples)
    batch = {}
    for key, fill in (("input_ids", PAD), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        rows = [torch.cat([torch.full((1, length - s[key].shape[1]), fill), s[key]], dim=1) for s in samples]
        batch[key] = torch.cat(rows)
    with_video = [s for s in samples if "video_grid_thw" in s]
    if with_video:
        batch["pixel_values_videos"] = torch.cat([s["pixel_values_videos"] for s in with_video])
        batch["video_grid_thw"] = torch.cat([s["video_grid_thw"] for s in with_video])
    return batch
