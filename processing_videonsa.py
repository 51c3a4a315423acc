"""Processor for VideoNSA (Qwen2.5-VL-7B with Native Sparse Attention on video tokens, arXiv 2510.02295).

VideoNSA runs NSA over the video tokens with blocks of `nsa_block_size` (64) tokens. At the released resolution
(at most 50,176 pixels per frame: 224 x 224 -> 16 x 16 patches of 14 -> 8 x 8 = 64 merged tokens per temporal patch of
2 frames) one temporal patch is exactly one NSA block, so the compression branch averages one frame step and the
selection branch picks whole frame steps. Training sampled videos at 4 fps with a 36K-token context; the model scales
to 128K tokens.

[`VideoNSAProcessor`] is transformers' Qwen2.5-VL processor with the video processor of `video_processing_videonsa`
([`VideoNSAVideoProcessor`]), plus, before anything is decoded, the context budget (`max_context_tokens`, default
131072: raise, or lower fps with `reduce_fps_to_fit=True`) and the NSA block alignment advice, both from the video
processor's `plan()`; the Qwen2.5-VL chat template; and qwen-vl-utils' outputs (per-video `fps` lists).
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import warnings

from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
from transformers.image_utils import get_image_size, load_image
from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize
from transformers.utils import is_decord_available, is_torchcodec_available  # noqa: F401 - re-exported for tests
from transformers.utils.hub import cached_file

# The video processor's public names are this module's too (where they lived before the split).
try:  # imported by transformers' remote-code loader, as part of a package ...
    from .video_processing_videonsa import *  # noqa: F403
except ImportError:  # ... or from a source checkout on sys.path
    from video_processing_videonsa import *  # noqa: F403

__all__ = [
    "VideoNSAProcessor",
    "ContextBudgetExceededError",
    "NSABlockAlignmentWarning",
    "FpsReducedWarning",
    "DEFAULT_MAX_CONTEXT_TOKENS",
    *sys.modules[VideoNSAVideoProcessor.__module__].__all__,  # noqa: F405
]

DEFAULT_MAX_CONTEXT_TOKENS = 131072  # 128K

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


class ContextBudgetExceededError(ValueError):
    """The prompt (text, images and videos) would need more tokens than `max_context_tokens`."""


class NSABlockAlignmentWarning(UserWarning):
    """A requested resolution makes temporal patches straddle VideoNSA's NSA blocks."""


