"""Loading a VideoNSA checkpoint for this package's tools (demo, training, analysis, evaluation).

The tools run this package's model code rather than a checkpoint's remote code, so that a checkpoint in the authors'
release layout (a Qwen2.5-VL ``config.json`` with no ``auto_map``, the gate MLPs in its weights) loads as VideoNSA:
through ``AutoModel`` it would load as plain Qwen2.5-VL, dropping the gates. A checkpoint this package saved or
published loads the same way.
"""

from __future__ import annotations

from modeling_videonsa import VideoNSAForConditionalGeneration
from processing_videonsa import VideoNSAProcessor


def load_videonsa(source: str, processor_source: str | None = None, **kwargs):
    """``(model, processor)`` of a folder or Hub repo id, in VideoNSA's layout or the authors' release layout.

    ``kwargs`` go to ``VideoNSAForConditionalGeneration.from_pretrained`` (``dtype``, ``device_map``,
    ``attn_implementation``, ``revision``, ...); ``revision`` also reaches the processor. The processor comes from
    ``processor_source`` (default: ``source``); a Qwen2.5-VL tokenizer and preprocessor become a
    ``VideoNSAProcessor`` with VideoNSA's video defaults and the model's NSA block size.
    """
    model = VideoNSAForConditionalGeneration.from_pretrained(source, **kwargs)
    hub = {key: kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only") if key in kwargs}
    if processor_source is not None:
        hub.pop("revision", None)  # the revision names a commit of `source`
    processor = VideoNSAProcessor.from_pretrained(processor_source or source, **hub)
    processor.nsa_block_size = model.config.nsa_block_size
    return model, processor
