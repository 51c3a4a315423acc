"""Training-step benchmark of VideoNSA through the fine-tuning code path (``videonsa.train`` + ``videonsa.training``).

What runs is what ``videonsa-train`` runs: a random-weight model from a preset (``videonsa.training.preset_config``, built by
``videonsa.training.model.load_model_and_processor``), LoRA or full fine-tuning (``make_trainable``), gradient checkpointing,
bf16, ``VideoNSATrainer`` (logits only where supervised, gate logging) and ``StepStatsCallback`` (CUDA-synchronised
step times). Only the data differ: instead of decoding videos, a ``torch.utils.data.Dataset`` returns synthetic
samples already in the processor's output form, padded and batched by the training collator:

* ``input_ids``: the chat template of one user turn (a video, then a question) and one assistant answer, rendered by
  the processor, its one ``<|video_pad|>`` expanded to the video's token count as the processor does;
* the video: ``t`` temporal patches of ``h x w`` patches merged to one NSA block of tokens each (64 tokens = 16 x 16
  patches of 14 px = 224 x 224 frames for ``7b`` / ``small``, as at the released resolution); ``t`` is as large as
  ``--tokens`` allows with at least 16 question tokens. ``pixel_values_videos`` is ``[t*h*w, 3*2*14*14]`` of N(0, 1)
  values (float32, as the processor returns them), ``video_grid_thw = [[t, h, w]]``, ``second_per_grid_ts = [0.5]``
  (4 fps, two frames per temporal patch), ``mm_token_type_ids`` 2 on video tokens;
* ``labels``: the answer (``--answer-tokens`` random letters) and its ``<|im_end|>``, by
  ``videonsa.training.assistant_labels``; everything else is ``-100``.
The tokenizer is ``videonsa.training.synthetic_processor``'s byte-level one, so a sample has exactly ``--tokens`` tokens. Sample
``i`` depends on ``--seed`` and ``i`` only, so runs with any number of processes see the same data.

Rows: ``videonsa`` (``nsa_enabled=True``, ``nsa_backend=--backend``: the Triton kernels on CUDA with ``auto``) and
``dense`` (``nsa_enabled=False``: Qwen2.5-VL's SDPA attention, same weights, the gate MLPs unused). Each row builds
the model afresh from ``--seed`` and trains ``--warmup-steps`` + ``--steps`` optimizer steps. Reported per row: mean
step time over the timed steps (warm-up excluded; forward, backward and optimizer step of every micro-batch of the
step, CUDA-synchronised), global tokens/s (tokens per optimizer step over all processes / mean step time), peak GPU
memory (``torch.cuda.max_memory_allocated`` from the start of training, weights and optimizer state included, the
largest over the processes; GB = 10^9 bytes), the loss of every step (the Trainer's logged loss) and the mean gates.
Results go to stdout and, from the first process only, to ``--out`` (markdown, plus the raw numbers in a ``.json``
beside it; default ``$OUT/bench_training.md`` when ``$OUT`` is set), rewritten after every row.

Presets (``videonsa.training.preset_config``): ``7b`` (Qwen2.5-VL-7B + VideoNSA gates, 8.7B parameters), ``small`` (the 7B's
widths, heads, vocabulary and NSA settings with 4 text layers and 4 vision blocks, 2.2B parameters: every kernel and
shape of the 7B at a size that trains in full on one GPU), ``tiny`` (the CPU test model).

Same loss with 1 and 2 GPUs: the global batch of an optimizer step must be the same samples. By default the dataset
has exactly one global batch of distinct samples (``--samples`` = per-device batch x gradient accumulation x
processes), so every step trains on all of them whatever the shuffling. With ``--batch-size 1``, two processes take
one sample each (``--grad-accum 1``), and one process takes both through ``--grad-accum 2``; the Trainer normalises
the loss by the supervised tokens of the whole global batch in both cases, so the logged losses are the same
function of the same data. Both runs must start from the same weights, and random weights depend on the generator of
the device they are drawn on (FSDP draws them on the CPU by default, then shards rank 0's): pass the same
``--init-device`` to both, ``cuda`` (every process draws the same numbers on its own GPU; fast) or ``cpu`` (slow for
billions of parameters). LoRA dropout is 0 by default, so nothing else random differs. ``--reference run.json`` puts
the step-by-step loss difference to an earlier run of this script in the report, and whether both started from the
same weights (a float64 checksum of every parameter, taken before training).

    # (a) 7B, LoRA, 36K tokens, one GPU: NSA kernels vs dense SDPA
    python bench/bench_training.py --preset 7b --tokens 36864 --rows videonsa,dense --steps 3
    # (b) the small model in full, FSDP on 2 GPUs, and the 1-GPU reference on the same two samples
    CUDA_VISIBLE_DEVICES=0 python bench/bench_training.py --preset small --full --init-device cuda --grad-accum 2 \\
        --out ref.md
    accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes 2 bench/bench_training.py \\
        --preset small --full --init-device cuda --reference ref.json --out fsdp.md
    # CPU smoke test
    python bench/bench_training.py --preset tiny --tokens 512 --steps 2 --backend torch --out /tmp/t.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback

import torch

import videonsa.training as vt
from videonsa.training.arguments import ModelArguments
from videonsa.training.model import load_model_and_processor, make_trainable
from videonsa.training.trainer import _videonsa_attention_modules

ROWS = ("videonsa", "dense")
PRESETS = ("7b", "small", "tiny")
MIN_QUESTION_TOKENS = 16
SAMPLE_KEYS = ("samples", "video_tokens", "video_grid_thw", "supervised_tokens", "tokens_per_step")


# ----------------------------------------------------------------------------------------------------------
# Synthetic pre-processed samples
# ----------------------------------------------------------------------------------------------------------
def merged_grid(tokens_per_patch: int) -> tuple[int, int]:
    """Merged-token grid (rows, columns) of one temporal patch holding ``tokens_per_patch`` (a power of two) tokens."""
    exponent = int(math.log2(tokens_per_patch))
    if 2**exponent != tokens_per_patch:
        raise ValueError(f"tokens per temporal patch must be a power of two, got {tokens_per_patch}")
    return 2 ** ((exponent + 1) // 2), 2 ** (exponent // 2)


def _letters(count: int, generator: torch.Generator) -> str:
    """``count`` characters of random lowercase words (one byte-level token each), no space at either end."""
    codes = torch.randint(ord("a"), ord("z") + 1, (count,), generator=generator).tolist()
    gaps = torch.randint(3, 11, (count,), generator=generator).tolist()
    chars, since_space = [], 0
    for index, code in enumerate(codes):
        space = 0 < index < count - 1 and since_space >= gaps[index] and chars[-1] != " "
        chars.append(" " if space else chr(code))
        since_space = 0 if space else since_space + 1
    return "".join(chars)


def synthetic_sample(processor, config, num_tokens: int, answer_tokens: int = 16, seed: int = 0) -> dict:
    """One training sample of ``num_tokens`` tokens, mostly video, in the form ``VideoNSADataCollator.encode``
    returns (1-D ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` / ``labels``, the video tensors)."""
    tokenizer = processor.tokenizer
    video_processor = processor.video_processor
    merge = config.vision_config.spatial_merge_size
    temporal = config.vision_config.temporal_patch_size
    per_patch = config.text_config.nsa_block_size  # one NSA block per temporal patch
    rows, cols = merged_grid(per_patch)
    generator = torch.Generator().manual_seed(seed)
    answer = _letters(answer_tokens, generator)

    def render(question: str) -> tuple[str, list[dict]]:
        messages = [
            {"role": "user", "content": [{"type": "video", "video": "synthetic.mp4"},
                                         {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer},
        ]
        return processor.apply_chat_template(messages, tokenize=False), messages

    text, _ = render("")
    text_tokens = len(tokenizer(text)["input_ids"]) - 1  # the one <|video_pad|> is the video's
    video_tokens = (num_tokens - text_tokens - MIN_QUESTION_TOKENS) // per_patch * per_patch
    if video_tokens < per_patch:
        raise ValueError(f"--tokens {num_tokens} leaves no room for a video: the template and answer take "
                         f"{text_tokens} tokens, a question at least {MIN_QUESTION_TOKENS}, a temporal patch "
                         f"{per_patch}")
    text, messages = render(_letters(num_tokens - text_tokens - video_tokens, generator))
    text = text.replace(processor.video_token, processor.video_token * video_tokens, 1)
    input_ids = torch.tensor(tokenizer(text)["input_ids"])
    steps = video_tokens // per_patch
    height, width = rows * merge, cols * merge
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == config.video_token_id).long() * 2,
        "labels": vt.assistant_labels(input_ids, tokenizer, messages),
        "pixel_values_videos": torch.randn(steps * height * width, 3 * temporal * config.vision_config.patch_size**2,
                                           generator=generator),
        "video_grid_thw": torch.tensor([[steps, height, width]]),
        "second_per_grid_ts": torch.tensor([temporal / float(video_processor.fps)]),
    }


class SyntheticVideoDataset(torch.utils.data.Dataset):
    """``num_samples`` distinct synthetic samples (:func:`synthetic_sample`), each made on first use and kept.
    Sample ``i`` depends on ``seed`` and ``i`` only."""

    def __init__(self, processor, config, num_tokens: int, num_samples: int, answer_tokens: int = 16, seed: int = 0):
        self.processor, self.config = processor, config
        self.num_tokens, self.num_samples, self.answer_tokens, self.seed = num_tokens, num_samples, answer_tokens, seed
        self._made = {}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if index not in self._made:
            self._made[index] = synthetic_sample(self.processor, self.config, self.num_tokens, self.answer_tokens,
                                                 seed=self.seed * 1_000_003 + index)
        return self._made[index]


class EncodedSampleCollator(vt.VideoNSADataCollator):
    """The training collator for samples that are already encoded: right padding and batching only."""

    def encode(self, record: dict) -> dict:
        return record


# ----------------------------------------------------------------------------------------------------------
# One row: build, train, measure
# ----------------------------------------------------------------------------------------------------------
def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe_failure(error: BaseException) -> str:
    first_line = (str(error).splitlines() or [""])[0]
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return f"out of memory ({first_line[:160]})"
    return f"{type(error).__name__}: {first_line[:300]}"


def weights_checksum(model) -> float:
    """Sum of the squares of every parameter, in float64: the same in two runs that start from the same weights."""
    with torch.no_grad():
        return float(sum(p.detach().double().square().sum() for p in model.parameters()))


def _max_over_processes(value: float) -> float:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return float(tensor.item())
    return value


def training_arguments(args, row: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=os.path.join(args.output_dir, row),
        max_steps=args.warmup_steps + args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        optim=args.optim,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a non-finite loss is reported as it is
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        ddp_find_unused_parameters=True,  # DDP only: the dense row leaves the gate MLPs out of the graph
        use_cpu=not torch.cuda.is_available(),
    )


def model_arguments(args, row: str):
    nsa = "nsa_enabled=false" if row == "dense" else f"nsa_enabled=true,nsa_backend={args.backend}"
    overrides = ",".join(part for part in (args.config_overrides, nsa) if part)
    return ModelArguments(
        random_init=True,
        random_init_preset=args.preset,
        dtype=args.dtype,
        config_overrides=overrides,
        use_lora=args.mode == "lora",
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        freeze_vision_tower=args.freeze_vision_tower,
        gate_logging="mean",
    )


def run_row(args, row: str) -> dict:
    from transformers import set_seed

    training_args = training_arguments(args, row)
    model_args = model_arguments(args, row)
    world = training_args.world_size
    num_samples = args.samples or args.batch_size * args.grad_accum * world
    init_device = None if args.init_device == "auto" else args.init_device
    _free()
    leftover = torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else None  # of earlier rows: ~0
    set_seed(args.seed)
    start = time.perf_counter()
    model, processor = load_model_and_processor(model_args, training_args, init_device=init_device)
    model, counts = make_trainable(model, model_args)
    build_s = time.perf_counter() - start
    checksum = weights_checksum(model)
    config = model.config
    dataset = SyntheticVideoDataset(processor, config, args.tokens, num_samples, args.answer_tokens, args.seed)
    sample = dataset[0]
    stats = vt.StepStatsCallback()
    trainer = vt.VideoNSATrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=EncodedSampleCollator(processor),
        processing_class=processor,
        callbacks=[stats],
        gate_logging="mean",
    )
    try:
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        path = next((m.last_path for m in _videonsa_attention_modules(trainer.model)), None)
        timed = stats.step_times[args.warmup_steps:]
        step_s = sum(timed) / len(timed) if timed else None
        tokens_per_step = args.tokens * args.batch_size * args.grad_accum * world
        peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
        result = {
            "attention_path": path,
            "nsa_enabled": bool(config.nsa_enabled),
            "nsa_backend": config.nsa_backend,
            "trainable_params": int(counts["trainable"]),
            "total_params": int(counts["total"]),
            "build_s": build_s,
            "allocated_before_gb": leftover,
            "initial_weights_checksum": checksum,
            "world_size": world,
            "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
            "sharded_params": sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
            "samples": num_samples,
            "tokens_per_sample": int(sample["input_ids"].numel()),
            "video_tokens": int((sample["input_ids"] == config.video_token_id).sum()),
            "video_grid_thw": sample["video_grid_thw"][0].tolist(),
            "supervised_tokens": int((sample["labels"] != vt.IGNORE_INDEX).sum()),
            "tokens_per_step": tokens_per_step,
            "step_time_s": stats.step_times,
            "mean_step_s": step_s,
            "tokens_per_s": tokens_per_step / step_s if step_s else None,
            "peak_gb": _max_over_processes(peak) if peak is not None else None,
            "loss": [entry["loss"] for entry in logs],
            "grad_norm": [float(entry["grad_norm"]) if entry.get("grad_norm") is not None else None for entry in logs],
            "gates": {key: value for key, value in logs[-1].items() if key.startswith("gate/")} if logs else {},
        }
    finally:
        if trainer.gate_monitor is not None:
            trainer.gate_monitor.remove()
        trainer.accelerator.free_memory()
        del trainer, model, dataset, sample
        _free()
    return result


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def _num(value, digits=2) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) and value is not None else "—"


def _count(number: int) -> str:
    return f"{number / 1e9:.2f}B" if number >= 1e9 else f"{number / 1e6:.1f}M"


def _times(value, reference) -> str:
    return f"{value / reference:.2f}x" if isinstance(value, (int, float)) and reference else "—"


def compare_losses(results: dict, reference: dict, rtol: float) -> dict:
    """Step-by-step loss differences of every row that both runs have."""
    comparison = {}
    for row, entry in results.items():
        theirs = reference.get("results", {}).get(row, {}).get("loss")
        mine = entry.get("loss")
        if not theirs or not mine:
            continue
        steps = min(len(theirs), len(mine))
        absolute = [abs(a - b) for a, b in zip(mine[:steps], theirs[:steps])]
        relative = [d / max(abs(b), 1e-12) for d, b in zip(absolute, theirs[:steps])]
        checksums = (entry.get("initial_weights_checksum"),
                     reference["results"][row].get("initial_weights_checksum"))
        same_weights = None if None in checksums else math.isclose(*checksums, rel_tol=1e-9)
        comparison[row] = {"steps": steps, "abs_diff": absolute, "rel_diff": relative, "same_initial_weights":
                           same_weights, "max_rel_diff": max(relative), "rtol": rtol, "within": max(relative) <= rtol}
    return comparison


def render(meta: dict, results: dict, args, comparison: dict | None = None) -> str:
    mode = (f"LoRA r={args.lora_r} alpha={args.lora_alpha} dropout={args.lora_dropout} on "
            f"{','.join(vt.DEFAULT_LORA_TARGETS)} of the text decoder" if args.mode == "lora" else "full fine-tuning")
    overrides = f" + {args.config_overrides}" if args.config_overrides else ""
    frozen = "; vision tower frozen" if args.freeze_vision_tower else ""
    lines = ["# VideoNSA training steps: NSA kernels vs dense attention", ""]
    lines.append(f"Date: {meta['date']}; device: {meta['device']} x {meta['world_size']} ({meta['distributed']}); "
                 f"torch {meta['torch']}, transformers {meta['transformers']}, accelerate {meta['accelerate']}, "
                 f"peft {meta['peft']}, triton {meta['triton']}; SDPA backends allowed: {meta['sdpa_backends']}")
    lines.append(f"Model: preset `{args.preset}`{overrides}, random weights (seed {args.seed}, drawn on "
                 f"{meta['init_device']}), {meta['dtype']} weights{', bf16 mixed precision' if args.bf16 else ''}; "
                 f"{mode}{frozen}; gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
                 f"{args.optim}, lr {args.lr:g} (constant)")
    lines.append(f"Data: {meta['samples']} synthetic sample(s) of {args.tokens} tokens ({meta['video_tokens']} video "
                 f"tokens, grid t,h,w = {meta['video_grid_thw']}; {meta['supervised_tokens']} supervised tokens); per "
                 f"optimizer step {meta['world_size']} process(es) x batch {args.batch_size} x {args.grad_accum} "
                 f"accumulation = {meta['tokens_per_step']} tokens")
    lines.append(f"Steps: {args.warmup_steps} warm-up (not timed) + {args.steps} timed per row; step time = forward, "
                 "backward and optimizer step, CUDA-synchronised; peak = torch.cuda.max_memory_allocated since the "
                 "start of training (weights and optimizer state included), the largest over the processes, "
                 "GB = 1e9 bytes")
    lines += [f"Command: {meta['command']}", ""]
    lines.append("| row | attention path | trainable / total params | mean step s | vs dense | tokens/s (all GPUs) | "
                 "tokens/s per GPU | peak GB | vs dense | loss per step (warm-up first) | gates cmp / slc / swa |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    dense = results.get("dense", {})
    for row in args.rows:
        entry = results.get(row)
        if entry is None:
            continue
        if "error" in entry:
            lines.append(f"| {row} | {entry['error']} | | | | | | | | | |")
            continue
        gates = entry.get("gates") or {}
        gate_text = " / ".join(_num(gates.get(f"gate/{b}"), 3) for b in vt.GATE_BRANCHES) if gates else "—"
        per_gpu = entry["tokens_per_s"] / entry["world_size"] if entry.get("tokens_per_s") else None
        lines.append(
            f"| {row} | {entry['attention_path']} | {_count(entry['trainable_params'])} / "
            f"{_count(entry['total_params'])} | {_num(entry['mean_step_s'], 3)} | "
            f"{_times(entry['mean_step_s'], dense.get('mean_step_s'))} | {_num(entry['tokens_per_s'], 0)} | "
            f"{_num(per_gpu, 0)} | {_num(entry['peak_gb'], 1)} | {_times(entry['peak_gb'], dense.get('peak_gb'))} | "
            f"{', '.join(f'{loss:.5f}' for loss in entry['loss'])} | {gate_text} |"
        )
    if comparison:
        lines += ["", f"Loss against the reference run {meta.get('reference')}:", ""]
        lines.append("| row | same initial weights | steps | max relative difference | tolerance | within | "
                     "relative difference per step |")
        lines.append("|---|---|---|---|---|---|---|")
        for row, item in comparison.items():
            same = {True: "yes", False: "NO", None: "—"}[item["same_initial_weights"]]
            lines.append(f"| {row} | {same} | {item['steps']} | {item['max_rel_diff']:.2e} | {item['rtol']:g} | "
                         f"{'yes' if item['within'] else 'NO'} | {', '.join(f'{d:.1e}' for d in item['rel_diff'])} |")
    return "\n".join(lines)


def write_report(path: str, meta: dict, results: dict, args, comparison: dict | None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        file.write(render(meta, results, args, comparison) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as file:
        json.dump({"meta": meta, "args": vars(args), "results": results, "comparison": comparison}, file, indent=1)


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------
def _row_list(text: str) -> list[str]:
    rows = [row for row in text.split(",") if row]
    if not rows or set(rows) - set(ROWS):
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma list among {ROWS}")
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="7b")
    parser.add_argument("--rows", type=_row_list, default=list(ROWS), help=f"comma list among {ROWS}")
    parser.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                        help="nsa_backend of the videonsa row (auto: Triton on CUDA, the PyTorch reference on CPU)")
    parser.add_argument("--tokens", type=int, default=36864, help="tokens per sample, nearly all video")
    parser.add_argument("--answer-tokens", type=int, default=16, help="supervised answer length (plus <|im_end|>)")
    parser.add_argument("--samples", type=int, default=None,
                        help="distinct samples in the dataset (default: one global batch)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row")
    parser.add_argument("--warmup-steps", type=int, default=1, help="optimizer steps before the timed ones")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per device per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="mode", action="store_const", const="lora", help="LoRA adapters (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="train every weight")
    parser.set_defaults(mode="lora")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="0 by default: no random masks, so runs with different process counts compare")
    parser.add_argument("--freeze-vision-tower", action="store_true")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="weight dtype (auto: bfloat16 with LoRA, float32 for full fine-tuning)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 mixed precision")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-4 LoRA, 1e-5 full)")
    parser.add_argument("--optim", default="adamw_torch", help="TrainingArguments.optim")
    parser.add_argument("--seed", type=int, default=0, help="weights and data")
    parser.add_argument("--init-device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where random weights are drawn (auto: the GPU of a single-process run, else the CPU); "
                             "runs whose losses are compared must use the same")
    parser.add_argument("--config-overrides", default=None,
                        help="key=value list applied to the preset, e.g. num_hidden_layers=2 for a smoke test")
    parser.add_argument("--reference", default=None, help="JSON of an earlier run: report the loss difference to it")
    parser.add_argument("--loss-rtol", type=float, default=0.01,
                        help="relative loss difference to the reference counted as within bf16 noise")
    parser.add_argument("--output-dir", default=None, help="the Trainer's scratch folder (nothing is saved there)")
    parser.add_argument("--out", default=None, help="markdown report path (a .json with the raw numbers beside it)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error("--steps must be >= 1 and --warmup-steps >= 0")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.mode == "lora" else "float32"
    if args.lr is None:
        args.lr = 1e-4 if args.mode == "lora" else 1e-5
    if args.output_dir is None:
        args.output_dir = os.path.join(tempfile.gettempdir(), "videonsa_bench_training")
    if args.out is None and os.environ.get("OUT"):
        args.out = os.path.join(os.environ["OUT"], "bench_training.md")
    return args


def run_metadata(args, argv) -> dict:
    import accelerate
    import peft
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"accelerate launch ({world} processes) " if world > 1 else "python "
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if cuda else "CPU",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peft": peft.__version__,
        "triton": triton_version,
        "sdpa_backends": ", ".join(
            name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                  ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                  ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                                  ("math", torch.backends.cuda.math_sdp_enabled())) if on),
        "dtype": args.dtype,
        "init_device": args.init_device if args.init_device != "auto" else (
            "cuda" if cuda and not os.environ.get("ACCELERATE_USE_FSDP") else "cpu"),
        "command": launcher + "bench/bench_training.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "reference": args.reference,
        "world_size": world,
        "distributed": "—",
        **{key: "—" for key in SAMPLE_KEYS},
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if torch.cuda.device_count() > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # the Trainer would wrap the model in torch.nn.DataParallel over every visible GPU
        raise SystemExit("bench_training.py: several GPUs are visible to one process; set CUDA_VISIBLE_DEVICES=0 for a "
                         "one-GPU run, or start one process per GPU with accelerate launch")
    meta = run_metadata(args, argv)
    reference = None
    if args.reference:
        with open(args.reference, encoding="utf-8") as file:
            reference = json.load(file)
    results, comparison, main_process = {}, None, True
    for row in args.rows:
        try:
            results[row] = run_row(args, row)
        except Exception as error:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc()
            results[row] = {"error": describe_failure(error)}
            _free()
        entry = results[row]
        main_process = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
            torch.distributed.get_rank() == 0)
        if "error" not in entry:
            meta.update(world_size=entry["world_size"], distributed=entry["distributed_type"],
                        **{key: entry[key] for key in SAMPLE_KEYS})
        if main_process:
            shown = {k: v for k, v in entry.items() if k not in ("step_time_s", "grad_norm")}
            print(f"{row}: {json.dumps(shown, default=str)}", flush=True)
        if reference is not None:
            comparison = compare_losses(results, reference, args.loss_rtol)
        if args.out and main_process:
            write_report(args.out, meta, results, args, comparison)
    if main_process:
        print("\n" + render(meta, results, args, comparison), flush=True)
        if args.out:
            write_report(args.out, meta, results, args, comparison)
            print(f"\nwrote {args.out} and {os.path.splitext(args.out)[0]}.json", flush=True)
    return {"meta": meta, "results": results, "comparison": comparison}


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # read when CUDA starts, below
    main()
