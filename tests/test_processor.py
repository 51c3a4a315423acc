"""VideoNSA processor: real video files in, block-aligned tokens out, through transformers' own video stack.

Every video here is a real file encoded with PyAV (several durations, frame rates and sizes, odd and portrait
included); the tokenizer is a tiny in-memory one carrying Qwen2.5-VL's special tokens. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import tempfile
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
from transformers.utils import logging as hf_logging
from transformers.video_utils import load_video

import processing_videonsa
from videonsa.testing import make_tokenizer, synthetic_frames, write_video
from processing_videonsa import (
    ContextBudgetExceededError,
    FpsReducedWarning,
    NSABlockAlignmentWarning,
    VideoDecodingError,
    VideoNSAProcessor,
    VideoNSAVideoProcessor,
)


# name: (frames, fps, width, height, expected sampled frames at 4 fps, expected (grid_h, grid_w))
CLIPS = {
    "square_3s_30fps.mp4": (90, 30, 224, 224, 12, (16, 16)),
    "ntsc_2s_29.97fps.mp4": (60, 30000 / 1001, 160, 120, 8, (8, 12)),
    "odd_2.5s_10fps.mp4": (25, 10, 225, 127, 10, (10, 16)),
    "portrait_2s_24fps.mp4": (48, 24, 180, 320, 8, (20, 12)),
    "big_square_1s_25fps.mp4": (25, 25, 448, 448, 4, (16, 16)),
    "short_0.5s_8fps.mp4": (4, 8, 96, 64, 4, (4, 6)),
    "one_frame.mp4": (1, 10, 64, 64, 1, (4, 4)),
}
PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    paths = {}
    for seed, (name, (frames, fps, width, height, _, _)) in enumerate(CLIPS.items()):
        paths[name] = write_video(folder / name, frames, fps, width, height, seed=seed)
    paths["long_20s_10fps.mp4"] = write_video(folder / "long_20s_10fps.mp4", 200, 10, 64, 64)
    paths["wide_2s_10fps.mp4"] = write_video(folder / "wide_2s_10fps.mp4", 20, 10, 320, 180)
    paths["zero_frames.avi"] = write_video(folder / "zero_frames.avi", 0, 10, 64, 64, codec="mpeg4")
    paths["no_frame_count.mkv"] = write_video(folder / "no_frame_count.mkv", 10, 10, 64, 64)
    (folder / "empty.mp4").write_bytes(b"")
    paths["empty.mp4"] = str(folder / "empty.mp4")
    good = open(paths["square_3s_30fps.mp4"], "rb").read()
    (folder / "corrupt.mp4").write_bytes(good[: len(good) // 3])  # truncated: no index, broken stream
    paths["corrupt.mp4"] = str(folder / "corrupt.mp4")
    (folder / "not_a_video.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    paths["not_a_video.mp4"] = str(folder / "not_a_video.mp4")
    paths["missing.mp4"] = str(folder / "missing.mp4")
    return paths


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture()
def processor(tokenizer):
    return VideoNSAProcessor(tokenizer=tokenizer)


def reference_processor(tokenizer, **video_kwargs):
    """transformers' own Qwen2.5-VL processor at VideoNSA's settings."""
    settings = dict(min_pixels=3136, max_pixels=50176, fps=4.0, do_sample_frames=True, cap_pixels_per_frame=False)
    settings.update(video_kwargs)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**settings),
    )


def decoded_with_metadata(path):
    """All frames of a file through transformers' `load_video` (PyAV), with their metadata."""
    frames, metadata = load_video(path, backend="pyav")
    metadata.frames_indices = list(range(len(frames)))
    return frames, metadata


def assert_same(ours, theirs, keys=("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw")):
    for key in keys:
        assert key in ours and key in theirs, key
        assert ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), key


def count_video_tokens(processor, out):
    return int((out["input_ids"] == processor.video_token_id).sum())


# ---------------------------------------------------------------------------------------------------- defaults


