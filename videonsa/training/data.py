"""Fine-tuning pieces for VideoNSA on video-instruction data, for transformers' ``Trainer`` (used by ``train.py``).

* :func:`record_to_messages`: a LLaVA-Video record (``{"video": ..., "conversations": [{"from": "human", "value":
  "<video>\\n..."}, {"from": "gpt", "value": ...}]}``, or ``role``/``content`` turns) -> chat messages + video paths.
* :func:`prepare_dataset`: plans every sample's token count from video metadata (nothing decoded), reports the
  samples that exceed the context budget or cannot be read, and skips or rejects them (never cuts them).
* :class:`VideoNSADataCollator`: processor in, padded batch out; ``labels`` supervise exactly the assistant turns
  (their content and closing ``<|im_end|>``), everything else is ``-100``.
* :class:`GateMonitor`: records the mean sigmoid gate per NSA branch (cmp / slc / swa) over vision tokens.
* :class:`VideoNSATrainer`: ``Trainer`` that logs the gate means, and computes logits only where a label is
  supervised (a 36K-token video sample would otherwise materialise a 36K x 152K float32 logits tensor).
* :func:`freeze_modules`, :func:`lora_config`, :func:`apply_config_overrides`, :class:`StepStatsCallback`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.utils import logging

from configuration_videonsa import NSA_KEYS, validate_nsa_settings
from processing_videonsa import ContextBudgetExceededError

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
VIDEO_TAG = "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
GATE_BRANCHES = ("cmp", "slc", "swa")  # the order of the gate logits: compression, selection, sliding window


# ----------------------------------------------------------------------------------------------------------
# Records -> chat messages
# ----------------------------------------------------------------------------------------------------------
def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def resolve_video(path: str, video_root: str | os.PathLike | None) -> str:
    """A record's video path made usable: absolute paths and URLs as they are, others joined to ``video_root``."""
    if path.startswith(("http://", "https://", "file://")) or os.path.isabs(path) or video_root is None:
        return path
    return os.path.join(str(video_root), path)


def _turn_role_and_text(turn: dict, index: int) -> tuple[str, str]:
    # ``datasets`` merges the keys of every turn of a file into one struct, so absent keys read as None
    speaker = turn.get("from") if turn.get("from") is not None else turn.get("role")
    text = turn.get("value") if turn.get("value") is not None else turn.get("content")
    if speaker not in ROLES:
        raise ValueError(f"turn {index} has speaker {speaker!r}; expected one of {sorted(ROLES)} in 'from' or 'role'")
    if isinstance(text, list):  # structured content: keep its text parts, in order
        if any(isinstance(part, dict) and part.get("type") not in (None, "text") for part in text):
            raise ValueError(f"turn {index}: only text parts are supported in structured content; mark videos "
                             f"with {VIDEO_TAG!r} in the text and name them in the record's 'video' field")
        text = "".join(part.get("text") or "" for part in text)
    if not isinstance(text, str):
        raise ValueError(f"turn {index} ({speaker}) has no text in 'value' or 'content'")
    return ROLES[speaker], text


