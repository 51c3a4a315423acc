"""Long-context prefill for VideoNSA: one logical pass, computed in pieces, with the one-pass result.

The released attention function is not causal across blocks: compression attends to the query's own and every
LATER block, and the log-sum-exp that selection misreads indexes the whole pass (README, "What the attention
computes"). A prefill that continues a KV cache chunk by chunk therefore cannot give the one-pass numbers in a
model with more than one layer. :func:`chunked_prefill` instead runs the one pass through the model with
``config.prefill_chunk_tokens = chunk_size``, the model's own pass in pieces (README, "Long videos"): every
token-wise part of a layer, the NSA part of its attention (query chunks) and the final norm run over pieces of
``chunk_size`` tokens, and only the last position goes through ``lm_head`` (``logits_to_keep=1``). What this
module adds to ``model(**inputs)`` with that key set: the vision tower over pieces of ``vision_chunk_size`` video
tokens (the model's own pieces follow ``chunk_size``), computed here before the pass, and a prefill that returns its
cache.

Every step computes the same function as ``model(**inputs)``; the results agree to float rounding (matrix
products over fewer rows may round differently). The returned ``DynamicCache`` holds every layer's keys and
values and the token types VideoNSA remembers, so ``model.generate(past_key_values=cache, ...)`` (or
:func:`chunked_generate`) continues from it with dense decode steps, as after an ordinary prefill.

Peak memory of a pass is roughly: weights + KV cache (``2 * layers * kv_heads * head_dim`` values per token) +
about six ``[tokens, hidden]`` bf16 buffers + one piece's working set (docs/benchmarks.md, "what fits where").

    from videonsa.long_context import chunked_prefill, chunked_generate
    logits, cache = chunked_prefill(model, **inputs, chunk_size=8192)   # logits: [batch, vocab] of the last token
    out = chunked_generate(model, **inputs, max_new_tokens=64)          # model.generate with that prefill
"""

from __future__ import annotations

import sys

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

DEFAULT_CHUNK_SIZE = 8192

_ACCEPTED_INPUTS = {
    "input_ids",
    "attention_mask",
    "position_ids",
    "inputs_embeds",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "mm_token_type_ids",
    "use_cache",
    "cache",  # the KV cache's name from transformers 5.24 on ...
    "past_key_values",  # ... and before
    "mm_encoder_outputs",  # vision features generate computes before its prefill (transformers >= 5.18)
}


def _modeling(model):
    """The modeling module that defined ``model`` (a source checkout or transformers' remote-code copy)."""
    return sys.modules[type(model).__module__]


def _pooled(features) -> torch.Tensor:
    """The merged vision tokens of a ``get_*_features`` result (a model output or a tuple), concatenated."""
    pooled = getattr(features, "pooler_output", None)
    if pooled is None:
        pooled = features[1] if isinstance(features, (tuple, list)) and len(features) > 1 else features
    return torch.cat(list(pooled), dim=0) if isinstance(pooled, (tuple, list)) else pooled


def video_features(model, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor, max_tokens=None):
    """The vision tower's merged tokens ``[total video tokens, hidden]`` for every video, computed over pieces of at
    most ``max_tokens`` tokens cut between temporal patches (``VideoNSAModel.video_features_in_pieces``; ``None``:
    each video in one call)."""
    return model.model.video_features_in_pieces(pixel_values_videos, video_grid_thw, max_tokens)


def _input_embeddings(model, inputs: dict, vision_chunk_size) -> torch.Tensor:
    """Token embeddings with the image and video features scattered in, as ``Qwen2_5_VLModel.forward`` does."""
    inner = model.model
    input_ids = inputs.get("input_ids")
    embeds = inputs.get("inputs_embeds")
    if embeds is None:
        embeds = inner.get_input_embeddings()(input_ids)
    encoded = inputs.get("mm_encoder_outputs") or {}
    if encoded.get("image") is not None or inputs.get("pixel_values") is not None:
        image = encoded.get("image")
        if image is None:
            image = inner.get_image_features(inputs["pixel_values"], inputs.get("image_grid_thw"), return_dict=True)
        image = _pooled(image).to(embeds.device, embeds.dtype)
        image_mask, _ = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=image)
        embeds = embeds.masked_scatter(image_mask, image)
    if encoded.get("video") is not None or inputs.get("pixel_values_videos") is not None:
        video = encoded.get("video")
        if video is None:
            video = video_features(model, inputs["pixel_values_videos"], inputs["video_grid_thw"], vision_chunk_size)
        video = _pooled(video).to(embeds.device, embeds.dtype)
        _, video_mask = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, video_features=video)
        embeds = embeds.masked_scatter(video_mask, video)
    return embeds


def _position_ids(model, inputs: dict, embeds: torch.Tensor):
    """Multimodal RoPE ids as the model's forward computes them for a fresh pass; sets ``model.model.rope_deltas``
    so that a continued ``generate`` places the new tokens correctly."""
    inner = model.model
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        inner.rope_deltas = None  # a stale value from an earlier prompt must not leak into this one
        position_ids = inner.compute_3d_position_ids(
            input_ids=inputs.get("input_ids"),
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            inputs_embeds=embeds,
            attention_mask=inputs.get("attention_mask"),
            **{_modeling(model).CACHE_ARG: None},
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
        )
    if inner.rope_deltas is None:  # text-only prompt or explicit positions: text positions continue as they are
        inner.rope_deltas = torch.zeros(embeds.shape[0], 1, dtype=torch.long, device=embeds.device)
    return position_ids