def test_released_defaults(processor):
    vp = processor.video_processor
    assert isinstance(processor, Qwen2_5_VLProcessor) and isinstance(vp, Qwen2VLVideoProcessor)
    assert isinstance(vp, VideoNSAVideoProcessor)
    assert vp.fps == 4.0 and vp.do_sample_frames is True
    assert vp.size.longest_edge == 50176 and vp.size.shortest_edge == 56 * 56
    assert vp.temporal_patch_size == 2 and vp.patch_size == 14 and vp.merge_size == 2
    assert vp.max_frames is None and vp.min_frames == 4 and vp.cap_pixels_per_frame is False
    assert vp.video_backend == "pyav"
    assert processor.max_context_tokens == 131072 and processor.reduce_fps_to_fit is False
    assert processor.nsa_block_size == 64
    # one NSA block of merged tokens per temporal patch at the default max pixels
    assert vp.size.longest_edge == processor.nsa_block_size * (vp.patch_size * vp.merge_size) ** 2
    assert processor.chat_template


# ---------------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", list(CLIPS))
def test_frames_timestamps_and_grid_at_4fps(processor, clips, name):
    frames, source_fps, width, height, expected_frames, (grid_h, grid_w) = CLIPS[name]
    source_fps = float(np.float64(source_fps))
    out = processor(text="Watch <|video_pad|> now", videos=clips[name], return_tensors="pt", return_metadata=True)
    metadata = out["video_metadata"][0]
    indices = np.asarray(metadata.frames_indices)

    assert len(indices) == expected_frames
    assert len(indices) % 2 == 0 or frames < 2  # frame counts are rounded to the temporal patch size
    assert np.all(np.diff(indices) > 0) and indices[0] == 0 and indices[-1] < frames
    duration = frames / source_fps
    if duration * 4 >= 4 and frames >= 2:  # not clamped by min_frames: one frame every 1/4 s
        step = duration / len(indices)
        assert step == pytest.approx(0.25, abs=0.01)
        for k, t in enumerate(metadata.timestamps):
            assert abs(t - k * step) < 1.0 / source_fps + 1e-6

    grid_t = -(-expected_frames // 2)
    assert out["video_grid_thw"].tolist() == [[grid_t, grid_h, grid_w]]
    assert out["pixel_values_videos"].shape == (grid_t * grid_h * grid_w, PATCH_DIM)
    assert count_video_tokens(processor, out) == grid_t * grid_h * grid_w // 4
    assert int((out["mm_token_type_ids"] == 2).sum()) == grid_t * grid_h * grid_w // 4
    sampled_fps = len(indices) / frames * source_fps
    assert out["second_per_grid_ts"].tolist() == pytest.approx([2 / sampled_fps])

    plan = processor.plan_videos(clips[name])[0]  # the same numbers from metadata alone, before decoding
    assert plan.frame_indices == indices.tolist()
    assert plan.grid_thw == (grid_t, grid_h, grid_w)
    assert plan.num_tokens == count_video_tokens(processor, out)


@pytest.mark.parametrize("name", ["square_3s_30fps.mp4", "big_square_1s_25fps.mp4"])
def test_one_temporal_patch_is_one_nsa_block_at_default_resolution(processor, clips, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NSABlockAlignmentWarning)
        out = processor(text="<|video_pad|>", videos=clips[name], return_tensors="pt")
    grid_t, grid_h, grid_w = out["video_grid_thw"][0].tolist()
    assert grid_h * grid_w // 4 == 64 == processor.nsa_block_size
    assert count_video_tokens(processor, out) == 64 * grid_t
    plan = processor.plan_videos(clips[name])[0]
    assert plan.tokens_per_temporal_patch == 64


def test_default_resolution_never_exceeds_one_block_per_frame_step(processor, clips):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NSABlockAlignmentWarning)
        for name in CLIPS:
            out = processor(text="<|video_pad|>", videos=clips[name], return_tensors="pt")
            _, grid_h, grid_w = out["video_grid_thw"][0].tolist()
            assert grid_h * grid_w // 4 <= processor.nsa_block_size


