"""Tiny random VideoNSA checkpoints, synthetic videos and a tokenizer, built locally (nothing is downloaded).

Used by the demo (``videonsa.demo`` builds a tiny checkpoint when no weights are present) and by the tests. Not part of
the Hub repository.

The tiny text decoder keeps the 7B head layout (28 query heads over 4 kv heads, so the NSA padding is 28 -> 64)
with head dim 8. The tokenizer is a byte-level BPE with no merges (every byte is a token) that carries
Qwen2.5-VL's special tokens; the videos are synthetic moving frames encoded with PyAV.
"""

from __future__ import annotations

import fractions
import os

import numpy as np
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
        intermediate_size=36,  # not a multiple of 8, like the released 3,420: exercises VideoNSAVisionMLP's padding
        num_heads=2,
        out_hidden_size=text["hidden_size"],  # the merger projects into the text decoder's width
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


# Qwen2.5-VL's special tokens, in the order the real vocabulary has them (ids 151643..151656 there).
QWEN2_5_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def synthetic_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """`(num_frames, height, width, 3)` uint8 frames with a moving gradient and a moving square, so that every frame
    differs from its neighbours (a static clip would hide frame-index mistakes)."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    side = max(2, min(height, width) // 4)
    for t in range(num_frames):
        frames[t, ..., 0] = (xx * 255 // max(width - 1, 1) + 7 * t + seed) % 256
        frames[t, ..., 1] = (yy * 255 // max(height - 1, 1) + 3 * t) % 256
        frames[t, ..., 2] = (29 * t + 50 * seed) % 256
        top = (t * 3) % max(height - side, 1)
        left = (t * 5) % max(width - side, 1)
        frames[t, top : top + side, left : left + side] = 255
    return frames


def write_video(
    path: str | os.PathLike,
    num_frames: int,
    fps: float,
    width: int,
    height: int,
    codec: str = "libx264",
    seed: int = 0,
) -> str:
    """Encode `num_frames` synthetic frames at `fps` into `path` (mp4/mkv/avi, picked by the extension).

    Odd sizes are written in yuv444p (4:2:0 needs even sizes); `num_frames=0` writes a container with a video stream
    and no frames (use `.avi`: mp4 and mkv drop streams that never got a packet)."""
    import av  # PyAV: only needed to write videos

    path = str(path)
    container = av.open(path, mode="w")
    stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    if codec == "libx264":
        # keep every frame (no lookahead surprises) and encode fast
        stream.options = {"preset": "ultrafast", "crf": "18"}
    if num_frames == 0:
        container.start_encoding()
    for frame in synthetic_frames(num_frames, height, width, seed=seed):
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def make_tokenizer(special_token_ids: dict[str, int] | None = None, vocab_size: int | None = None):
    """A byte-level tokenizer with Qwen2.5-VL's special tokens, built in memory.

    Every byte is one token (the vocabulary is the 256-symbol byte-level alphabet, no merges). The special tokens
    follow at ids 256..269, or at the ids given in `special_token_ids` (e.g. to match a tiny model's config), the
    gaps filled with unreachable placeholder tokens up to `vocab_size`."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    wanted = dict(special_token_ids or {})
    size = max([vocab_size or 0, len(vocab) + len(QWEN2_5_VL_SPECIAL_TOKENS), *(i + 1 for i in wanted.values())])
    by_id = {index: token for token, index in wanted.items()}
    free = iter(i for i in range(len(vocab), size) if i not in by_id)
    for token in QWEN2_5_VL_SPECIAL_TOKENS:
        if token not in wanted:
            by_id[next(free)] = token
    for index in range(len(vocab), size):
        vocab[by_id.get(index, f"<|unused_{index}|>")] = index
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_5_VL_SPECIAL_TOKENS})
    return tokenizer


def build_tiny_checkpoint(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a complete tiny VideoNSA folder, laid out like the Hub repo: weights, config with the released NSA
    settings (block 64, 32 blocks, window 256, temperature 0.3), generation config, tokenizer, processor and code.
    """
    from processing_videonsa import VideoNSAProcessor

    tokenizer = make_tokenizer(
        {"<|image_pad|>": IMAGE_TOKEN, "<|video_pad|>": VIDEO_TOKEN,
         "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END},
        vocab_size=VOCAB,
    )
    model = tiny_model(seed=seed, nsa_block_size=64, nsa_block_count=32, nsa_window_size=256)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    VideoNSAProcessor(tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def on_quantization_grid(model, mode: str):
    """Round the weights of ``model`` that a quantized load converts (the text decoder's projections, gate MLPs
    excepted: see ``modeling_videonsa.UNQUANTIZED_MODULES``) onto the grid of ``mode``, so that quantizing them loses
    nothing and a quantized model can be compared with this one at the backend's arithmetic precision.

    ``"nf4"``: bitsandbytes' NF4 blocks of 64 (needs bitsandbytes); ``"int8"``: LLM.int8's absmax scale per output
    row; ``"fp8"``: e4m3 in 128 x 128 tiles, every tile rescaled to the absmax 448 * 2**-12 so that its scale is a
    power of two and the weights are exact in bf16 too. Returns ``model``.
    """
    from torch import nn

    with torch.no_grad():
        for name, module in model.model.language_model.named_modules():
            if type(module) is not nn.Linear or "g_proj" in name:
                continue
            weight = module.weight
            if mode == "nf4":
                from bitsandbytes import functional

                packed, state = functional.quantize_4bit(weight.data.contiguous(), blocksize=64, quant_type="nf4")
                weight.copy_(functional.dequantize_4bit(packed, state))
            elif mode == "int8":
                scale = weight.abs().amax(dim=1, keepdim=True) / 127
                weight.copy_(torch.round(weight / scale) * scale)
            elif mode == "fp8":
                rows, cols = weight.shape
                tiles = weight.reshape(rows // 128, 128, cols // 128, 128)
                tiles = tiles / tiles.abs().amax(dim=(1, 3), keepdim=True) * 448.0
                weight.copy_(tiles.to(torch.float8_e4m3fn).float().reshape(rows, cols) * 2.0**-12)
            else:
                raise ValueError(f"mode must be 'nf4', 'int8' or 'fp8', got {mode!r}")
    return model
