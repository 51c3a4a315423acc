"""Processor for VideoNSA (Qwen2.5-VL-7B with Native Sparse Attention on video tokens, arXiv 2510.02295).

VideoNSA runs NSA over the video tokens with blocks of `nsa_block_size` (64) tokens. At the released resolution
(at most 50,176 pixels per frame: 224 x 224 -> 16 x 16 patches of 14 -> 8 x 8 = 64 merged tokens per temporal patch of
2 frames) one temporal patch is exactly one NSA block, so the compression branch averages one frame step and the
selection branch picks whole frame steps. Training sampled videos at 4 fps with a 36K-token context; the model scales
to 128K tokens.

This module gives:

* [`VideoNSAVideoProcessor`]: transformers' Qwen2-VL video processor with the released defaults (4 fps, 50,176 max
  pixels, Qwen2.5-VL's min pixels, no frame cap: the context budget governs) that decodes through transformers'
  `load_video` (PyAV by default; torchcodec, decord or OpenCV on request, or `video_backend="auto"`), gives clear
  errors for missing, empty, corrupt and frameless files, shows a progress bar while decoding long videos, and can
  plan a video (frames, timestamps, grid, tokens) from its metadata alone, before decoding it.
* [`VideoNSAProcessor`]: transformers' Qwen2.5-VL processor plus the NSA block alignment check, the context budget
  (`max_context_tokens`, default 131072: raise, or lower fps with `reduce_fps_to_fit=True`), the Qwen2.5-VL chat
  template, and compatibility with `qwen_vl_utils.process_vision_info` outputs (per-video `fps` lists).
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
    Qwen2VLVideoProcessor,
    Qwen2VLVideoProcessorInitKwargs,
    smart_resize,
)
from transformers.utils import is_decord_available, is_torchcodec_available, logging
from transformers.utils.hub import cached_file
from transformers.video_utils import (
    VIDEO_DECODERS,
    VideoMetadata,
    get_video_size,
    load_video,
    make_batched_videos,
)


logger = logging.get_logger(__name__)

__all__ = [
    "VideoNSAProcessor",
    "VideoNSAVideoProcessor",
    "VideoPlan",
    "VideoDecodingError",
    "ContextBudgetExceededError",
    "NSABlockAlignmentWarning",
    "FpsReducedWarning",
]

DEFAULT_NSA_BLOCK_SIZE = 64
DEFAULT_MAX_CONTEXT_TOKENS = 131072  # 128K
DEFAULT_FPS = 4.0
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# Qwen2.5-VL's released min pixels (56 x 56); its max (12845056) is kept for images only.
QWEN2_5_VL_MIN_PIXELS = 56 * 56
QWEN2_5_VL_MAX_PIXELS = 12845056
# One NSA block of merged tokens per temporal patch: 64 * 28 * 28 = 50176 = 224 * 224.
DEFAULT_VIDEO_MAX_PIXELS = DEFAULT_NSA_BLOCK_SIZE * (PATCH_SIZE * MERGE_SIZE) ** 2

# Qwen2.5-VL's chat format: a default system turn, `<|im_start|>role\n...<|im_end|>\n` turns, images and videos as
# `<|vision_start|><|image_pad|><|vision_end|>` / `<|vision_start|><|video_pad|><|vision_end|>` (optionally numbered
# with `add_vision_id=True`), and `<|im_start|>assistant\n` as the generation prompt.
CHAT_TEMPLATE = (
    "{% set counts = namespace(image=0, video=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set counts.image = counts.image + 1 %}"
    "{% if add_vision_id %}Picture {{ counts.image }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set counts.video = counts.video + 1 %}"
    "{% if add_vision_id %}Video {{ counts.video }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


class VideoDecodingError(ValueError):
    """A video could not be read: empty, corrupt or truncated file, no video stream, or no frames."""


class ContextBudgetExceededError(ValueError):
    """The prompt (text, images and videos) would need more tokens than `max_context_tokens`."""


class NSABlockAlignmentWarning(UserWarning):
    """A requested resolution makes temporal patches straddle VideoNSA's NSA blocks."""


class FpsReducedWarning(UserWarning):
    """`reduce_fps_to_fit=True` lowered the sampling rate so that the prompt fits the context."""


@dataclass
class VideoPlan:
    """What one video becomes, computed from its metadata before decoding.

    `frame_indices` are the source frames that will be decoded, `timestamps` their times in seconds, `grid_thw` the
    patch grid the vision tower sees and `num_tokens` the number of `<|video_pad|>` tokens in the prompt.
    """

    source: str
    total_num_frames: int
    source_fps: float | None
    duration: float | None
    height: int
    width: int
    frame_indices: list[int]
    sampled: bool
    resized_height: int
    resized_width: int
    grid_thw: tuple[int, int, int]
    num_tokens: int
    tokens_per_temporal_patch: int
    timestamps: list[float] | None = field(default=None)

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def sampled_fps(self) -> float | None:
        if not self.source_fps or not self.total_num_frames:
            return None
        return self.num_frames / self.total_num_frames * self.source_fps


@dataclass
class _DecodeOptions:
    backend: str
    show_progress: bool | None
    assumed_fps: float | None


_DECODE_OPTIONS: contextvars.ContextVar[_DecodeOptions | None] = contextvars.ContextVar(
    "videonsa_decode_options", default=None
)


class _MetadataProbe(Exception):
    """Raised from inside `load_video`'s sampling callback to stop right after the container's metadata is read."""

    def __init__(self, metadata):
        super().__init__("metadata probe")
        self.metadata = metadata


