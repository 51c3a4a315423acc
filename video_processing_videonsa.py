"""Video processor for VideoNSA (Qwen2.5-VL-7B with Native Sparse Attention on video tokens, arXiv 2510.02295).

[`VideoNSAVideoProcessor`] is transformers' Qwen2-VL video processor with the released defaults (4 fps, at most
50,176 pixels per frame, Qwen2.5-VL's min pixels, no frame cap). It adds:

* `plan()`: what each video becomes (sampled frames, their timestamps, resized size, grid, tokens), computed from the
  container's metadata before any decoding; file probes are cached, so planning a video again is free.
* Decoding with PyAV that converts each frame as soon as it is decoded, follows the frames' presentation times
  (variable frame rates are sampled by time), reports progress through a callback, and names the video and the frame
  on failure. `video_backend` picks transformers' other decoders (torchcodec, decord, OpenCV) instead.
* Checks with errors that name what was wrong: every knob (fps, frame counts, pixel bounds), every video input
  (rank, frame count, non-finite pixels, aspect ratio), unreadable files and unreachable URLs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import torch

from transformers.image_utils import ChannelDimension
from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
    Qwen2VLVideoProcessor,
    Qwen2VLVideoProcessorInitKwargs,
    smart_resize,
)
from transformers.utils import is_decord_available, is_torchcodec_available, logging
from transformers.video_utils import VIDEO_DECODERS, VideoMetadata, load_video, make_batched_videos


logger = logging.get_logger(__name__)

__all__ = [
    "VideoNSAVideoProcessor",
    "VideoNSAVideoMetadata",
    "VideoPlan",
    "VideoDecodingError",
    "InvalidVideoError",
    "InvalidVideoArgumentError",
    "convert_per_video_fps",
    "decode_pyav",
    "flatten_videos",
    "local_copies",
    "probe_video",
    "DEFAULT_FPS",
    "DEFAULT_NSA_BLOCK_SIZE",
    "DEFAULT_VIDEO_MAX_PIXELS",
    "QWEN2_5_VL_MAX_PIXELS",
    "QWEN2_5_VL_MIN_PIXELS",
]

DEFAULT_NSA_BLOCK_SIZE = 64
DEFAULT_FPS = 4.0
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# Qwen2.5-VL's released min pixels (56 x 56); its max (12845056) is kept for images only.
QWEN2_5_VL_MIN_PIXELS = 56 * 56
QWEN2_5_VL_MAX_PIXELS = 12845056
# One NSA block of merged tokens per temporal patch: 64 * 28 * 28 = 50176 = 224 * 224.
DEFAULT_VIDEO_MAX_PIXELS = DEFAULT_NSA_BLOCK_SIZE * (PATCH_SIZE * MERGE_SIZE) ** 2


class VideoDecodingError(ValueError):
    """A video could not be read: missing stream, empty, corrupt or truncated file, no frames, unreachable URL."""


class InvalidVideoError(ValueError):
    """Frames that cannot be processed: wrong rank or type, no frames, non-finite pixel values, impossible size."""


class InvalidVideoArgumentError(ValueError):
    """A processing knob (`fps`, `num_frames`, `min_frames`, `max_frames`, `min_pixels`, `max_pixels`, ...) is out of
    its range."""


@dataclass
class VideoNSAVideoMetadata(VideoMetadata):
    """transformers' `VideoMetadata` plus `frame_times`: the presentation time (seconds) of every frame of a
    variable-frame-rate video, so that sampling and `timestamps` follow time rather than frame index. `None` for
    constant frame rates, where index / fps is the time."""

    frame_times: list[float] | None = None

    @property
    def timestamps(self) -> list[float]:
        if self.frame_times is None or self.frames_indices is None:
            return super().timestamps
        return [self.frame_times[int(i)] for i in self.frames_indices]


@dataclass
class VideoPlan:
    """What one video becomes, computed from its metadata before decoding.

    `frame_indices` are the source frames that will be decoded, `timestamps` their presentation times in seconds,
    `grid_thw` the patch grid the vision tower sees and `num_tokens` the number of `<|video_pad|>` tokens in the prompt.
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


# ---------------------------------------------------------------------------------------------------- inputs


def display_name(video, index: int | None = None) -> str:
    """How messages name a video after the word "video": its path or URL, or its position and shape for frames."""
    if isinstance(video, str):
        return repr(video if len(video) <= 120 else "..." + video[-117:])
    where = f"{index} " if index is not None else ""
    shape = tuple(getattr(video, "shape", ())) or f"{len(video)} frames"
    return f"{where}<frames {type(video).__name__} {shape}>"


def is_url(video: str) -> bool:
    return video.startswith("http://") or video.startswith("https://")


