"""Helpers shared by the Triton kernels of ``nsa_kernels``: launch arithmetic on the host and the
``@triton.jit`` building blocks every attention kernel is made of (tile loads, one online-softmax step,
one backward step for dq and one for dk/dv). Triton inlines them, so sharing costs nothing at run time."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import functools
import warnings

import torch
import triton
import triton.language as tl

from .reference import next_pow2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: for float32 inputs exact products unless ``torch.backends.cuda.matmul.allow_tf32`` is
    set (then TF32, as PyTorch's own matmuls), the tensor-core default for half precision.

    Exact float32 is the accuracy path (tests, block selection that matches the reference bit for bit outside
    exact ties) but runs on CUDA cores, far slower than bf16: a one-time warning says so on CUDA.
    """
    if dtype != torch.float32:
        return "tf32"
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    if not interpreting():
        _warn_exact_float32()
    return "ieee"


@functools.lru_cache(maxsize=None)
def _warn_exact_float32() -> None:
    warnings.warn(
        "VideoNSA's Triton kernels run float32 inputs with exact float32 dot products on CUDA cores, tens of times "
        "slower than bfloat16. Load the model in bfloat16, or set torch.backends.cuda.matmul.allow_tf32 = True to "
        "use TF32 tensor cores (block selection may then differ from the float32 reference on near ties).",
        stacklevel=3,
    )


def head_block(group: int) -> int:
    """Rows of a head tile: ``tl.dot`` needs at least 16 rows."""
    return max(16, next_pow2(group))


def check_dim(d: int) -> int:
    bd = next_pow2(d)
    if bd > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the Triton kernels")
    return max(16, bd)


@dataclass(frozen=True)
class LaunchSettings:
    """Launch settings of every kernel, in one explicit object (the defaults are the fastest measured on H100 and
    H200, ``docs/benchmarks.md``). Library calls take ``launch=DEFAULT_LAUNCH``; a benchmark passes a variant made
    with ``dataclasses.replace``."""

    attention_warps: int = 4  # compression and window tiles (64 x 64), forward and backward
    compression_dkv_rows: int | None = None  # query rows per dk/dv program; None: 256 up to 16K rows, else 1024
    selected_warps: int = 2  # one row x one kv group per program, forward and dq
    selected_rows_per_tile: int = 4  # forward, short prompts: tiles of 4 rows over the union of their blocks ...
    selected_tile_max_rows: int = 8192  # ... up to this many query rows; one row per program beyond
    selected_tma: bool = False  # per-row kernels: key/value blocks by the tensor memory accelerator (Hopper on)
    selected_stages: int = 2
    selected_dkv_rows: int = 64  # (row, head) pairs per step of the selected dk/dv kernel
    selected_dkv_warps: int = 4
    selected_dkv_stages: int = 3
    selected_dkv_item_rows: int = 512  # rows of one block's list per selected dk/dv program (one atomic add each)
    topk_rows_per_program: int = 4
    topk_warps: int = 4
    mix_rows: int = 16  # (token, head) rows per gate-mixing program
    band_programs_per_sm: int = 4  # band attention splits a row tile's keys over programs below this many

    def selected_schedule(self, pass_rows: int) -> int:
        """Rows per selected-attention forward program for a pass of ``pass_rows`` query rows (the union size of a
        tile grows with the position, so the choice follows the pass, also when it is computed in chunks)."""
        return self.selected_rows_per_tile if pass_rows <= self.selected_tile_max_rows else 1


DEFAULT_LAUNCH = LaunchSettings()