class _FrameIndicesWithProgress(np.ndarray):
    """Sampled frame indices whose membership test ticks a progress bar.

    transformers' PyAV reader decodes frames in order and asks `i in indices` once per decoded frame, so counting
    those questions is a real per-frame progress measure without a decoding loop of our own. Membership is answered
    from a set, which also keeps the reader linear in the number of decoded frames."""

    def __new__(cls, indices: np.ndarray, progress_bar):
        obj = np.asarray(indices, dtype=np.int64).view(cls)
        obj._progress_bar = progress_bar
        obj._index_set = frozenset(int(i) for i in obj.view(np.ndarray))
        return obj

    def __array_finalize__(self, obj):
        self._progress_bar = getattr(obj, "_progress_bar", None)
        self._index_set = None

    def __contains__(self, item):
        if self._index_set is None:  # a view or slice: plain numpy semantics
            return np.ndarray.__contains__(self, item)
        if self._progress_bar is not None:
            self._progress_bar.update(1)
        return int(item) in self._index_set


def _size_value(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _display_name(video) -> str:
    if isinstance(video, str):
        return repr(video if len(video) <= 120 else "..." + video[-117:])
    return f"<frames {type(video).__name__}>"


def _is_url(video: str) -> bool:
    return video.startswith("http://") or video.startswith("https://")


def _resolve_backend(backend: str | None) -> str:
    backend = (backend or "pyav").lower()
    if backend == "auto":
        usable = getattr(sys.modules["transformers.utils"], "is_torchcodec_usable", None)
        torchcodec_ok = usable(decode="video") if usable is not None else is_torchcodec_available()
        if torchcodec_ok:
            return "torchcodec"
        if is_decord_available():
            return "decord"
        return "pyav"
    if backend not in VIDEO_DECODERS:
        raise ValueError(
            f"Unknown video_backend={backend!r}: use 'auto' or one of {sorted(VIDEO_DECODERS)} (transformers' "
            "load_video backends)."
        )
    return backend


def _progress_enabled(show_progress: bool | None) -> bool | None:
    """`False`: never. `True`: always. `None`: when transformers' progress bars are on and stderr is a terminal."""
    if show_progress is False or not logging.is_progress_bar_enabled():
        return False
    if show_progress is None:
        return None  # tqdm's own rule: off when not a terminal
    return True


def _make_progress_bar(total: int, desc: str, show_progress: bool | None):
    from tqdm.auto import tqdm as tqdm_cls

    enabled = _progress_enabled(show_progress)
    return tqdm_cls(
        total=total,
        desc=desc,
        unit="frame",
        leave=False,
        dynamic_ncols=True,
        disable=True if enabled is False else (None if enabled is None else False),
        # In automatic mode a bar only appears for decodes that take a while.
        delay=0 if enabled else 2.0,
    )


def _local_video_path(video: str) -> str:
    """Validate a local path (or `file://` URI) before handing it to `load_video`, with clear errors."""
    path = video[len("file://") :] if video.startswith("file://") else video
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Video file not found: {path!r}. Pass an existing local path, a file:// URI, an http(s) URL or "
            "decoded frames."
        )
    if os.path.isdir(path):
        raise IsADirectoryError(f"Expected a video file but {path!r} is a directory.")
    if os.path.getsize(path) == 0:
        raise VideoDecodingError(f"Video file {path!r} is empty (0 bytes).")
    return path


def _check_container_metadata(metadata: VideoMetadata, source: str, backend: str):
    total = metadata.total_num_frames
    if total is None or total <= 0:
        raise VideoDecodingError(
            f"Video {source} has no frames: the '{backend}' backend reads a frame count of {total} from its "
            "container. If the file does play, its container does not record a frame count (e.g. .mkv/.webm read "
            "with PyAV): remux it to .mp4 or decode it with video_backend='torchcodec' or 'decord'."
        )
    if not metadata.fps or metadata.fps <= 0 or not math.isfinite(metadata.fps):
        raise VideoDecodingError(f"Video {source} reports an invalid frame rate ({metadata.fps}).")


class VideoNSAVideoProcessorKwargs(Qwen2VLVideoProcessorInitKwargs, total=False):
    r"""
    max_frames (`int`, *optional*, defaults to `None`):
        Cap on the number of sampled frames. `None` (VideoNSA's default) means no cap: frames follow `fps` and the
        processor's `max_context_tokens` budget decides whether the video fits.
    video_backend (`str`, *optional*, defaults to `"pyav"`):
        Decoder used through transformers' `load_video`: `"pyav"`, `"torchcodec"`, `"decord"`, `"opencv"`, or
        `"auto"` (torchcodec, then decord, then PyAV, whichever is installed first).
    show_progress (`bool`, *optional*, defaults to `None`):
        Progress bar while decoding: `None` shows one for long decodes when stderr is a terminal (and transformers'
        progress bars are enabled), `True` always, `False` never.
    """

    max_frames: int | None
    video_backend: str | None
    show_progress: bool | None