def test_num_frames_and_fps_overrides(processor, clips):
    out = processor(text="<|video_pad|>", videos=clips["square_3s_30fps.mp4"], num_frames=6, return_tensors="pt")
    assert out["video_grid_thw"][0, 0].item() == 3
    out = processor(text="<|video_pad|>", videos=clips["square_3s_30fps.mp4"], fps=2, return_tensors="pt")
    assert out["video_grid_thw"][0, 0].item() == 3
    assert out["second_per_grid_ts"].tolist() == pytest.approx([1.0])


def test_frames_given_as_arrays(processor, clips):
    frames, metadata = decoded_with_metadata(clips["square_3s_30fps.mp4"])
    from_file = processor(text="<|video_pad|>", videos=clips["square_3s_30fps.mp4"], return_tensors="pt")
    # a whole decoded video with its metadata is sampled like the file
    from_array = processor(text="<|video_pad|>", videos=[frames], video_metadata=[metadata], return_tensors="pt")
    assert_same(
        from_array, from_file, keys=("input_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    )
    # frames without metadata are taken as already sampled, at the processor's fps
    presampled = processor(text="<|video_pad|>", videos=[frames[::8]], return_tensors="pt")
    assert presampled["video_grid_thw"][0, 0].item() == 6
    assert presampled["second_per_grid_ts"].tolist() == pytest.approx([0.5])
    # PIL frames work too
    pil = [Image.fromarray(frame) for frame in frames[::8]]
    from_pil = processor(text="<|video_pad|>", videos=[pil], return_tensors="pt")
    assert torch.equal(from_pil["pixel_values_videos"], presampled["pixel_values_videos"])


# ---------------------------------------------------------------------------------------------------- alignment


def test_resolution_that_breaks_alignment_warns_once_and_still_works(processor, clips):
    wide = clips["wide_2s_10fps.mp4"]
    with pytest.warns(NSABlockAlignmentWarning) as record:
        out = processor(text="<|video_pad|>", videos=wide, max_pixels=100000, return_tensors="pt")
    message = str(record[0].message)
    assert "66 tokens per temporal patch" in message and "64-token" in message and "max_pixels=50176" in message
    assert out["video_grid_thw"].tolist() == [[4, 12, 22]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NSABlockAlignmentWarning)  # once per processor
        processor(text="<|video_pad|>", videos=wide, max_pixels=100000, return_tensors="pt")


def test_larger_aligned_resolution_does_not_warn(processor, clips):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NSABlockAlignmentWarning)
        out = processor(
            text="<|video_pad|>", videos=clips["big_square_1s_25fps.mp4"], max_pixels=4 * 50176, return_tensors="pt"
        )
    _, grid_h, grid_w = out["video_grid_thw"][0].tolist()
    assert grid_h * grid_w // 4 == 4 * 64  # four whole blocks per temporal patch


def test_alignment_follows_the_model_block_size(tokenizer, clips):
    processor = VideoNSAProcessor(tokenizer=tokenizer, nsa_block_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NSABlockAlignmentWarning)
        processor(text="<|video_pad|>", videos=clips["square_3s_30fps.mp4"])  # 8x8 = 4 blocks of 16
        processor(text="<|video_pad|>", videos=clips["square_3s_30fps.mp4"], max_pixels=16 * 784)  # 4x4 = 1 block
    with pytest.warns(NSABlockAlignmentWarning, match="16-token") as record:
        processor(text="<|video_pad|>", videos=clips["wide_2s_10fps.mp4"], max_pixels=100000)
    suggested = int(re.search(r"for this video, max_pixels=(\d+)", str(record[0].message)).group(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NSABlockAlignmentWarning)
        out = VideoNSAProcessor(tokenizer=tokenizer, nsa_block_size=16)(
            text="<|video_pad|>", videos=clips["wide_2s_10fps.mp4"], max_pixels=suggested, return_tensors="pt"
        )
    _, grid_h, grid_w = out["video_grid_thw"][0].tolist()
    assert (grid_h * grid_w // 4) % 16 == 0


# ---------------------------------------------------------------------------------------------------- equality


@pytest.mark.parametrize("name", list(CLIPS))
def test_same_as_transformers_qwen2_5_vl_processor(processor, tokenizer, clips, name):
    frames, metadata = decoded_with_metadata(clips[name])
    text = ["A <|video_pad|> B"]
    ours = processor(text=text, videos=[clips[name]], return_tensors="pt")
    # transformers' sampler divides by zero on a one-frame clip (ours keeps the frame): compare unsampled there
    sample = CLIPS[name][0] >= 2
    theirs = reference_processor(tokenizer, do_sample_frames=sample)(
        text=text, videos=[frames], video_metadata=[metadata], return_tensors="pt"
    )
    assert_same(
        ours,
        theirs,
        keys=("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),
    )


def test_same_as_transformers_on_a_mixed_batch(processor, tokenizer, clips):
    names = ["portrait_2s_24fps.mp4", "odd_2.5s_10fps.mp4", "square_3s_30fps.mp4"]
    decoded = [decoded_with_metadata(clips[n]) for n in names]
    image = Image.fromarray(synthetic_frames(1, 150, 200)[0])
    text = ["one <|video_pad|> and <|image_pad|>", "two <|video_pad|><|video_pad|>"]
    kwargs = dict(text=text, images=[image], padding=True, return_tensors="pt")
    ours = processor(videos=[clips[n] for n in names], **kwargs)
    theirs = reference_processor(tokenizer)(
        videos=[d[0] for d in decoded], video_metadata=[d[1] for d in decoded], **kwargs
    )
    assert_same(
        ours,
        theirs,
        keys=(
            "input_ids",
            "attention_mask",
            "pixel_values_videos",
            "video_grid_thw",
            "second_per_grid_ts",
            "pixel_values",
            "image_grid_thw",
        ),
    )


def test_qwen_vl_utils_output_gives_the_same_tokens_as_transformers(processor, tokenizer):
    qwen_vl_utils = pytest.importorskip("qwen_vl_utils")
    frames = [Image.fromarray(frame) for frame in synthetic_frames(9, 180, 320)]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": frames, "min_pixels": 3136, "max_pixels": 50176, "sample_fps": 2.0},
                {"type": "text", "text": "Describe."},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images, videos, video_kwargs = qwen_vl_utils.process_vision_info(messages, return_video_kwargs=True)
    assert video_kwargs == {"do_sample_frames": False, "fps": [2.0]}
    ours = processor(text=[text], images=images, videos=videos, return_tensors="pt", **video_kwargs)
    # transformers' processor rejects a list of fps; everything but the timing is compared there
    reference_kwargs = {k: v for k, v in video_kwargs.items() if k != "fps"}
    theirs = reference_processor(tokenizer)(
        text=[text], images=images, videos=videos, return_tensors="pt", **reference_kwargs
    )
    assert_same(ours, theirs)
    assert ours["video_grid_thw"].tolist() == [[5, 12, 20]]
    # the sampled rate qwen-vl-utils reports sets the M-RoPE time step
    assert ours["second_per_grid_ts"].tolist() == pytest.approx([2 / 2.0])
    nested = processor(text=[text], videos=videos, videos_kwargs=video_kwargs, return_tensors="pt")
    assert torch.equal(nested["pixel_values_videos"], ours["pixel_values_videos"])


def test_qwen_vl_utils_on_video_files(processor, tokenizer, clips):
    """The authors' client reading a file (needs decord or torchcodec, as qwen-vl-utils does)."""
    qwen_vl_utils = pytest.importorskip("qwen_vl_utils")
    if not (processing_videonsa.is_decord_available() or processing_videonsa.is_torchcodec_available()):
        pytest.skip("qwen-vl-utils reads files with decord or torchcodec; neither is installed")
    path = clips["wide_2s_10fps.mp4"]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": path, "min_pixels": 3136, "max_pixels": 50176, "fps": 4.0},
                {"type": "text", "text": "Describe."},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    for with_metadata in (False, True):
        _, videos, video_kwargs = qwen_vl_utils.process_vision_info(
            messages, return_video_kwargs=True, return_video_metadata=with_metadata
        )
        if with_metadata:
            videos, metadata = map(list, zip(*videos))
            video_kwargs["video_metadata"] = metadata
        ours = processor(text=[text], videos=videos, return_tensors="pt", **video_kwargs)
        theirs = reference_processor(tokenizer)(
            text=[text], videos=videos, return_tensors="pt", **{k: v for k, v in video_kwargs.items() if k != "fps"}
        )
        assert_same(ours, theirs)
        assert ours["second_per_grid_ts"].tolist() == pytest.approx([0.5])


# ---------------------------------------------------------------------------------------------------- budget


def test_budget_error_names_the_numbers_and_the_knobs_before_decoding(tokenizer, clips, monkeypatch):
    processor = VideoNSAProcessor(tokenizer=tokenizer, max_context_tokens=100)
    decoded = []
    original = VideoNSAVideoProcessor.fetch_videos
    monkeypatch.setattr(VideoNSAVideoProcessor, "fetch_videos", lambda *a, **k: decoded.append(1) or original(*a, **k))
    with pytest.raises(ContextBudgetExceededError) as error:
        processor(text="Describe <|video_pad|>", videos=clips["long_20s_10fps.mp4"])
    message = str(error.value)
    # 20 s at 4 fps -> 80 frames -> 40 temporal patches x 4 tokens (56x56) = 160 video tokens + 9 text tokens
    assert "169 tokens" in message and "max_context_tokens=100" in message
    assert "20.0 s at 4 fps -> 80 frames -> 40 temporal patches x 4 tokens" in message
    for knob in ("`fps`", "`max_frames`", "`num_frames`", "`max_pixels`", "`max_context_tokens`", "reduce_fps_to_fit"):
        assert knob in message
    assert not decoded  # nothing was decoded


def test_opt_in_fps_reduction_fits_and_says_so(tokenizer, clips):
    processor = VideoNSAProcessor(tokenizer=tokenizer, max_context_tokens=100)
    with pytest.warns(FpsReducedWarning, match="lowered the sampling rate") as record:
        out = processor(
            text="Describe <|video_pad|>",
            videos=clips["long_20s_10fps.mp4"],
            reduce_fps_to_fit=True,
            return_tensors="pt",
            return_metadata=True,
        )
    assert out["input_ids"].shape[1] <= 100
    grid_t = out["video_grid_thw"][0, 0].item()
    assert grid_t * 4 + 9 <= 100 < (grid_t + 1) * 4 + 9  # the highest frame count that fits
    frames = len(out["video_metadata"][0].frames_indices)
    assert frames == 2 * grid_t
    assert out["second_per_grid_ts"].tolist() == pytest.approx([2 / (frames / 20)])
    assert f"{frames} frames" in str(record[0].message)
    # the same as an attribute, saved with the processor
    processor.reduce_fps_to_fit = True
    with pytest.warns(FpsReducedWarning):
        again = processor(text="Describe <|video_pad|>", videos=clips["long_20s_10fps.mp4"], return_tensors="pt")
    assert torch.equal(again["input_ids"], out["input_ids"])


def test_budget_counts_text_images_and_every_video_of_a_prompt(tokenizer, clips):
    square = clips["square_3s_30fps.mp4"]  # 6 temporal patches x 64 = 384 tokens
    processor = VideoNSAProcessor(tokenizer=tokenizer, max_context_tokens=800)
    processor(text="<|video_pad|><|video_pad|>", videos=[square, square])  # 768 tokens fit
    with pytest.raises(ContextBudgetExceededError, match="801 tokens"):
        processor(text="x" * 33 + "<|video_pad|><|video_pad|>", videos=[square, square])
    image = Image.fromarray(synthetic_frames(1, 112, 112)[0])  # 4 x 4 merged tokens
    with pytest.raises(ContextBudgetExceededError, match="text and images: 50 tokens"):
        processor(text="x" * 34 + "<|image_pad|><|video_pad|><|video_pad|>", images=[image], videos=[square, square])
    # the limit is per prompt: two prompts of 384 video tokens each fit a 400-token context
    processor(text=["<|video_pad|>", "<|video_pad|>"], videos=[square, square], max_context_tokens=400, padding=True)


def test_budget_that_fps_cannot_meet_still_raises(tokenizer, clips):
    processor = VideoNSAProcessor(tokenizer=tokenizer, max_context_tokens=50, reduce_fps_to_fit=True)
    with pytest.raises(ContextBudgetExceededError, match="lowering fps alone cannot fit"):
        processor(text="<|video_pad|>", videos=clips["square_3s_30fps.mp4"])  # 4 frames are already 128 tokens


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name, error, pattern",
    [
        ("missing.mp4", FileNotFoundError, "Video file not found: .*missing.mp4"),
        ("empty.mp4", VideoDecodingError, "empty.mp4.* is empty \\(0 bytes\\)"),
        ("corrupt.mp4", VideoDecodingError, "Could not decode video .*corrupt.mp4.*corrupt, truncated"),
        ("not_a_video.mp4", VideoDecodingError, "Could not decode video .*not_a_video.mp4"),
        ("zero_frames.avi", VideoDecodingError, "zero_frames.avi.* has no frames"),
        ("no_frame_count.mkv", VideoDecodingError, "no_frame_count.mkv.* has no frames.*remux it to .mp4"),
    ],
)
def test_unreadable_videos_give_clear_errors(processor, clips, name, error, pattern):
    with pytest.raises(error, match=pattern):
        processor(text="<|video_pad|>", videos=clips[name])
    with pytest.raises(error, match=pattern):  # the video processor alone too
        processor.video_processor(clips[name])


def test_file_uri_and_video_processor_alone(processor, clips):
    path = clips["odd_2.5s_10fps.mp4"]
    direct = processor.video_processor(path, return_tensors="pt")
    via_uri = processor.video_processor("file://" + path, return_tensors="pt")
    assert torch.equal(direct["pixel_values_videos"], via_uri["pixel_values_videos"])
    assert direct["video_grid_thw"].tolist() == [[5, 10, 16]]
    out = processor(text="<|video_pad|>", videos="file://" + path, return_tensors="pt")
    assert torch.equal(out["pixel_values_videos"], direct["pixel_values_videos"])


def test_unknown_backend_is_rejected(processor, clips):
    with pytest.raises(ValueError, match="Unknown video_backend='nope'"):
        processor(text="<|video_pad|>", videos=clips["square_3s_30fps.mp4"], video_backend="nope")


def test_decord_backend_matches_pyav(processor, clips):
    pytest.importorskip("decord")
    path = clips["portrait_2s_24fps.mp4"]
    pyav = processor(text="<|video_pad|>", videos=path, return_tensors="pt")
    decord = processor(text="<|video_pad|>", videos=path, video_backend="decord", return_tensors="pt")
    assert_same(decord, pyav)


# ---------------------------------------------------------------------------------------------------- images, template


def test_images_still_work(processor, tokenizer):
    images = [Image.fromarray(synthetic_frames(1, 150, 200)[0]), Image.fromarray(synthetic_frames(1, 97, 61)[0])]
    text = ["look <|image_pad|>", "and <|image_pad|> too"]
    ours = processor(text=text, images=images, padding=True, return_tensors="pt")
    theirs = reference_processor(tokenizer)(text=text, images=images, padding=True, return_tensors="pt")
    assert_same(ours, theirs, keys=("input_ids", "attention_mask", "pixel_values", "image_grid_thw"))
    assert "pixel_values_videos" not in ours


def test_chat_template_is_qwen2_5_vl(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "More."},
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>What?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nMore.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    numbered = processor.apply_chat_template(messages[1:2], add_vision_id=True)
    assert numbered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Video 1: <|vision_start|><|video_pad|><|vision_end|>"
        "What?<|im_end|>\n"
    )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def http_folder(clips):
    folder = os.path.dirname(clips["square_3s_30fps.mp4"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("source", ["path", "url", "frames"])
def test_apply_chat_template_returns_what_generate_needs(processor, clips, http_folder, source):
    path = clips["portrait_2s_24fps.mp4"]
    if source == "path":
        video = path
    elif source == "url":
        video = f"{http_folder}/portrait_2s_24fps.mp4"
    else:
        video = [Image.fromarray(frame) for frame in load_video(path, backend="pyav", num_frames=8)[0]]
    messages = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "What?"}]}]
    before = set(os.listdir(tempfile.gettempdir()))
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert {
        "input_ids",
        "attention_mask",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
        "mm_token_type_ids",
    } <= set(out)
    assert out["video_grid_thw"].tolist() == [[4, 20, 12]]
    assert count_video_tokens(processor, out) == 4 * 20 * 12 // 4
    if source != "frames":
        reference = processor(
            text=processor.apply_chat_template(messages, add_generation_prompt=True), videos=path, return_tensors="pt"
        )
        assert_same(out, reference)
    after = set(os.listdir(tempfile.gettempdir()))
    assert not {name for name in after - before if name.startswith("videonsa_")}  # downloaded copies are removed


