"""The ``videonsa`` model of lmms-eval: VideoNSA loaded with ``AutoModel`` / ``AutoProcessor`` and answering the
harness's generation requests through the processor's chat template.

lmms-eval finds the classes through the ``lmms_eval.models`` entry point of this package (``videonsa.eval``).
``VideoNSA`` is the chat model (the task builds the messages: ``doc_to_messages``, or lmms-eval's default built from
``doc_to_visual`` and ``doc_to_text``); ``VideoNSASimple`` is the same model for ``--force_simple``, where requests
carry a context string and a ``doc_to_visual`` function.

A sample whose video cannot be used (over the context budget, missing, undecodable) does not stop the run: its
answer is the empty string, which every task scores as wrong, the error is logged with the task and document, and
``failure_log=path.jsonl`` keeps one JSON line per failed sample. Bad model arguments raise at start-up.
"""

from __future__ import annotations

import difflib
import inspect
import json
import sys
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from loguru import logger as eval_logger

from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.api.task import ConfigurableMessagesTask
from lmms_eval.models.model_utils.progress import make_progress
from lmms_eval.protocol import ChatMessages

# The settings the released checkpoint was trained with; passed on every call, so that a checkpoint whose processor
# files say otherwise is still evaluated at the paper's settings unless the user asks for others.
from processing_videonsa import DEFAULT_FPS, DEFAULT_MAX_CONTEXT_TOKENS, DEFAULT_VIDEO_MAX_PIXELS

# Keys of a task's `generation_kwargs` that reach `generate`; `until` is applied to the decoded text.
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "repetition_penalty")
DTYPES = {
    "auto": "auto",
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


class UnsupportedSampleError(ValueError):
    """A sample asks for something VideoNSA's processor does not do (a clip of a video, audio)."""


@dataclass
class _Sample:
    task: str
    split: str
    doc_id: Any
    messages: list | None
    gen_kwargs: dict
    error: Exception | None = None


def _none(value):
    return None if isinstance(value, str) and value.strip().lower() in ("", "none", "null") else value


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"videonsa model argument {name} must be true or false, got {value!r}")


def _as_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"videonsa model argument {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _as_float(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number > 0:
        raise ValueError(f"videonsa model argument {name} must be a number > 0, got {value!r}")
    return number


