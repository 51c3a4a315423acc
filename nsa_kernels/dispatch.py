"""Choice of the attention implementation: bundled Triton kernels on CUDA, the PyTorch reference elsewhere."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType

import torch

from . import reference

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _triton_nsa():
    """The Triton backend module and ``None``, or ``None`` and the reason it cannot be used."""
    try:
        from . import triton_nsa
    except ImportError as error:
        return None, f"the Triton kernels could not be imported ({error})"
    return triton_nsa, None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


@dataclass(frozen=True)
class Backend:
    """What computes the attention: ``name`` is ``"torch"`` (the PyTorch reference) or ``"triton"`` (the bundled
    kernels). Both expose ``hybrid_attention``, ``nsa_attention`` and ``dense_attention`` with the same signatures
    (read through this object). Only the reference takes a ``dense_fn``, so that the model's own attention
    implementation (sdpa, eager, ...) computes the dense part; the Triton backend computes it in its kernels."""

    name: str
    module: ModuleType

    @property
    def takes_dense_fn(self) -> bool:
        return self.name == "torch"

    def __getattr__(self, attribute):
        return getattr(self.module, attribute)


TORCH = Backend("torch", reference)


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The :class:`Backend` that computes the attention for ``backend`` ("auto", "triton" or "torch") on ``device``.

    "auto" takes the Triton kernels on CUDA and falls back to the PyTorch reference with a one-time warning that
    says why; "triton" raises instead of falling back.
    """
    if backend == "torch":
        return TORCH
    kernels, why_not = _triton_nsa()
    if device.type != "cuda":
        why_not = f"tensors are on {device.type}, and the Triton kernels run on CUDA only"
        kernels = None
    if kernels is not None:
        return Backend("triton", kernels)
    if backend == "triton":
        raise RuntimeError(f"nsa_backend='triton' was requested but {why_not}. Use nsa_backend='torch' or 'auto'.")
    if backend != "auto":
        raise ValueError(f"nsa_backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if device.type == "cuda":
        _warn_once(f"VideoNSA runs its attention with the PyTorch reference (slow) because {why_not}.")
    return TORCH
