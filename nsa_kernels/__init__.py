"""VideoNSA attention kernels: a pure-PyTorch reference of the released model's function, and dispatch."""

from . import reference
from .dispatch import Backend, resolve_backend
from .reference import HybridPlan, hybrid_attention, nsa_head_layout, plan_hybrid, token_is_vision

__all__ = ["Backend", "HybridPlan", "reference", "hybrid_attention", "nsa_head_layout", "plan_hybrid", "resolve_backend",
           "token_is_vision"]