def record_to_messages(record: dict, video_root: str | os.PathLike | None = None) -> tuple[list[dict], list[str]]:
    """Turn a LLaVA-Video record into chat-template messages and the list of its videos, in prompt order.

    ``<video>`` in a user (or system) turn marks where a video goes; the line break right after it is dropped, so
    that a training prompt reads exactly like the one ``apply_chat_template`` builds at inference
    (``<|vision_start|><|video_pad|><|vision_end|>Question``). A record with videos and no ``<video>`` tag gets
    them at the start of its first user turn, as LLaVA does. The record's ``videos`` field (absolute paths, written
    by :func:`prepare_dataset`) wins over ``video`` (paths relative to ``video_root``).
    """
    if record.get("image"):
        raise ValueError("image samples are not supported by this script (only 'video' records)")
    videos = _as_list(record.get("videos")) or [resolve_video(v, video_root) for v in _as_list(record.get("video"))]
    turns = record.get("conversations") if record.get("conversations") is not None else record.get("messages")
    if not turns:
        raise ValueError("the record has no 'conversations' (or 'messages') turns")
    parsed = [_turn_role_and_text(turn, index) for index, turn in enumerate(turns)]
    if not any(role == "assistant" for role, _ in parsed):
        raise ValueError("the record has no assistant ('gpt') turn: nothing would be supervised")
    tags = sum(text.count(VIDEO_TAG) for _, text in parsed)
    if tags == 0 and videos:
        first_user = next((i for i, (role, _) in enumerate(parsed) if role == "user"), None)
        if first_user is None:
            raise ValueError("the record has videos but no user turn to put them in")
        parsed[first_user] = ("user", VIDEO_TAG * len(videos) + parsed[first_user][1])
        tags = len(videos)
    if tags != len(videos):
        raise ValueError(f"the conversation has {tags} {VIDEO_TAG!r} tags but the record names {len(videos)} videos")

    messages, next_video = [], 0
    for index, (role, text) in enumerate(parsed):
        if VIDEO_TAG not in text:
            messages.append({"role": role, "content": text})
            continue
        if role == "assistant":
            raise ValueError(f"turn {index}: an assistant turn cannot hold a {VIDEO_TAG!r}")
        content = []
        for position, piece in enumerate(text.split(VIDEO_TAG)):
            if position > 0:
                content.append({"type": "video", "video": videos[next_video]})
                next_video += 1
                piece = piece.removeprefix("\n")
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages, videos


# ----------------------------------------------------------------------------------------------------------
# Labels: exactly the assistant turns
# ----------------------------------------------------------------------------------------------------------
def assistant_labels(input_ids: torch.Tensor, tokenizer, messages: list[dict]) -> torch.Tensor:
    """``labels`` for one tokenized conversation: the tokens of each assistant turn's content and its closing
    ``<|im_end|>`` keep their ids; everything else (system and user turns, video pads, the ``<|im_start|>assistant\\n``
    header, the line break after ``<|im_end|>``) is ``-100``.

    Special tokens are never merged with their neighbours, so every turn sits between an ``<|im_start|>`` and the
    next ``<|im_end|>``; an assistant turn is one that starts with the tokens of ``assistant\\n``. The supervised
    tokens of every turn are checked to decode to the turn's text, so a tokenization that does not split header
    and answer (an answer that starts with a line break) is an error, not a silently wrong mask.
    """
    ids = input_ids.tolist()
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    found = []
    for start, token in enumerate(ids):
        if token != im_start or ids[start + 1 : start + 1 + len(header)] != header:
            continue
        first = start + 1 + len(header)
        try:
            end = ids.index(im_end, first)
        except ValueError:
            raise ValueError("an assistant turn has no closing <|im_end|>") from None
        labels[first : end + 1] = input_ids[first : end + 1]
        found.append(tokenizer.decode(ids[first:end], clean_up_tokenization_spaces=False))
    expected = [a if isinstance(a, str) else "".join(p.get("text", "") for p in a) for a in answers]
    if found != expected:
        raise ValueError(
            f"could not locate the {len(expected)} assistant turns in the tokenized conversation (found "
            f"{len(found)}); an answer that starts with a line break, or special tokens such as <|im_start|> inside a "
            "turn's text, break the turn structure"
        )
    return labels


