"""Choice of the NSA implementation: bundled Triton kernels on CUDA, the PyTorch reference elsewhere."""

from __future__ import annotations

import functools
import logging

import torch

from . import reference

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _triton_nsa():
    """The Triton ``nsa_attention`` and ``None``, or ``None`` and the reason it cannot be used."""
    try:
        import triton  # noqa: F401

        from .triton_nsa import nsa_attention
    except ImportError as error:
        return None, f"the Triton kernels could not be imported ({error})"
    return nsa_attention, None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def resolve_nsa_fn(backend: str, device: torch.device):
    """Return the ``nsa_attention`` implementation for ``backend`` ("auto", "triton" or "torch") on ``device``.

    "auto" takes the Triton kernels on CUDA and falls back to the PyTorch reference with a one-time warning
    that says why; "triton" raises instead of falling back.
    """
    if backend == "torch":
        return reference.nsa_attention
    kernels, why_not = _triton_nsa()
    if device.type != "cuda":
        why_not = f"tensors are on {device.type}, and the Triton kernels run on CUDA only"
        kernels = None
    if kernels is not None:
        return kernels
    if backend == "triton":
        raise RuntimeError(f"nsa_backend='triton' was requested but {why_not}. Use nsa_backend='torch' or 'auto'.")
    if backend != "auto":
        raise ValueError(f"nsa_backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if device.type == "cuda":
        _warn_once(f"VideoNSA runs its attention with the PyTorch reference (slow) because {why_not}.")
    return reference.nsa_attention
