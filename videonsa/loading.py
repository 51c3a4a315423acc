"""Loading a VideoNSA checkpoint for this package's tools (demo, training, analysis, evaluation).

A checkpoint in the authors' release layout (a Qwen2.5-VL ``config.json`` with no ``auto_map``, the gate MLPs in its
weights) must load through this package's model code: through ``AutoModel`` it would load as plain Qwen2.5-VL,
dropping the gates. :func:`load_videonsa` always uses this package's classes; :func:`load_checkpoint`, for the entry
points that show the Hub's way of loading, uses ``AutoModel`` / ``AutoProcessor`` with the checkpoint's own code when
the checkpoint is in this package's layout and :func:`load_videonsa` for the release.
"""

from __future__ import annotations

from modeling_videonsa import VideoNSAForConditionalGeneration
from processing_videonsa import VideoNSAProcessor

# from_pretrained arguments that locate a checkpoint's files (and so also reach its config and processor)
HUB_KEYS = ("revision", "token", "cache_dir", "local_files_only")


def load_videonsa(source: str, processor_source: str | None = None, **kwargs):
    """``(model, processor)`` of a folder or Hub repo id, in VideoNSA's layout or the authors' release layout.

    ``kwargs`` go to ``VideoNSAForConditionalGeneration.from_pretrained`` (``dtype``, ``device_map``,
    ``attn_implementation``, ``revision``, ...); ``revision`` also reaches the processor. The processor comes from
    ``processor_source`` (default: ``source``); a Qwen2.5-VL tokenizer and preprocessor become a
    ``VideoNSAProcessor`` with VideoNSA's video defaults and the model's NSA block size.
    """
    model = VideoNSAForConditionalGeneration.from_pretrained(source, **kwargs)
    hub = {key: kwargs[key] for key in HUB_KEYS if key in kwargs}
    if processor_source is not None:
        hub.pop("revision", None)  # the revision names a commit of `source`
    processor = VideoNSAProcessor.from_pretrained(processor_source or source, **hub)
    processor.nsa_block_size = model.config.nsa_block_size
    return model, processor


def load_checkpoint(source: str, trust_remote_code: bool = True, **kwargs):
    """``(model, processor)`` for an entry point: VideoNSA whatever the layout of ``source``.

    A checkpoint whose ``config.json`` is Qwen2.5-VL's (the authors' release, or plain Qwen2.5-VL whose gates are
    then initialised, with a warning) goes through :func:`load_videonsa`. Any other (a VideoNSA folder or repo, with
    its code files) loads with ``AutoModel`` / ``AutoProcessor`` and ``trust_remote_code``, as users load it from
    the Hub. ``kwargs`` go to the model's ``from_pretrained``; the hub keys (``revision``, ...) also to the config and
    processor.
    """
    from transformers import AutoModel, AutoProcessor, PretrainedConfig

    hub = {key: kwargs[key] for key in HUB_KEYS if kwargs.get(key) is not None}
    config, _ = PretrainedConfig.get_config_dict(source, **hub)
    if config.get("model_type") == "qwen2_5_vl":
        return load_videonsa(source, **kwargs)
    model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    return model, processor
