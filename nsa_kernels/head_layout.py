"""The padded head layout of the NSA kernels on Triton, to and from the model's heads.

The NSA steps run on ``P`` padded heads (``reference.nsa_head_layout``: the model's ``H`` query heads, the same
again, then zero heads). The padded query is written here in one pass instead of a masked copy and a
concatenation (``docs/benchmarks.md``), and the branches' padded query gradients come back to the model's heads in
one pass too:

* :func:`pad_query`: ``[B, T, H, D]`` (any strides) and optional row flags -> contiguous ``[B, T, P, D]``, equal to
  ``reference.pad_query`` (``pad_heads`` of the query with the rows whose flag is off zeroed);
* :func:`fold_query_grads`: padded gradients ``[B, T, P, D]`` of one or more branches -> ``[B, T, H, D]``, the
  gradient of that padding: ``sum_i (g_i[h] + g_i[h + H])``, zero at the flagged-off rows (float32 sums, rounded
  once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import check_dim, flat_row_tile, row_flags

_ROWS = 16  # (token, head) rows per program


@triton.jit
def _pad_query_kernel(q, qon, out, n_rows, T, sqb, sqt, sqh, sqd, H: tl.constexpr, P: tl.constexpr,
                      D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, QON: tl.constexpr):
    # out: contiguous [n_rows = B * T * P, D]
    rows, rmask, off, mask = flat_row_tile(n_rows, D, BR, BD)
    bt = rows // P
    j = rows % P
    ok = rmask & (j < 2 * H)
    if QON:
        ok = ok & (tl.load(qon + bt, mask=ok, other=0) != 0)
    dd = tl.arange(0, BD)
    src = q + (bt // T) * sqb + (bt % T) * sqt + (j % H) * sqh
    x = tl.load(src[:, None] + dd[None, :] * sqd, mask=ok[:, None] & (dd < D)[None, :], other=0.0)
    tl.store(out + off, x, mask=mask)


@triton.jit
def _fold_grads_kernel(g0, g1, g2, qon, out, n_rows, H: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                       BR: tl.constexpr, BD: tl.constexpr, N: tl.constexpr, QON: tl.constexpr):
    # out: contiguous [n_rows = B * T * H, D]; g0..g(N-1): contiguous [B * T * P, D]
    rows, rmask, off, mask = flat_row_tile(n_rows, D, BR, BD)
    bt = rows // H
    first_off = off + (bt * P + rows % H - rows)[:, None] * D  # the head's first copy; the second is H rows on
    acc = tl.load(g0 + first_off, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(g0 + first_off + H * D, mask=mask, other=0.0).to(tl.float32)
    if N > 1:
        acc += tl.load(g1 + first_off, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(g1 + first_off + H * D, mask=mask, other=0.0).to(tl.float32)
    if N > 2:
        acc += tl.load(g2 + first_off, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(g2 + first_off + H * D, mask=mask, other=0.0).to(tl.float32)
    if QON:
        on = tl.load(qon + bt, mask=rmask, other=0) != 0
        acc = tl.where(on[:, None], acc, 0.0)
    tl.store(out + off, acc.to(out.dtype.element_ty), mask=mask)


def pad_query(q: torch.Tensor, padded_heads: int, rows_on: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T, H, D]`` (any strides) -> contiguous ``[B, T, P, D]``: heads ``0..H-1``, the same again, zeros;
    rows whose ``rows_on`` flag (bool ``[B, T]``) is off are zero."""
    B, T, H, D = q.shape
    if padded_heads < 2 * H:
        raise ValueError(f"{padded_heads} padded heads cannot hold two copies of {H} heads")
    flags = row_flags(rows_on, (B, T))
    out = q.new_empty(B, T, padded_heads, D)
    n_rows = out.numel() // D
    if n_rows:
        _pad_query_kernel[(triton.cdiv(n_rows, _ROWS),)](
            q, flags if flags is not None else q, out, n_rows, T, *q.stride(), H=H, P=padded_heads, D=D, BR=_ROWS,
            BD=check_dim(D), QON=flags is not None, num_warps=4)
    return out


def fold_query_grads(grads, num_heads: int, rows_on: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    """Padded query gradients ``[B, T, P, D]`` (one to three, one shape) -> the model's ``[B, T, H, D]`` (``dtype``,
    by default theirs): each head's two copies summed over the gradients, zero at the rows whose ``rows_on`` flag is
    off. The gradient of ``pad_query`` taken of their sum."""
    grads = [g.contiguous() for g in grads]
    if not 1 <= len(grads) <= 3 or any(g.shape != grads[0].shape for g in grads):
        raise ValueError(f"fold_query_grads takes one to three gradients of one shape, got "
                         f"{[tuple(g.shape) for g in grads]}")
    B, T, P, D = grads[0].shape
    if P < 2 * num_heads:
        raise ValueError(f"{P} padded heads cannot hold two copies of {num_heads} heads")
    flags = row_flags(rows_on, (B, T))
    out = grads[0].new_empty(B, T, num_heads, D, dtype=dtype or grads[0].dtype)
    n_rows = out.numel() // D
    if n_rows:
        padded = grads + [grads[0]] * (3 - len(grads))
        _fold_grads_kernel[(triton.cdiv(n_rows, _ROWS),)](
            *padded, flags if flags is not None else out, out, n_rows, H=num_heads, P=P, D=D, BR=_ROWS,
            BD=check_dim(D), N=len(grads), QON=flags is not None, num_warps=4)
    return out


__all__ = ["pad_query", "fold_query_grads"]