@triton.jit
def flat_row_tile(n_rows, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """The program's ``BR`` rows of a contiguous ``[n_rows, D]`` view (the elementwise kernels' tiles): rows, their
    mask, element offsets ``[BR, BD]`` and the tile mask."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # offsets pass 2**31 beyond 256K tokens
    dd = tl.arange(0, BD)
    rmask = rows < n_rows
    return rows, rmask, rows[:, None] * D + dd[None, :], rmask[:, None] & (dd < D)[None, :]


@triton.jit
def heads_first_index(rows, T, P):
    """Flat index in ``[B, P, T]`` of the flat rows ``rows`` of a ``[B, T, P]`` array."""
    bt = rows // P
    return (bt // T * P + rows % P) * T + bt % T


@triton.jit
def _row_dot_kernel(a, b, out, n_rows, T, P, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                    HEADS_FIRST: tl.constexpr):
    # a, b: contiguous [B, T, P, D] read as [n_rows, D]; out: float32 [B, T, P], or [B, P, T] with HEADS_FIRST
    rows, rmask, off, mask = flat_row_tile(n_rows, D, BR, BD)
    dot = tl.sum(tl.load(a + off, mask=mask, other=0.0).to(tl.float32) *
                 tl.load(b + off, mask=mask, other=0.0).to(tl.float32), 1)
    if HEADS_FIRST:
        rows = heads_first_index(rows, T, P)
    tl.store(out + rows, dot, mask=rmask)


def attention_delta(o: torch.Tensor, do: torch.Tensor, heads_first: bool = False) -> torch.Tensor:
    """The softmax backward's correction term ``delta = sum_d o * do`` per (token, head), float32.

    One pass over ``o`` and ``do`` ``[B, T, P, D]`` (any float dtype; products and sums in float32) instead of
    torch's two float32 copies of the output's size. Returns ``[B, T, P]``, or ``[B, P, T]`` with ``heads_first``.
    """
    if o.shape != do.shape or o.dim() != 4:
        raise ValueError(f"o and do must be [B, T, P, D] of one shape, got {tuple(o.shape)} and {tuple(do.shape)}")
    B, T, P, D = o.shape
    out = torch.empty((B, P, T) if heads_first else (B, T, P), device=o.device, dtype=torch.float32)
    n_rows = B * T * P
    rows_per_program = 32
    if n_rows:
        _row_dot_kernel[(triton.cdiv(n_rows, rows_per_program),)](
            o.contiguous(), do.contiguous(), out, n_rows, T, P, D=D, BR=rows_per_program, BD=check_dim(D),
            HEADS_FIRST=heads_first, num_warps=4)
    return out


def row_flags(flags: torch.Tensor | None, shape, name: str = "rows_on", what: str = "[B, T]") -> torch.Tensor | None:
    """Bool row flags as the kernels read them (int8, contiguous), after checking they are ``shape``; None stays
    None. ``name`` and ``what`` say in the error which argument and which shape were meant."""
    if flags is None:
        return None
    if tuple(flags.shape) != tuple(shape):
        raise ValueError(f"{name} must be {what} = {tuple(shape)}, got {tuple(flags.shape)}")
    return flags.to(torch.int8).contiguous()


INT32_OFFSET_LIMIT = 2**31


def wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether a kernel's element offsets into ``tensors`` can reach 2**31 and so need int64 (the ``WIDE`` switch of
    the kernels that compute row offsets). int32 offsets where they suffice save the registers whose lack made the
    backward kernels spill (``docs/benchmarks.md``)."""
    for x in tensors:
        span = 1 + sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride()) if n > 0)
        if span + 256 > INT32_OFFSET_LIMIT:  # + the masked lanes of a padded tile
            return True
    return False


def log2_int(n: int) -> int:
    k = int(math.log2(n))
    if 1 << k != n:
        raise ValueError(f"{n} is not a power of two")
    return k


@triton.jit
def row_tile_program(Tq, H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                     BD: tl.constexpr, WIDE: tl.constexpr):
    """Program ids of the row-tile kernels (grid ``(cdiv(Tq, BM), B * H)``): sample ``b``, query head ``h``,
    its kv head ``g``, the tile's query rows (int64 when ``WIDE``, see :func:`wide_offsets`) and their mask,
    and the feature lanes of its ``[BM, BD]`` tiles with their mask and the tile mask."""
    pid_m = tl.program_id(0)
    if WIDE:
        pid_m = pid_m.to(tl.int64)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < Tq
    dd = tl.arange(0, BD)
    dmask = dd < D
    return b, h, h // GROUP, rows, rmask, dd, dmask, rmask[:, None] & dmask[None, :]


@triton.jit
def load_head_rows(q, b, h, rows, dd, mask, sqb, sqt, sqh, sqd):
    """The ``[len(rows), BD]`` tile of head ``h`` at query rows ``rows`` of a strided ``[B, T, H, D]`` tensor,
    zero where ``mask`` is off."""
    return tl.load(q + b * sqb + h * sqh + rows[:, None] * sqt + dd[None, :] * sqd, mask=mask, other=0.0)


@triton.jit
def head_rows_offsets(b, h, rows, dd, Tq, H: tl.constexpr, D: tl.constexpr):
    """Element offsets of the ``[len(rows), BD]`` tile of head ``h`` in a contiguous ``[B, Tq, H, D]`` tensor
    (outputs and their gradients)."""
    return ((b * Tq + rows[:, None]) * H + h) * D + dd[None, :]