def _is_youtube(video: str) -> bool:
    return urlparse(video).netloc.endswith("youtube.com")


def _is_array(item) -> bool:
    return isinstance(item, (np.ndarray, torch.Tensor))


def _is_frame(item) -> bool:
    from PIL import Image

    return isinstance(item, Image.Image) or (_is_array(item) and item.ndim == 3)


def _checked_structure(item, where: str, top: bool):
    """The video input with 5-D batches split into videos, or an `InvalidVideoError` naming the bad entry."""
    expected = (
        "a path or URL, an array/tensor of shape (frames, height, width, channels) or (frames, channels, height, "
        "width), a list of PIL images or of (height, width, channels) frames, or a list of those"
    )
    if isinstance(item, str) or _is_frame(item) and top:
        return item
    if _is_array(item):
        if item.ndim == 5:
            return [_checked_structure(v, f"{where}[{i}]", False) for i, v in enumerate(item)]
        if item.ndim != 4:
            raise InvalidVideoError(f"{where} has rank {item.ndim} (shape {tuple(item.shape)}); expected {expected}.")
        if item.shape[0] == 0:
            raise InvalidVideoError(f"{where} has no frames (shape {tuple(item.shape)}).")
        return item
    if isinstance(item, (list, tuple)):
        if len(item) == 0:
            raise InvalidVideoError(f"{where} is an empty list: a video needs at least one frame.")
        if all(_is_frame(frame) for frame in item):
            return list(item)
        return [_checked_structure(v, f"{where}[{i}]", False) for i, v in enumerate(item)]
    raise InvalidVideoError(f"{where} is {type(item).__name__} {item!r:.60}; expected {expected}.")


def flatten_videos(videos) -> list:
    """One entry per video (a path/URL, a 4-D array or tensor, or a list of frame paths), as transformers'
    `make_batched_videos` gives, after checking every entry: a bad one raises [`InvalidVideoError`] instead of
    being dropped."""
    checked = _checked_structure(videos, "videos", True)
    flat = make_batched_videos(checked)
    return [np.stack([np.asarray(f) for f in v]) if isinstance(v, list) and _is_frame(v[0]) else v for v in flat]


def channel_format(video, source: str | None = None) -> ChannelDimension:
    """Where a video's channels are, as transformers infers it, except for ambiguous shapes (1 or 3 both first and
    last, e.g. 1 x 1 frames): numpy arrays (what decoders and PIL give) are channels-last there, tensors
    channels-first."""
    first, last = video.shape[1] in (1, 3), video.shape[-1] in (1, 3)
    if first and last:
        return ChannelDimension.FIRST if isinstance(video, torch.Tensor) else ChannelDimension.LAST
    if first or last:
        return ChannelDimension.FIRST if first else ChannelDimension.LAST
    raise InvalidVideoError(
        f"Cannot tell the channel axis of video {source or tuple(video.shape)}: expected 1 or 3 "
        "channels first or last."
    )


def frame_size(video, data_format: ChannelDimension | None = None, source: str | None = None) -> tuple[int, int]:
    layout = data_format or channel_format(video, source)
    return (int(video.shape[2]), int(video.shape[3])) if layout == ChannelDimension.FIRST else tuple(video.shape[1:3])


# ---------------------------------------------------------------------------------------------------- fetching


def download(url: str) -> str:
    """Fetch a video URL to a temporary file (with the HTTP client transformers' `load_video` uses)."""
    from transformers import video_utils

    try:
        response = video_utils.httpx.get(url, follow_redirects=True)
        response.raise_for_status()
    except Exception as error:  # httpx's errors do not name the URL
        raise VideoDecodingError(f"Could not download video {url!r}: {type(error).__name__}: {error}") from error
    suffix = os.path.splitext(urlparse(url).path)[1] or ".mp4"
    handle, path = tempfile.mkstemp(prefix="videonsa_", suffix=suffix)
    with os.fdopen(handle, "wb") as file:
        file.write(response.content)
    return path


@contextlib.contextmanager
def local_copies(videos: list):
    """The videos with URLs downloaded once (and `file://` stripped); the downloads are removed on exit."""
    downloaded, local = [], []
    try:
        for video in videos:
            if isinstance(video, str) and video.startswith("file://"):
                video = video[len("file://") :]
            elif isinstance(video, str) and is_url(video) and not _is_youtube(video):
                video = download(video)
                downloaded.append(video)
            local.append(video)
        yield local
    finally:
        for path in downloaded:
            with contextlib.suppress(OSError):
                os.remove(path)


def _check_local_file(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Video file not found: {path!r}. Pass an existing local path, a file:// URI, an http(s) URL or "
            "decoded frames."
        )
    if os.path.isdir(path):
        raise IsADirectoryError(f"Expected a video file but {path!r} is a directory.")
    if os.path.getsize(path) == 0:
        raise VideoDecodingError(f"Video file {path!r} is empty (0 bytes).")


