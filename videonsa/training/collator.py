"""The training collator: LLaVA-Video records in, a padded batch out; videos are decoded here.

A video can pass the planning pass (its header reads) and still fail to decode (its frames are cut). Such a sample
is handled as ``on_invalid`` says: ``"skip"`` drops it from the batch and logs it, ``"error"`` stops before the
step with an error that names it. Either way it is recorded in ``failures_path`` (one JSON line), and a resumed run
passes those records as ``known_invalid``, so it skips the sample without decoding it again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from processing_videonsa import VideoDecodingError

from .data import IGNORE_INDEX, _as_list, assistant_labels, record_to_messages

logger = logging.get_logger(__name__)

UNDECODABLE_REPORT = "undecodable_samples.jsonl"  # in the output folder; kept when a run resumes


class SampleDecodingError(ValueError):
    """A training sample's video could not be decoded (``on_invalid="error"``); the message names the sample."""


def sample_key(record: dict) -> tuple:
    """What identifies a sample across runs: its record index in the data file and its videos."""
    return record.get("index"), tuple(_as_list(record.get("videos")) or _as_list(record.get("video")))


def read_failures(path: str | os.PathLike | None) -> set[tuple]:
    """The :func:`sample_key` of every sample recorded in a failures report (empty when there is none)."""
    if path is None or not Path(path).is_file():
        return set()
    keys = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            keys.add((entry["index"], tuple(entry["videos"])))
    return keys


@dataclass
class VideoNSADataCollator:
    """Encodes LLaVA-Video records with the processor and pads them into one batch (right padding).

    Videos are decoded here (in the DataLoader workers when ``dataloader_num_workers > 0``). The processor's context
    budget is enforced per sample: a sample over ``max_context_tokens`` raises
    :class:`~processing_videonsa.ContextBudgetExceededError`, it is never truncated (``prepare_dataset`` removes
    such samples beforehand and reports them). A sample whose video fails to decode follows ``on_invalid`` (see the
    module docs); a batch left with no sample becomes one padding token with no label, which trains nothing but
    keeps every process of a distributed run in step.
    """

    processor: Any
    max_context_tokens: int | None = None
    video_root: str | None = None
    on_invalid: str = "error"
    failures_path: str | os.PathLike | None = None
    known_invalid: set = field(default_factory=set)

    def __post_init__(self):
        if self.on_invalid not in ("skip", "error"):
            raise ValueError(f"on_invalid must be 'skip' or 'error', got {self.on_invalid!r}")

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
        samples = []
        for record in records:
            if sample_key(record) in self.known_invalid:
                logger.warning(f"Skipping sample {_describe(record)}: its video failed to decode before "
                               f"(listed in {self.failures_path})")
                continue
            try:
                samples.append(self.encode(record))
            except (VideoDecodingError, OSError) as error:
                self._failed(record, error)
        return self.pad(samples) if samples else self.empty_batch()

    def _failed(self, record: dict, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        if self.failures_path is not None:
            Path(self.failures_path).parent.mkdir(parents=True, exist_ok=True)
            index, videos = sample_key(record)
            with open(self.failures_path, "a", encoding="utf-8") as file:
                file.write(json.dumps({"index": index, "id": record.get("id"), "videos": list(videos),
                                       "reason": reason}, default=str) + "\n")
        where = f" (recorded in {self.failures_path})" if self.failures_path is not None else ""
        if self.on_invalid == "error":
            resume = (" Resume the run (--resume_from_checkpoint auto) to continue without it, or" if
                      self.failures_path is not None else "")
            raise SampleDecodingError(
                f"Training stopped before the step of sample {_describe(record)}: its video could not be decoded "
                f"({reason}){where}.{resume} pass --on_invalid skip to skip such samples."
            ) from error
        logger.warning(f"Skipping sample {_describe(record)}: its video could not be decoded ({reason}){where}")
        self.known_invalid.add(sample_key(record))

    def empty_batch(self) -> dict[str, torch.Tensor]:
        pad = self.processor.tokenizer.pad_token_id
        return {"input_ids": torch.tensor([[pad]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
                "mm_token_type_ids": torch.zeros(1, 1, dtype=torch.long),
                "labels": torch.full((1, 1), IGNORE_INDEX)}

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


def _describe(record: dict) -> str:
    index, videos = sample_key(record)
    return f"#{index} (id={record.get('id')!r}, video={list(videos)!r})"