class VideoNSAVideoProcessor(Qwen2VLVideoProcessor):
    r"""
    Qwen2-VL video processor with VideoNSA's released defaults.

    * `fps=4.0` with `do_sample_frames=True`: videos given as paths or URLs are sampled at 4 frames per second, frame
      counts floored to a multiple of `temporal_patch_size` (2), at least `min_frames` (4), at most `max_frames`
      (`None`: no cap).
    * `size={"shortest_edge": 3136, "longest_edge": 50176}`: Qwen2.5-VL's min pixels and VideoNSA's max pixels per
      frame, i.e. at most 64 merged tokens per temporal patch (one NSA block).
    * `cap_pixels_per_frame=False`: the per-frame resolution never depends on the video's length (that would break the
      block alignment); long videos are governed by the processor's token budget instead.
    * Decoding goes through transformers' `load_video` with `video_backend` (PyAV by default).

    Frames given as arrays/tensors/PIL lists with metadata (`video_metadata` with `fps` and `total_num_frames` equal
    to the number of frames given) are sampled like files; frames given without metadata, or fewer frames than the
    metadata's `total_num_frames`, are taken as already sampled (at `fps` when no metadata says otherwise).
    """

    size = {"shortest_edge": QWEN2_5_VL_MIN_PIXELS, "longest_edge": DEFAULT_VIDEO_MAX_PIXELS}
    fps = DEFAULT_FPS
    do_sample_frames = True
    max_frames = None
    cap_pixels_per_frame = False
    video_backend = "pyav"
    show_progress = None
    valid_kwargs = VideoNSAVideoProcessorKwargs
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    # ------------------------------------------------------------------ public API

    def preprocess(self, videos, **kwargs):
        kwargs = _convert_per_video_fps(videos, kwargs)
        kwargs = self._merge_pixel_kwargs(kwargs)
        # `fps` has a default here (4.0): a call that asks for `num_frames` only means "no fps"
        if kwargs.get("num_frames") is not None and kwargs.get("fps") is None:
            kwargs["fps"] = None
        backend = kwargs.pop("video_backend", None) or self.video_backend
        show_progress = kwargs.pop("show_progress", None)
        options = _DecodeOptions(
            backend=_resolve_backend(backend),
            show_progress=self.show_progress if show_progress is None else show_progress,
            assumed_fps=kwargs.get("fps") if kwargs.get("fps") is not None else self.fps,
        )
        token = _DECODE_OPTIONS.set(options)
        try:
            return super().preprocess(videos, **kwargs)
        finally:
            _DECODE_OPTIONS.reset(token)

    def _merge_pixel_kwargs(self, kwargs: dict) -> dict:
        """`min_pixels` / `max_pixels` (qwen-vl-utils' names) and partial `size` dicts become a full `size`."""
        min_pixels = kwargs.pop("min_pixels", None)
        max_pixels = kwargs.pop("max_pixels", None)
        size = kwargs.get("size")
        if size is None and min_pixels is None and max_pixels is None:
            return kwargs
        shortest = _size_value(size, "shortest_edge")
        longest = _size_value(size, "longest_edge")
        if size is not None and shortest is None and longest is None:
            return dict(kwargs, size=size)  # another kind of size (height/width): leave it to the parent class
        merged = {
            "shortest_edge": int(min_pixels or shortest or _size_value(self.size, "shortest_edge")),
            "longest_edge": int(max_pixels or longest or _size_value(self.size, "longest_edge")),
        }
        return dict(kwargs, size=merged)

    def probe(self, video: str, video_backend: str | None = None) -> VideoMetadata:
        """Read a video file's metadata (frame count, fps, size) through `load_video` without decoding frames."""
        backend = _resolve_backend(video_backend or self.video_backend)
        options = _DecodeOptions(backend, False, None)
        metadata = self._load_one(video, None, options, probe_only=True)
        if (metadata.height is None or metadata.width is None) and metadata.total_num_frames:
            # some backends (decord) only report the frame size once a frame is decoded: decode the first one
            frame, _ = self._load_one(video, lambda metadata, **kwargs: np.array([0]), options)
            height, width = get_video_size(np.asarray(frame))
            metadata.height, metadata.width = int(height), int(width)
        return metadata

    def plan(self, videos, video_metadata=None, **kwargs) -> list[VideoPlan]:
        """Compute, before any decoding, what each video becomes at these settings: sampled frame indices and
        timestamps, resized size, `video_grid_thw` and number of video tokens. Files are only probed for metadata.

        Accepts what `__call__` accepts (paths, URLs, arrays, frame lists) and the same kwargs (`fps`, `num_frames`,
        `min_frames`, `max_frames`, `size`/`min_pixels`/`max_pixels`, `do_sample_frames`, ...)."""
        kwargs = _convert_per_video_fps(videos, dict(kwargs, video_metadata=video_metadata))
        flat = make_batched_videos(videos)
        backend = _resolve_backend(kwargs.get("video_backend") or self.video_backend)
        entries = [self._probe_entry(video, backend) for video in flat]
        metadata = _metadata_for_arrays(flat, kwargs.get("video_metadata"))
        return [self._plan_entry(entry, md, kwargs) for entry, md in zip(entries, metadata)]

    # ------------------------------------------------------------------ sampling

    def sample_frames(
        self,
        metadata: VideoMetadata,
        temporal_patch_size: int | None = None,
        min_frames: int | None = None,
        max_frames: int | None = None,
        num_frames: int | None = None,
        fps: int | float | None = None,
        **kwargs,
    ):
        """Qwen2-VL's sampling (`fps` frames per second, floored to a multiple of `temporal_patch_size`), with
        `max_frames=None` meaning no cap and clips shorter than one temporal patch kept whole (the last frame is
        repeated when patchifying)."""
        total = metadata.total_num_frames
        if total is None or total <= 0:
            raise VideoDecodingError(f"Cannot sample frames from a video with {total} frames.")
        temporal_patch_size = temporal_patch_size or self.temporal_patch_size
        max_frames = max_frames if max_frames is not None else self.max_frames
        if max_frames is None:
            max_frames = total
        max_frames = max(int(max_frames), temporal_patch_size)
        if total < temporal_patch_size:
            return torch.arange(total, dtype=torch.int32)
        return super().sample_frames(
            metadata,
            temporal_patch_size=temporal_patch_size,
            min_frames=min_frames,
            max_frames=max_frames,
            num_frames=num_frames,
            fps=fps,
            **kwargs,
        )

    # ------------------------------------------------------------------ decoding

    def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
        if isinstance(video_url_or_urls, list):
            return list(zip(*[self.fetch_videos(x, sample_indices_fn=sample_indices_fn) for x in video_url_or_urls]))
        return self._load_one(video_url_or_urls, sample_indices_fn, self._decode_options())

    def _decode_options(self) -> _DecodeOptions:
        options = _DECODE_OPTIONS.get()
        if options is None:
            options = _DecodeOptions(_resolve_backend(self.video_backend), self.show_progress, self.fps)
        return options

    def _load_one(self, video: str, sample_indices_fn, options: _DecodeOptions, probe_only: bool = False):
        source = _display_name(video)
        path = video if _is_url(video) or urlparse(video).netloc.endswith("youtube.com") else _local_video_path(video)
        backend = options.backend
        progress = {}

        def sample(metadata, **fn_kwargs):
            if probe_only:
                raise _MetadataProbe(metadata)
            _check_container_metadata(metadata, source, backend)
            if sample_indices_fn is not None:
                indices = sample_indices_fn(metadata=metadata, **fn_kwargs)
            else:
                indices = np.arange(metadata.total_num_frames)
            indices = np.asarray(indices, dtype=np.int64)
            if indices.size == 0:
                raise VideoDecodingError(f"No frames were selected from video {source}.")
            name = os.path.basename(urlparse(path).path) if _is_url(path) else os.path.basename(path)
            bar = _make_progress_bar(int(indices[-1]) + 1, f"Decoding {name}", options.show_progress)
            progress["bar"] = bar
            return _FrameIndicesWithProgress(indices, bar) if backend == "pyav" else indices

        try:
            frames, metadata = load_video(path, backend=backend, sample_indices_fn=sample)
        except _MetadataProbe as probe:
            return probe.metadata
        except (VideoDecodingError, FileNotFoundError, IsADirectoryError, ImportError):
            raise
        except Exception as error:
            raise VideoDecodingError(
                f"Could not decode video {source} with the '{backend}' backend ({type(error).__name__}: {error}). "
                "The file may be corrupt, truncated, not a video, or have no video stream."
            ) from error
        finally:
            bar = progress.get("bar")
            if bar is not None:
                if backend != "pyav":
                    bar.update(bar.total - bar.n)
                bar.close()

        indices = np.asarray(metadata.frames_indices, dtype=np.int64)
        if len(frames) == 0:
            raise VideoDecodingError(f"Video {source} decoded to no frames with the '{backend}' backend.")
        if len(frames) < len(indices):
            # the container announced more frames than it holds: keep the metadata true to what was decoded
            logger.warning(
                f"Video {source}: {len(indices)} frames were requested but only {len(frames)} could be decoded; "
                "the container's frame count is larger than the stream."
            )
            indices = indices[: len(frames)]
        metadata.frames_indices = indices
        return frames, metadata

    def _decode_and_sample_videos(self, videos, video_metadata, do_sample_frames=None, sample_indices_fn=None):
        videos = make_batched_videos(videos)
        metadata = _metadata_for_arrays(videos, video_metadata)
        options = self._decode_options()
        out_videos, out_metadata = [], []
        for video, md in zip(videos, metadata):
            if isinstance(video, str):
                video, md = self._load_one(video, sample_indices_fn if do_sample_frames else None, options)
            elif isinstance(video, (list, tuple)):
                # frames given as image paths/URLs: already sampled
                images = self.fetch_images(list(video))
                video = torch.stack([self.process_image(image) for image in images], dim=0)
                md = _presampled_metadata(len(video), md, options.assumed_fps)
            elif _is_full_video(video, md) and do_sample_frames and sample_indices_fn is not None:
                indices = np.asarray(sample_indices_fn(metadata=md), dtype=np.int64)
                video = video[indices]
                md.frames_indices = indices
            else:
                md = _presampled_metadata(len(video), md, options.assumed_fps)
            out_videos.append(video)
            out_metadata.append(md)
        return out_videos, out_metadata

    # ------------------------------------------------------------------ planning

    def _probe_entry(self, video, backend: str):
        if isinstance(video, str):
            return ("file", video, self.probe(video, video_backend=backend))
        if isinstance(video, (list, tuple)):
            images = self.fetch_images(list(video))
            first = self.process_image(images[0])
            return ("frames", video, (len(images), int(first.shape[-2]), int(first.shape[-1])))
        height, width = get_video_size(video if isinstance(video, np.ndarray) else np.asarray(video[:1]))
        return ("array", video, (len(video), int(height), int(width)))

    def _resolved(self, kwargs: dict, key: str):
        value = kwargs.get(key)
        return value if value is not None else getattr(self, key, None)

    def _plan_entry(self, entry, md: VideoMetadata, kwargs: dict) -> VideoPlan:
        kind, video, info = entry
        do_sample_frames = self._resolved(kwargs, "do_sample_frames")
        fps = kwargs.get("fps") if "fps" in kwargs else self.fps
        num_frames = self._resolved(kwargs, "num_frames")
        if num_frames is not None and kwargs.get("fps") is None:
            fps = None
        sampling = {
            "temporal_patch_size": self._resolved(kwargs, "temporal_patch_size"),
            "min_frames": self._resolved(kwargs, "min_frames"),
            "max_frames": kwargs.get("max_frames"),
            "num_frames": num_frames,
            "fps": fps,
        }
        if kind == "file":
            file_md = info
            total, height, width = file_md.total_num_frames, file_md.height, file_md.width
            _check_container_metadata(file_md, _display_name(video), file_md.video_backend or "pyav")
            if do_sample_frames:
                indices = np.asarray(self.sample_frames(file_md, **sampling), dtype=np.int64)
            else:
                indices = np.arange(total)
            source_fps, sampled = file_md.fps, bool(do_sample_frames)
        else:
            count, height, width = info
            if kind == "array" and _is_full_video(video, md) and do_sample_frames:
                indices = np.asarray(self.sample_frames(md, **sampling), dtype=np.int64)
                total, source_fps, sampled = md.total_num_frames, md.fps, True
            else:
                md = _presampled_metadata(count, md, fps if fps is not None else self.fps)
                indices = np.asarray(md.frames_indices, dtype=np.int64)
                total, source_fps, sampled = md.total_num_frames, md.fps, False
                if len(indices) != count:
                    indices = np.arange(count)
        if height is None or width is None:
            raise VideoDecodingError(f"Video {_display_name(video)} does not report its frame size.")

        patch_size = self._resolved(kwargs, "patch_size")
        merge_size = self._resolved(kwargs, "merge_size")
        temporal_patch_size = self._resolved(kwargs, "temporal_patch_size")
        min_pixels, max_pixels = self._pixel_bounds(kwargs)
        factor = patch_size * merge_size
        if self._resolved(kwargs, "do_resize"):
            if self._resolved(kwargs, "cap_pixels_per_frame"):
                budget = int(self._resolved(kwargs, "max_video_tokens") * factor * factor * 0.9)
                max_pixels = max(
                    min(max_pixels, budget * temporal_patch_size // max(len(indices), 1)), int(min_pixels * 1.05)
                )
            resized_height, resized_width = smart_resize(
                height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
            )
        else:
            resized_height, resized_width = height, width
        grid_t = -(-len(indices) // temporal_patch_size)
        grid_h, grid_w = resized_height // patch_size, resized_width // patch_size
        per_patch = grid_h * grid_w // merge_size**2
        timestamps = [float(i) / source_fps for i in indices] if source_fps else None
        return VideoPlan(
            source=_display_name(video),
            total_num_frames=int(total),
            source_fps=float(source_fps) if source_fps else None,
            duration=float(total) / source_fps if source_fps else None,
            height=int(height),
            width=int(width),
            frame_indices=[int(i) for i in indices],
            sampled=sampled,
            resized_height=int(resized_height),
            resized_width=int(resized_width),
            grid_thw=(int(grid_t), int(grid_h), int(grid_w)),
            num_tokens=int(grid_t * per_patch),
            tokens_per_temporal_patch=int(per_patch),
            timestamps=timestamps,
        )

    def _pixel_bounds(self, kwargs: dict) -> tuple[int, int]:
        size = kwargs.get("size") or self.size
        min_pixels = (
            kwargs.get("min_pixels") or _size_value(size, "shortest_edge") or _size_value(self.size, "shortest_edge")
        )
        max_pixels = (
            kwargs.get("max_pixels") or _size_value(size, "longest_edge") or _size_value(self.size, "longest_edge")
        )
        return int(min_pixels), int(max_pixels)


def _is_full_video(video, md: VideoMetadata) -> bool:
    """Frames given with metadata describing exactly these frames (a whole decoded video), so they can be sampled."""
    return md is not None and md.fps is not None and md.total_num_frames == len(video)


def _presampled_metadata(count: int, md: VideoMetadata | None, assumed_fps: float | None) -> VideoMetadata:
    """Metadata for frames that are already sampled: keep what the caller said, fill in what is missing."""
    if md is None:
        md = VideoMetadata(total_num_frames=count)
    if md.fps is None:
        # frames without a rate: take them as sampled at the requested fps, so that M-RoPE's time axis is right
        md.fps = float(assumed_fps) if assumed_fps else DEFAULT_FPS
        md.total_num_frames = count
        md.frames_indices = list(range(count))
        md.duration = count / md.fps
    elif md.frames_indices is None or len(md.frames_indices) != count:
        if md.total_num_frames is None or md.total_num_frames == count:
            md.total_num_frames = count
            md.frames_indices = list(range(count))
        else:
            # spread evenly over the video the metadata describes
            md.frames_indices = np.linspace(0, md.total_num_frames - 1, count).round().astype(int).tolist()
    return md


def _metadata_for_arrays(videos: list, video_metadata) -> list:
    """One `VideoMetadata` (or None) per video; file paths get theirs when they are read."""
    if video_metadata is None:
        return [None] * len(videos)
    if isinstance(video_metadata, (dict, VideoMetadata)):
        video_metadata = [video_metadata]
    flat = []
    for item in video_metadata:
        if isinstance(item, (list, tuple)):
            flat.extend(item)
        else:
            flat.append(item)
    if len(flat) != len(videos):
        raise ValueError(
            f"Received {len(videos)} videos but {len(flat)} `video_metadata` entries; pass one per video."
        )
    result = []
    for item in flat:
        if item is None:
            result.append(None)
        elif isinstance(item, VideoMetadata):
            result.append(VideoMetadata(**{k: item[k] for k in item}))
        else:
            known = {k: v for k, v in dict(item).items() if k in VideoMetadata.__dataclass_fields__}
            if "total_num_frames" not in known:
                known["total_num_frames"] = None
            if isinstance(known.get("frames_indices"), torch.Tensor):
                known["frames_indices"] = known["frames_indices"].tolist()
            result.append(VideoMetadata(**known))
    return result


def _convert_per_video_fps(videos, kwargs: dict) -> dict:
    """Accept qwen-vl-utils' `video_kwargs` as they come: `fps` as a list (one sampled rate per video, frames already
    sampled). The rates become per-video metadata so that `second_per_grid_ts` follows them."""
    kwargs = dict(kwargs)
    per_video = kwargs.get("fps")
    videos_kwargs = kwargs.get("videos_kwargs")
    in_videos_kwargs = isinstance(videos_kwargs, dict) and isinstance(videos_kwargs.get("fps"), (list, tuple))
    if in_videos_kwargs:
        videos_kwargs = dict(videos_kwargs)
        per_video = videos_kwargs.pop("fps")
        kwargs["videos_kwargs"] = videos_kwargs
    elif isinstance(per_video, (list, tuple)):
        kwargs.pop("fps")
    else:
        return kwargs
    if videos is None:
        return kwargs
    flat = make_batched_videos(videos)
    per_video = [float(x) for x in per_video]
    if len(per_video) == 1 and len(flat) > 1:
        per_video = per_video * len(flat)
    if len(per_video) != len(flat):
        raise ValueError(f"Got {len(per_video)} `fps` values for {len(flat)} videos; pass one per video.")
    given = kwargs.get("video_metadata")
    if given is None and isinstance(videos_kwargs, dict):
        given = videos_kwargs.get("video_metadata")
    if given is None:
        metadata = []
        for video, rate in zip(flat, per_video):
            count = len(video) if not isinstance(video, str) else None
            entry = {"fps": rate, "total_num_frames": count}
            if count is not None:
                entry["frames_indices"] = list(range(count))
            metadata.append(entry)
        target = kwargs["videos_kwargs"] if in_videos_kwargs else kwargs
        target["video_metadata"] = metadata
    target = kwargs["videos_kwargs"] if in_videos_kwargs else kwargs
    target.setdefault("do_sample_frames", False)
    return kwargs


# ---------------------------------------------------------------------- processor


@dataclass
class _CallState:
    text: Any
    max_context_tokens: int
    reduce_fps_to_fit: bool
    image_tokens: list = field(default_factory=list)
    temp_files: list = field(default_factory=list)
    plans: list = field(default_factory=list)

    def cleanup(self):
        for path in self.temp_files:
            try:
                os.remove(path)
            except OSError:
                pass
        self.temp_files.clear()


_CALL_STATE: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar("videonsa_call_state", default=None)


def _download(url: str, state: _CallState) -> str:
    """Fetch a video URL once (with the HTTP client transformers' `load_video` uses) so that probing its metadata and
    decoding it read the same local copy."""
    from transformers import video_utils

    response = video_utils.httpx.get(url, follow_redirects=True)
    response.raise_for_status()
    suffix = os.path.splitext(urlparse(url).path)[1] or ".mp4"
    handle, path = tempfile.mkstemp(prefix="videonsa_", suffix=suffix)
    with os.fdopen(handle, "wb") as file:
        file.write(response.content)
    state.temp_files.append(path)
    return path


class VideoNSAProcessor(Qwen2_5_VLProcessor):
    r"""
    Processor for VideoNSA: a Qwen2.5-VL processor (Qwen2-VL image processor, Qwen2 tokenizer,
    [`VideoNSAVideoProcessor`]) that keeps videos aligned with the model's NSA blocks and within its context.

    Args:
        image_processor ([`Qwen2VLImageProcessor`], *optional*):
            Defaults to Qwen2.5-VL's released settings (min 3136, max 12845056 pixels).
        tokenizer ([`Qwen2Tokenizer`]):
            Qwen2.5-VL's tokenizer (needs `<|video_pad|>`, `<|image_pad|>`, `<|vision_start|>`, `<|vision_end|>`).
        video_processor ([`VideoNSAVideoProcessor`], *optional*):
            Defaults to VideoNSA's released settings (4 fps, at most 50,176 pixels per frame).
        chat_template (`str`, *optional*):
            Defaults to Qwen2.5-VL's chat format.
        max_context_tokens (`int`, *optional*, defaults to 131072):
            Largest prompt, in tokens, the processor lets through. The number of tokens of every video is computed
            from its metadata before it is decoded.
        reduce_fps_to_fit (`bool`, *optional*, defaults to `False`):
            When a prompt is too long: `False` raises [`ContextBudgetExceededError`] naming the numbers and the knobs;
            `True` lowers the sampling fps (the same for every video of the call) to the highest rate that fits and
            warns with [`FpsReducedWarning`]. Nothing is ever truncated.
        nsa_block_size (`int`, *optional*):
            The model's NSA block size. `from_pretrained` reads it from the model's `config.json` (`nsa_block_size`
            at the top level or in `text_config`) beside the processor files; 64 when absent.

    `max_context_tokens` and `reduce_fps_to_fit` can also be given per call.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        chat_template=None,
        max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
        reduce_fps_to_fit: bool = False,
        nsa_block_size: int | None = None,
        **kwargs,
    ):
        if image_processor is None:
            image_processor = Qwen2VLImageProcessor(min_pixels=QWEN2_5_VL_MIN_PIXELS, max_pixels=QWEN2_5_VL_MAX_PIXELS)
        if video_processor is None:
            video_processor = VideoNSAVideoProcessor()
        if chat_template is None:
            chat_template = CHAT_TEMPLATE
        if int(max_context_tokens) <= 0:
            raise ValueError(f"max_context_tokens must be positive, got {max_context_tokens}.")
        self.max_context_tokens = int(max_context_tokens)
        self.reduce_fps_to_fit = bool(reduce_fps_to_fit)
        self.nsa_block_size = int(nsa_block_size) if nsa_block_size else DEFAULT_NSA_BLOCK_SIZE
        self._alignment_warned = False
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if kwargs.get("nsa_block_size") is None:
            block_size = _read_nsa_block_size(pretrained_model_name_or_path, kwargs)
            if block_size is not None:
                processor.nsa_block_size = block_size
        return processor

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """The image processor and tokenizer load as transformers loads them; the video processor is always this
        module's [`VideoNSAVideoProcessor`], so `VideoNSAProcessor.from_pretrained` needs no remote code once this
        file is imported (and `AutoProcessor(..., trust_remote_code=True)` gets the classes of the same module)."""
        from transformers import AutoImageProcessor

        subfolder = kwargs.pop("subfolder", "")
        loaders = {
            "image_processor": lambda: AutoImageProcessor.from_pretrained(
                pretrained_model_name_or_path, subfolder=subfolder, **kwargs
            ),
            "tokenizer": lambda: cls._load_tokenizer_from_pretrained(
                "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
            ),
            "video_processor": lambda: VideoNSAVideoProcessor.from_pretrained(
                pretrained_model_name_or_path, subfolder=subfolder, **kwargs
            ),
        }
        return [loaders[name]() for name in cls.get_attributes()]

    # ------------------------------------------------------------------ calling

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        max_context_tokens = kwargs.pop("max_context_tokens", None)
        reduce_fps_to_fit = kwargs.pop("reduce_fps_to_fit", None)
        kwargs = _convert_per_video_fps(videos, kwargs)
        state = _CallState(
            text=text,
            max_context_tokens=int(max_context_tokens or self.max_context_tokens),
            reduce_fps_to_fit=self.reduce_fps_to_fit if reduce_fps_to_fit is None else bool(reduce_fps_to_fit),
        )
        token = _CALL_STATE.set(state)
        try:
            return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        finally:
            _CALL_STATE.reset(token)
            state.cleanup()

    def _process_images(self, images, **kwargs):
        processed, replacements = super()._process_images(images, **kwargs)
        state = _CALL_STATE.get()
        if state is not None:
            state.image_tokens = [len(r) // len(self.image_token) for r in replacements]
        return processed, replacements

    def _process_videos(self, videos, **kwargs):
        state = _CALL_STATE.get()
        if state is None:  # called outside `__call__`
            state = _CallState(text=None, max_context_tokens=self.max_context_tokens, reduce_fps_to_fit=False)
        flat = make_batched_videos(videos)
        flat = [self._localize(video, state) if isinstance(video, str) else video for video in flat]
        kwargs = self._fit_to_context(flat, kwargs, state)
        return super()._process_videos(flat, **kwargs)

    def plan_videos(self, videos, **kwargs) -> list[VideoPlan]:
        """What each video becomes at these settings (frames, timestamps, grid, tokens), from metadata only."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("max_context_tokens", "reduce_fps_to_fit")}
        return self.video_processor.plan(videos, **kwargs)

    # ------------------------------------------------------------------ budget and alignment

    def _localize(self, video: str, state: _CallState) -> str:
        if video.startswith("file://"):
            return video[len("file://") :]
        if _is_url(video) and not urlparse(video).netloc.endswith("youtube.com"):
            return _download(video, state)
        return video

    def _prompt_layout(self, state: _CallState, num_videos: int):
        """Per prompt: (text tokens without placeholders, image indices, video indices), in placeholder order."""
        text = state.text
        if text is None:
            return [(0, list(range(len(state.image_tokens))), list(range(num_videos)))]
        samples = [text] if isinstance(text, str) else list(text)
        layout, next_image, next_video = [], 0, 0
        for sample in samples:
            n_images = sample.count(self.image_token)
            n_videos = sample.count(self.video_token)
            n_text = len(self.tokenizer(sample)["input_ids"]) - n_images - n_videos
            layout.append(
                (
                    n_text,
                    list(range(next_image, next_image + n_images)),
                    list(range(next_video, next_video + n_videos)),
                )
            )
            next_image += n_images
            next_video += n_videos
        return layout

    def _prompt_totals(self, layout, state, plans):
        totals = []
        for n_text, image_ids, video_ids in layout:
            images = sum(state.image_tokens[i] for i in image_ids if i < len(state.image_tokens))
            videos = sum(plans[i].num_tokens for i in video_ids if i < len(plans))
            totals.append((n_text + images + videos, n_text + images, video_ids))
        return totals

    def _fit_to_context(self, flat: list, kwargs: dict, state: _CallState) -> dict:
        vp = self.video_processor
        if not isinstance(vp, VideoNSAVideoProcessor):
            return kwargs
        kwargs = dict(kwargs)
        backend = _resolve_backend(kwargs.get("video_backend") or vp.video_backend)
        entries = [vp._probe_entry(video, backend) for video in flat]
        metadata = _metadata_for_arrays(flat, kwargs.get("video_metadata"))

        def plan_all(call_kwargs):
            return [
                vp._plan_entry(e, None if m is None else VideoMetadata(**{k: m[k] for k in m}), call_kwargs)
                for e, m in zip(entries, metadata)
            ]

        plans = plan_all(kwargs)
        layout = self._prompt_layout(state, len(flat))
        limit = state.max_context_tokens
        totals = self._prompt_totals(layout, state, plans)
        worst = max(totals, key=lambda item: item[0])
        if worst[0] > limit:
            fps_fit = self._highest_fitting_fps(plan_all, kwargs, layout, state, limit)
            if state.reduce_fps_to_fit and fps_fit is not None:
                requested = kwargs.get("fps") if kwargs.get("fps") is not None else vp.fps
                kwargs["fps"] = fps_fit
                new_plans = plan_all(kwargs)
                new_total = max(t[0] for t in self._prompt_totals(layout, state, new_plans))
                effective = ", ".join(
                    f"video {i}: {plan.num_frames} frames ({plan.sampled_fps:.3g} fps after rounding to "
                    f"temporal patches)"
                    for i, plan in enumerate(new_plans)
                    if plan.sampled and plan.sampled_fps
                )
                warnings.warn(
                    f"The prompt would be {worst[0]:,} tokens at {requested:g} fps, above max_context_tokens="
                    f"{limit:,}: reduce_fps_to_fit=True lowered the sampling rate to fps={fps_fit:g} "
                    f"({effective}); the prompt is now {new_total:,} tokens.",
                    FpsReducedWarning,
                    stacklevel=4,
                )
                plans = new_plans
            else:
                raise ContextBudgetExceededError(self._budget_message(worst, plans, kwargs, limit, fps_fit))
        self._check_alignment(plans, kwargs)
        state.plans = plans
        return kwargs

    def _highest_fitting_fps(self, plan_all, kwargs, layout, state, limit) -> float | None:
        vp = self.video_processor
        if kwargs.get("num_frames") is not None:
            return None
        requested = kwargs.get("fps") if kwargs.get("fps") is not None else vp.fps
        if requested is None:
            return None

        def fits(rate):
            trial = dict(kwargs, fps=rate)
            return max(t[0] for t in self._prompt_totals(layout, state, plan_all(trial))) <= limit

        low = 1e-6
        if not fits(low):
            return None
        high = float(requested)
        for _ in range(60):
            mid = (low + high) / 2
            if fits(mid):
                low = mid
            else:
                high = mid
        for decimals in (2, 3, 4, 6):
            nice = math.floor(low * 10**decimals) / 10**decimals
            if nice > 0 and fits(nice):
                return nice
        return low

    def _budget_message(self, worst, plans, kwargs, limit, fps_fit) -> str:
        total, fixed, video_ids = worst
        vp = self.video_processor
        fps = kwargs.get("fps") if kwargs.get("fps") is not None else vp.fps
        _, max_pixels = vp._pixel_bounds(kwargs)
        lines = [
            f"The prompt would be {total:,} tokens, above max_context_tokens={limit:,} "
            f"(text and images: {fixed:,} tokens; videos: {total - fixed:,} tokens)."
        ]
        for i in video_ids:
            plan = plans[i]
            duration = f"{plan.duration:.1f} s" if plan.duration is not None else "pre-sampled frames"
            rate = f" at {plan.sampled_fps:.3g} fps" if plan.sampled and plan.sampled_fps else ""
            lines.append(
                f"  video {i} {plan.source}: {duration}{rate} -> {plan.num_frames} frames -> "
                f"{plan.grid_thw[0]} temporal patches x {plan.tokens_per_temporal_patch} tokens "
                f"({plan.resized_height}x{plan.resized_width} px) = {plan.num_tokens:,} tokens"
            )
        knobs = [
            f"lower `fps` (now {fps:g}" + (f"; {fps_fit:g} fits" if fps_fit is not None else "") + ")",
            f"cap frames with `max_frames` (now {kwargs.get('max_frames') or vp.max_frames or 'no cap'}) or "
            "`num_frames`",
            f"lower the pixels per frame with `max_pixels` / size['longest_edge'] (now {max_pixels:,})",
            f"raise `max_context_tokens` (now {limit:,}) if the model and memory allow",
        ]
        if fps_fit is not None:
            knobs.append("or pass `reduce_fps_to_fit=True` to let the processor lower fps for you")
        else:
            knobs.append("(lowering fps alone cannot fit this prompt: the frame count is at its minimum)")
        return "\n".join(lines) + "\nTo fit: " + "; ".join(knobs) + "."

    def _check_alignment(self, plans: list[VideoPlan], kwargs: dict):
        vp = self.video_processor
        block = self.nsa_block_size
        patch_size = vp._resolved(kwargs, "patch_size")
        merge_size = vp._resolved(kwargs, "merge_size")
        temporal_patch_size = vp._resolved(kwargs, "temporal_patch_size")
        aligned_pixels = block * (patch_size * merge_size) ** 2
        _, max_pixels = vp._pixel_bounds(kwargs)
        if max_pixels == aligned_pixels or self._alignment_warned:
            # the default resolution: a frame step is one block (224x224) or fits in one (other aspect ratios)
            return
        for plan in plans:
            per_patch = plan.tokens_per_temporal_patch
            if per_patch == 0 or per_patch % block == 0 or block % per_patch == 0:
                continue
            side = math.isqrt(block)
            suggestion = _aligned_max_pixels(plan, block, patch_size, merge_size, vp._pixel_bounds(kwargs))
            other = ""
            if suggestion is not None:
                pixels, grid_h, grid_w = suggestion
                tokens = grid_h * grid_w
                other = (
                    f"; for this video, max_pixels={pixels} gives {grid_h}x{grid_w} = {tokens} tokens per temporal "
                    f"patch = {tokens // block} block{'s' if tokens // block > 1 else ''}"
                    if tokens >= block
                    else f"; for this video, max_pixels={pixels} gives {grid_h}x{grid_w} = {tokens} tokens, "
                    f"{block // tokens} temporal patches per block"
                )
            self._alignment_warned = True
            warnings.warn(
                f"NSA block alignment: with max_pixels={max_pixels}, video {plan.source} ({plan.height}x"
                f"{plan.width}) resizes to {plan.resized_height}x{plan.resized_width}, i.e. "
                f"{plan.grid_thw[1] // merge_size}x{plan.grid_thw[2] // merge_size} = {per_patch} tokens per "
                f"temporal patch ({temporal_patch_size} frames), not a whole number of VideoNSA's {block}-token NSA "
                "blocks, so blocks straddle frame steps. Processing goes on. The alignment the model was trained "
                f"with: at max_pixels={aligned_pixels} one temporal patch is one block (a square frame gives "
                f"{side}x{side} = {block} tokens), so compression averages one frame step and selection picks whole "
                f"frame steps{other}.",
                NSABlockAlignmentWarning,
                stacklevel=5,
            )
            return


def _aligned_max_pixels(plan: VideoPlan, block: int, patch_size: int, merge_size: int, bounds):
    """The per-frame pixel budget closest to the requested one at which this video's temporal patches are whole
    numbers of blocks (or whole fractions of one): `(max_pixels, merged grid h, merged grid w)`, or None."""
    min_pixels, max_pixels = bounds
    factor = patch_size * merge_size
    requested = max(1, max_pixels // factor**2)
    best = None
    for tokens in range(1, 4 * requested + 1):
        pixels = max(tokens * factor**2, min_pixels)
        try:
            height, width = smart_resize(plan.height, plan.width, factor, min_pixels=min_pixels, max_pixels=pixels)
        except ValueError:
            continue
        grid_h, grid_w = height // factor, width // factor
        count = grid_h * grid_w
        if count and (count % block == 0 or block % count == 0):
            distance = abs(math.log(count / requested))
            if best is None or distance < best[0]:
                best = (distance, pixels, grid_h, grid_w)
    return None if best is None else best[1:]


def _read_nsa_block_size(pretrained_model_name_or_path, kwargs: dict) -> int | None:
    """`nsa_block_size` from the model's `config.json` beside the processor files (top level or `text_config`)."""
    hub_kwargs = {
        key: kwargs[key]
        for key in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
        if kwargs.get(key) is not None
    }
    try:
        config_file = cached_file(
            pretrained_model_name_or_path,
            "config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
    except Exception:  # no config beside the processor: keep the saved or default block size
        return None
    if config_file is None:
        return None
    try:
        with open(config_file, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        value = section.get("nsa_block_size")
        if value:
            return int(value)
    return None


VideoNSAProcessor.register_for_auto_class("AutoProcessor")
VideoNSAVideoProcessor.register_for_auto_class("AutoVideoProcessor")