# ---------------------------------------------------------------------------------------------------- saving, loading


def test_save_pretrained_and_auto_processor_round_trip(tokenizer, clips, tmp_path):
    processor = VideoNSAProcessor(tokenizer=tokenizer, max_context_tokens=65536, reduce_fps_to_fit=True)
    processor.video_processor.min_frames = 6
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["auto_map"]["AutoProcessor"] == "processing_videonsa.VideoNSAProcessor"
    assert saved["video_processor"]["auto_map"]["AutoVideoProcessor"] == "video_processing_videonsa.VideoNSAVideoProcessor"
    assert saved["max_context_tokens"] == 65536 and saved["reduce_fps_to_fit"] is True
    assert (tmp_path / "processing_videonsa.py").is_file() and (tmp_path / "chat_template.jinja").is_file()
    assert (tmp_path / "video_processing_videonsa.py").is_file()

    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "VideoNSAProcessor"
    assert type(loaded.video_processor).__name__ == "VideoNSAVideoProcessor"
    assert loaded.max_context_tokens == 65536 and loaded.reduce_fps_to_fit is True
    assert loaded.video_processor.min_frames == 6 and loaded.video_processor.fps == 4.0
    assert loaded.video_processor.video_backend == "pyav"
    assert loaded.video_processor.max_frames is None
    assert loaded.nsa_block_size == 64  # no model config beside it
    assert loaded.chat_template == processor.chat_template
    path = clips["portrait_2s_24fps.mp4"]
    assert_same(
        loaded(text="<|video_pad|>", videos=path, return_tensors="pt"),
        processor(text="<|video_pad|>", videos=path, return_tensors="pt"),
    )


