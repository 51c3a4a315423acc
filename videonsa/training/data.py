"""LLaVA-Video records for training: records -> chat messages, assistant-only labels, and the planning pass that
measures every sample from its videos' metadata and reports (skips or rejects) what does not fit or cannot be read.

* :func:`record_to_messages`: a LLaVA-Video record (``{"video": ..., "conversations": [{"from": "human", "value":
  "<video>\\n..."}, {"from": "gpt", "value": ...}]}``, or ``role``/``content`` turns) -> chat messages + video paths.
* :func:`assistant_labels`: ``labels`` that supervise exactly the assistant turns.
* :func:`prepare_dataset`: plans every sample's token count from video metadata (nothing decoded), reports the
  samples that exceed the context budget or cannot be read, and skips or rejects them (never cuts them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers.utils import logging

from processing_videonsa import ContextBudgetExceededError

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
VIDEO_TAG = "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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