# ----------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------
@dataclass
class VideoNSADataCollator:
    """Encodes LLaVA-Video records with the processor and pads them into one batch (right padding).

    Videos are decoded here (in the DataLoader workers when ``dataloader_num_workers > 0``). The processor's context
    budget is enforced per sample: a sample over ``max_context_tokens`` raises
    :class:`~processing_videonsa.ContextBudgetExceededError`, it is never truncated (``prepare_dataset`` removes
    such samples beforehand and reports them).
    """

    processor: Any
    max_context_tokens: int | None = None
    video_root: str | None = None

    def encode(self, record: dict) -> dict[str, torch.Tensor]:
        messages, videos = record_to_messages(record, self.video_root)
        text = self.processor.apply_chat_template(messages, tokenize=False)
        kwargs = {} if self.max_context_tokens is None else {"max_context_tokens": self.max_context_tokens}
        encoded = self.processor(text=[text], videos=videos or None, return_tensors="pt", **kwargs)
        sample = {key: value[0] for key, value in encoded.items() if key in ("input_ids", "attention_mask",
                                                                            "mm_token_type_ids")}
        sample["labels"] = assistant_labels(sample["input_ids"], self.processor.tokenizer, messages)
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            if key in encoded:
                sample[key] = torch.as_tensor(encoded[key])
        return sample

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        return self.pad([self.encode(record) for record in records])

    def pad(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(s["input_ids"]) for s in samples)
        pad_id = self.processor.tokenizer.pad_token_id
        fills = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key, fill in fills.items():
            if all(key in s for s in samples):
                rows = [torch.cat([s[key], s[key].new_full((length - len(s[key]),), fill)]) for s in samples]
                batch[key] = torch.stack(rows)
        with_video = [s for s in samples if "video_grid_thw" in s]
        if with_video:
            batch["pixel_values_videos"] = torch.cat([s["pixel_values_videos"] for s in with_video])
            batch["video_grid_thw"] = torch.cat([s["video_grid_thw"] for s in with_video])
            if all("second_per_grid_ts" in s for s in with_video):
                batch["second_per_grid_ts"] = torch.cat([s["second_per_grid_ts"] for s in with_video])
        return batch


# ----------------------------------------------------------------------------------------------------------
# Dataset preparation: plan token counts, report and skip (or reject) what does not fit or cannot be read
# ----------------------------------------------------------------------------------------------------------
def planned_num_tokens(processor, messages: list[dict], videos: list[str]) -> int:
    """The sample's length in tokens, from the template text and the videos' metadata (no frame is decoded):
    what the processor's own budget check counts, and the length of the collated ``input_ids``."""
    text = processor.apply_chat_template(messages, tokenize=False)
    num_text = len(processor.tokenizer(text)["input_ids"]) - text.count(processor.video_token)
    return num_text + sum(plan.num_tokens for plan in (processor.plan_videos(videos) if videos else []))


