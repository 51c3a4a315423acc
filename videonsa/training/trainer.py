"""Training VideoNSA with transformers' ``Trainer``: the gate monitor, the loss on supervised logits only, the
Trainer subclass, step timing, and freezing / LoRA set-up.

* :class:`GateMonitor`: records the mean sigmoid gate per NSA branch (cmp / slc / swa) over vision tokens.
* :class:`VideoNSATrainer`: ``Trainer`` that logs the gate means, and computes logits only where a label is
  supervised (a 36K-token video sample would otherwise materialise a 36K x 152K float32 logits tensor).
* :func:`freeze_modules`, :func:`lora_config`, :class:`StepStatsCallback`.
"""

from __future__ import annotations

import json
import os
import time

import torch
from transformers import Trainer, TrainerCallback
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.utils import logging

from .data import IGNORE_INDEX

logger = logging.get_logger(__name__)


GATE_BRANCHES = ("cmp", "slc", "swa")  # the order of the gate logits: compression, selection, sliding window
def _videonsa_attention_modules(model) -> list:
    """The VideoNSA attention modules of a model, whatever wraps it (PEFT, DDP, FSDP, DeepSpeed) and whichever copy
    of the modeling code defined them (a source checkout or transformers' remote-code cache)."""
    return [m for m in model.modules() if hasattr(m, "gate_logits") and hasattr(m, "g_proj_2")]


class GateMonitor:
    """Records the mean sigmoid gate of each NSA branch (cmp, slc, swa) over the real vision tokens of training
    forward passes, per layer, between two calls of :meth:`pop`.

    The gates are read where the model computes them: each attention's ``gate_logits`` (the model's own view and
    temperature, LoRA included when the gate MLP is adapted) is wrapped to see its output, and a pre-hook on the
    attention gives the pass's token typing (``videonsa_tokens``: vision flags and padding). The gate of a token is
    ``sigmoid`` of its logit, averaged over heads. Dense passes (text-only batches, ``nsa_enabled=False``) compute
    no gate and add nothing. Under gradient checkpointing a layer's forward runs again during backward with
    identical values, which leaves the mean unchanged.
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
            self._handles.append(attention.register_forward_hook(self._forget_tokens(index)))
            attention.gate_logits = self._recording(index, attention)  # shadows the method on this instance only

    def _remember_tokens(self, index):
        def hook(module, args, kwargs):
            self._tokens[index] = kwargs.get("videonsa_tokens")

        return hook

    def _forget_tokens(self, index):
        def hook(module, args, output):
            self._tokens[index] = None

        return hook

    def _recording(self, index, attention):
        gate_logits = type(attention).gate_logits

        def recording_gate_logits(hidden_states):
            logits = gate_logits(attention, hidden_states)
            tokens = self._tokens[index]
            if attention.training and tokens is not None:
                self._add(index, logits, tokens)
            return logits

        return recording_gate_logits

    @torch.no_grad()
    def _add(self, index, logits, tokens) -> None:
        length = logits.shape[1]
        vision = tokens.is_vision[:, -length:]
        if tokens.key_padding_mask is not None:
            vision = vision & tokens.key_padding_mask[:, -length:]
        gates = torch.sigmoid(logits.detach().float())  # [B, T, H, 3]
        # weighted by the vision flags rather than indexed by them: boolean indexing waits for the GPU
        weight = vision.to(device=gates.device, dtype=gates.dtype)[:, :, None, None]  # [B, T, 1, 1]
        if self._sums is None:
            self._sums = torch.zeros(len(self.layers), 3, dtype=torch.float64, device=gates.device)
            self._counts = torch.zeros(len(self.layers), dtype=torch.float64, device=gates.device)
        self._sums[index] += (gates * weight).sum(dim=(0, 1, 2)).to(torch.float64)
        self._counts[index] += weight.sum().to(torch.float64) * gates.shape[2]

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
        for attention in self.layers:
            attention.__dict__.pop("gate_logits", None)


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
    (``videonsa-train --step_stats``; ``bench/bench_training.py`` uses it for its tables).

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

