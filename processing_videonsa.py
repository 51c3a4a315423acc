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
import re
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
from transformers.image_utils import get_image_size, load_image
from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize
from transformers.utils import is_decord_available, is_torchcodec_available  # noqa: F401 - re-exported for tests
from transformers.utils.hub import cached_file, convert_file_size_to_int
from transformers.video_utils import VideoMetadata

# The video processor's public names are this module's too (where they lived before the split).
try:  # imported by transformers' remote-code loader, as part of a package ...
    from .video_processing_videonsa import *  # noqa: F403
    from .video_processing_videonsa import MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
except ImportError:  # ... or from a source checkout on sys.path
    from video_processing_videonsa import *  # noqa: F403
    from video_processing_videonsa import MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE

__all__ = [
    "VideoNSAProcessor",
    "ContextBudgetExceededError",
    "NSABlockAlignmentWarning",
    "FpsReducedWarning",
    "DEFAULT_MAX_CONTEXT_TOKENS",
    "MemoryBudgetError",
    "MemoryPlan",
    "WEIGHT_FORMATS",
    "DEFAULT_ANSWER_TOKENS",
    "estimate_prefill_memory",
    "max_prompt_tokens",
    "prefill_memory_terms",
    "parameter_counts",
    "weight_bytes",
    "kv_cache_bytes_per_token",
    "parse_max_memory",
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


# ---------------------------------------------------------------------------------------------------- memory planning

WEIGHT_FORMATS = ("bf16", "fp8", "int8", "nf4")
DEFAULT_ANSWER_TOKENS = 1024
# The prefill's working set beyond the weights and the KV cache, for a pass in pieces (prefill_chunk_tokens 4096-8192)
# with the pixels left on the CPU: WORK_HIDDEN_VECTORS_PER_TOKEN bf16 vectors of hidden_size per prompt token, plus
# FIXED_OVERHEAD_BYTES (CUDA context, pieces' workspaces, allocator). Fitted on H200, 2026-12-03, to peaks of 7B
# prefills of 64K-320K tokens in bf16, int8 and nf4 (docs/benchmarks.md, "Memory planner calibration"): the estimate
# lies within 0.7 GB above each.
WORK_HIDDEN_VECTORS_PER_TOKEN = 6
FIXED_OVERHEAD_BYTES = 1 * 2**30
_BF16 = 2  # bytes per value: weights that stay unquantized, the KV cache and activations
_GIB = 2**30
# Quantized formats of the text decoder's q/k/v/o and MLP projections: (bytes per weight as a fraction, scale bytes
# of one (out_features, in_features) matrix). The scales are approximate (each library's defaults):
#   fp8:  transformers' fine-grained FP8, one float32 scale per 128 x 128 block;
#   int8: bitsandbytes LLM.int8(), one float32 scale per output row (outlier buffers not counted);
#   nf4:  bitsandbytes 4-bit, one float32 absmax per 64 weights (no double quantization).
_QUANTIZED = {
    "fp8": ((1, 1), lambda out, inp: 4 * -(-out // 128) * -(-inp // 128)),
    "int8": ((1, 1), lambda out, inp: 4 * out),
    "nf4": ((1, 2), lambda out, inp: 4 * -(-out * inp // 64)),
}


class MemoryBudgetError(ValueError):
    """A memory planning input is wrong: `max_memory`, `weights`, `answer_tokens` or the model config."""


@dataclass(frozen=True)
class _Architecture:
    """The sizes of a VideoNSA (Qwen2.5-VL) model that its memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_out: int
    vision_in_channels: int
    vision_patch: int
    vision_temporal_patch: int
    vision_merge: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads  # as Qwen2.5-VL's attention computes it (no `head_dim` key)

    def decoder_matrices(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of one decoder layer's q/k/v/o and MLP projections: the quantizable ones."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def _config_dict(model_config) -> dict:
    if hasattr(model_config, "to_dict"):
        model_config = model_config.to_dict()
    if not isinstance(model_config, dict):
        raise MemoryBudgetError(
            f"`model_config` must be the model's config (a PretrainedConfig) or its config.json as a dict, got "
            f"{type(model_config).__name__}."
        )
    return model_config


def _architecture(model_config) -> _Architecture:
    """The sizes from a Qwen2.5-VL / VideoNSA config: text keys in `text_config` (transformers 5) or at the top level
    (the Hub's Qwen2.5-VL config.json), vision keys in `vision_config`."""
    config = _config_dict(model_config)
    text_section = config.get("text_config") or {}
    if hasattr(text_section, "to_dict"):
        text_section = text_section.to_dict()
    text = {**config, **text_section}
    vision = config.get("vision_config") or {}
    if hasattr(vision, "to_dict"):
        vision = vision.to_dict()

    def size(section: dict, where: str, *keys, default=None) -> int:
        for key in keys:
            value = section.get(key)
            if value is not None:
                break
        else:
            if default is not None:
                return default
            raise MemoryBudgetError(
                f"The model config has no `{keys[0]}` ({where}), needed to estimate memory: pass the model's "
                "config.json (as a dict) or its config object as `model_config`."
            )
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise MemoryBudgetError(
                f"The model config's `{keys[0]}` ({where}) must be a positive integer, got {value!r}."
            )
        return value

    in_text = "looked in text_config and at the top level"
    heads = size(text, in_text, "num_attention_heads")
    hidden = size(text, in_text, "hidden_size")
    if hidden % heads:
        raise MemoryBudgetError(
            f"The model config's hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})."
        )
    if not vision:
        raise MemoryBudgetError(
            "The model config has no `vision_config`, needed to count the vision tower's weights: pass the model's "
            "whole config.json (as a dict) or its config object as `model_config`."
        )
    return _Architecture(
        hidden=hidden,
        intermediate=size(text, in_text, "intermediate_size"),
        layers=size(text, in_text, "num_hidden_layers"),
        heads=heads,
        kv_heads=size(text, in_text, "num_key_value_heads", default=heads),
        vocab=size(text, in_text, "vocab_size"),
        # transformers reads it at the top level; configs saved before v5 kept it in text_config
        tied_embeddings=bool(config.get("tie_word_embeddings") or text_section.get("tie_word_embeddings")),
        vision_depth=size(vision, "vision_config", "depth", "num_hidden_layers"),
        vision_hidden=size(vision, "vision_config", "hidden_size", "embed_dim"),
        vision_intermediate=size(vision, "vision_config", "intermediate_size"),
        vision_out=size(vision, "vision_config", "out_hidden_size", default=hidden),
        vision_in_channels=size(vision, "vision_config", "in_channels", "in_chans", default=3),
        vision_patch=size(vision, "vision_config", "patch_size", default=PATCH_SIZE),
        vision_temporal_patch=size(vision, "vision_config", "temporal_patch_size", default=TEMPORAL_PATCH_SIZE),
        vision_merge=size(vision, "vision_config", "spatial_merge_size", default=MERGE_SIZE),
    )


def parameter_counts(model_config) -> dict[str, int]:
    """Parameters of the model a config describes, by group: `embeddings`, `lm_head` (0 when tied),
    `decoder_projections` (q/k/v/o and MLP weight matrices of the text decoder: what the quantized formats
    quantize), `decoder_other` (their biases and the RMS norms), `nsa_gates` (VideoNSA's gate MLP per layer:
    `g_proj_1` hidden -> hidden and `g_proj_2` hidden -> 3 * heads, with biases) and `vision` (the vision tower and its
    patch merger)."""
    a = _architecture(model_config)
    h, q, kv = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim
    vh, vi, merged = a.vision_hidden, a.vision_intermediate, a.vision_hidden * a.vision_merge**2
    vision_block = (
        2 * vh  # norm1, norm2
        + vh * 3 * vh + 3 * vh + vh * vh + vh  # qkv, proj (with biases)
        + 2 * (vh * vi + vi) + vi * vh + vh  # gate, up, down (with biases)
    )
    return {
        "embeddings": a.vocab * h,
        "lm_head": 0 if a.tied_embeddings else a.vocab * h,
        "decoder_projections": a.layers * sum(out * inp for out, inp in a.decoder_matrices()),
        "decoder_other": a.layers * (q + 2 * kv + 2 * h) + h,  # q/k/v biases, two norms per layer; the final norm
        "nsa_gates": a.layers * (h * h + h + h * 3 * a.heads + 3 * a.heads),
        "vision": (
            a.vision_in_channels * a.vision_temporal_patch * a.vision_patch**2 * vh  # patch embedding, no bias
            + a.vision_depth * vision_block
            + vh + merged * merged + merged + merged * a.vision_out + a.vision_out  # merger: norm, two linears
        ),
    }


def _check_weights(weights) -> str:
    if weights not in WEIGHT_FORMATS:
        raise MemoryBudgetError(f"`weights` must be one of {', '.join(map(repr, WEIGHT_FORMATS))}, got {weights!r}.")
    return weights


def weight_bytes(model_config, weights: str = "bf16") -> int:
    """Bytes of the model's weights in a format: `"bf16"`, or `"fp8"` / `"int8"` / `"nf4"` for the text decoder's
    q/k/v/o and MLP projections (scales counted approximately; the vision tower, embeddings, lm_head, norms, biases
    and gate MLPs stay bf16)."""
    counts = parameter_counts(model_config)
    if _check_weights(weights) == "bf16":
        return _BF16 * sum(counts.values())
    (num, den), scale_bytes = _QUANTIZED[weights]
    a = _architecture(model_config)
    quantized = a.layers * sum(-(-out * inp * num // den) + scale_bytes(out, inp) for out, inp in a.decoder_matrices())
    return _BF16 * (sum(counts.values()) - counts["decoder_projections"]) + quantized


def kv_cache_bytes_per_token(model_config) -> int:
    """Keys and values of every layer for one token, in bf16: 2 * layers * kv_heads * head_dim * 2 bytes."""
    a = _architecture(model_config)
    return 2 * a.layers * a.kv_heads * a.head_dim * _BF16


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MemoryBudgetError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return value


def prefill_memory_terms(
    num_tokens: int, model_config, weights: str = "bf16", answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    batch_size: int = 1,
) -> dict[str, int]:
    """The terms of [`estimate_prefill_memory`], in bytes: `weights`, `kv_cache` (prompt and answer tokens),
    `working_set` (the prefill's activations) and `fixed_overhead`."""
    num_tokens = _non_negative_int("num_tokens", num_tokens)
    answer_tokens = _non_negative_int("answer_tokens", answer_tokens)
    if _non_negative_int("batch_size", batch_size) == 0:
        raise MemoryBudgetError("`batch_size` must be at least 1, got 0.")
    a = _architecture(model_config)
    return {
        "weights": weight_bytes(model_config, weights),
        "kv_cache": batch_size * (num_tokens + answer_tokens) * kv_cache_bytes_per_token(model_config),
        "working_set": batch_size * num_tokens * WORK_HIDDEN_VECTORS_PER_TOKEN * a.hidden * _BF16,
        "fixed_overhead": FIXED_OVERHEAD_BYTES,
    }


def estimate_prefill_memory(
    num_tokens: int, model_config, weights: str = "bf16", answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    batch_size: int = 1,
) -> int:
    """Estimated peak GPU memory, in bytes, of a prefill of `num_tokens` prompt tokens per sequence (`batch_size`
    sequences padded to that length) followed by `answer_tokens` generated tokens: the weights in `weights` format,
    the bf16 KV cache of prompt and answer, the prefill's working set and a fixed overhead."""
    return sum(prefill_memory_terms(num_tokens, model_config, weights, answer_tokens, batch_size).values())


def max_prompt_tokens(
    max_memory, model_config, weights: str = "bf16", answer_tokens: int = DEFAULT_ANSWER_TOKENS, batch_size: int = 1
) -> int:
    """The inverse of [`estimate_prefill_memory`]: the largest prompt, in tokens per sequence, whose estimate is at
    most `max_memory` (bytes, a string like `"24GB"` / `"80GiB"`, or `"auto"`); 0 when not even an empty prompt fits."""
    memory = parse_max_memory(max_memory)
    terms = prefill_memory_terms(0, model_config, weights, answer_tokens, batch_size)
    a = _architecture(model_config)
    per_token = batch_size * (kv_cache_bytes_per_token(model_config) + WORK_HIDDEN_VECTORS_PER_TOKEN * a.hidden * _BF16)
    return max(0, (memory - sum(terms.values())) // per_token)


def parse_max_memory(max_memory) -> int:
    """Bytes from an int, a string with a unit (`"24GB"` = 24 * 10**9, `"80GiB"` = 80 * 2**30; KB, MB, KiB, MiB too,
    as transformers' `convert_file_size_to_int` reads them) or `"auto"` (the total memory of the current CUDA
    device)."""
    if isinstance(max_memory, str) and max_memory.strip().lower() == "auto":
        import torch

        if not torch.cuda.is_available():
            raise MemoryBudgetError(
                "max_memory='auto' reads the total memory of the current CUDA device, but CUDA is not available: "
                "give the memory as a number of bytes or a string like '24GB' or '80GiB'."
            )
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    accepted = "an integer number of bytes, a string like '24GB' (10**9 bytes) or '80GiB' (2**30 bytes), or 'auto'"
    if isinstance(max_memory, str):
        text = max_memory.strip()
        if re.fullmatch(r"\d+\s*[KMGkmg]b", text):
            raise MemoryBudgetError(
                f"max_memory={max_memory!r}: a lowercase 'b' means bits in transformers' size strings; write "
                f"{text[:-2] + text[-2].upper() + 'B'!r} for bytes."
            )
        try:
            memory = convert_file_size_to_int(text)
        except ValueError:
            raise MemoryBudgetError(
                f"max_memory={max_memory!r} is not a memory size: expected {accepted} (units KB, MB, GB, KiB, MiB, "
                "GiB, after a whole number)."
            ) from None
    elif isinstance(max_memory, int) and not isinstance(max_memory, bool):
        memory = max_memory
    else:
        raise MemoryBudgetError(f"max_memory must be {accepted}, got {type(max_memory).__name__} {max_memory!r}.")
    if memory <= 0:
        raise MemoryBudgetError(f"max_memory must be positive, got {max_memory!r}.")
    return memory


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / _GIB:,.2f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    """What [`VideoNSAProcessor.memory_plan`] found, for the longest prompt of a call (`batch_size` prompts padded to
    its length).

    Attributes:
        max_memory: the memory, in bytes (None: no memory limit, only `max_context_tokens`).
        weights: the weight format of the estimate.
        num_tokens: prompt tokens at the requested settings.
        estimated_bytes: the estimated peak memory of the prefill and answer at the requested settings.
        terms: its terms in bytes (`weights`, `kv_cache`, `working_set`, `fixed_overhead`).
        max_prompt_tokens: the largest prompt that fits both `max_memory` and `max_context_tokens`.
        fits: whether `num_tokens <= max_prompt_tokens`.
        requested_fps: the fps asked for (None when frames are not sampled by fps, e.g. `num_frames`).
        frames: frames of each video at the requested settings.
        fitting_fps: the requested fps when it fits, else the highest fps that fits; None when none does (or frames
            are not sampled by fps).
        frames_at_fitting_fps: frames of each video at `fitting_fps` (None with it).
        batch_size: the number of prompts.
    """

    max_memory: int | None
    weights: str
    num_tokens: int
    estimated_bytes: int
    terms: dict
    max_prompt_tokens: int
    fits: bool
    requested_fps: float | None
    frames: list
    fitting_fps: float | None
    frames_at_fitting_fps: list | None
    batch_size: int = 1


@dataclass(frozen=True)
class _Budget:
    """The limits of one call: `max_context_tokens`, and the memory (bytes, as given) with what its estimate needs."""

    context_tokens: int
    memory: int | None = None
    memory_given: object = None
    weights: str = "bf16"
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    model_config: dict | None = None

    def memory_tokens(self, batch_size: int) -> int | None:
        if self.memory is None:
            return None
        return max_prompt_tokens(self.memory, self.model_config, self.weights, self.answer_tokens, batch_size)

    def tokens(self, batch_size: int) -> int:
        memory_tokens = self.memory_tokens(batch_size)
        return self.context_tokens if memory_tokens is None else min(self.context_tokens, memory_tokens)

    def memory_binds(self, batch_size: int) -> bool:
        memory_tokens = self.memory_tokens(batch_size)
        return memory_tokens is not None and memory_tokens < self.context_tokens

    def estimate(self, num_tokens: int, batch_size: int, weights: str | None = None) -> dict[str, int]:
        return prefill_memory_terms(
            num_tokens, self.model_config, weights or self.weights, self.answer_tokens, batch_size
        )

    def limit_text(self, batch_size: int) -> str:
        """What a prompt is above, in words: `max_context_tokens=...`, or the tokens that fit in the memory."""
        if not self.memory_binds(batch_size):
            return f"max_context_tokens={self.context_tokens:,}"
        batch = f" for a batch of {batch_size} prompts" if batch_size > 1 else ""
        return (
            f"the {self.memory_tokens(batch_size):,} prompt tokens that fit in max_memory={self.memory_given!r} "
            f"({_gib(self.memory)}) with {self.weights} weights{batch}"
        )

    def estimate_text(self, num_tokens: int, batch_size: int) -> str:
        """The estimate at `num_tokens` and its terms, in words."""
        terms = self.estimate(num_tokens, batch_size)
        return (
            f"By the estimate, {num_tokens:,} tokens need {_gib(sum(terms.values()))}: weights "
            f"{_gib(terms['weights'])}, KV cache {_gib(terms['kv_cache'])} (prompt and {self.answer_tokens:,} answer "
            f"tokens), working set {_gib(terms['working_set'])}, fixed overhead {_gib(terms['fixed_overhead'])}; "
            f"max_context_tokens={self.context_tokens:,} is not the limit here."
        )

    def memory_knobs(self, num_tokens: int, batch_size: int) -> list[str]:
        """The memory knobs, with what each would allow."""
        smaller = [
            f"`weights={fmt!r}` fits "
            f"{max_prompt_tokens(self.memory, self.model_config, fmt, self.answer_tokens, batch_size):,} tokens"
            for fmt in WEIGHT_FORMATS[WEIGHT_FORMATS.index(self.weights) + 1 :]
        ]
        knobs = []
        if smaller:
            knobs.append(f"a quantized weight format ({'; '.join(smaller)})")
        needed = sum(self.estimate(num_tokens, batch_size).values())
        knobs.append(f"a larger `max_memory` (now {self.memory_given!r}; this prompt needs about {_gib(needed)})")
        return knobs


# The per-call knobs of the budget, popped from `__call__`'s kwargs.
_BUDGET_KNOBS = ("max_context_tokens", "max_memory", "weights", "answer_tokens")
# `from_pretrained` kwargs that are this processor's settings: never handed to the tokenizer (which would keep them
# in its init kwargs and save them) or the image and video processors.
_OWN_KWARGS = (*_BUDGET_KNOBS, "reduce_fps_to_fit", "nsa_block_size", "model_config")
_NO_MODEL_CONFIG = (
    "Memory planning needs the model's architecture: pass `model_config=` (the model's config, or its config.json "
    "as a dict) or load the processor with `from_pretrained` from the model's repository or folder (it reads the "
    "config.json beside the processor files)."
)


@dataclass(frozen=True)
class _Fit:
    """A call planned at its requested settings: `plans`, its longest prompt (`num_tokens`), the token `limit` for
    `batch_size` prompts, the highest fps that fits (`fps_fit`, when too long), and how to plan it again."""

    plans: list
    num_tokens: int
    limit: int
    batch_size: int
    fps_fit: float | None
    requested_fps: float | None
    sampled_by_fps: bool
    videos_kwargs: dict
    plans_at: object  # fps -> plans
    worst: object  # plans -> (tokens, text and image tokens, video ids) of the longest prompt


def _videos_from_metadata(videos, kwargs: dict):
    """`VideoMetadata` entries of `videos` as stand-in arrays of their shape (no pixels: a broadcast view of one
    zero), with the metadata as their `video_metadata`, so that planning samples them as the described video."""
    if videos is None:
        return None, kwargs
    entries = list(videos) if isinstance(videos, (list, tuple)) else [videos]
    if not any(isinstance(entry, VideoMetadata) for entry in entries):
        return videos, kwargs
    given = kwargs.get("video_metadata")
    given = list(given) if isinstance(given, (list, tuple)) else [given] * len(entries)
    stand_ins, metadata = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, VideoMetadata):
            stand_ins.append(entry)
            metadata.append(given[i] if i < len(given) else None)
            continue
        missing = [key for key in ("total_num_frames", "fps", "height", "width") if not getattr(entry, key, None)]
        if missing:
            raise MemoryBudgetError(
                f"videos[{i}] is a VideoMetadata without {', '.join(missing)}: a described video needs "
                "total_num_frames, fps, height and width."
            )
        shape = (int(entry.total_num_frames), int(entry.height), int(entry.width), 3)
        stand_ins.append(np.broadcast_to(np.zeros((1, 1, 1, 3), dtype=np.uint8), shape))
        metadata.append({"total_num_frames": shape[0], "fps": float(entry.fps), "height": shape[1], "width": shape[2]})
    return stand_ins, dict(kwargs, video_metadata=metadata)


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
        max_memory (`int` or `str`, *optional*):
            GPU memory the model may use: bytes, a string like `"24GB"` or `"80GiB"`, or `"auto"` (the total memory
            of the current CUDA device, read at each call). The prompt must then also fit the memory estimate of
            [`estimate_prefill_memory`] (weights, KV cache of prompt and answer, prefill working set); the effective
            budget is the smaller of `max_context_tokens` and [`max_prompt_tokens`]. `None` (default): no memory
            planning.
        weights (`str`, *optional*, defaults to `"bf16"`):
            The weight format the memory estimate assumes: `"bf16"`, `"fp8"`, `"int8"` or `"nf4"`.
        answer_tokens (`int`, *optional*, defaults to 1024):
            Generated tokens the memory estimate keeps room for in the KV cache.
        model_config (`PretrainedConfig` or `dict`, *optional*):
            The model's config (or its `config.json` as a dict), for memory planning. `from_pretrained` reads the
            model's `config.json` beside the processor files. Not saved with the processor.

    `max_context_tokens`, `reduce_fps_to_fit`, `max_memory`, `weights` and `answer_tokens` can also be given per call.
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
        max_memory: int | str | None = None,
        weights: str = "bf16",
        answer_tokens: int = DEFAULT_ANSWER_TOKENS,
        model_config=None,
        **kwargs,
    ):
        if image_processor is None:
            image_processor = Qwen2VLImageProcessor(min_pixels=QWEN2_5_VL_MIN_PIXELS, max_pixels=QWEN2_5_VL_MAX_PIXELS)
        if video_processor is None:
            video_processor = VideoNSAVideoProcessor()
        self.max_context_tokens = _positive_int("max_context_tokens", max_context_tokens)
        self.reduce_fps_to_fit = bool(reduce_fps_to_fit)
        self.nsa_block_size = _positive_int("nsa_block_size", nsa_block_size or DEFAULT_NSA_BLOCK_SIZE)
        if max_memory is not None and not (isinstance(max_memory, str) and max_memory.strip().lower() == "auto"):
            parse_max_memory(max_memory)  # checked now; kept as given ("auto" is read at each call)
        self.max_memory = max_memory
        self.weights = _check_weights(weights)
        self.answer_tokens = _non_negative_int("answer_tokens", answer_tokens)
        self.model_config = model_config
        if model_config is not None:
            _architecture(model_config)  # a config given here is checked now; one read from a folder when used
        self._alignment_warned = False
        template = CHAT_TEMPLATE if chat_template is None else chat_template
        super().__init__(image_processor, tokenizer, video_processor, chat_template=template, **kwargs)

    @property
    def model_config(self) -> dict | None:
        """The model's config as a dict (from `config.json` when loaded with `from_pretrained`), or None."""
        return self._model_config

    @model_config.setter
    def model_config(self, value):
        # stored under a private name: `to_dict` saves only `__init__` arguments found in `__dict__`
        self._model_config = None if value is None else _config_dict(value)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model_config = _read_model_config(pretrained_model_name_or_path, kwargs)
        if model_config is not None:
            if kwargs.get("nsa_block_size") is None:
                block_size = _nsa_block_size(model_config)
                if block_size is not None:
                    processor.nsa_block_size = block_size
            if kwargs.get("model_config") is None:
                processor.model_config = model_config
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
        kwargs = {key: value for key, value in kwargs.items() if key not in _OWN_KWARGS}
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
        own = {key: kwargs.pop(key) for key in _OWN_KWARGS if key in kwargs}  # the processor's, for it alone
        used = set()
        if video_processor is None:
            video_processor, unused = cls._load_video_processor(
                pretrained_model_name_or_path, **{**kwargs, "return_unused_kwargs": True}
            )
            used = set(kwargs) - set(unused) - set(inspect.signature(cls.__init__).parameters)
        processor_dict = {**processor_dict, "video_processor": video_processor}
        processor_dict, kwargs = super()._resolve_subprocessors(pretrained_model_name_or_path, processor_dict, **kwargs)
        # as transformers does for the sub-processors it loads: what the video processor used is not the processor's
        return processor_dict, {**{key: value for key, value in kwargs.items() if key not in used}, **own}

    # ------------------------------------------------------------------ calling

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Qwen2.5-VL's processing, after the budget and the alignment advice were computed from each video's plan
        (and fps lowered, when `reduce_fps_to_fit` allows). URLs are downloaded once, for planning and decoding."""
        limits = {name: kwargs.pop(name, None) for name in _BUDGET_KNOBS}
        reduce_fps = kwargs.pop("reduce_fps_to_fit", None)
        reduce_fps = self.reduce_fps_to_fit if reduce_fps is None else bool(reduce_fps)
        budget = self._budget(**limits)  # checked even when there is no video to plan
        if videos is None:
            return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        kwargs = convert_per_video_fps(videos, kwargs)
        with local_copies(flatten_videos(videos)) as local:
            fps = self.fit_to_context(local, images=images, text=text, reduce_fps_to_fit=reduce_fps, budget=budget,
                                      **kwargs)
            if fps is not None:
                nested = kwargs.get("videos_kwargs")
                if isinstance(nested, dict) and "fps" in nested:
                    kwargs["videos_kwargs"] = dict(nested, fps=fps)
                else:
                    kwargs["fps"] = fps
            return super().__call__(images=images, text=text, videos=local, audio=audio, **kwargs)

    def plan_videos(self, videos, **kwargs) -> list[VideoPlan]:
        """What each video becomes at these settings (frames, timestamps, grid, tokens), from metadata only."""
        kwargs = {k: v for k, v in kwargs.items() if k not in (*_BUDGET_KNOBS, "reduce_fps_to_fit")}
        return self.video_processor.plan(videos, **kwargs)

    # ------------------------------------------------------------------ budget and alignment

    def fit_to_context(
        self, videos, images=None, text=None, max_context_tokens=None, reduce_fps_to_fit=False, budget=None, **kwargs
    ) -> float | None:
        """Check a call against the context budget (and the memory budget, when `max_memory` is set) and warn about
        NSA block alignment, before decoding.

        Returns the fps to sample at instead of the requested one (`reduce_fps_to_fit=True` and too long), or None.
        Raises [`ContextBudgetExceededError`] when the prompt does not fit."""
        if budget is None:
            limits = {name: kwargs.pop(name, None) for name in _BUDGET_KNOBS}
            budget = self._budget(**dict(limits, max_context_tokens=max_context_tokens))
        fit = self._fit(videos, images, text, budget, kwargs)
        plans, fitted = fit.plans, None
        if fit.num_tokens > fit.limit:
            if not (reduce_fps_to_fit and fit.fps_fit is not None):
                raise ContextBudgetExceededError(self._budget_message(fit, budget))
            new_plans = fit.plans_at(fit.fps_fit)
            new_tokens = fit.worst(new_plans)[0]
            effective = ", ".join(
                f"video {i}: {plan.num_frames} frames ({plan.sampled_fps:.3g} fps after rounding to temporal patches)"
                for i, plan in enumerate(new_plans)
                if plan.sampled and plan.sampled_fps
            )
            estimate = ""
            if budget.memory_binds(fit.batch_size):
                estimate = " " + budget.estimate_text(new_tokens, fit.batch_size)
            warnings.warn(
                f"The prompt would be {fit.num_tokens:,} tokens at {fit.requested_fps:g} fps, above "
                f"{budget.limit_text(fit.batch_size)}: reduce_fps_to_fit=True lowered the sampling rate to "
                f"fps={fit.fps_fit:g} ({effective}); the prompt is now {new_tokens:,} tokens.{estimate}",
                FpsReducedWarning,
                stacklevel=3,
            )
            plans, fitted = new_plans, fit.fps_fit
        self._check_alignment(plans, fit.videos_kwargs)
        return fitted

    def memory_plan(
        self,
        videos=None,
        text=None,
        images=None,
        *,
        max_memory=None,
        weights=None,
        answer_tokens=None,
        model_config=None,
        max_context_tokens=None,
        **kwargs,
    ) -> MemoryPlan:
        """How many frames fit: the memory estimate of a call and the fps at which it fits, from metadata only.

        Args:
            videos: what `__call__` takes (paths, URLs, arrays, frame lists), or `VideoMetadata` objects with
                `total_num_frames`, `fps`, `height` and `width` (a video described, not given).
            text, images: the prompt(s), counted as `__call__` counts them (without `text`: the videos and images
                alone, as one prompt).
            max_memory, weights, answer_tokens, max_context_tokens: as in the constructor; the processor's values
                when not given.
            model_config: the model's config; the processor's (from `from_pretrained`) when not given.
            kwargs: the video settings of the call (`fps`, `max_pixels`, `max_frames`, ...).

        Returns a [`MemoryPlan`]. Nothing is decoded and nothing raises for a prompt that does not fit."""
        if model_config is None and self.model_config is None:
            raise MemoryBudgetError(_NO_MODEL_CONFIG)
        budget = self._budget(max_context_tokens, max_memory, weights, answer_tokens, model_config=model_config)
        videos, kwargs = _videos_from_metadata(videos, kwargs)
        fit = self._fit(videos, images, text, budget, kwargs)
        fits = fit.num_tokens <= fit.limit
        fitting_fps = fit.requested_fps if fits and fit.sampled_by_fps else fit.fps_fit
        fitting_plans = None if fitting_fps is None else fit.plans_at(fitting_fps)
        terms = budget.estimate(fit.num_tokens, fit.batch_size)
        return MemoryPlan(
            max_memory=budget.memory,
            weights=budget.weights,
            num_tokens=fit.num_tokens,
            estimated_bytes=sum(terms.values()),
            terms=terms,
            max_prompt_tokens=fit.limit,
            fits=fits,
            requested_fps=fit.requested_fps if fit.sampled_by_fps else None,
            frames=[plan.num_frames for plan in fit.plans],
            fitting_fps=fitting_fps,
            frames_at_fitting_fps=None if fitting_plans is None else [plan.num_frames for plan in fitting_plans],
            batch_size=fit.batch_size,
        )

    def _budget(
        self, max_context_tokens=None, max_memory=None, weights=None, answer_tokens=None, model_config=None
    ) -> _Budget:
        """A call's limits: its own values, else the processor's, checked; the memory read (`"auto"`) and the model
        config required when a memory is set."""
        context = self.max_context_tokens if max_context_tokens is None else max_context_tokens
        given = self.max_memory if max_memory is None else max_memory
        weights = _check_weights(self.weights if weights is None else weights)
        answer = _non_negative_int("answer_tokens", self.answer_tokens if answer_tokens is None else answer_tokens)
        config = self.model_config if model_config is None else _config_dict(model_config)
        memory = None if given is None else parse_max_memory(given)
        if memory is not None and config is None:
            raise MemoryBudgetError(_NO_MODEL_CONFIG)
        if config is not None:
            _architecture(config)  # a config that cannot be read fails here, naming the missing key
        return _Budget(_positive_int("max_context_tokens", context), memory, given, weights, answer, config)

    def _fit(self, videos, images, text, budget: _Budget, kwargs: dict) -> _Fit:
        """Plans of a call at the requested settings, its longest prompt and the highest fps that fits."""
        # the kwargs class given explicitly, as ProcessorMixin.__call__ does: transformers < 5.23 requires it
        merged = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        videos_kwargs = merged["videos_kwargs"]
        vp = self.video_processor
        videos = [] if videos is None else videos

        def plans_at(fps=None):
            if not videos:
                return []
            call = videos_kwargs if fps is None else dict(videos_kwargs, fps=fps)
            return vp.plan(videos, **call)

        layout = self._prompt_layout(text, self._image_tokens(images, merged["images_kwargs"]), len(videos))

        def worst(plans):
            return max(self._prompt_totals(layout, plans), key=lambda item: item[0])

        plans = plans_at()
        limit = budget.tokens(len(layout))
        fps_fit = None
        if worst(plans)[0] > limit:
            fps_fit = self._highest_fitting_fps(plans_at, worst, videos_kwargs, limit)
        requested = videos_kwargs.get("fps") if videos_kwargs.get("fps") is not None else vp.fps
        sampled_by_fps = videos_kwargs.get("num_frames") is None and requested is not None and bool(videos)
        return _Fit(plans, worst(plans)[0], limit, len(layout), fps_fit, requested, sampled_by_fps, videos_kwargs,
                    plans_at, worst)

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

    def _budget_message(self, fit: _Fit, budget: _Budget) -> str:
        total, fixed, video_ids = fit.worst(fit.plans)
        plans, videos_kwargs, fps_fit = fit.plans, fit.videos_kwargs, fit.fps_fit
        vp = self.video_processor
        fps = fit.requested_fps
        _, max_pixels = vp.pixel_bounds(videos_kwargs)
        memory_bound = budget.memory_binds(fit.batch_size)
        lines = [
            f"The prompt would be {total:,} tokens, above {budget.limit_text(fit.batch_size)} "
            f"(text and images: {fixed:,} tokens; videos: {total - fixed:,} tokens)."
        ]
        if memory_bound:
            lines.append(budget.estimate_text(total, fit.batch_size))
        weights_alone = memory_bound and fit.limit == 0
        if weights_alone:
            base = sum(budget.estimate(0, fit.batch_size).values())
            lines.append(
                f"Not even an empty prompt fits: the {budget.weights} weights, the KV cache of "
                f"{budget.answer_tokens:,} answer tokens and the fixed overhead need {_gib(base)}."
            )
        for i in video_ids:
            plan = plans[i]
            duration = f"{plan.duration:.1f} s" if plan.duration is not None else "pre-sampled frames"
            rate = f" at {plan.sampled_fps:.3g} fps" if plan.sampled and plan.sampled_fps else ""
            lines.append(
                f"  video {i} {plan.source}: {duration}{rate} -> {plan.num_frames} frames -> "
                f"{plan.grid_thw[0]} temporal patches x {plan.tokens_per_temporal_patch} tokens "
                f"({plan.resized_height}x{plan.resized_width} px) = {plan.num_tokens:,} tokens"
            )
        if fps_fit is not None:
            frames = ", ".join(f"video {i}: {plan.num_frames}" for i, plan in enumerate(fit.plans_at(fps_fit)))
            lines.append(f"Frames that fit, at fps={fps_fit:g}: {frames}.")
        fps_text = "n/a" if fps is None else f"{fps:g}"
        knobs = [
            f"lower `fps` (now {fps_text}" + (f"; {fps_fit:g} fits" if fps_fit is not None else "") + ")",
            f"cap frames with `max_frames` (now {videos_kwargs.get('max_frames') or vp.max_frames or 'no cap'}) or "
            "`num_frames`",
            f"lower the pixels per frame with `max_pixels` / size['longest_edge'] (now {max_pixels:,})",
        ]
        if weights_alone:  # fewer frames or pixels cannot help
            return "\n".join(lines) + "\nTo fit: " + "; ".join(budget.memory_knobs(total, fit.batch_size)) + "."
        if memory_bound:
            knobs.extend(budget.memory_knobs(total, fit.batch_size))
        else:
            knobs.append(f"raise `max_context_tokens` (now {budget.context_tokens:,}) if the model and memory allow")
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


def _read_model_config(pretrained_model_name_or_path, kwargs: dict) -> dict | None:
    """The model's `config.json` beside the processor files, as a dict, or None."""
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
    return config if isinstance(config, dict) else None


def _nsa_block_size(config: dict) -> int | None:
    """`nsa_block_size` of a model config (top level or `text_config`)."""
    for section in (config, config.get("text_config") or {}):
        value = section.get("nsa_block_size")
        if value:
            return int(value)
    return None


VideoNSAProcessor.register_for_auto_class("AutoProcessor")
VideoNSAVideoProcessor.register_for_auto_class("AutoVideoProcessor")