def prepare_dataset(
    dataset,
    processor,
    *,
    video_root: str | os.PathLike | None,
    max_context_tokens: int | None = None,
    on_too_long: str = "skip",
    on_invalid: str = "error",
    report_path: str | os.PathLike | None = None,
    num_proc: int | None = None,
    name: str = "train",
    load_from_cache_file: bool = True,
):
    """Add ``videos`` (resolved paths), ``length`` (planned tokens) and keep only the samples that can be trained on.

    A sample is *too long* when its planned length exceeds ``max_context_tokens`` (the processor's when None) and
    *invalid* when its record is malformed or a video cannot be read. ``on_too_long`` / ``on_invalid``: ``"skip"``
    drops the samples and reports each one (a warning, and one JSON line in ``report_path``); ``"error"`` raises,
    naming them (:class:`ContextBudgetExceededError` for too-long samples, ``ValueError`` for invalid ones).
    """
    for flag, value in (("on_too_long", on_too_long), ("on_invalid", on_invalid)):
        if value not in ("skip", "error"):
            raise ValueError(f"{flag} must be 'skip' or 'error', got {value!r}")
    limit = int(max_context_tokens or processor.max_context_tokens)

    def plan(record, index):
        try:
            messages, videos = record_to_messages(record, video_root)
            length = planned_num_tokens(processor, messages, videos)
        except (ValueError, OSError, KeyError, TypeError) as error:
            return {"index": index, "videos": [], "length": -1, "skip_kind": "invalid",
                    "skip_reason": f"{type(error).__name__}: {error}"}
        too_long = length > limit
        return {"index": index, "videos": videos, "length": length, "skip_kind": "too_long" if too_long else "",
                "skip_reason": f"{length:,} tokens > max_context_tokens={limit:,}" if too_long else ""}

    from datasets.fingerprint import Hasher

    video_processor = processor.video_processor
    settings = dict(limit=limit, root=str(video_root), fps=video_processor.fps, size=str(video_processor.size),
                    max_frames=video_processor.max_frames, template=processor.chat_template,
                    vocab=len(processor.tokenizer))
    fingerprint = Hasher.hash([getattr(dataset, "_fingerprint", None), settings, "videonsa-plan-v1"])
    dataset = dataset.map(plan, with_indices=True, num_proc=num_proc, new_fingerprint=fingerprint,
                          load_from_cache_file=load_from_cache_file,
                          desc=f"Planning {name} samples (video metadata only)")
    kinds = dataset["skip_kind"]
    skipped = [i for i, kind in enumerate(kinds) if kind]
    if not skipped:
        return dataset.remove_columns(["skip_kind", "skip_reason"])
    rows = dataset.select(skipped)
    reports = [
        {"split": name, "index": row["index"], "id": row.get("id"), "video": row.get("video"),
         "kind": row["skip_kind"], "reason": row["skip_reason"]}
        for row in rows
    ]
    for kind, policy, error_class in (("too_long", on_too_long, ContextBudgetExceededError),
                                      ("invalid", on_invalid, ValueError)):
        of_kind = [r for r in reports if r["kind"] == kind]
        if of_kind and policy == "error":
            listed = "\n".join(f"  #{r['index']} id={r['id']!r} video={r['video']!r}: {r['reason']}"
                               for r in of_kind[:20])
            more = f"\n  ... and {len(of_kind) - 20} more" if len(of_kind) > 20 else ""
            flag = "--on_too_long skip" if kind == "too_long" else "--on_invalid skip"
            raise error_class(f"{len(of_kind)} {name} sample(s) are {kind.replace('_', ' ')} (pass {flag} to skip "
                              f"and report them instead):\n{listed}{more}")
    for report in reports[:20]:
        logger.warning(f"Skipping {name} sample #{report['index']} (id={report['id']!r}, video={report['video']!r}): "
                       f"{report['kind']}: {report['reason']}")
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        with open(report_path, "a", encoding="utf-8") as file:
            for report in reports:
                file.write(json.dumps(report, default=str) + "\n")
    counts = {kind: sum(r["kind"] == kind for r in reports) for kind in ("too_long", "invalid")}
    logger.warning(
        f"{name}: skipped {len(reports)} of {len(kinds)} samples ({counts['too_long']} too long for "
        f"max_context_tokens={limit:,}, {counts['invalid']} invalid)"
        + (f"; every one is listed in {report_path}" if report_path is not None else "")
    )
    skipped_set = set(skipped)
    keep = [i for i in range(len(kinds)) if i not in skipped_set]
    return dataset.select(keep).remove_columns(["skip_kind", "skip_reason"])


# ----------------------------------------------------------------------------------------------------------
# Gate monitor
# ----------------------------------------------------------------------------------------------------------
def _videonsa_attention_modules(model) -> list:
    """The VideoNSA attention modules of a model, whatever wraps it (PEFT, DDP, FSDP, DeepSpeed) and whichever copy
    of the modeling code defined them (a source checkout or transformers' remote-code cache)."""
    return [m for m in model.modules() if hasattr(m, "gate_logits") and hasattr(m, "g_proj_2")]