def test_from_pretrained_needs_no_remote_code_and_resaves(tokenizer, clips, tmp_path):
    processor = VideoNSAProcessor(tokenizer=tokenizer, max_context_tokens=65536)
    processor.video_processor.min_frames = 6
    processor.save_pretrained(tmp_path / "a")
    # trust_remote_code=False: the classes of this checkout, never the folder's copies through the Auto classes
    loaded = VideoNSAProcessor.from_pretrained(tmp_path / "a", trust_remote_code=False)
    assert type(loaded.video_processor) is VideoNSAVideoProcessor
    assert loaded.video_processor.min_frames == 6 and loaded.max_context_tokens == 65536
    assert "video_processor" not in loaded.tokenizer.init_kwargs
    loaded.save_pretrained(tmp_path / "b")  # the loaded processor saves again, and the same
    reloaded = VideoNSAProcessor.from_pretrained(tmp_path / "b")
    assert reloaded.video_processor.to_dict() == loaded.video_processor.to_dict()
    path = clips["portrait_2s_24fps.mp4"]
    assert_same(
        reloaded(text="<|video_pad|>", videos=path, return_tensors="pt"),
        processor(text="<|video_pad|>", videos=path, return_tensors="pt"),
    )
    # a video processor setting given to from_pretrained reaches the video processor; a given one is used as is
    assert VideoNSAProcessor.from_pretrained(tmp_path / "a", fps=2.0).video_processor.fps == 2.0
    given = VideoNSAVideoProcessor(fps=1.0)
    with_given = VideoNSAProcessor.from_pretrained(tmp_path / "a", video_processor=given)
    assert with_given.video_processor is given and "video_processor" not in with_given.tokenizer.init_kwargs
    with_given.save_pretrained(tmp_path / "c")
    assert VideoNSAProcessor.from_pretrained(tmp_path / "c").video_processor.fps == 1.0