class FpsReducedWarning(UserWarning):
    """`reduce_fps_to_fit=True` lowered the sampling rate so that the prompt fits the context."""


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise InvalidVideoArgumentError(f"`{name}` must be a positive integer, got {value!r}.")
    if value <= 0:
        raise InvalidVideoArgumentError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def _flat_images(images) -> list:
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flat_images(item)]
    if hasattr(images, "ndim") and images.ndim == 4:
        return list(images)
    return [images]


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
        self.max_context_tokens = _positive_int("max_context_tokens", max_context_tokens)
        self.reduce_fps_to_fit = bool(reduce_fps_to_fit)
        self.nsa_block_size = _positive_int("nsa_block_size", nsa_block_size or DEFAULT_NSA_BLOCK_SIZE)
        self._alignment_warned = False
        template = CHAT_TEMPLATE if chat_template is None else chat_template
        super().__init__(image_processor, tokenizer, video_processor, chat_template=template, **kwargs)

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
    def _load_video_processor(cls, pretrained_model_name_or_path, **kwargs):
        """Always [`VideoNSAVideoProcessor`] (not `AutoVideoProcessor`, which would ask for `trust_remote_code` to
        find this class), so `VideoNSAProcessor.from_pretrained` needs no remote code once this file is imported and
        `AutoProcessor(..., trust_remote_code=True)` gets the classes of the same files."""
        return VideoNSAVideoProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """transformers < 5.25: the image processor and tokenizer load as transformers loads them, the video processor
        as [`VideoNSAVideoProcessor`]."""
        from transformers import AutoImageProcessor

        subfolder = kwargs.pop("subfolder", "")
        given = kwargs.pop("video_processor", None)  # not a tokenizer or image processor setting
        loaders = {
            "image_processor": lambda: AutoImageProcessor.from_pretrained(
                pretrained_model_name_or_path, subfolder=subfolder, **kwargs
            ),
            "tokenizer": lambda: cls._load_tokenizer_from_pretrained(
                "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
            ),
            "video_processor": lambda: given
            if given is not None
            else cls._load_video_processor(pretrained_model_name_or_path, subfolder=subfolder, **kwargs),
        }
        return [loaders[name]() for name in cls.get_attributes()]

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
        """transformers >= 5.25 (replaces `_get_arguments_from_pretrained`): the video processor (the one given, or
        [`VideoNSAVideoProcessor`] loaded from the folder) goes into `processor_dict` as an object, which transformers
        keeps; the image processor and tokenizer load as transformers loads them. Returns `(processor_dict, kwargs
        left for the processor)`."""
        # Popped, not passed on: transformers would hand a `video_processor=` kwarg to the tokenizer, which loads first
        # and would keep it in its init kwargs (then `save_pretrained` fails to serialise it).
        video_processor = kwargs.pop("video_processor", None)
        used = set()
        if video_processor is None:
            video_processor, unused = cls._load_video_processor(
                pretrained_model_name_or_path, **{**kwargs, "return_unused_kwargs": True}
            )
            used = set(kwargs) - set(unused) - set(inspect.signature(cls.__init__).parameters)
        processor_dict = {**processor_dict, "video_processor": video_processor}
        processor_dict, kwargs = super()._resolve_subprocessors(pretrained_model_name_or_path, processor_dict, **kwargs)
        # as transformers does for the sub-processors it loads: what the video processor used is not the processor's
        return processor_dict, {key: value for key, value in kwargs.items() if key not in used}

    # ------------------------------------------------------------------ calling

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Qwen2.5-VL's processing, after the budget and the alignment advice were computed from each video's plan
        (and fps lowered, when `reduce_fps_to_fit` allows). URLs are downloaded once, for planning and decoding."""
        limit = kwargs.pop("max_context_tokens", None)
        limit = self.max_context_tokens if limit is None else _positive_int("max_context_tokens", limit)
        reduce_fps = kwargs.pop("reduce_fps_to_fit", None)
        reduce_fps = self.reduce_fps_to_fit if reduce_fps is None else bool(reduce_fps)
        if videos is None:
            return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        kwargs = convert_per_video_fps(videos, kwargs)
        with local_copies(flatten_videos(videos)) as local:
            fps = self.fit_to_context(
                local, images=images, text=text, max_context_tokens=limit, reduce_fps_to_fit=reduce_fps, **kwargs
            )
            if fps is not None:
                nested = kwargs.get("videos_kwargs")
                if isinstance(nested, dict) and "fps" in nested:
                    kwargs["videos_kwargs"] = dict(nested, fps=fps)
                else:
                    kwargs["fps"] = fps
            return super().__call__(images=images, text=text, videos=local, audio=audio, **kwargs)

    def plan_videos(self, videos, **kwargs) -> list[VideoPlan]:
        """What each video becomes at these settings (frames, timestamps, grid, tokens), from metadata only."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("max_context_tokens", "reduce_fps_to_fit")}
        return self.video_processor.plan(videos, **kwargs)

    # ------------------------------------------------------------------ budget and alignment

    def fit_to_context(
        self, videos, images=None, text=None, max_context_tokens=None, reduce_fps_to_fit=False, **kwargs
    ) -> float | None:
        """Check a call against the context budget and warn about NSA block alignment, before decoding.

        Returns the fps to sample at instead of the requested one (`reduce_fps_to_fit=True` and too long), or None.
        Raises [`ContextBudgetExceededError`] when the prompt does not fit."""
        limit = max_context_tokens or self.max_context_tokens
        # the kwargs class given explicitly, as ProcessorMixin.__call__ does: transformers < 5.23 requires it
        merged = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        videos_kwargs = merged["videos_kwargs"]
        vp = self.video_processor

        def plans_at(fps=None):
            call = videos_kwargs if fps is None else dict(videos_kwargs, fps=fps)
            return vp.plan(videos, **call)

        layout = self._prompt_layout(text, self._image_tokens(images, merged["images_kwargs"]), len(videos))

        def worst(plans):
            return max(self._prompt_totals(layout, plans), key=lambda item: item[0])

        plans = plans_at()
        fitted = None
        if worst(plans)[0] > limit:
            fps_fit = self._highest_fitting_fps(plans_at, worst, videos_kwargs, limit)
            if not (reduce_fps_to_fit and fps_fit is not None):
                message = self._budget_message(worst(plans), plans, videos_kwargs, limit, fps_fit)
                raise ContextBudgetExceededError(message)
            requested = videos_kwargs.get("fps") if videos_kwargs.get("fps") is not None else vp.fps
            new_plans = plans_at(fps_fit)
            effective = ", ".join(
                f"video {i}: {plan.num_frames} frames ({plan.sampled_fps:.3g} fps after rounding to temporal patches)"
                for i, plan in enumerate(new_plans)
                if plan.sampled and plan.sampled_fps
            )
            warnings.warn(
                f"The prompt would be {worst(plans)[0]:,} tokens at {requested:g} fps, above max_context_tokens="
                f"{limit:,}: reduce_fps_to_fit=True lowered the sampling rate to fps={fps_fit:g} ({effective}); the "
                f"prompt is now {worst(new_plans)[0]:,} tokens.",
                FpsReducedWarning,
                stacklevel=3,
            )
            plans, fitted = new_plans, fps_fit
        self._check_alignment(plans, videos_kwargs)
        return fitted

    def _image_tokens(self, images, images_kwargs: dict) -> list[int]:
        """Tokens of each image, from its size (Qwen2-VL's resize rule), in order."""
        if images is None:
            return []
        ip = self.image_processor
        size = images_kwargs.get("size") or ip.size
        bounds = {
            "min_pixels": images_kwargs.get("min_pixels") or size["shortest_edge"],
            "max_pixels": images_kwargs.get("max_pixels") or size["longest_edge"],
            "patch_size": images_kwargs.get("patch_size") or ip.patch_size,
            "merge_size": images_kwargs.get("merge_size") or ip.merge_size,
        }
        counts = []
        for image in _flat_images(images):
            if isinstance(image, str):
                image = load_image(image)
            height, width = (image.height, image.width) if hasattr(image, "height") else get_image_size(image)
            counts.append(ip.get_number_of_image_patches(height, width, bounds) // bounds["merge_size"] ** 2)
        return counts

    def _prompt_layout(self, text, image_tokens: list[int], num_videos: int):
        """Per prompt: (text and image tokens, video indices), in placeholder order."""
        if text is None:
            return [(sum(image_tokens), list(range(num_videos)))]
        layout, next_image, next_video = [], 0, 0
        for sample in [text] if isinstance(text, str) else list(text):
            n_images = sample.count(self.image_token)
            n_videos = sample.count(self.video_token)
            n_text = len(self.tokenizer(sample)["input_ids"]) - n_images - n_videos
            fixed = n_text + sum(image_tokens[next_image : next_image + n_images])
            layout.append((fixed, list(range(next_video, min(next_video + n_videos, num_videos)))))
            next_image += n_images
            next_video += n_videos
        return layout

    @staticmethod
    def _prompt_totals(layout, plans):
        """Per prompt: (total tokens, text and image tokens, video indices)."""
        return [(fixed + sum(plans[i].num_tokens for i in ids), fixed, ids) for fixed, ids in layout]

    def _highest_fitting_fps(self, plans_at, worst, videos_kwargs: dict, limit: int) -> float | None:
        """The highest fps (rounded down to a few decimals) at which every prompt fits, or None."""
        if videos_kwargs.get("num_frames") is not None:
            return None
        requested = videos_kwargs.get("fps") if videos_kwargs.get("fps") is not None else self.video_processor.fps
        if requested is None:
            return None

        def fits(rate):
            return worst(plans_at(rate))[0] <= limit

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

    def _budget_message(self, worst, plans, videos_kwargs, limit, fps_fit) -> str:
        total, fixed, video_ids = worst
        vp = self.video_processor
        fps = videos_kwargs.get("fps") if videos_kwargs.get("fps") is not None else vp.fps
        _, max_pixels = vp.pixel_bounds(videos_kwargs)
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
        fps_text = "n/a" if fps is None else f"{fps:g}"
        knobs = [
            f"lower `fps` (now {fps_text}" + (f"; {fps_fit:g} fits" if fps_fit is not None else "") + ")",
            f"cap frames with `max_frames` (now {videos_kwargs.get('max_frames') or vp.max_frames or 'no cap'}) or "
            "`num_frames`",
            f"lower the pixels per frame with `max_pixels` / size['longest_edge'] (now {max_pixels:,})",
            f"raise `max_context_tokens` (now {limit:,}) if the model and memory allow",
        ]
        if fps_fit is not None:
            knobs.append("or pass `reduce_fps_to_fit=True` to let the processor lower fps for you")
        else:
            knobs.append("(lowering fps alone cannot fit this prompt: the frame count is at its minimum)")
        return "\n".join(lines) + "\nTo fit: " + "; ".join(knobs) + "."

    def _check_alignment(self, plans: list[VideoPlan], videos_kwargs: dict):
        vp = self.video_processor
        block = self.nsa_block_size
        patch_size = vp.setting(videos_kwargs, "patch_size")
        merge_size = vp.setting(videos_kwargs, "merge_size")
        temporal_patch_size = vp.setting(videos_kwargs, "temporal_patch_size")
        aligned_pixels = block * (patch_size * merge_size) ** 2
        bounds = vp.pixel_bounds(videos_kwargs)
        max_pixels = bounds[1]
        if max_pixels == aligned_pixels or self._alignment_warned:
            # the default resolution: a frame step is one block (224x224) or fits in one (other aspect ratios)
            return
        for plan in plans:
            per_patch = plan.tokens_per_temporal_patch
            if per_patch == 0 or per_patch % block == 0 or block % per_patch == 0:
                continue
            side = math.isqrt(block)
            suggestion = _aligned_max_pixels(plan, block, patch_size, merge_size, bounds)
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
                stacklevel=4,
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