class GateMonitor:
    """Records the mean sigmoid gate of each NSA branch (cmp, slc, swa) over the real vision tokens of training
    forward passes, per layer, between two calls of :meth:`pop`.

    The gates are read where the model computes them: a forward hook on each attention's ``g_proj_2`` (the last
    layer of ``VideoNSAAttention.gate_logits``, LoRA included when it is adapted) sees the logits, and a
    pre-hook on the attention gives the pass's token typing (``videonsa_tokens``: vision flags and padding). The
    gate of a token is ``sigmoid(logit / nsa_gate_temperature)``, averaged over heads. Dense passes (text-only
    batches, ``nsa_enabled=False``) compute no gate and add nothing. Under gradient checkpointing a layer's forward
    runs again during backward with identical values, which leaves the mean unchanged.
    """

    def __init__(self, model, per_layer: bool = False):
        self.per_layer = per_layer
        self.layers = _videonsa_attention_modules(model)
        self._tokens = [None] * len(self.layers)
        self._sums = None  # float64 [layers, 3], on the device of the gates
        self._counts = None  # float64 [layers]
        self._handles = []
        for index, attention in enumerate(self.layers):
            self._handles.append(attention.register_forward_pre_hook(self._remember_tokens(index), with_kwargs=True))
            self._handles.append(attention.g_proj_2.register_forward_hook(self._record(index, attention)))

    def _remember_tokens(self, index):
        def hook(module, args, kwargs):
            self._tokens[index] = kwargs.get("videonsa_tokens")

        return hook

    def _record(self, index, attention):
        def hook(module, args, output):
            tokens = self._tokens[index]
            if not attention.training or tokens is None:
                return
            with torch.no_grad():
                batch, length = output.shape[:2]
                vision = tokens.is_vision[:, -length:]
                if tokens.key_padding_mask is not None:
                    vision = vision & tokens.key_padding_mask[:, -length:]
                logits = output.detach().float().view(batch, length, -1, 3) / attention.config.nsa_gate_temperature
                # weighted by the vision flags rather than indexed by them: boolean indexing waits for the GPU
                weight = vision.to(device=logits.device, dtype=logits.dtype)[:, :, None, None]  # [B, T, 1, 1]
                if self._sums is None:
                    self._sums = torch.zeros(len(self.layers), 3, dtype=torch.float64, device=logits.device)
                    self._counts = torch.zeros(len(self.layers), dtype=torch.float64, device=logits.device)
                self._sums[index] += (torch.sigmoid(logits) * weight).sum(dim=(0, 1, 2)).to(torch.float64)
                self._counts[index] += weight.sum().to(torch.float64) * logits.shape[2]

        return hook

    def pop(self, device=None, all_reduce: bool = False) -> dict[str, float]:
        """The means since the last call (``gate/cmp``, ``gate/slc``, ``gate/swa``, over every layer; with
        ``per_layer`` also ``gate/layer_{i}/{branch}``), then reset. With ``all_reduce``, summed over the processes
        of ``torch.distributed`` first (every process must call it)."""
        sums, counts = self._sums, self._counts
        if sums is None:
            sums = torch.zeros(len(self.layers), 3, dtype=torch.float64, device=device)
            counts = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        elif device is not None:
            sums, counts = sums.to(device), counts.to(device)
        self._sums = self._counts = None
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        total = float(counts.sum())
        if total == 0:
            return {}
        means = (sums.sum(dim=0) / total).tolist()
        logs = {f"gate/{branch}": value for branch, value in zip(GATE_BRANCHES, means)}
        if self.per_layer:
            for index in range(len(self.layers)):
                if counts[index] > 0:
                    for branch, value in zip(GATE_BRANCHES, (sums[index] / counts[index]).tolist()):
                        logs[f"gate/layer_{index}/{branch}"] = value
        return logs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------
def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """1-D positions ``p`` whose logits predict a supervised label (``labels[:, p + 1] != -100`` in some row)."""
    return torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0)).flatten()


