"""VideoNSA attention kernels: a pure-PyTorch reference of the released model's function, and dispatch."""

from . import reference
from .dispatch import Backend, resolve_backend
from .reference import hybrid_attention, nsa_head_layout, token_is_vision

__all__ = ["Backend", "reference", "hybrid_attention", "nsa_head_layout", "resolve_backend", "token_is_vision"]
