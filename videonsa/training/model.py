"""Building what ``videonsa-train`` trains: the model and processor (from a checkpoint, or random weights from a
preset), what is trainable (freezing, LoRA), and the processor's video settings."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import TrainingArguments

from configuration_videonsa import VideoNSAConfig
from modeling_videonsa import VideoNSAForConditionalGeneration
from processing_videonsa import VideoNSAProcessor

from .arguments import DataArguments, ModelArguments
from .presets import apply_config_overrides, preset_config, synthetic_processor
from .trainer import freeze_modules, lora_config


def _has_processor(path: str | None) -> bool:
    return path is not None and (not os.path.isdir(path) or (Path(path) / "processor_config.json").is_file())


def load_model_and_processor(model_args: ModelArguments, training_args: TrainingArguments, init_device=None):
    """The model and its processor. ``init_device``: where random weights (``--random_init``) are built; by default
    the training GPU when there is one and the model is not sharded (FSDP, DeepSpeed), else the CPU. Random weights
    are a function of the seed and of the device's random generator, so runs to compare must build on one kind."""
    hub = {"revision": model_args.revision} if model_args.revision else {}
    dtype = model_args.dtype
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ValueError(f"--dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
    if model_args.random_init:
        path = model_args.model_name_or_path
        config = VideoNSAConfig.from_pretrained(path, **hub) if path else preset_config(model_args.random_init_preset)
        config = apply_config_overrides(config, model_args.config_overrides)
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        sharded = training_args.deepspeed or getattr(training_args, "fsdp", None) or os.environ.get(
            "ACCELERATE_USE_FSDP", "false").lower() == "true"
        device = init_device
        if device is None:
            device = training_args.device if training_args.device.type == "cuda" and not sharded else "cpu"
        with torch.device(device):  # build the weights where they will train (a 7B model initialises slowly on CPU)
            model = VideoNSAForConditionalGeneration._from_config(
                config, dtype=torch_dtype, attn_implementation=model_args.attn_implementation
            )
        source = model_args.processor_name_or_path or path
        processor = (VideoNSAProcessor.from_pretrained(source, trust_remote_code=True, **hub)
                     if _has_processor(source) else synthetic_processor(config))
    else:
        path = model_args.model_name_or_path
        if path is None:
            raise ValueError("Pass --model_name_or_path (e.g. Enxin/VideoNSA), or --random_init for random weights.")
        config = VideoNSAConfig.from_pretrained(path, **hub)
        config = apply_config_overrides(config, model_args.config_overrides)
        model = VideoNSAForConditionalGeneration.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=model_args.attn_implementation, **hub
        )
        processor = VideoNSAProcessor.from_pretrained(
            model_args.processor_name_or_path or path, trust_remote_code=True, **hub
        )
    return model, processor


def make_trainable(model, model_args: ModelArguments):
    """Freeze what the arguments freeze, then wrap the model in LoRA adapters with ``--use_lora``.

    Returns the model to train (a ``PeftModel`` with ``--use_lora``) and its trainable and total parameter counts."""
    counts = freeze_modules(model, model_args.freeze_vision_tower, model_args.freeze_merger, model_args.freeze_llm)
    if model_args.use_lora:
        from peft import get_peft_model

        targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
        to_save = [n.strip() for n in (model_args.lora_modules_to_save or "").split(",") if n.strip()]
        model = get_peft_model(model, lora_config(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                                                  targets, to_save))
        trainable, total = model.get_nb_trainable_parameters()
        counts = {"trainable": trainable, "total": total}
    return model, counts


def configure_processor(processor, data_args: DataArguments) -> None:
    video_processor = processor.video_processor
    if data_args.video_fps is not None:
        video_processor.fps = data_args.video_fps
    if data_args.video_max_pixels is not None:
        video_processor.size = {**dict(video_processor.size), "longest_edge": data_args.video_max_pixels}
    if data_args.video_max_frames is not None:
        video_processor.max_frames = data_args.video_max_frames
    if data_args.video_backend is not None:
        video_processor.video_backend = data_args.video_backend
    if data_args.max_context_tokens is not None:
        processor.max_context_tokens = data_args.max_context_tokens