def supervised_causal_lm_loss(outputs, labels, num_items_in_batch=None, **kwargs):
    """Causal-LM cross entropy on logits computed at :func:`supervised_positions` only; the same value as the
    model's own loss over all positions (a sum divided by ``num_items_in_batch`` when given, else a mean)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    targets = labels[:, 1:][:, supervised_positions(labels)]
    if targets.numel() == 0:  # nothing supervised (a kept position has a supervised label by construction)
        return logits.sum() * 0.0
    return ForCausalLMLoss(
        logits, None, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch, shift_labels=targets
    )


class VideoNSATrainer(Trainer):
    """``Trainer`` for VideoNSA: logs the mean NSA gates per branch and computes logits only where supervised.

    Args:
        gate_logging: ``"mean"`` (``gate/cmp``, ``gate/slc``, ``gate/swa`` in every training log), ``"per_layer"``
            (also ``gate/layer_{i}/{branch}``) or ``"none"``.
        supervised_logits_only: project only the hidden states that predict a supervised token onto the vocabulary
            (``logits_to_keep``); the loss is the same, the logits of a long video prompt are never built.
    """

    def __init__(self, *args, gate_logging: str = "mean", supervised_logits_only: bool = True, **kwargs):
        if supervised_logits_only and kwargs.get("compute_loss_func") is None:
            kwargs["compute_loss_func"] = supervised_causal_lm_loss
        super().__init__(*args, **kwargs)
        self.supervised_logits_only = supervised_logits_only
        if gate_logging not in ("none", "mean", "per_layer"):
            raise ValueError(f"gate_logging must be 'none', 'mean' or 'per_layer', got {gate_logging!r}")
        self.gate_monitor = None if gate_logging == "none" else GateMonitor(self.model, gate_logging == "per_layer")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "use_cache": False}
        if self.supervised_logits_only and inputs.get("labels") is not None:
            inputs["logits_to_keep"] = supervised_positions(inputs["labels"])
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    # transformers writes Qwen2.5-VL-style checkpoints in the 4.x key layout (``model.layers.N``, ``visual.*``) and
    # maps it back in ``from_pretrained``, but the Trainer's resume and best-model paths call ``load_state_dict`` on
    # the raw file, which would match no key. Full-weight checkpoints of a plain run therefore load through
    # ``from_pretrained``; adapters, FSDP and DeepSpeed checkpoints keep the Trainer's own loading.
    def _full_weights_checkpoint(self, folder, model) -> bool:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or hasattr(model, "peft_config") or folder is None:
            return False
        names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
        return any(os.path.isfile(os.path.join(folder, name)) for name in names)

    def _load_full_weights(self, folder, model) -> None:
        logger.info(f"Loading model weights from {folder}")
        parameter = next(model.parameters())
        loaded = type(model).from_pretrained(folder, dtype=parameter.dtype)
        result = model.load_state_dict(loaded.state_dict(), strict=False)
        del loaded
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(f"The checkpoint {folder} does not fit the model: missing {result.missing_keys[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.model if model is None else model
        if not self._full_weights_checkpoint(resume_from_checkpoint, target):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_full_weights(resume_from_checkpoint, target)

    def _load_best_model(self):
        if not self._full_weights_checkpoint(self.state.best_model_checkpoint, self.model):
            return super()._load_best_model()
        self._load_full_weights(self.state.best_model_checkpoint, self.model)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.gate_monitor is not None and "loss" in logs:  # a training log: every process is here
            logs.update(self.gate_monitor.pop(device=self.args.device, all_reduce=self.args.world_size > 1))
        super().log(logs, *args, **kwargs)


class StepStatsCallback(TrainerCallback):
    """Times every optimizer step and tracks peak accelerator memory; writes ``step_stats.json`` to the output
    folder at the end of training. It synchronises the GPU twice a step, so it is on only when asked for
    (``train.py --step_stats``; ``bench/bench_training.py`` uses it for its tables).

    ``step_time_s``: from the step's start to its end (forward, backward, optimizer; the batches of the step are
    already loaded); ``interval_s``: from one step's end to the next (data loading included)."""

    def __init__(self):
        self.step_times, self.intervals = [], []
        self._start = self._last_end = None

    @staticmethod
    def _sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # peaks of training, not of model building
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        if self._start is not None:
            self.step_times.append(now - self._start)
        if self._last_end is not None:
            self.intervals.append(now - self._last_end)
        self._last_end = now

    def summary(self) -> dict:
        times = sorted(self.step_times[1:] or self.step_times)  # the first step includes warm-up (autotuning)
        stats = {
            "steps": len(self.step_times),
            "step_time_s": self.step_times,
            "interval_s": self.intervals,
            "median_step_time_s_after_first": times[len(times) // 2] if times else None,
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            stats.update(
                device=torch.cuda.get_device_name(),
                peak_memory_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                peak_memory_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
            )
        return stats

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "step_stats.json"), "w", encoding="utf-8") as file:
                json.dump(self.summary(), file, indent=2)