@torch.no_grad()
def chunked_prefill(model, *, chunk_size: int = DEFAULT_CHUNK_SIZE, vision_chunk_size: int | None = None, **inputs):
    """Prefill a prompt in one logical pass computed in pieces; returns the last position's logits and the cache.

    Args:
        model: a ``VideoNSAForConditionalGeneration`` (local or remote code), in eval mode.
        chunk_size: tokens per piece of the norms and the MLP (and of the vision tower, unless
            ``vision_chunk_size`` is given). Any value gives the same result; smaller saves memory.
        vision_chunk_size: video tokens per vision-tower call (rounded down to whole temporal patches, at least
            one); ``None`` uses ``chunk_size``; ``0`` encodes each video in one call.
        **inputs: what the processor returns (``input_ids``, ``attention_mask``, ``pixel_values_videos``,
            ``video_grid_thw``, ``mm_token_type_ids``, ``second_per_grid_ts``, images alike), or ``inputs_embeds``
            and ``position_ids``.

    Returns:
        ``(logits, cache)``: ``logits`` ``[batch, vocab]`` of the last position (computed for that position only),
        ``cache`` a ``DynamicCache`` holding the whole prompt, usable by ``model.generate(past_key_values=cache)``.
    """
    unknown = set(inputs) - _ACCEPTED_INPUTS
    if unknown:
        raise TypeError(
            f"chunked_prefill got unexpected inputs {sorted(unknown)}; accepted: {sorted(_ACCEPTED_INPUTS)}"
        )
    modeling = _modeling(model)
    cache = modeling.resolve_cache(inputs.get("cache"), dict(inputs))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            "chunked_prefill starts a sequence and fills a new cache; it does not continue one (the released "
            "attention is not causal across blocks, see README 'Chunked prefill')"
        )
    if inputs.get("use_cache") is False:
        raise ValueError("chunked_prefill always fills a KV cache (use_cache=False is not supported)")
    if inputs.get("input_ids") is None and inputs.get("inputs_embeds") is None:
        raise ValueError("chunked_prefill needs input_ids or inputs_embeds")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    chunk_size = int(chunk_size)
    vision_chunk_size = chunk_size if vision_chunk_size is None else vision_chunk_size

    text = model.model.language_model
    embeds = _input_embeddings(model, inputs, vision_chunk_size)
    position_ids = _position_ids(model, inputs, embeds)
    if cache is None:
        cache = DynamicCache(config=text.config)
    # The layers are the model's own (VideoNSADecoderLayer chunks its token-wise parts when the key is set); only
    # the last position reaches lm_head (logits_to_keep).
    previous = text.config.prefill_chunk_tokens
    text.config.prefill_chunk_tokens = chunk_size
    try:
        output = model(
            inputs_embeds=embeds,
            attention_mask=inputs.get("attention_mask"),
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{modeling.CACHE_ARG: cache},
        )
    finally:
        text.config.prefill_chunk_tokens = previous
    return output.logits[:, -1], cache


def chunked_generate(
    model, *, chunk_size: int = DEFAULT_CHUNK_SIZE, vision_chunk_size: int | None = None, **generate_kwargs
):
    """``model.generate(**generate_kwargs)`` whose prefill is :func:`chunked_prefill`.

    Everything else is ``generate``'s own (logits processors, sampling, stopping, streamers, the returned
    sequences): only its prefill step is replaced, for this call, by the exact pass in pieces, which fills
    ``generate``'s cache; the decode steps are the usual dense steps. So greedy decoding returns what
    ``model.generate`` returns, for prompts whose one-pass prefill would not fit in memory too.

    Do not use ``generate(prefill_chunk_size=...)`` with VideoNSA for this: it continues the cache chunk by
    chunk, which the released attention function does not allow exactly (README, "Chunked prefill").
    """
    original = model._prefill  # GenerationMixin's prefill step (transformers 5.x)

    def prefill(input_ids, generation_config, model_kwargs, *args, **kwargs):
        cache = model_kwargs.get(_modeling(model).CACHE_ARG)
        if cache is not None and cache.get_seq_length() > 0:  # generate continues a cache: nothing to prefill here
            return original(input_ids, generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get("use_cache") is False:
            raise ValueError("chunked_generate needs use_cache=True (the decode steps continue the prefill's cache)")
        inputs = {key: value for key, value in model_kwargs.items() if key in _ACCEPTED_INPUTS and value is not None}
        inputs.pop("use_cache", None)
        if "inputs_embeds" not in inputs:
            inputs["input_ids"] = input_ids
        logits, cache = chunked_prefill(model, chunk_size=chunk_size, vision_chunk_size=vision_chunk_size, **inputs)
        return CausalLMOutputWithPast(logits=logits[:, None], **{_modeling(model).CACHE_ARG: cache})

    model._prefill = prefill
    try:
        with torch.no_grad():
            return model.generate(**generate_kwargs)
    finally:
        del model._prefill  # back to the class's method


__all__ = ["DEFAULT_CHUNK_SIZE", "chunked_generate", "chunked_prefill", "video_features"]