def resolve_backend(backend: str | None) -> str:
    backend = (backend or "pyav").lower()
    if backend == "auto":
        usable = getattr(sys.modules["transformers.utils"], "is_torchcodec_usable", None)
        torchcodec_ok = usable(decode="video") if usable is not None else is_torchcodec_available()
        if torchcodec_ok:
            return "torchcodec"
        return "decord" if is_decord_available() else "pyav"
    if backend not in VIDEO_DECODERS:
        raise ValueError(
            f"Unknown video_backend={backend!r}: use 'auto' or one of {sorted(VIDEO_DECODERS)} (transformers' "
            "load_video backends)."
        )
    return backend


def _decode_failure(source: str, backend: str, error: Exception, where: str = "") -> VideoDecodingError:
    return VideoDecodingError(
        f"Could not decode video {source} with the '{backend}' backend{where} ({type(error).__name__}: {error}). "
        "The file may be corrupt, truncated, not a video, or have no video stream."
    )


def _pyav_frame_times(stream, total: int, fps: float) -> list[float] | None:
    """Presentation times (s, from the first frame) from the container's index when it lists every frame and they
    are not evenly spaced at `fps` (within half a frame); `None` for constant frame rates, and with PyAV < 16, which
    does not expose the index (variable frame rates are then sampled by index, as transformers does)."""
    entries = getattr(stream, "index_entries", None)
    if entries is None or total < 2 or len(entries) != total:
        return None
    stamps = np.sort(np.fromiter((entry.timestamp for entry in entries), dtype=np.float64, count=total))
    times = (stamps - stamps[0]) * float(stream.time_base)
    if np.max(np.abs(times - np.arange(total) / fps)) <= 0.5 / fps:
        return None
    return times.tolist()


@functools.lru_cache(maxsize=256)
def _probe_file(path: str, size: int, mtime_ns: int, backend: str) -> VideoNSAVideoMetadata:
    """A file's metadata; cached by path, size and modification time (the file's identity for the cache)."""
    source = display_name(path)
    if backend == "pyav":
        import av

        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise VideoDecodingError(f"Video {source} has no video stream.")
                stream = container.streams.video[0]
                total = int(stream.frames)
                fps = float(stream.average_rate) if stream.average_rate else None
                times = _pyav_frame_times(stream, total, fps) if fps else None
                metadata = VideoNSAVideoMetadata(
                    total_num_frames=total,
                    fps=fps,
                    width=stream.width,
                    height=stream.height,
                    duration=total / fps if fps else None,
                    video_backend="pyav",
                    frame_times=times,
                )
        except VideoDecodingError:
            raise
        except Exception as error:
            raise _decode_failure(source, backend, error) from error
    else:
        # transformers' other decoders report metadata to the sampling callback; frame 0 gives the frame size
        seen = {}

        def first_frame(metadata, **kwargs):
            seen["metadata"] = metadata
            return np.array([0]) if metadata.total_num_frames else np.array([], dtype=np.int64)

        try:
            frames, _ = load_video(path, backend=backend, sample_indices_fn=first_frame)
        except Exception as error:
            if "metadata" not in seen:
                raise _decode_failure(source, backend, error) from error
            frames = None
        found = seen["metadata"]
        metadata = VideoNSAVideoMetadata(**{k: found[k] for k in found})
        if frames is not None and len(frames):
            metadata.height, metadata.width = frame_size(np.asarray(frames))
    _check_container_metadata(metadata, source, backend)
    return metadata


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
    if metadata.height is None or metadata.width is None:
        raise VideoDecodingError(f"Video {source} does not report its frame size.")


def probe_video(path: str, backend: str = "pyav") -> VideoNSAVideoMetadata:
    """A local video file's metadata (frame count, fps, size, and frame times when the frame rate varies), from its
    container without decoding frames. Cached; a copy is returned."""
    _check_local_file(path)
    stat = os.stat(path)
    return copy.copy(_probe_file(os.path.abspath(path), stat.st_size, stat.st_mtime_ns, backend))


