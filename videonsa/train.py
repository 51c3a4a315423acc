"""Fine-tune VideoNSA on video-instruction data with transformers' Trainer (one GPU, or several through accelerate).

Data: a JSON list or JSON Lines file in the LLaVA-Video form, loaded with ``datasets``::

    {"id": "clip-001", "video": "clips/clip-001.mp4",
     "conversations": [{"from": "human", "value": "<video>\\nWhat happens?"}, {"from": "gpt", "value": "A cat..."}]}

``video`` is relative to ``--video_root`` (default: the data file's folder), or absolute, or a URL; a list names
several videos, one ``<video>`` tag each. Turns may also be ``{"role": "user"|"assistant"|"system", "content":
...}``. Only the assistant turns are supervised. Every sample's token count is planned from its videos' metadata
before training; samples over ``--max_context_tokens`` are reported and skipped (``--on_too_long skip``, the
default) or stop the run (``--on_too_long error``); nothing is ever truncated. A sample whose video cannot be read,
at planning or when it is decoded during training (a file whose frames are cut), is skipped and reported
(``--on_invalid skip``) or stops the run naming it (``--on_invalid error``, the default); decoding failures are
listed in ``<output_dir>/undecodable_samples.jsonl``, which a resumed run reads to skip them.

Examples::

    # LoRA on one GPU, bf16, gradient checkpointing
    videonsa-train --model_name_or_path Enxin/VideoNSA --train_file data/train.json --video_root data/videos \\
        --output_dir runs/lora --use_lora --bf16 --gradient_checkpointing --max_context_tokens 36864 \\
        --per_device_train_batch_size 1 --gradient_accumulation_steps 8 --learning_rate 1e-4 --num_train_epochs 1

    # full fine-tuning of the language model and gates, vision tower frozen, 8 GPUs with FSDP
    accelerate launch --config_file configs/accelerate_fsdp.yaml -m videonsa.train --model_name_or_path Enxin/VideoNSA \\
        --dtype float32 --bf16 --gradient_checkpointing --freeze_vision_tower --train_file data/train.json ...

    # the 7B architecture with random weights (no download), e.g. to benchmark
    videonsa-train --random_init --train_file bench/data.json --output_dir runs/bench --max_steps 5 ...

A single ``.json``/``.yaml`` argument is read as a file of all the arguments. Every ``TrainingArguments`` option
applies (``--eval_strategy``, ``--save_steps``, ``--resume_from_checkpoint``, ``--report_to``, ``--deepspeed``...).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from configuration_videonsa import VideoNSAConfig
from modeling_videonsa import VideoNSAForConditionalGeneration
from processing_videonsa import VideoNSAProcessor

from .training import (
    DEFAULT_LORA_TARGETS,
    StepStatsCallback,
    VideoNSADataCollator,
    VideoNSATrainer,
    apply_config_overrides,
    freeze_modules,
    lora_config,
    prepare_dataset,
    preset_config,
    read_failures,
    synthetic_processor,
)
from .training.collator import UNDECODABLE_REPORT

logger = logging.getLogger("videonsa.train")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub repo id (Enxin/VideoNSA) or folder of a VideoNSA checkpoint. Required, except with "
                          "--random_init, where it is optional and only its config is used."},
    )
    processor_name_or_path: str | None = field(default=None, metadata={"help": "Default: the model's."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model and processor."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weight dtype: auto (the checkpoint's; float32 for --random_init), bfloat16, float16, "
                          "float32. --bf16 adds autocast on top; for full fine-tuning keep float32 weights."},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Dense attention (text queries, vision tower): sdpa, eager, flash_attention_2."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated key=value applied to the config before the model is built, e.g. "
                          "'nsa_enabled=false', 'nsa_backend=torch', 'num_hidden_layers=4', 'vision_config.depth=2'."},
    )
    random_init: bool = field(default=False, metadata={"help": "Random weights: nothing is downloaded."})
    random_init_preset: str = field(
        default="7b",
        metadata={"help": "Architecture for --random_init without --model_name_or_path: '7b' (Qwen2.5-VL-7B, the "
                          "released VideoNSA), 'small' (the 7B's widths with 4 text layers and 4 vision blocks) or "
                          "'tiny' (the test model). A byte-level tokenizer with Qwen2.5-VL's special tokens is built "
                          "when no processor is given."},
    )
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Freeze the vision encoder (not the merger)."})
    freeze_merger: bool = field(default=False, metadata={"help": "Freeze the vision -> text merger (projector)."})
    freeze_llm: bool = field(
        default=False, metadata={"help": "Freeze the language model except the NSA gate MLPs (g_proj_1, g_proj_2)."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of the weights."})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = field(
        default=",".join(DEFAULT_LORA_TARGETS),
        metadata={"help": "Linear layers of the language model's decoder layers to adapt (also gate_proj, up_proj, "
                          "down_proj)."},
    )
    lora_modules_to_save: str | None = field(
        default=None, metadata={"help": "Modules trained in full next to the adapters, e.g. 'merger'."}
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "After training, merge the adapters and save the full model to "
                                         "<output_dir>/merged (single-process runs)."}
    )
    gate_logging: str = field(
        default="mean",
        metadata={"help": "Log the mean NSA gate per branch over vision tokens: mean (gate/cmp, gate/slc, "
                          "gate/swa), per_layer (also gate/layer_<i>/<branch>) or none."},
    )
    step_stats: bool = field(
        default=False,
        metadata={"help": "Time every optimizer step (the GPU is synchronised twice a step) and write peak memory "
                          "and step times to <output_dir>/step_stats.json."},
    )
    supervised_logits_only: bool = field(
        default=True,
        metadata={"help": "Compute logits only at positions that predict a supervised token (same loss, far less "
                          "memory for long videos). --supervised_logits_only false: the model's own loss."},
    )


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "LLaVA-Video JSON / JSONL training data."})
    eval_file: str | None = field(default=None, metadata={"help": "Same form; gives the evaluation loss."})
    video_root: str | None = field(default=None, metadata={"help": "Folder that relative video paths start from "
                                                                    "(default: each data file's folder)."})
    max_context_tokens: int | None = field(
        default=None, metadata={"help": "Token budget per sample, video included (paper: 36K). Default: the "
                                        "processor's (131072)."}
    )
    on_too_long: str = field(default="skip", metadata={"help": "Samples over the budget: skip (reported) or error."})
    on_invalid: str = field(
        default="error",
        metadata={"help": "Malformed records, missing or unreadable videos, videos that fail to decode during training: "
                          "error (stops naming the sample; a resumed run skips it) or skip (reported)."},
    )
    video_fps: float | None = field(default=None, metadata={"help": "Sampling rate (default: the processor's, 4)."})
    video_max_pixels: int | None = field(
        default=None, metadata={"help": "Pixels per frame (default 50176 = 224x224: one NSA block per frame pair)."}
    )
    video_max_frames: int | None = field(default=None, metadata={"help": "Frame cap per video (default: none)."})
    video_backend: str | None = field(default=None, metadata={"help": "pyav (default), torchcodec, decord, auto."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training records."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N evaluation records."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for the planning pass."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of `datasets`."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Plan the samples again (videos changed)."})


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


def load_split(path: str, data_args: DataArguments, processor, training_args, name: str, limit: int | None):
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=path, split="train", cache_dir=data_args.dataset_cache_dir)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    root = data_args.video_root or str(Path(path).resolve().parent)
    report = Path(training_args.output_dir) / "skipped_samples.jsonl" if training_args.process_index == 0 else None
    with training_args.main_process_first(desc=f"planning the {name} samples"):
        return prepare_dataset(
            dataset, processor, video_root=root, max_context_tokens=data_args.max_context_tokens,
            on_too_long=data_args.on_too_long, on_invalid=data_args.on_invalid, report_path=report,
            num_proc=data_args.preprocessing_num_workers, name=name,
            load_from_cache_file=not data_args.overwrite_cache,
        )


def parse_args(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv=None):
    model_args, data_args, training_args = parse_args(argv)
    # the collator reads the raw records (video paths, turns), and the eval loop must not gather 152K-wide logits
    training_args.remove_unused_columns = False
    training_args.prediction_loss_only = True
    training_args.label_names = training_args.label_names or ["labels"]

    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logger.setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    if data_args.train_file is None and data_args.eval_file is None:
        raise ValueError("Pass --train_file (and/or --eval_file).")
    set_seed(training_args.seed)

    model, processor = load_model_and_processor(model_args, training_args)
    configure_processor(processor, data_args)
    model, counts = make_trainable(model, model_args)
    logger.info(f"Trainable parameters: {counts['trainable']:,} of {counts['total']:,}; NSA "
                f"{'on' if model.config.nsa_enabled else 'off'} (backend {model.config.nsa_backend})")

    output = Path(training_args.output_dir)
    resuming = training_args.resume_from_checkpoint is not None
    if training_args.process_index == 0:  # fresh reports for this run; a resumed run keeps its decoding failures
        for report in ["skipped_samples.jsonl"] + ([] if resuming else [UNDECODABLE_REPORT]):
            if (output / report).exists():
                (output / report).unlink()
    failures = read_failures(output / UNDECODABLE_REPORT) if resuming else set()
    if failures:
        logger.warning(f"{len(failures)} sample(s) failed to decode in an earlier run and are skipped (listed in "
                       f"{output / UNDECODABLE_REPORT})")
    train_dataset = eval_dataset = None
    if data_args.train_file:
        train_dataset = load_split(data_args.train_file, data_args, processor, training_args, "train",
                                   data_args.max_train_samples)
    if data_args.eval_file:
        eval_dataset = load_split(data_args.eval_file, data_args, processor, training_args, "eval",
                                  data_args.max_eval_samples)

    trainer = VideoNSATrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=VideoNSADataCollator(processor, max_context_tokens=data_args.max_context_tokens,
                                           on_invalid=data_args.on_invalid,
                                           failures_path=output / UNDECODABLE_REPORT, known_invalid=failures),
        processing_class=processor,
        callbacks=[StepStatsCallback()] if model_args.step_stats else None,
        gate_logging=model_args.gate_logging,
        supervised_logits_only=model_args.supervised_logits_only,
    )

    if train_dataset is not None:
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint in ("auto", "last", "latest"):
            last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
            logger.info(f"Resuming from {last}" if last else "No checkpoint to resume from: starting afresh")
            checkpoint = last
        result = trainer.train(resume_from_checkpoint=checkpoint)
        if trainer.is_fsdp_enabled:  # one loadable file for the final model, whatever the checkpoints use
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if model_args.use_lora and model_args.merge_lora:
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled or training_args.world_size > 1:
            logger.warning("--merge_lora is done in single-process runs only: load the base model and the adapter "
                           f"in {training_args.output_dir} with peft's PeftModel.from_pretrained, then "
                           "merge_and_unload.")
        else:
            merged = trainer.model.merge_and_unload()
            target = Path(training_args.output_dir) / "merged"
            merged.save_pretrained(target)
            processor.save_pretrained(target)
            logger.info(f"Merged model saved to {target}")
    return trainer


def console() -> None:
    """The ``videonsa-train`` command: :func:`main`, whose return value (the trainer) is not an exit status."""
    main()


if __name__ == "__main__":
    main()
