"""Fine-tuning VideoNSA with transformers' ``Trainer`` (the ``videonsa-train`` command is :mod:`videonsa.train`).

:mod:`~videonsa.training.data` (records, labels, planning), :mod:`~videonsa.training.collator` (decoding and
padding), :mod:`~videonsa.training.trainer` (Trainer, gate logging, freezing, LoRA),
:mod:`~videonsa.training.presets` (model presets, config overrides), :mod:`~videonsa.training.arguments` (the
command's model and data arguments), :mod:`~videonsa.training.model` (building the model and processor, freezing
and LoRA).
"""

from .collator import SampleDecodingError, VideoNSADataCollator, read_failures, sample_key
from .data import (
    IGNORE_INDEX,
    VIDEO_TAG,
    assistant_labels,
    planned_num_tokens,
    prepare_dataset,
    record_to_messages,
    resolve_video,
)
from .presets import PRESET_7B, SMALL_OVERRIDES, apply_config_overrides, preset_config, synthetic_processor
from .trainer import (
    DEFAULT_LORA_TARGETS,
    GATE_BRANCHES,
    GATE_MODULES,
    GateMonitor,
    StepStatsCallback,
    VideoNSATrainer,
    freeze_modules,
    lora_config,
    supervised_causal_lm_loss,
    supervised_positions,
)

__all__ = [
    "DEFAULT_LORA_TARGETS", "GATE_BRANCHES", "GATE_MODULES", "IGNORE_INDEX", "PRESET_7B", "SMALL_OVERRIDES",
    "VIDEO_TAG", "GateMonitor", "SampleDecodingError", "StepStatsCallback", "VideoNSADataCollator",
    "VideoNSATrainer", "apply_config_overrides", "assistant_labels", "freeze_modules", "lora_config",
    "planned_num_tokens", "prepare_dataset", "preset_config", "read_failures", "record_to_messages",
    "resolve_video", "sample_key", "supervised_causal_lm_loss", "supervised_positions", "synthetic_processor",
]
