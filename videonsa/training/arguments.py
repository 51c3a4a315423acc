"""The arguments of ``videonsa-train`` besides transformers' ``TrainingArguments``: the model (weights, dtype,
freezing, LoRA, gate logging) and the data (files, context budget, what to do with samples that cannot be used)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .trainer import DEFAULT_LORA_TARGETS


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

