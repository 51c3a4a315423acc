"""Loading a VideoNSA checkpoint for this package's tools (demo, training, analysis, evaluation).

A checkpoint in the authors' release layout (a Qwen2.5-VL ``config.json`` with no ``auto_map``, the gate MLPs in its
weights) must load through this package's model code: through ``AutoModel`` it would load as plain Qwen2.5-VL,
dropping the gates. :func:`load_videonsa` always uses this package's classes; :func:`load_checkpoint`, for the entry
points that show the Hub's way of loading, uses ``AutoModel`` / ``AutoProcessor`` with the checkpoint's own code when
the checkpoint is in this package's layout and :func:`load_videonsa` for the release.
"""

from __future__ import annotations

import torch

from modeling_videonsa import VideoNSAForConditionalGeneration
from processing_videonsa import VideoNSAProcessor

# from_pretrained arguments that locate a checkpoint's files (and so also reach its config and processor)
HUB_KEYS = ("revision", "token", "cache_dir", "local_files_only")

QUANTIZATIONS = ("fp8", "int8", "nf4")


def quantization_config(mode: str, dtype: torch.dtype | str = torch.bfloat16):
    """transformers' quantization config for ``mode``, to pass as ``from_pretrained(..., quantization_config=...)``.

    ``"fp8"``: ``FineGrainedFP8Config`` (FP8 weights in 128 x 128 blocks, FP8 activations; CUDA GPUs of compute
    capability 8.9 or newer). ``"int8"``: bitsandbytes LLM.int8 (``BitsAndBytesConfig(load_in_8bit=True)``).
    ``"nf4"``: bitsandbytes 4-bit NF4 computing in ``dtype`` (the model's dtype; bitsandbytes' own default is
    float32). None of them names modules to keep unquantized: the model's ``from_pretrained`` then keeps
    ``modeling_videonsa.UNQUANTIZED_MODULES`` (vision tower, lm_head, gate MLPs) in the model's dtype.
    """
    from transformers import BitsAndBytesConfig, FineGrainedFP8Config

    if mode == "fp8":
        return FineGrainedFP8Config()
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode == "nf4":
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise ValueError(f"quantization must be one of {', '.join(map(repr, QUANTIZATIONS))} or None, got {mode!r}")


def _with_quantization(quantization: str | None, kwargs: dict) -> dict:
    """``from_pretrained`` kwargs with ``quantization`` (a :data:`QUANTIZATIONS` name) as its config."""
    if quantization is None:
        return kwargs
    if kwargs.get("quantization_config") is not None:
        raise ValueError("Pass either quantization=... or quantization_config=..., not both.")
    dtype = kwargs.get("dtype", "auto")
    config = quantization_config(quantization, torch.bfloat16 if dtype == "auto" else dtype)
    kwargs = {**kwargs, "quantization_config": config}
    if quantization == "fp8":
        kwargs.setdefault("device_map", "cuda")  # FP8 runs on the GPU only; transformers would leave it on CPU
    return kwargs


def load_videonsa(source: str, processor_source: str | None = None, quantization: str | None = None, **kwargs):
    """``(model, processor)`` of a folder or Hub repo id, in VideoNSA's layout or the authors' release layout.

    ``kwargs`` go to ``VideoNSAForConditionalGeneration.from_pretrained`` (``dtype``, ``device_map``,
    ``attn_implementation``, ``revision``, ...); ``revision`` also reaches the processor. The processor comes from
    ``processor_source`` (default: ``source``); a Qwen2.5-VL tokenizer and preprocessor become a
    ``VideoNSAProcessor`` with VideoNSA's video defaults and the model's NSA block size. ``quantization``
    (``"fp8"``, ``"int8"``, ``"nf4"``) loads quantized weights through :func:`quantization_config`.
    """
    kwargs = _with_quantization(quantization, kwargs)
    model = VideoNSAForConditionalGeneration.from_pretrained(source, **kwargs)
    hub = {key: kwargs[key] for key in HUB_KEYS if key in kwargs}
    if processor_source is not None:
        hub.pop("revision", None)  # the revision names a commit of `source`
    processor = VideoNSAProcessor.from_pretrained(processor_source or source, **hub)
    processor.nsa_block_size = model.config.nsa_block_size
    return model, processor


def load_checkpoint(source: str, trust_remote_code: bool = True, quantization: str | None = None, **kwargs):
    """``(model, processor)`` for an entry point: VideoNSA whatever the layout of ``source``.

    A checkpoint whose ``config.json`` is Qwen2.5-VL's (the authors' release, or plain Qwen2.5-VL whose gates are
    then initialised, with a warning) goes through :func:`load_videonsa`. Any other (a VideoNSA folder or repo, with
    its code files) loads with ``AutoModel`` / ``AutoProcessor`` and ``trust_remote_code``, as users load it from
    the Hub. ``kwargs`` go to the model's ``from_pretrained``; the hub keys (``revision``, ...) also to the config and
    processor; ``quantization`` as for :func:`load_videonsa`.
    """
    from transformers import AutoModel, AutoProcessor, PretrainedConfig

    kwargs = _with_quantization(quantization, kwargs)
    hub = {key: kwargs[key] for key in HUB_KEYS if kwargs.get(key) is not None}
    config, _ = PretrainedConfig.get_config_dict(source, **hub)
    if config.get("model_type") == "qwen2_5_vl":
        return load_videonsa(source, **kwargs)
    model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    return model, processor
