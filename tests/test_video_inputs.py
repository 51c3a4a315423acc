"""Issue #17's processor items: long videos, non-finite pixels, variable frame rates, every knob, odd inputs.

Every bad input is built here; each test asserts the clear error (its class and what it names) or the right result.
"""

from __future__ import annotations

import fractions
import os
import time

import numpy as np
import pytest
import torch

from processing_videonsa import (
    ContextBudgetExceededError,
    InvalidVideoArgumentError,
    InvalidVideoError,
    VideoDecodingError,
    VideoNSAProcessor,
)
from videonsa.testing import make_tokenizer, synthetic_frames, write_video
from video_processing_videonsa import decode_pyav, probe_video

DOCUMENTED_ERRORS = (InvalidVideoError, InvalidVideoArgumentError, VideoDecodingError, ContextBudgetExceededError)


def write_gray_video(path, times_ms, size=16, crf="40"):
    """Frame i is flat gray (7 * i) % 256, shown at times_ms[i]: tiny, fast to encode, and each frame says its index."""
    import av

    container = av.open(str(path), mode="w")
    gap = int(np.min(np.diff(times_ms))) if len(times_ms) > 1 else 250
    stream = container.add_stream("libx264", rate=fractions.Fraction(1000, gap))
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.time_base = fractions.Fraction(1, 1000)
    stream.options = {"preset": "ultrafast", "crf": crf, "bf": "0"}
    for i, t in enumerate(times_ms):
        frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), (7 * i) % 256, np.uint8), format="rgb24")
        frame.pts, frame.time_base = int(t), fractions.Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def write_long_video(path, repeats: int, chunk: int = 1000, step_ms: int = 250):
    """`repeats` copies of a `chunk`-frame clip (starting with a keyframe) muxed back to back with shifted times: a
    long video in a fraction of the time encoding it would take. Frame i is gray (7 * (i % chunk)) % 256."""
    import av

    clip = write_gray_video(str(path) + ".clip.mp4", np.arange(chunk) * step_ms)
    with av.open(clip) as source, av.open(str(path), mode="w") as target:
        template = source.streams.video[0]
        stream = target.add_stream_from_template(template)
        packets = [packet for packet in source.demux(template) if packet.size]
        shift = int(round(chunk * step_ms / 1000 / template.time_base))
        for copy in range(repeats):
            for packet in packets:
                packet.stream = stream
                packet.pts, packet.dts = packet.pts + (copy > 0) * shift, packet.dts + (copy > 0) * shift
                target.mux(packet)
    return str(path)


def gray_of(frame) -> float:
    return float(np.asarray(frame, dtype=np.float64).mean())


@pytest.fixture(scope="module")
def processor():
    return VideoNSAProcessor(tokenizer=make_tokenizer())


# ---------------------------------------------------------------------------------------------------- item 5


def test_long_video_decodes_every_frame_with_bounded_threads(tmp_path, processor):
    """40,000 frames at 4 fps (2.8 hours), all of them sampled. transformers' reader keeps every decoded frame with
    its own converter thread pool and fails with EAGAIN once threads run out; ours holds one converter."""
    path = write_long_video(tmp_path / "long.mp4", repeats=40)
    metadata = probe_video(path)
    assert metadata.total_num_frames == 40_000 and metadata.fps == pytest.approx(4.0)
    threads, ticks = [], []

    def on_frame():
        ticks.append(1)
        if len(ticks) % 5000 == 0:
            threads.append(len(os.listdir("/proc/self/task")))

    start = time.perf_counter()
    frames, kept = decode_pyav(path, np.arange(40_000), on_frame=on_frame)
    elapsed = time.perf_counter() - start
    assert frames.shape == (40_000, 16, 16, 3) and kept == list(range(40_000))
    assert len(ticks) == 40_000  # the progress callback saw every decoded frame
    assert max(threads) < 64, threads  # not one thread pool per frame
    for i in (0, 1, 12_345, 39_999):  # each frame is the one written at its index
        assert abs(gray_of(frames[i]) - (7 * (i % 1000)) % 256) < 12
    assert elapsed < 60

    # the processor plans the whole video from metadata and, at a fitting fps, decodes through the same reader
    plan = processor.plan_videos(path, fps=4.0)[0]
    assert plan.num_frames == 40_000 and plan.num_tokens == 20_000 * 4
    fitted = processor.plan_videos(path, fps=0.01)[0]
    out = processor(text="<|video_pad|>", videos=path, fps=0.01, return_tensors="pt", return_metadata=True)
    assert out["video_grid_thw"].tolist() == [list(fitted.grid_thw)]
    assert list(out["video_metadata"][0].frames_indices) == fitted.frame_indices