def decode_pyav(path: str, indices, on_frame: Callable[[], None] | None = None):
    """The frames at `indices` (positions in presentation order, repeats allowed) as a uint8 array (frames, height,
    width, 3), and the indices decoded (fewer when the container announced more frames than the stream holds).

    Each frame is converted to RGB as soon as it is decoded, with one converter for the whole video: PyAV gives
    every frame its own converter (and thread pool), so holding tens of thousands of decoded frames, as transformers'
    reader does, runs out of threads (EAGAIN) on long videos (docs/processor.md)."""
    import av
    from av.video.reformatter import VideoReformatter

    source = display_name(path)
    indices = [int(i) for i in indices]
    wanted: dict[int, list[int]] = {}
    for position, index in enumerate(indices):
        wanted.setdefault(index, []).append(position)
    frames: list = [None] * len(indices)
    last = max(indices)
    decoded = 0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            reformatter = VideoReformatter()
            # PyAV >= 16 lets the converter's thread pool be sized; it only pays off on large frames (3x slower on
            # tiny ones: docs/processor.md). Older PyAV (lmms-eval pins av < 16) converts single-threaded.
            sized_pool = int(av.__version__.split(".")[0]) >= 16
            container.seek(0)
            for frame in container.decode(stream):
                positions = wanted.get(decoded)
                if positions is not None:
                    threads = {"threads": 1 if frame.width * frame.height <= 512 * 512 else 0} if sized_pool else {}
                    array = reformatter.reformat(frame, format="rgb24", **threads).to_ndarray()
                    for position in positions:
                        frames[position] = array
                decoded += 1
                if on_frame is not None:
                    on_frame()
                if decoded > last:
                    break
    except Exception as error:
        where = f" at frame {decoded} of the {last + 1} it has to read" if decoded else ""
        raise _decode_failure(source, "pyav", error, where) from error
    kept = [p for p in range(len(indices)) if frames[p] is not None]
    if not kept:
        raise VideoDecodingError(f"Video {source} decoded to no frames with the 'pyav' backend.")
    if len(kept) < len(indices):
        # the container announced more frames than it holds: keep the metadata true to what was decoded
        logger.warning(
            f"Video {source}: {len(indices)} frames were requested but only {len(kept)} could be decoded; the "
            "container's frame count is larger than the stream."
        )
    return np.stack([frames[p] for p in kept]), [indices[p] for p in kept]


def _progress_bar(total: int, desc: str, show_progress: bool | None):
    """`show_progress=False`: never. `True`: always. `None`: when transformers' progress bars are on, stderr is a
    terminal and the decode takes more than 2 s."""
    from tqdm.auto import tqdm

    enabled = show_progress is not False and logging.is_progress_bar_enabled()
    return tqdm(
        total=total,
        desc=desc,
        unit="frame",
        leave=False,
        dynamic_ncols=True,
        disable=(None if show_progress is None else False) if enabled else True,
        delay=2.0 if show_progress is None else 0,
    )


# ---------------------------------------------------------------------------------------------------- knobs


def _check_number(name: str, value, minimum, integer: bool, hint: str = "", exclusive: bool = False):
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > minimum if exclusive else value >= minimum)
    if not ok or integer and not float(value).is_integer():
        kind = "an integer" if integer else "a finite number"
        bound = f"> {minimum}" if exclusive else f">= {minimum}"
        raise InvalidVideoArgumentError(f"`{name}` must be {kind} {bound}, got {value!r}.{hint}")