@triton.jit
def row_group_program(Tq, OFF, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BH: tl.constexpr,
                      BD: tl.constexpr):
    """Program ids of the one-row kernels (grid ``(Tq, B * Hkv)``): sample ``b``, kv head ``g``, query row
    ``r`` at position ``t``, and the head / feature lanes of the group's ``[BH, BD]`` query tile with masks."""
    r = tl.program_id(0).to(tl.int64)  # row offsets pass 2**31 elements beyond 256K tokens
    pid_bg = tl.program_id(1)
    hh = tl.arange(0, BH)
    dd = tl.arange(0, BD)
    return pid_bg // HKV, pid_bg % HKV, r, r + OFF, hh, hh < GROUP, dd, dd < D


@triton.jit
def load_group_query(q, b, r, g, GROUP: tl.constexpr, hh, dd, mask, sqb, sqt, sqh, sqd):
    """The ``[BH, BD]`` query tile of row ``r``: the heads of kv group ``g`` (zero beyond the group)."""
    return tl.load(q + b * sqb + r * sqt + (g * GROUP + hh[:, None]) * sqh + dd[None, :] * sqd, mask=mask,
                   other=0.0)


@triton.jit
def load_kv_tile(k, v, b, g, cols, cmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd):
    """Keys and values ``cols`` (a vector of token or block indices) of kv head ``g`` in sample ``b``:
    two ``[len(cols), BD]`` tiles, zero where ``cmask`` or ``dmask`` is off."""
    mask = cmask[:, None] & dmask[None, :]
    bk = tl.load(k + b * skb + g * skh + cols[:, None] * skt + dd[None, :] * skd, mask=mask, other=0.0)
    bv = tl.load(v + b * svb + g * svh + cols[:, None] * svt + dd[None, :] * svd, mask=mask, other=0.0)
    return bk, bv


@triton.jit
def online_softmax_step(bq, bk, bv, vis, m_i, l_i, acc, qk_scale, PREC: tl.constexpr):
    """Fold one key tile into the running base-2 softmax state ``(m_i, l_i, acc)`` of the query tile ``bq``.

    ``vis`` (broadcastable to ``[rows, keys]``) says which scores count; a row that has seen no visible key
    keeps ``m_i = -inf``, ``l_i = 0``, ``acc = 0`` (no NaN: its shift is taken as 0).
    """
    s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(bv.dtype), bv, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def attention_probs(bq, bk, vis, lse2, qk_scale, PREC: tl.constexpr):
    """Normalised probabilities of the query tile over one key tile from the saved base-2 log-sum-exp."""
    s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
    return tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)


@triton.jit
def dq_step(bq, bk, bv, bdo, vis, lse2, dlt, acc, qk_scale, PREC: tl.constexpr):
    """``acc += dS @ K`` for one key tile (``dS = P * (dO V^T - delta)``); the caller scales by 1/sqrt(D)."""
    p = attention_probs(bq, bk, vis, lse2, qk_scale, PREC)
    dp = tl.dot(bdo, tl.trans(bv), input_precision=PREC)
    ds = p * (dp - dlt[:, None])
    return acc + tl.dot(ds.to(bk.dtype), bk, input_precision=PREC)


@triton.jit
def dkv_step(bq, bk, bv, bdo, vis, lse2, dlt, dk_acc, dv_acc, qk_scale, PREC: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """``dv_acc += P^T @ dO`` and ``dk_acc += dS^T @ Q`` for one query tile against the key tile.

    ``KEY_MAJOR``: ``vis`` is ``[keys, rows]`` and the scores are computed transposed, ``K @ Q^T``, so that ``P^T``
    and ``dS^T`` come out of their products in the register layout the accumulating products take as their left
    operand (no transpose through shared memory); else ``vis`` is ``[rows, keys]``. Each kernel takes the form that
    measured faster for it (``docs/benchmarks.md``)."""
    if KEY_MAJOR:
        s_t = tl.dot(bk, tl.trans(bq), input_precision=PREC) * qk_scale
        p_t = tl.where(vis, tl.exp2(s_t - lse2[None, :]), 0.0)
        dv_acc += tl.dot(p_t.to(bdo.dtype), bdo, input_precision=PREC)
        dp_t = tl.dot(bv, tl.trans(bdo), input_precision=PREC)
        ds_t = p_t * (dp_t - dlt[None, :])
        dk_acc += tl.dot(ds_t.to(bq.dtype), bq, input_precision=PREC)
    else:
        p = attention_probs(bq, bk, vis, lse2, qk_scale, PREC)
        dv_acc += tl.dot(tl.trans(p.to(bdo.dtype)), bdo, input_precision=PREC)
        dp = tl.dot(bdo, tl.trans(bv), input_precision=PREC)
        ds = p * (dp - dlt[:, None])
        dk_acc += tl.dot(tl.trans(ds.to(bq.dtype)), bq, input_precision=PREC)
    return dk_acc, dv_acc


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
