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
from pathlib import Path

import transformers
from transformers import HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .training import StepStatsCallback, VideoNSADataCollator, VideoNSATrainer, prepare_dataset, read_failures
from .training.arguments import DataArguments, ModelArguments
from .training.collator import UNDECODABLE_REPORT
from .training.model import configure_processor, load_model_and_processor, make_trainable

logger = logging.getLogger("videonsa.train")


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