class VideoNSA(lmms):
    """VideoNSA in lmms-eval (chat requests). Model arguments (``--model_args key=value,...``):

    Loading:
        pretrained (`str`, defaults to ``"Enxin/VideoNSA"``): Hub repo id or local folder.
        revision (`str`, *optional*): Hub revision (branch, tag or commit).
        dtype (`str`, defaults to ``"bfloat16"``): ``bfloat16``, ``float16``, ``float32`` or ``auto``.
        device_map (`str`, *optional*): passed to ``from_pretrained``; defaults to ``cuda`` when a GPU is visible
            (the rank's GPU under ``accelerate launch``), else ``cpu``; ``auto`` shards one model over the GPUs.
        trust_remote_code (`bool`, defaults to `True`): load the checkpoint's own code (``AutoModel`` /
            ``AutoProcessor``). A checkpoint in the authors' release layout (a Qwen2.5-VL ``config.json``, no code
            files) loads with this installation's classes instead, so that its gate MLPs are kept.
        in_tree (`bool`, defaults to `False`): use this installation's ``modeling_videonsa`` /
            ``processing_videonsa`` classes instead of the checkpoint's code.
    Videos (the processor's settings, per call):
        fps (`float`, defaults to 4), max_pixels (`int`, defaults to 50,176: 64 tokens per frame pair),
        min_pixels (`int`, *optional*), max_frames (`int`, *optional*, no cap), max_context_tokens (`int`, defaults
        to 131,072), reduce_fps_to_fit (`bool`, defaults to `False`: a prompt over the budget is a failed sample;
        `True` lowers the fps of that prompt until it fits, and samples are then encoded one at a time),
        video_backend (`str`, *optional*).
    Attention (set on the loaded model's config, which validates them; unset keeps the checkpoint's values):
        nsa_enabled (`bool`: `False` runs dense attention with the same weights), nsa_block_count, nsa_window_size,
        nsa_block_size, nsa_backend.
    Generation (each one, when given, overrides the task's ``generation_kwargs``):
        max_new_tokens, temperature, top_p, top_k, num_beams, do_sample, repetition_penalty; use_cache (`bool`,
        defaults to `True`); system_prompt (*optional*; the chat template's default system turn otherwise).
    Harness:
        batch_size (`int`, defaults to 1; ``--batch_size``), failure_log (`str`, *optional*: JSON Lines file that
        receives one line per failed sample).
    """

    is_simple = False

    def __init__(
        self,
        pretrained: str = "Enxin/VideoNSA",
        revision: str | None = None,
        dtype: str = "bfloat16",
        device_map: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = True,
        in_tree: bool = False,
        fps: float = DEFAULT_FPS,
        max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS,
        min_pixels: int | None = None,
        max_frames: int | None = None,
        max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
        reduce_fps_to_fit: bool = False,
        video_backend: str | None = None,
        nsa_enabled: bool | None = None,
        nsa_block_size: int | None = None,
        nsa_block_count: int | None = None,
        nsa_window_size: int | None = None,
        nsa_backend: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        num_beams: int | None = None,
        do_sample: bool | None = None,
        repetition_penalty: float | None = None,
        use_cache: bool = True,
        system_prompt: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        failure_log: str | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            accepted = [
                name for name in inspect.signature(VideoNSA.__init__).parameters if name not in ("self", "unknown")
            ]
            hints = []
            for key in sorted(unknown):
                close = difflib.get_close_matches(key, accepted, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"Unknown videonsa model argument(s): {', '.join(hints)}. Accepted: {', '.join(accepted)}."
            )

        # ---- arguments, validated before anything is loaded
        self.batch_size_per_gpu = self._parse_batch_size(batch_size)
        dtype_key = str(dtype).lower()
        if dtype_key not in DTYPES:
            raise ValueError(f"videonsa model argument dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.video_kwargs = {"fps": _as_float("fps", fps), "max_pixels": _as_int("max_pixels", max_pixels)}
        if _none(min_pixels) is not None:
            self.video_kwargs["min_pixels"] = _as_int("min_pixels", min_pixels)
        if _none(max_frames) is not None:
            self.video_kwargs["max_frames"] = _as_int("max_frames", max_frames)
        if _none(video_backend) is not None:
            self.video_kwargs["video_backend"] = str(video_backend)
        self.max_context_tokens = _as_int("max_context_tokens", max_context_tokens)
        self.reduce_fps_to_fit = _as_bool("reduce_fps_to_fit", reduce_fps_to_fit)
        nsa_values = dict(
            nsa_enabled=None if _none(nsa_enabled) is None else _as_bool("nsa_enabled", nsa_enabled),
            nsa_block_size=None if _none(nsa_block_size) is None else _as_int("nsa_block_size", nsa_block_size),
            nsa_block_count=None if _none(nsa_block_count) is None else _as_int("nsa_block_count", nsa_block_count),
            nsa_window_size=None if _none(nsa_window_size) is None else _as_int("nsa_window_size", nsa_window_size),
            nsa_backend=_none(nsa_backend),
        )
        self.generation_overrides = self._parse_generation(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            num_beams=num_beams,
            do_sample=do_sample,
            repetition_penalty=repetition_penalty,
        )
        self.use_cache = _as_bool("use_cache", use_cache)
        self.system_prompt = self._resolve_system_prompt(_none(system_prompt)) if _none(system_prompt) else None
        self.failure_log = _none(failure_log)
        self.failures: list[dict] = []

        # ---- devices: one model per process; `accelerate launch` splits the documents over the ranks
        accelerator = Accelerator()
        self.accelerator = accelerator
        if accelerator.num_processes > 1:
            self._rank, self._world_size = accelerator.local_process_index, accelerator.num_processes
            device_map = f"cuda:{accelerator.local_process_index}"
        else:
            device_map = _none(device_map) or _none(device) or ("cuda" if torch.cuda.is_available() else "cpu")

        # ---- model and processor through the public API
        load = {"revision": _none(revision), "dtype": DTYPES[dtype_key], "device_map": device_map}
        if _as_bool("in_tree", in_tree):
            from ..loading import load_videonsa

            self._model, self.processor = load_videonsa(pretrained, **load)
        else:  # the checkpoint's code; the authors' release (no code files) with this package's, as VideoNSA
            from ..loading import load_checkpoint

            remote = _as_bool("trust_remote_code", trust_remote_code)
            self._model, self.processor = load_checkpoint(pretrained, trust_remote_code=remote, **load)
        if not hasattr(self._model, "generate"):
            raise ValueError(f"{pretrained!r} loaded as {type(self._model).__name__}, which cannot generate.")
        self._model.eval()
        for key, value in nsa_values.items():
            if value is None:
                continue
            if not hasattr(self._model.config, key):
                raise ValueError(
                    f"videonsa model argument {key} needs a VideoNSA checkpoint; {pretrained!r} has a "
                    f"{type(self._model.config).__name__} without {key}."
                )
            setattr(self._model.config, key, value)  # the config validates and names a bad value
        if hasattr(self._model.config, "nsa_block_size") and hasattr(self.processor, "nsa_block_size"):
            self.processor.nsa_block_size = self._model.config.nsa_block_size  # keeps its block-alignment check true
        self._device = self._model.device
        self.sample_errors = self._per_sample_errors()
        eval_logger.info(
            "videonsa: {} on {} ({}), video {}, max_context_tokens={}, reduce_fps_to_fit={}, nsa_enabled={}, "
            "nsa_block_count={}, nsa_window_size={}",
            pretrained,
            self._device,
            self._model.dtype,
            self.video_kwargs,
            self.max_context_tokens,
            self.reduce_fps_to_fit,
            getattr(self._model.config, "nsa_enabled", None),
            getattr(self._model.config, "nsa_block_count", None),
            getattr(self._model.config, "nsa_window_size", None),
        )

    # ------------------------------------------------------------------ harness properties

    @property
    def model(self):
        return self._model

    @property
    def config(self):
        return self._model.config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    # ------------------------------------------------------------------ argument parsing

    @staticmethod
    def _parse_batch_size(batch_size) -> int:
        if isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
            raise ValueError("videonsa does not support --batch_size auto; give an integer (1 for long videos).")
        return _as_int("batch_size", batch_size)

    @staticmethod
    def _parse_generation(**values) -> dict:
        parsed = {}
        for key, value in values.items():
            value = _none(value)
            if value is None:
                continue
            if key in ("max_new_tokens", "num_beams", "top_k"):
                parsed[key] = _as_int(key, value)
            elif key == "do_sample":
                parsed[key] = _as_bool(key, value)
            elif key == "temperature":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"videonsa model argument temperature must be a number >= 0, got {value!r}")
                parsed[key] = float(value)
            else:
                parsed[key] = _as_float(key, value)
        return parsed

    def _per_sample_errors(self) -> tuple[type[BaseException], ...]:
        """The errors that fail one sample, not the run: the processor's budget and decoding errors (taken from the
        processor's own module, which is the checkpoint's copy under remote code), missing files, and requests this
        model cannot serve."""
        module = sys.modules.get(type(self.processor).__module__)
        own = tuple(
            getattr(module, name)
            for name in ("ContextBudgetExceededError", "VideoDecodingError")
            if isinstance(getattr(module, name, None), type)
        )
        return own + (FileNotFoundError, IsADirectoryError, UnsupportedSampleError)

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        tasks = sorted({str(request.task_name) for request in requests})
        raise NotImplementedError(
            f"videonsa answers generation tasks only; task(s) {', '.join(tasks)} asked for log-likelihoods "
            f"(output_type multiple_choice or loglikelihood). The six benchmarks of the paper are generation tasks."
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        tasks = sorted({str(request.task_name) for request in requests})
        raise NotImplementedError(f"videonsa does not run multi-round generation (task(s) {', '.join(tasks)}).")

    # argument positions of a generate_until request: (gen_kwargs, doc_id, task, split)
    _ARGS = {"chat": (2, 3, 4, 5), "simple": (1, 3, 4, 5)}

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        gen_at, doc_at, task_at, _ = self._ARGS["simple" if self.is_simple else "chat"]
        collator = utils.Collator(
            [request.args for request in requests],
            lambda args: (str(args[task_at]), str(args[doc_at])),
            group_fn=lambda args: args[gen_at],
            grouping=True,
        )
        progress = make_progress(total=len(requests), desc="Model Responding", disable=self.rank != 0)
        answers = []
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            samples = [self._sample(args) for args in chunk]
            answers.extend(self._answer(samples))
            progress.update(len(chunk))
        progress.close()
        failed = sum(1 for answer in answers if answer.token_counts is None)
        if failed:
            eval_logger.warning(
                "videonsa: {} of {} samples failed and were answered with an empty string (scored as wrong){}",
                failed,
                len(answers),
                f"; details in {self.failure_log}" if self.failure_log else "",
            )
        return collator.get_original(answers)

    def _sample(self, args: tuple) -> _Sample:
        gen_at, doc_at, task_at, split_at = self._ARGS["simple" if self.is_simple else "chat"]
        task, split, doc_id = args[task_at], args[split_at], args[doc_at]
        doc = self.task_dict[task][split][doc_id]
        if self.is_simple:
            visuals = args[2](doc) or []
            raw = ConfigurableMessagesTask._build_user_turn(visuals, args[0])
        else:
            raw = args[1](doc)
        sample = _Sample(task, split, doc_id, None, dict(args[gen_at] or {}))
        try:
            sample.messages = self._hf_messages(raw)
        except UnsupportedSampleError as error:
            sample.error = error
        return sample

    def _hf_messages(self, raw: list[dict]) -> list[dict]:
        """lmms-eval's protocol messages -> transformers chat messages (``{"type": "video", "video": path}``)."""
        messages = ChatMessages(messages=raw).to_hf_messages()
        for message in messages:
            for item in message["content"]:
                if item["type"] == "audio":
                    raise UnsupportedSampleError("VideoNSA takes no audio input.")
                if item["type"] == "video" and (
                    "video_start" in item or "video_end" in item or isinstance(item["video"], dict)
                ):
                    raise UnsupportedSampleError(
                        f"The task asks for a clip ({item.get('video_start')} - {item.get('video_end')} s) of "
                        f"{item['video']!r}; VideoNSA's processor samples whole videos. Cut the clip beforehand."
                    )
        if self.system_prompt:
            messages = self._apply_system_prompt(messages, self.system_prompt)
        return messages

    def encode(self, conversations: list[list[dict]]):
        """Chat template + video processing for a batch of conversations, left-padded: what ``generate`` takes."""
        return self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={
                "padding": True,
                "padding_side": "left",
                "videos_kwargs": dict(self.video_kwargs),
                "max_context_tokens": self.max_context_tokens,
                "reduce_fps_to_fit": self.reduce_fps_to_fit,
            },
        )

    def _encode_usable(self, samples: list[_Sample]):
        """Encode the samples that have no error yet; a sample whose own video fails gets the error instead.

        The processor checks the budget of a batch as a whole, so a failed batch is retried sample by sample to
        find the culprit(s); the others are then encoded together again."""
        pending = [sample for sample in samples if sample.error is None]
        if not pending:
            return None, []
        try:
            return self.encode([sample.messages for sample in pending]), pending
        except self.sample_errors as batch_error:
            if len(pending) == 1:
                pending[0].error = batch_error
                return None, []
            for sample in pending:
                try:
                    self.encode([sample.messages])
                except self.sample_errors as error:
                    sample.error = error
            if all(sample.error is None for sample in pending):
                raise
        return self._encode_usable(samples)

    def _answer(self, samples: list[_Sample]) -> list[GenerationResult]:
        if self.reduce_fps_to_fit and len(samples) > 1:
            # the processor lowers the fps of a whole call: batched, one long video would lower its neighbours' too
            return [result for sample in samples for result in self._answer([sample])]
        inputs, encoded = self._encode_usable(samples)
        texts = {}
        if encoded:
            gen_kwargs = self._generation_kwargs(encoded[0].gen_kwargs)
            inputs = inputs.to(self._device)
            with torch.inference_mode():
                output = self._model.generate(**inputs, **gen_kwargs)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            decoded = self.processor.batch_decode(
                new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            pad = self.tokenizer.pad_token_id
            for index, (sample, row, text) in enumerate(zip(encoded, new_tokens, decoded)):
                until = sample.gen_kwargs.get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    if stop:
                        text = text.split(stop)[0]
                counts = TokenCounts(
                    input_tokens=int(inputs["attention_mask"][index].sum()),
                    output_tokens=int((row != pad).sum()) if pad is not None else int(row.numel()),
                )
                texts[id(sample)] = GenerationResult(text=text, token_counts=counts)
        results = []
        for sample in samples:
            if sample.error is not None:
                self._record_failure(sample)
                results.append(GenerationResult(text="", token_counts=None))
            else:
                results.append(texts[id(sample)])
        return results

    def _generation_kwargs(self, task_kwargs: dict) -> dict:
        """The task's generation settings, overridden by the model arguments, as `generate` takes them; greedy
        unless sampling is asked for (`do_sample`, or a temperature > 0)."""
        merged = {"max_new_tokens": 128, "num_beams": 1}
        ignored = sorted(set(task_kwargs) - set(GENERATION_KEYS) - {"until"})
        if ignored:
            eval_logger.debug("videonsa: generation_kwargs {} are not generation settings here; ignored", ignored)
        merged.update({key: task_kwargs[key] for key in GENERATION_KEYS if task_kwargs.get(key) is not None})
        merged.update(self.generation_overrides)
        do_sample = merged.get("do_sample")
        if do_sample is None:
            do_sample = float(merged.get("temperature") or 0) > 0
        kwargs = {
            "max_new_tokens": int(merged["max_new_tokens"]),
            "num_beams": int(merged["num_beams"]),
            "do_sample": bool(do_sample),
            "use_cache": self.use_cache,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if kwargs["do_sample"]:
            kwargs.update(
                {key: merged[key] for key in ("temperature", "top_p", "top_k") if merged.get(key) is not None}
            )
        if merged.get("repetition_penalty") is not None:
            kwargs["repetition_penalty"] = float(merged["repetition_penalty"])
        return kwargs

    def _record_failure(self, sample: _Sample) -> None:
        record = {
            "task": sample.task,
            "split": sample.split,
            "doc_id": sample.doc_id,
            "error": type(sample.error).__name__,
            "message": str(sample.error),
        }
        self.failures.append(record)
        eval_logger.warning(
            "videonsa: sample {}/{}/{} failed: {}: {}",
            sample.task,
            sample.split,
            sample.doc_id,
            record["error"],
            record["message"],
        )
        if self.failure_log:
            with open(self.failure_log, "a", encoding="utf-8") as file:
                file.write(json.dumps(record, default=str) + "\n")


class VideoNSASimple(VideoNSA):
    """The same model for ``--force_simple``: requests carry the task's context string and ``doc_to_visual``."""

    is_simple = True
