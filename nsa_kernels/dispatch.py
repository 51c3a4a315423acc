"""Choice of the attention implementation: bundled Triton kernels on CUDA, the PyTorch reference elsewhere."""

from __future__ import annotations

import functools
import logging

import torch

from . import reference

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _triton_nsa():
    """The Triton backend module and ``None``, or ``None`` and the reason it cannot be used."""
    try:
        import triton  # noqa: F401

        from . import triton_nsa
    except ImportError as error:
        return None, f"the Triton kernels could not be imported ({error})"
    return triton_nsa, None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def resolve_backend(backend: str, device: torch.device):
    """The module that computes the attention for ``backend`` ("auto", "triton" or "torch") on ``device``.

    Both candidates, :mod:`.reference` and :mod:`.triton_nsa`, expose ``hybrid_attention``, ``nsa_attention``
    and ``dense_attention`` with the same signatures. "auto" takes the Triton kernels on CUDA and falls back to
    the PyTorch reference with a one-time warning that says why; "triton" raises instead of falling back.
    """
    if backend == "torch":
        return reference
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
    return reference