@pytest.mark.parametrize("where", ["top_level", "text_config"])
def test_nsa_block_size_comes_from_the_model_config_beside_it(tokenizer, tmp_path, where):
    VideoNSAProcessor(tokenizer=tokenizer).save_pretrained(tmp_path)
    config = {"model_type": "videonsa", "text_config": {}}
    (config if where == "top_level" else config["text_config"])["nsa_block_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert VideoNSAProcessor.from_pretrained(tmp_path).nsa_block_size == 128
    assert VideoNSAProcessor.from_pretrained(tmp_path, nsa_block_size=32).nsa_block_size == 32


# ---------------------------------------------------------------------------------------------------- progress


def test_progress_bar_while_decoding(processor, clips, capsys):
    path = clips["long_20s_10fps.mp4"]
    processor(text="<|video_pad|>", videos=path)  # not a terminal: no bar
    assert "Decoding" not in capsys.readouterr().err
    processor(text="<|video_pad|>", videos=path, show_progress=True)
    err = capsys.readouterr().err
    assert "Decoding long_20s_10fps.mp4" in err and "frame" in err
    hf_logging.disable_progress_bar()
    try:
        processor(text="<|video_pad|>", videos=path, show_progress=True)
        assert "Decoding" not in capsys.readouterr().err
    finally:
        hf_logging.enable_progress_bar()
    processor.video_processor.show_progress = False
    processor(text="<|video_pad|>", videos=path)
    assert "Decoding" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- end to end


def test_processor_to_tiny_model_to_generate(clips, tmp_path):
    import videonsa.testing as tiny
    model = tiny.tiny_model()
    tokenizer = make_tokenizer(
        {
            "<|image_pad|>": tiny.IMAGE_TOKEN,
            "<|video_pad|>": tiny.VIDEO_TOKEN,
            "<|vision_start|>": tiny.VISION_START,
            "<|vision_end|>": tiny.VISION_END,
        },
        vocab_size=tiny.VOCAB,
    )
    # the checkpoint folder as the Hub has it: model config beside the processor files
    model.config.save_pretrained(tmp_path)
    VideoNSAProcessor(tokenizer=tokenizer).save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert processor.nsa_block_size == model.config.text_config.nsa_block_size == 16

    video = write_video(tmp_path / "clip.mp4", 20, 10, 64, 64)
    messages = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "Why?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["video_grid_thw"].tolist() == [[4, 4, 4]]  # 2 s at 4 fps, 64x64 -> 56x56
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert prompt_length < generated.shape[1] <= prompt_length + 4
    assert torch.equal(generated[:, :prompt_length], inputs["input_ids"])
    assert isinstance(processor.batch_decode(generated[:, prompt_length:])[0], str)