def _size_value(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


# ---------------------------------------------------------------------------------------------------- processor


class VideoNSAVideoProcessorKwargs(Qwen2VLVideoProcessorInitKwargs, total=False):
    r"""
    max_frames (`int`, *optional*, defaults to `None`):
        Cap on the number of sampled frames. `None` (VideoNSA's default) means no cap: frames follow `fps` and the
        processor's `max_context_tokens` budget decides whether the video fits.
    video_backend (`str`, *optional*, defaults to `"pyav"`):
        Decoder: `"pyav"` (this module's reader), or through transformers' `load_video`: `"torchcodec"`, `"decord"`,
        `"opencv"`, or `"auto"` (torchcodec, then decord, then PyAV, whichever is installed first).
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
      (`None`: no cap). Variable-frame-rate files are sampled by presentation time.
    * `size={"shortest_edge": 3136, "longest_edge": 50176}`: Qwen2.5-VL's min pixels and VideoNSA's max pixels per
      frame, i.e. at most 64 merged tokens per temporal patch (one NSA block).
    * `cap_pixels_per_frame=False`: the per-frame resolution never depends on the video's length (that would break the
      block alignment); long videos are governed by the processor's token budget instead.

    Frames given as arrays/tensors/PIL lists with metadata (`video_metadata` with `fps` and `total_num_frames` equal
    to the number of frames given) are sampled like files; frames given without metadata, or fewer frames than the
    metadata's `total_num_frames`, are taken as already sampled (at `fps` when no metadata says otherwise). Float
    frames already in [0, 1] are not rescaled a second time.
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

    def __init__(self, **kwargs):
        if kwargs.get("size") is None:
            # transformers < 5.23 writes `min_pixels`/`max_pixels` into `self.size`, the class's dict: give it a copy
            kwargs["size"] = dict(self.size)
        super().__init__(**kwargs)
        self.call_kwargs(None, {})  # the saved settings obey the same rules as per-call ones

    # ------------------------------------------------------------------ knobs

    def setting(self, kwargs: dict, key: str):
        """A knob's value for a call: the call's own, else this processor's."""
        value = kwargs.get(key)
        return value if value is not None else getattr(self, key, None)

    def pixel_bounds(self, kwargs: dict) -> tuple[int, int]:
        """(min_pixels, max_pixels) per frame for a call: `min_pixels`/`max_pixels`, then `size`, then the saved
        size."""
        size = kwargs.get("size") or self.size
        bounds = []
        for name, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            for value in (kwargs.get(name), _size_value(size, key), _size_value(self.size, key)):
                if value is not None:
                    bounds.append(value)
                    break
        return bounds[0], bounds[1]

    def call_kwargs(self, videos, kwargs: dict) -> dict:
        """A call's kwargs, checked and normalized: qwen-vl-utils' per-video `fps` lists become metadata,
        `min_pixels`/`max_pixels` and partial `size` dicts become a full `size`, and every knob is validated."""
        kwargs = convert_per_video_fps(videos, kwargs)
        min_pixels, max_pixels = self.pixel_bounds(kwargs)
        factor = self.setting(kwargs, "patch_size") * self.setting(kwargs, "merge_size")
        for name in ("patch_size", "merge_size", "temporal_patch_size"):
            _check_number(name, self.setting(kwargs, name), 1, integer=True)
        _check_number("min_pixels", min_pixels, 1, integer=True)
        hint = f" One merged patch is {factor}x{factor} = {factor**2} pixels."
        _check_number("max_pixels", max_pixels, factor**2, integer=True, hint=hint)
        if min_pixels > max_pixels:
            raise InvalidVideoArgumentError(
                f"`min_pixels` ({min_pixels}) is above `max_pixels` ({max_pixels}): frames cannot satisfy both."
            )
        fps = kwargs["fps"] if "fps" in kwargs else self.fps
        if fps is not None:
            _check_number("fps", fps, 0, integer=False, exclusive=True)
        for name in ("num_frames", "min_frames"):
            if self.setting(kwargs, name) is not None:
                _check_number(name, self.setting(kwargs, name), 1, integer=True)
        max_frames = self.setting(kwargs, "max_frames")
        if max_frames is not None:
            _check_number("max_frames", max_frames, 1, integer=True)
            min_frames = self.setting(kwargs, "min_frames") or 1
            if min_frames > max_frames:
                raise InvalidVideoArgumentError(f"`min_frames` ({min_frames}) is above `max_frames` ({max_frames}).")
        if kwargs.get("num_frames") is not None and kwargs.get("fps") is not None:
            raise InvalidVideoArgumentError(
                f"`num_frames` ({kwargs['num_frames']}) and `fps` ({kwargs['fps']}) are mutually exclusive: pass one."
            )
        if kwargs.get("num_frames") is not None:
            kwargs["fps"] = None  # `fps` has a default (4.0): a call that asks for `num_frames` only means "no fps"
        size = kwargs.get("size")
        given = [kwargs.pop(name, None) is not None for name in ("min_pixels", "max_pixels")]
        if any(given) or size is not None:
            if size is None or _size_value(size, "shortest_edge") or _size_value(size, "longest_edge"):
                kwargs["size"] = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
        return kwargs

    def _sampling(self, kwargs: dict) -> dict:
        fps = kwargs["fps"] if "fps" in kwargs else self.fps
        return {
            "temporal_patch_size": self.setting(kwargs, "temporal_patch_size"),
            "min_frames": self.setting(kwargs, "min_frames"),
            "max_frames": kwargs.get("max_frames"),
            "num_frames": self.setting(kwargs, "num_frames"),
            "fps": fps,
        }

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
        `max_frames=None` meaning no cap, clips shorter than one temporal patch kept whole (the last frame is
        repeated when patchifying), and frames picked by presentation time when the metadata has `frame_times`."""
        total = metadata.total_num_frames
        if total is None or total <= 0:
            raise VideoDecodingError(f"Cannot sample frames from a video with {total} frames.")
        temporal_patch_size = temporal_patch_size or self.temporal_patch_size
        max_frames = max_frames if max_frames is not None else self.max_frames
        max_frames = max(int(total if max_frames is None else max_frames), temporal_patch_size)
        if total < temporal_patch_size:
            return torch.arange(total, dtype=torch.int32)
        if num_frames is not None and num_frames > total:
            raise InvalidVideoArgumentError(f"`num_frames={num_frames}` is more than the video's {total} frames.")
        if num_frames is not None:  # Qwen2-VL rounds to the temporal patch size: at least one patch
            num_frames = max(num_frames, temporal_patch_size)
        min_frames = max(min_frames if min_frames is not None else self.min_frames, temporal_patch_size)
        indices = super().sample_frames(
            metadata,
            temporal_patch_size=temporal_patch_size,
            min_frames=min_frames,
            max_frames=max_frames,
            num_frames=num_frames,
            fps=fps,
            **kwargs,
        )
        frame_times = getattr(metadata, "frame_times", None)
        if frame_times is None:
            return indices
        # variable frame rate: the same number of frames, evenly spaced in time; each is the frame shown then
        times = np.asarray(frame_times)
        targets = np.arange(len(indices)) * (metadata.duration / len(indices))
        picked = np.searchsorted(times, targets + 1e-9, side="right") - 1
        return torch.as_tensor(np.clip(picked, 0, total - 1), dtype=torch.int32)

    # ------------------------------------------------------------------ planning

    def plan(self, videos, video_metadata=None, **kwargs) -> list[VideoPlan]:
        """What each video becomes at these settings, before any decoding: sampled frame indices and timestamps,
        resized size, `video_grid_thw` and number of video tokens. Files are only probed for metadata (cached).

        Accepts what `__call__` accepts (paths, URLs, arrays, frame lists) and the same kwargs (`fps`, `num_frames`,
        `min_frames`, `max_frames`, `size`/`min_pixels`/`max_pixels`, `do_sample_frames`, `video_backend`, ...)."""
        kwargs = self.call_kwargs(videos, dict(kwargs, video_metadata=video_metadata))
        flat = flatten_videos(videos)
        metadata = metadata_per_video(flat, kwargs.get("video_metadata"))
        backend = resolve_backend(kwargs.get("video_backend") or self.video_backend)
        with local_copies(flat) as local:
            return [
                self._plan_one(video, local_video, md, kwargs, backend, i)
                for i, (video, local_video, md) in enumerate(zip(flat, local, metadata))
            ]

    def select_frames(self, video, md, kwargs: dict, backend: str):
        """The frames taken from one (local) video: `(metadata, source indices, sampled)`. Files are sampled from their
        probed metadata; frames are sampled when their metadata describes exactly them, else taken as they are."""
        do_sample = bool(self.setting(kwargs, "do_sample_frames"))
        sampling = self._sampling(kwargs)
        if isinstance(video, str):
            md = probe_video(video, backend)
            indices = self.sample_frames(md, **sampling) if do_sample else np.arange(md.total_num_frames)
            return md, np.asarray(indices, dtype=np.int64), do_sample
        if not isinstance(video, list) and _is_full_video(len(video), md) and do_sample:
            return md, np.asarray(self.sample_frames(md, **sampling), dtype=np.int64), True
        md = presampled_metadata(len(video), md, sampling["fps"] if sampling["fps"] is not None else self.fps)
        return md, np.asarray(md.frames_indices, dtype=np.int64), False

    def _plan_one(self, video, local_video, md, kwargs: dict, backend: str, index: int) -> VideoPlan:
        source = display_name(video, index)
        if isinstance(local_video, str) and _is_youtube(local_video):
            raise VideoDecodingError(f"Video {source} cannot be planned: YouTube videos are only read when decoded.")
        md, indices, sampled = self.select_frames(local_video, md, kwargs, backend)
        if isinstance(local_video, str):
            height, width = md.height, md.width
        elif isinstance(local_video, list):  # frame paths or URLs
            first = self.process_image(self.fetch_images([local_video[0]])[0])
            height, width = int(first.shape[-2]), int(first.shape[-1])
        else:
            height, width = frame_size(local_video, kwargs.get("input_data_format"), source)
        patch_size = self.setting(kwargs, "patch_size")
        merge_size = self.setting(kwargs, "merge_size")
        temporal_patch_size = self.setting(kwargs, "temporal_patch_size")
        resized_height, resized_width = self.resized_size(height, width, len(indices), kwargs, source)
        grid_t = -(-len(indices) // temporal_patch_size)
        grid_h, grid_w = resized_height // patch_size, resized_width // patch_size
        per_patch = grid_h * grid_w // merge_size**2
        fps = md.fps
        plan_md = copy.copy(md)
        plan_md.frames_indices = indices.tolist()
        return VideoPlan(
            source=display_name(video),
            total_num_frames=int(md.total_num_frames),
            source_fps=float(fps) if fps else None,
            duration=float(md.total_num_frames) / fps if fps else None,
            height=int(height),
            width=int(width),
            frame_indices=[int(i) for i in indices],
            sampled=sampled,
            resized_height=int(resized_height),
            resized_width=int(resized_width),
            grid_thw=(int(grid_t), int(grid_h), int(grid_w)),
            num_tokens=int(grid_t * per_patch),
            tokens_per_temporal_patch=int(per_patch),
            timestamps=[float(t) for t in plan_md.timestamps] if fps else None,
        )

    def resized_size(self, height: int, width: int, num_frames: int, kwargs: dict, source: str) -> tuple[int, int]:
        """The frame size the vision tower sees (Qwen2-VL's `smart_resize` within the pixel bounds)."""
        if not self.setting(kwargs, "do_resize"):
            return height, width
        factor = self.setting(kwargs, "patch_size") * self.setting(kwargs, "merge_size")
        min_pixels, max_pixels = self.pixel_bounds(kwargs)
        if self.setting(kwargs, "cap_pixels_per_frame"):
            budget = int(self.setting(kwargs, "max_video_tokens") * factor * factor * 0.9)
            temporal = self.setting(kwargs, "temporal_patch_size")
            max_pixels = max(min(max_pixels, budget * temporal // max(num_frames, 1)), int(min_pixels * 1.05))
        try:
            return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        except ValueError as error:
            raise InvalidVideoError(f"Video {source} ({height}x{width} px) cannot be resized: {error}") from error

    # ------------------------------------------------------------------ decoding

    def fetch_videos(self, video_url_or_urls, sample_indices_fn=None, video_backend=None, show_progress=None):
        """Decode local files (lists give lists): `(frames, metadata)`. Frames follow `sample_indices_fn(metadata=)`
        (all frames without it)."""
        if isinstance(video_url_or_urls, list):
            return list(
                zip(*[self.fetch_videos(x, sample_indices_fn, video_backend, show_progress) for x in video_url_or_urls])
            )
        video = video_url_or_urls
        backend = resolve_backend(video_backend or self.video_backend)
        show_progress = self.show_progress if show_progress is None else show_progress
        if _is_youtube(video):
            frames, metadata = load_video(video, backend=backend, sample_indices_fn=sample_indices_fn)
            return frames, metadata
        metadata = probe_video(video, backend)
        indices = sample_indices_fn(metadata=metadata) if sample_indices_fn is not None else None
        indices = np.arange(metadata.total_num_frames) if indices is None else np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            raise VideoDecodingError(f"No frames were selected from video {display_name(video)}.")
        bar = _progress_bar(int(indices.max()) + 1, f"Decoding {os.path.basename(video)}", show_progress)
        try:
            if backend == "pyav":
                frames, kept = decode_pyav(video, indices, on_frame=lambda: bar.update(1))
            else:
                frames, kept = self._decode_with_transformers(video, indices, backend)
            bar.update(bar.total - bar.n)
        finally:
            bar.close()
        metadata.frames_indices = list(kept)
        return frames, metadata

    def _decode_with_transformers(self, video: str, indices: np.ndarray, backend: str):
        try:
            frames, _ = load_video(video, backend=backend, sample_indices_fn=lambda metadata, **kwargs: indices)
        except Exception as error:
            raise _decode_failure(display_name(video), backend, error) from error
        if len(frames) == 0:
            raise VideoDecodingError(f"Video {display_name(video)} decoded to no frames with the '{backend}' backend.")
        return frames, indices[: len(frames)].tolist()

    def preprocess(self, videos, **kwargs):
        kwargs = self.call_kwargs(videos, kwargs)
        backend = resolve_backend(kwargs.pop("video_backend", None) or self.video_backend)
        show_progress = kwargs.pop("show_progress", None)
        flat = flatten_videos(videos)
        metadata = metadata_per_video(flat, kwargs.pop("video_metadata", None))
        frames, out_metadata = [], []
        with local_copies(flat) as local:
            for i, (video, md) in enumerate(zip(local, metadata)):
                if isinstance(video, str) and _is_youtube(video):
                    sampler = functools.partial(self.sample_frames, **self._sampling(kwargs))
                    do_sample = self.setting(kwargs, "do_sample_frames")
                    video, md = self.fetch_videos(video, sampler if do_sample else None, backend, show_progress)
                else:
                    md, indices, sampled = self.select_frames(video, md, kwargs, backend)
                    if isinstance(video, str):
                        video, md = self.fetch_videos(video, lambda metadata: indices, backend, show_progress)
                    elif isinstance(video, list):  # frames given as image paths/URLs: already sampled
                        video = torch.stack([self.process_image(image) for image in self.fetch_images(video)], dim=0)
                    elif sampled:
                        video, md.frames_indices = video[indices], indices.tolist()
                frames.append(self._checked_frames(video, flat[i], i, kwargs))
                out_metadata.append(md)
        kwargs.pop("do_sample_frames", None)
        return super().preprocess(frames, video_metadata=out_metadata, do_sample_frames=False, **kwargs)

    def _checked_frames(self, video, original, index: int, kwargs: dict) -> torch.Tensor:
        """One video as a channels-first tensor after the checks every input gets: finite pixel values, and float
        frames already in [0, 1] brought back to [0, 255] so that the usual rescale does not divide twice."""
        source = display_name(original, index)
        layout = kwargs.get("input_data_format") or channel_format(video, source)
        tensor = torch.from_numpy(np.ascontiguousarray(video)) if isinstance(video, np.ndarray) else video
        if layout == ChannelDimension.LAST:
            tensor = tensor.permute(0, 3, 1, 2).contiguous()
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise InvalidVideoError(
                    f"Video {source} has {bad} non-finite pixel values (NaN or Inf) in {tensor.shape[0]} frames; they "
                    "would make every logit NaN. Fix or drop those frames."
                )
            if self.setting(kwargs, "do_rescale") and tensor.numel() and 0 <= tensor.min() and tensor.max() <= 1:
                tensor = tensor * 255.0
        return tensor

    def _prepare_input_videos(self, videos, input_data_format=None, **kwargs):
        """`preprocess` gives channels-first tensors (see `_checked_frames`); only RGB conversion (transformers >=
        5.23 passes `do_convert_rgb` here, older releases do not) and device remain."""
        return super()._prepare_input_videos(videos, input_data_format=ChannelDimension.FIRST, **kwargs)


def _is_full_video(count: int, md: VideoMetadata | None) -> bool:
    """Frames given with metadata describing exactly these frames (a whole decoded video), so they can be sampled."""
    return md is not None and md.fps is not None and md.total_num_frames == count


def presampled_metadata(count: int, md: VideoMetadata | None, assumed_fps: float | None) -> VideoMetadata:
    """Metadata for frames that are already sampled: keep what the caller said, fill in what is missing."""
    md = VideoNSAVideoMetadata(total_num_frames=count) if md is None else md
    if md.fps is None:
        # frames without a rate: taken as sampled at the requested fps, so that M-RoPE's time axis is right
        md.fps = float(assumed_fps) if assumed_fps else DEFAULT_FPS
        md.total_num_frames = count
        md.frames_indices = list(range(count))
        md.duration = count / md.fps
    elif md.frames_indices is None or len(md.frames_indices) != count:
        if md.total_num_frames is None or md.total_num_frames == count:
            md.total_num_frames = count
            md.frames_indices = list(range(count))
        else:  # spread evenly over the video the metadata describes
            md.frames_indices = np.linspace(0, md.total_num_frames - 1, count).round().astype(int).tolist()
    return md


def metadata_per_video(videos: list, video_metadata) -> list:
    """One `VideoNSAVideoMetadata` copy (or None) per video; files get theirs when they are probed."""
    if video_metadata is None:
        return [None] * len(videos)
    if isinstance(video_metadata, (dict, VideoMetadata)):
        video_metadata = [video_metadata]
    flat = []
    for item in video_metadata:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    if len(flat) != len(videos):
        raise ValueError(
            f"Received {len(videos)} videos but {len(flat)} `video_metadata` entries; pass one per video."
        )
    result = []
    known_fields = VideoNSAVideoMetadata.__dataclass_fields__
    for item in flat:
        if item is None:
            result.append(None)
            continue
        known = {k: item[k] for k in item if k in known_fields}
        known.setdefault("total_num_frames", None)
        if isinstance(known.get("frames_indices"), torch.Tensor):
            known["frames_indices"] = known["frames_indices"].tolist()
        result.append(VideoNSAVideoMetadata(**known))
    return result


def convert_per_video_fps(videos, kwargs: dict) -> dict:
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
    flat = flatten_videos(videos)
    for rate in per_video:
        _check_number("fps", rate, 0, integer=False, exclusive=True)
    per_video = [float(x) for x in per_video]
    if len(per_video) == 1 and len(flat) > 1:
        per_video = per_video * len(flat)
    if len(per_video) != len(flat):
        raise ValueError(f"Got {len(per_video)} `fps` values for {len(flat)} videos; pass one per video.")
    target = kwargs["videos_kwargs"] if in_videos_kwargs else kwargs
    if kwargs.get("video_metadata") is None and target.get("video_metadata") is None:
        metadata = []
        for video, rate in zip(flat, per_video):
            count = len(video) if not isinstance(video, str) else None
            entry = {"fps": rate, "total_num_frames": count}
            if count is not None:
                entry["frames_indices"] = list(range(count))
            metadata.append(entry)
        target["video_metadata"] = metadata
    target.setdefault("do_sample_frames", False)
    return kwargs


VideoNSAVideoProcessor.register_for_auto_class("AutoVideoProcessor")