def test_decode_failure_names_the_video_and_the_frame(tmp_path):
    path = write_gray_video(tmp_path / "cut.mp4", np.arange(400) * 250, crf="18")
    data = open(path, "rb").read()
    # keep the index (moov, written last) and the first frames, zero the frame data after them
    start = data.index(b"mdat") + 8 + len(data) // 3
    broken = data[:start] + bytes(len(data) // 3) + data[start + len(data) // 3 :]
    (tmp_path / "garbled.mp4").write_bytes(broken)
    try:
        frames, kept = decode_pyav(str(tmp_path / "garbled.mp4"), np.arange(400))
    except VideoDecodingError as error:
        assert "garbled.mp4" in str(error) and "at frame" in str(error)  # where it failed, not "may be corrupt"
    else:  # FFmpeg conceals garbage: frames come back, as many as asked or fewer, never silently more
        assert len(frames) == len(kept) <= 400


# ---------------------------------------------------------------------------------------------------- item 7


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_raise_naming_the_video(processor, bad):
    frames = synthetic_frames(4, 56, 56).astype(np.float32)
    frames[2, 10, 10, 1] = bad
    good = synthetic_frames(4, 56, 56)
    with pytest.raises(InvalidVideoError, match=r"Video 1 <frames ndarray \(4, 56, 56, 3\)> has 1 non-finite pixel value"):
        processor(text="<|video_pad|><|video_pad|>", videos=[good, frames])
    with pytest.raises(InvalidVideoError, match="non-finite"):
        processor.video_processor(torch.from_numpy(frames))


# ---------------------------------------------------------------------------------------------------- item 8


def test_variable_frame_rate_uses_presentation_times(tmp_path, processor):
    # 100 frames in the first second, then one frame a second up to 10 s: 110 frames, ~11 fps on average
    times_ms = [10 * i for i in range(100)] + [1000 * k for k in range(1, 11)]
    path = write_gray_video(tmp_path / "vfr.mp4", times_ms, size=32, crf="10")
    true_times = np.asarray(times_ms) / 1000
    plan = processor.plan_videos(path)[0]
    # frame 100 is at 1.0 s (index / average fps would say ~9 s)
    assert np.allclose(plan.timestamps, true_times[plan.frame_indices], atol=1e-3)
    # sampled by time: evenly spaced targets, each the frame on screen then
    targets = np.arange(plan.num_frames) * plan.duration / plan.num_frames
    for target, index in zip(targets, plan.frame_indices):
        assert true_times[index] <= target + 1e-6
        assert index == len(true_times) - 1 or true_times[index + 1] > target
    assert sum(t < 1.0 for t in plan.timestamps) == pytest.approx(4, abs=1)  # ~4 fps in the dense second too
    out = processor(text="<|video_pad|>", videos=path, return_tensors="pt", return_metadata=True)
    metadata = out["video_metadata"][0]
    assert list(metadata.frames_indices) == plan.frame_indices
    assert metadata.timestamps == pytest.approx(plan.timestamps)
    frames, _ = processor.video_processor.fetch_videos(path, lambda metadata: np.asarray(plan.frame_indices))
    for frame, index in zip(frames, plan.frame_indices):  # the decoded frames are the planned ones (repeats too)
        assert abs(gray_of(frame) - (7 * index) % 256) < 6


def test_constant_frame_rate_keeps_index_sampling(tmp_path, processor):
    path = write_gray_video(tmp_path / "cfr.mp4", np.arange(40) * 100, size=32)  # 10 fps
    assert probe_video(path).frame_times is None
    plan = processor.plan_videos(path)[0]
    assert plan.frame_indices == [int(k * 40 / 16) for k in range(16)]  # 4 s at 4 fps, Qwen2-VL's index rule
    assert plan.timestamps == pytest.approx([i / 10 for i in plan.frame_indices])


# ---------------------------------------------------------------------------------------------------- item 9


def test_float_frames_in_unit_range_are_not_rescaled_twice(processor):
    frames = synthetic_frames(4, 56, 56)
    as_uint8 = processor.video_processor(frames, return_tensors="pt")["pixel_values_videos"]
    as_unit = processor.video_processor(frames.astype(np.float32) / 255, return_tensors="pt")["pixel_values_videos"]
    assert torch.allclose(as_unit, as_uint8, atol=1e-4)
    assert abs(float(as_unit.mean()) - float(as_uint8.mean())) < 1e-4


@pytest.mark.parametrize(
    "knobs, pattern",
    [
        ({"fps": 0}, r"`fps` must be a finite number > 0, got 0"),
        ({"fps": -2}, r"`fps` must be a finite number > 0"),
        ({"fps": float("nan")}, r"`fps` must be a finite number > 0, got nan"),
        ({"fps": [float("inf")]}, r"`fps` must be"),
        ({"max_pixels": 0}, r"`max_pixels` must be an integer >= 784, got 0"),
        ({"max_pixels": -5}, r"`max_pixels` must be an integer >= 784, got -5"),
        ({"max_pixels": 500}, r"`max_pixels` .* One merged patch is 28x28"),
        ({"min_pixels": 100_000}, r"`min_pixels` \(100000\) is above `max_pixels` \(50176\)"),
        ({"min_pixels": 0}, r"`min_pixels` must be an integer >= 1"),
        ({"num_frames": 0}, r"`num_frames` must be an integer >= 1, got 0"),
        ({"num_frames": -3}, r"`num_frames` must be an integer >= 1, got -3"),
        ({"num_frames": 4, "fps": 2.0}, r"`num_frames` \(4\) and `fps` \(2.0\) are mutually exclusive"),
        ({"num_frames": 200}, r"`num_frames=200` is more than the video's 16 frames"),
        ({"max_frames": 0}, r"`max_frames` must be an integer >= 1"),
        ({"min_frames": 8, "max_frames": 4}, r"`min_frames` \(8\) is above `max_frames` \(4\)"),
        ({"max_context_tokens": 0}, r"`max_context_tokens` must be a positive integer, got 0"),
        ({"max_context_tokens": -1}, r"`max_context_tokens` must be a positive integer"),
    ],
)
def test_every_knob_is_validated_with_its_name(processor, knobs, pattern):
    frames = synthetic_frames(16, 56, 56)
    metadata = {"fps": 4.0, "total_num_frames": 16}
    with pytest.raises(InvalidVideoArgumentError, match=pattern):
        processor(text="<|video_pad|>", videos=[frames], video_metadata=[metadata], **knobs)
    if "max_context_tokens" not in knobs and not isinstance(knobs.get("fps"), list):
        with pytest.raises(InvalidVideoArgumentError, match=pattern):
            processor.video_processor(frames, video_metadata=metadata, **knobs)


def test_saved_settings_are_validated_too():
    from video_processing_videonsa import VideoNSAVideoProcessor

    with pytest.raises(InvalidVideoArgumentError, match="`fps`"):
        VideoNSAVideoProcessor(fps=-1)
    with pytest.raises(InvalidVideoArgumentError, match="`min_pixels`"):
        VideoNSAVideoProcessor(min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(InvalidVideoArgumentError, match="`max_context_tokens`"):
        VideoNSAProcessor(tokenizer=make_tokenizer(), max_context_tokens=0)


def test_pixel_settings_of_one_processor_leave_the_defaults_alone():
    from video_processing_videonsa import VideoNSAVideoProcessor

    default = dict(VideoNSAVideoProcessor().size)
    assert default == {"shortest_edge": 3136, "longest_edge": 50176}
    assert VideoNSAVideoProcessor(min_pixels=6272, max_pixels=100352).size == {
        "shortest_edge": 6272,
        "longest_edge": 100352,
    }
    assert dict(VideoNSAVideoProcessor().size) == default


# ---------------------------------------------------------------------------------------------------- item 11


@pytest.mark.parametrize("container", ["numpy", "torch", "file"])
def test_one_pixel_video_plan_matches_processing(tmp_path, processor, container):
    if container == "numpy":  # (frames, height, width, channels), as decoders and PIL give
        video = np.full((4, 1, 1, 3), 128, np.uint8)
    elif container == "torch":  # (frames, channels, height, width), torch's convention
        video = torch.full((4, 3, 1, 1), 128, dtype=torch.uint8)
    else:
        video = write_video(tmp_path / "dot.mp4", 4, 4, 1, 1)  # yuv444p, 1 x 1
    plan = processor.plan_videos(video)[0]
    out = processor(text="<|video_pad|>", videos=video, return_tensors="pt")
    assert plan.grid_thw == (2, 4, 4) and plan.num_tokens == 8
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert int((out["input_ids"] == processor.video_token_id).sum()) == 8


# ---------------------------------------------------------------------------------------------------- item 12


@pytest.mark.parametrize(
    "videos, pattern",
    [
        (np.zeros((0, 32, 32, 3), np.uint8), r"videos has no frames"),
        ([np.zeros((0, 32, 32, 3), np.uint8)], r"videos\[0\] has no frames"),
        ([np.zeros((32, 32), np.uint8)], r"videos\[0\] has rank 2"),
        (np.zeros((32, 32), np.uint8), r"videos has rank 2"),
        ([np.zeros((1, 2, 4, 32, 32, 3), np.uint8)], r"videos\[0\] has rank 6"),
        (7, r"videos is int"),
        ([synthetic_frames(4, 32, 32), None], r"videos\[1\] is NoneType"),
        ([], r"videos is an empty list"),
        ([np.zeros((4, 32, 32, 5), np.uint8)], r"channel axis of video 0 <frames ndarray \(4, 32, 32, 5\)>"),
    ],
)
def test_bad_video_inputs_raise_naming_the_entry(processor, videos, pattern):
    with pytest.raises(InvalidVideoError, match=pattern):
        processor(text="<|video_pad|>", videos=videos)
    with pytest.raises(InvalidVideoError, match=pattern):
        processor.plan_videos(videos)


def test_no_video_at_all(processor):
    with pytest.raises(InvalidVideoError, match=r"videos is NoneType"):
        processor.video_processor(None)
    with pytest.raises(InvalidVideoError, match=r"videos is NoneType"):
        processor.plan_videos(None)


def test_rank_five_batches_are_videos(processor):
    batch = np.stack([synthetic_frames(4, 56, 56), synthetic_frames(4, 56, 56, seed=1)])
    out = processor(text="<|video_pad|><|video_pad|>", videos=batch, return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]]
    nested = processor(text="<|video_pad|><|video_pad|>", videos=[batch], return_tensors="pt")
    assert torch.equal(nested["pixel_values_videos"], out["pixel_values_videos"])


def test_unreachable_url_is_named(processor):
    url = "http://127.0.0.1:9/nowhere/clip.mp4"  # the discard port: nothing listens
    with pytest.raises(VideoDecodingError, match=r"Could not download video 'http://127.0.0.1:9/nowhere/clip.mp4'"):
        processor(text="<|video_pad|>", videos=url)


def test_extreme_aspect_ratio_names_the_video(tmp_path, processor):
    wide = np.zeros((4, 16, 4000, 3), np.uint8)
    with pytest.raises(InvalidVideoError, match=r"Video 0 <frames ndarray \(4, 16, 4000, 3\)> \(16x4000 px\) cannot be resized.*aspect ratio"):
        processor(text="<|video_pad|>", videos=[wide])
    path = write_video(tmp_path / "strip.mp4", 2, 4, 4000, 16)
    with pytest.raises(InvalidVideoError, match=r"strip.mp4.*\(16x4000 px\)"):
        processor.plan_videos(path)


# ---------------------------------------------------------------------------------------------------- property


def test_random_knobs_give_consistent_outputs_or_documented_errors(processor):
    """Random videos and knobs: either `video_grid_thw` matches the video tokens, the pixel rows and the plan, or the
    call raises one of the package's documented errors (never an IndexError, ZeroDivisionError, ...)."""
    rng = np.random.default_rng(17)
    choices = {
        "fps": [None, 0, -1.0, float("nan"), 0.3, 1.0, 4.0, 30.0],
        "num_frames": [None, None, None, 0, 1, 2, 5, 64],
        "min_frames": [None, None, 1, 3, 9],
        "max_frames": [None, None, 0, 2, 6, 40],
        "min_pixels": [None, None, 0, 784, 3136, 20_000],
        "max_pixels": [None, None, -5, 0, 500, 784, 3136, 50_176, 200_000],
        "max_context_tokens": [None, None, 0, 40, 400, 131_072],
        "reduce_fps_to_fit": [None, True],
    }
    outcomes = {"ok": 0, "error": 0}
    for trial in range(80):
        knobs = {k: v[rng.integers(len(v))] for k, v in choices.items() if rng.random() < 0.35}
        knobs = {k: v for k, v in knobs.items() if v is not None}
        count, height, width = int(rng.integers(0, 12)), int(rng.integers(1, 90)), int(rng.integers(1, 90))
        frames = synthetic_frames(max(count, 1), height, width, seed=trial)[:count]
        if rng.random() < 0.3:
            frames = frames.astype(np.float32) / 255
        rate = float(rng.choice([2.0, 10.0, 29.97]))
        metadata = [{"fps": rate, "total_num_frames": count}] if rng.random() < 0.6 else None
        try:
            out = processor(
                text="Q <|video_pad|>", videos=[frames], video_metadata=metadata, return_tensors="pt", **knobs
            )
        except DOCUMENTED_ERRORS as error:
            outcomes["error"] += 1
            assert str(error)
            continue
        grid = out["video_grid_thw"]
        tokens = int((out["input_ids"] == processor.video_token_id).sum())
        assert tokens == int(grid.prod(-1).sum()) // 4, knobs
        assert out["pixel_values_videos"].shape[0] == int(grid.prod(-1).sum()), knobs
        plan_knobs = {k: v for k, v in knobs.items() if k not in ("max_context_tokens", "reduce_fps_to_fit")}
        if "reduce_fps_to_fit" not in knobs:
            plan = processor.plan_videos([frames], video_metadata=metadata, **plan_knobs)[0]
            assert tuple(grid[0].tolist()) == plan.grid_thw, knobs
        assert out["input_ids"].shape[1] <= knobs.get("max_context_tokens", processor.max_context_tokens)
        outcomes["ok"] += 1
    assert outcomes["ok"] >= 5 and outcomes["error"] >= 5, outcomes  # both branches were exercised