# ----------------------------------------------------------------------------------------------------------
# Model set-up: freezing, LoRA, config overrides
# ----------------------------------------------------------------------------------------------------------
GATE_MODULES = ("g_proj_1", "g_proj_2")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj_1", "g_proj_2")


def freeze_modules(model, vision_tower: bool = False, merger: bool = False, llm: bool = False) -> dict[str, int]:
    """Freeze parts of a ``VideoNSAForConditionalGeneration``: the vision tower (patch embedding and blocks),
    the merger (the vision -> text projection), and/or the language model (embeddings, decoder layers, final norm,
    ``lm_head``) except the NSA gate MLPs (``g_proj_1``, ``g_proj_2``), which stay trainable.

    Returns the trainable and total parameter counts."""
    core = model.model
    if vision_tower:
        for name, parameter in core.visual.named_parameters():
            if not name.startswith("merger."):
                parameter.requires_grad_(False)
    if merger:
        core.visual.merger.requires_grad_(False)
    if llm:
        core.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
        for attention in _videonsa_attention_modules(core.language_model):
            for name in GATE_MODULES:
                getattr(attention, name).requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=DEFAULT_LORA_TARGETS,
                modules_to_save=None):
    """A PEFT ``LoraConfig`` adapting the named linear layers of the language model's decoder layers only (the
    vision tower's MLP shares names such as ``gate_proj`` with the language model's)."""
    from peft import LoraConfig

    names = "|".join(sorted(set(target_modules)))
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({names})",
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type="CAUSAL_LM",
    )


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def apply_config_overrides(config, overrides: str | None):
    """A new config with ``"key=value,key=value"`` applied. Keys are text-config keys (``num_hidden_layers``, the
    NSA keys such as ``nsa_enabled``), top-level keys, or dotted (``vision_config.depth``); values are JSON
    (``false``, ``4``, ``[16,24,24]``) or plain strings. A changed layer count drops the per-layer lists so that
    they are rebuilt for the new count."""
    if not overrides:
        return config
    data = config.to_dict()
    text = data["text_config"]
    for item in (part.strip() for part in overrides.split(",") if part.strip()):
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        value = _parse_value(value)
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in ("text_config", "vision_config") or sub not in data[section]:
                raise ValueError(f"unknown config key {key!r}")
            data[section][sub] = value
        elif key in text or key in NSA_KEYS:
            text[key] = value
        elif key in data:
            data[key] = value
        else:
            raise ValueError(f"unknown config key {key!r} (not in text_config, vision_config or the top level)")
        if key.endswith("num_hidden_layers") and "layer_types" not in overrides:
            text.pop("layer_types", None)
        if key.endswith("depth") and "fullatt_block_indexes" not in overrides:
            depth = data["vision_config"]["depth"]
            data["vision_config"]["fullatt_block_indexes"] = [
                i for i in data["vision_config"].get("fullatt_block_indexes", []) if i < depth
            ] or [depth - 1]
    new = type(config).from_dict(data)
    validate_nsa_settings(new.text_config)
    return new

