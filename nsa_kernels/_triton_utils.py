"""Small helpers shared by the Triton kernels of ``nsa_kernels`` (no kernels here)."""

from __future__ import annotations

import math
import os

import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact float32 products for float32 inputs, the tensor-core default otherwise.

    float32 inputs are the accuracy path (tests, block selection that must match the reference bit for bit
    outside exact ties), so TF32 is not used for them.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def head_block(group: int) -> int:
    """Rows of a head tile: ``tl.dot`` needs at least 16 rows."""
    return max(16, next_pow2(group))


def check_dim(d: int) -> int:
    bd = next_pow2(d)
    if bd > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the Triton kernels")
    return max(16, bd)


def num_warps_for(bd: int) -> int:
    """Warps of the dense-tile attention kernels (64-row tiles): 4 measured faster than 8 at D = 128 on H200."""
    return 4


def log2_int(n: int) -> int:
    k = int(math.log2(n))
    if 1 << k != n:
        raise ValueError(f"{n} is not a power of two")
    return k


def _patch_interpreter_scalar_index() -> None:
    """Let Triton 3.6's CPU interpreter run on NumPy >= 2.4.

    The interpreter keeps scalars as one-element arrays and converts them with ``int(array)``, which NumPy
    2.4 refuses for arrays with ``ndim > 0`` (``range(tensor_start, ...)`` inside a kernel then fails). This
    re-registers ``__index__`` on the interpreter's tensors so that it reads the single element. Only the
    interpreter is touched, and only when ``TRITON_INTERPRET=1``.
    """
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover - triton layout changed
        return
    original = getattr(_interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_nsa_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._nsa_patched = True
    _interp._patch_lang_tensor = patched


if interpreting():
    _patch_interpreter_scalar_index()
