"""The dense part's output at rows whose query is zero, on Triton: the running mean of the visible values.

Attention with a zero query weighs every visible key alike, so the row at position ``p`` gets the mean of the
values at positions ``0 .. p`` (those that are real tokens when a padding mask is given), the same for each query
head of a kv group. :func:`running_means` returns that as a function of a range of positions, written straight
into the query heads' layout ``[B, rows, H, D]``: float32 sums of a scan over tiles of ``_TILE`` keys (each
tile's running sum plus the sum of the tiles before it), divided by the count, rounded once. Its backward is the
reverse scan of the output gradient summed over each group's heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton_utils import check_dim, row_flags

_TILE = 64  # keys per program


@triton.jit
def _key_tile(pid_c, pid_bg, Tk, HKV: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, D: tl.constexpr):
    """Sample, kv head, the tile's key positions (int64: the ``[B, T, H, D]`` output passes 2**31 elements at about
    600K tokens) and feature lanes, with masks."""
    keys = (pid_c * BT + tl.arange(0, BT)).to(tl.int64)
    dd = tl.arange(0, BD)
    return pid_bg // HKV, pid_bg % HKV, keys, keys < Tk, dd, dd < D


@triton.jit
def _value_tile(v, kvalid, b, g, keys, kmask, dd, dmask, Tk, svb, svt, svh, svd, HAS_KVALID: tl.constexpr):
    """float32 ``[BT, BD]`` values of the keys, zero at padding keys."""
    x = tl.load(v + b * svb + g * svh + keys[:, None] * svt + dd[None, :] * svd,
                mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if HAS_KVALID:
        x = tl.where((tl.load(kvalid + b * Tk + keys, mask=kmask, other=0) != 0)[:, None], x, 0.0)
    return x


@triton.jit
def _counts(counts, b, keys, kmask, Tk, HAS_KVALID: tl.constexpr):
    """How many values the mean at each key position divides by (at least 1)."""
    if HAS_KVALID:
        n = tl.load(counts + b * Tk + keys, mask=kmask, other=1.0)
    else:
        n = (keys + 1).to(tl.float32)
    return tl.maximum(n, 1.0)


@triton.jit
def _mean_grad_tile(grad, on, counts, b, g, keys, kmask, dd, dmask, Tk, start, stop, H: tl.constexpr,
                    GROUP: tl.constexpr, D: tl.constexpr, HAS_KVALID: tl.constexpr, HAS_ON: tl.constexpr):
    """float32 ``[BT, BD]``: the gradient reaching each position's mean, its group's heads summed, divided by the
    count; zero outside the output's rows ``[start, stop)`` and at rows whose flag is off."""
    rows = keys - start
    rmask = kmask & (keys >= start) & (keys < stop)
    if HAS_ON:
        rmask = rmask & (tl.load(on + b * (stop - start) + rows, mask=rmask, other=0) != 0)
    mask = rmask[:, None] & dmask[None, :]
    acc = tl.zeros(mask.shape, dtype=tl.float32)
    for j in tl.static_range(GROUP):
        acc += tl.load(grad + ((b * (stop - start) + rows[:, None]) * H + g * GROUP + j) * D + dd[None, :],
                       mask=mask, other=0.0).to(tl.float32)
    return acc / _counts(counts, b, keys, kmask, Tk, HAS_KVALID)[:, None]


@triton.jit
def _value_tile_sums_kernel(v, kvalid, sums, Tk, NC, svb, svt, svh, svd, HKV: tl.constexpr, D: tl.constexpr,
                            BT: tl.constexpr, BD: tl.constexpr, HAS_KVALID: tl.constexpr):
    # sums: float32 [B * HKV, NC, D], the sum of each tile's (real) values
    pid_c, pid_bg = tl.program_id(0), tl.program_id(1)
    b, g, keys, kmask, dd, dmask = _key_tile(pid_c, pid_bg, Tk, HKV, BT, BD, D)
    x = _value_tile(v, kvalid, b, g, keys, kmask, dd, dmask, Tk, svb, svt, svh, svd, HAS_KVALID)
    tl.store(sums + (pid_bg * NC + pid_c) * D + dd, tl.sum(x, 0), mask=dmask)


@triton.jit
def _running_mean_kernel(v, kvalid, counts, carry, on, out, Tk, NC, start, stop, first_tile,
                         svb, svt, svh, svd, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                         BT: tl.constexpr, BD: tl.constexpr, HAS_KVALID: tl.constexpr, HAS_ON: tl.constexpr):
    # out: [B, stop - start, HKV * GROUP, D] contiguous; carry: float32 [B * HKV, NC, D], the sum of the tiles before
    pid_c, pid_bg = first_tile + tl.program_id(0), tl.program_id(1)
    b, g, keys, kmask, dd, dmask = _key_tile(pid_c, pid_bg, Tk, HKV, BT, BD, D)
    x = _value_tile(v, kvalid, b, g, keys, kmask, dd, dmask, Tk, svb, svt, svh, svd, HAS_KVALID)
    s = tl.cumsum(x, 0) + tl.load(carry + (pid_bg * NC + pid_c) * D + dd, mask=dmask, other=0.0)[None, :]
    mean = s / _counts(counts, b, keys, kmask, Tk, HAS_KVALID)[:, None]
    rows = keys - start
    rmask = kmask & (keys >= start) & (keys < stop)
    if HAS_ON:
        mean = tl.where((tl.load(on + b * (stop - start) + rows, mask=rmask, other=0) != 0)[:, None], mean, 0.0)
    mean = mean.to(out.dtype.element_ty)
    mask = rmask[:, None] & dmask[None, :]
    for j in tl.static_range(GROUP):
        tl.store(out + ((b * (stop - start) + rows[:, None]) * (HKV * GROUP) + g * GROUP + j) * D + dd[None, :],
                 mean, mask=mask)


@triton.jit
def _grad_tile_sums_kernel(grad, on, counts, sums, Tk, NC, start, stop, first_tile, HKV: tl.constexpr,
                           GROUP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                           HAS_KVALID: tl.constexpr, HAS_ON: tl.constexpr):
    pid_c, pid_bg = first_tile + tl.program_id(0), tl.program_id(1)
    b, g, keys, kmask, dd, dmask = _key_tile(pid_c, pid_bg, Tk, HKV, BT, BD, D)
    w = _mean_grad_tile(grad, on, counts, b, g, keys, kmask, dd, dmask, Tk, start, stop, HKV * GROUP, GROUP, D,
                        HAS_KVALID, HAS_ON)
    tl.store(sums + (pid_bg * NC + pid_c) * D + dd, tl.sum(w, 0), mask=dmask)


@triton.jit
def _value_grad_kernel(grad, on, counts, kvalid, carry, dv, Tk, NC, start, stop, HKV: tl.constexpr,
                       GROUP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                       HAS_KVALID: tl.constexpr, HAS_ON: tl.constexpr):
    # dv: [B, Tk, HKV, D] contiguous; carry: float32 [B * HKV, NC, D], the sum over the tiles after
    pid_c, pid_bg = tl.program_id(0), tl.program_id(1)
    b, g, keys, kmask, dd, dmask = _key_tile(pid_c, pid_bg, Tk, HKV, BT, BD, D)
    w = _mean_grad_tile(grad, on, counts, b, g, keys, kmask, dd, dmask, Tk, start, stop, HKV * GROUP, GROUP, D,
                        HAS_KVALID, HAS_ON)
    after = tl.load(carry + (pid_bg * NC + pid_c) * D + dd, mask=dmask, other=0.0)
    s = tl.cumsum(w, 0, reverse=True) + after[None, :]
    if HAS_KVALID:
        s = tl.where((tl.load(kvalid + b * Tk + keys, mask=kmask, other=0) != 0)[:, None], s, 0.0)
    tl.store(dv + ((b * Tk + keys[:, None]) * HKV + g) * D + dd[None, :], s.to(dv.dtype.element_ty),
             mask=kmask[:, None] & dmask[None, :])


def _exclusive_scan(sums: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Per ``[B * Hkv, NC, D]`` row of tiles: the sum of the tiles before each (after it, with ``reverse``)."""
    if reverse:
        return F.pad(sums.flip(1).cumsum(1).flip(1)[:, 1:], (0, 0, 0, 1))
    return F.pad(sums.cumsum(1)[:, :-1], (0, 0, 1, 0))


class _RunningMeans(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, carry, kvalid, counts, on, group, start, stop):
        B, Tk, HKV, D = v.shape
        out = v.new_empty(B, stop - start, HKV * group, D)
        first, last = start // _TILE, triton.cdiv(stop, _TILE)
        dummy = out
        if stop > start and B * HKV:
            _running_mean_kernel[(last - first, B * HKV)](
                v, kvalid if kvalid is not None else dummy, counts if counts is not None else dummy, carry,
                on if on is not None else dummy, out, Tk, carry.shape[1], start, stop, first, *v.stride(),
                HKV=HKV, GROUP=group, D=D, BT=_TILE, BD=check_dim(D), HAS_KVALID=kvalid is not None,
                HAS_ON=on is not None, num_warps=4)
        ctx.save_for_backward(kvalid, counts, on)
        ctx.cfg = (v.shape, v.dtype, group, start, stop)
        return out

    @staticmethod
    def backward(ctx, grad):
        kvalid, counts, on = ctx.saved_tensors
        (B, Tk, HKV, D), dtype, group, start, stop = ctx.cfg
        grad = grad.contiguous()
        NC = triton.cdiv(Tk, _TILE)
        first, last = start // _TILE, triton.cdiv(stop, _TILE)
        dv = torch.empty(B, Tk, HKV, D, device=grad.device, dtype=dtype)
        dv[:, last * _TILE:].zero_()  # keys after the last row: no mean reads them
        sums = torch.zeros(B * HKV, NC, D, device=grad.device, dtype=torch.float32)
        flags = dict(HKV=HKV, GROUP=group, D=D, BT=_TILE, BD=check_dim(D), HAS_KVALID=kvalid is not None,
                     HAS_ON=on is not None, num_warps=4)
        dummy = sums
        on_arg, counts_arg = (on if on is not None else dummy), (counts if counts is not None else dummy)
        if stop > start and B * HKV:
            _grad_tile_sums_kernel[(last - first, B * HKV)](grad, on_arg, counts_arg, sums, Tk, NC, start, stop,
                                                            first, **flags)
            _value_grad_kernel[(last, B * HKV)](grad, on_arg, counts_arg, kvalid if kvalid is not None else dummy,
                                                _exclusive_scan(sums, reverse=True), dv, Tk, NC, start, stop, **flags)
        else:
            dv.zero_()
        return dv, None, None, None, None, None, None, None


def running_means(v: torch.Tensor, key_valid: torch.Tensor | None, group: int):
    """The running means of ``v`` ``[B, Tk, Hkv, D]`` (any strides) as a function of positions:
    ``means(start, stop, rows_on)`` -> ``[B, stop - start, Hkv * group, D]`` in ``v``'s dtype, row ``i`` the mean of
    the values at positions ``0 .. start + i`` (those ``key_valid``, bool ``[B, Tk]``, marks real when given),
    copied to each query head of its kv head, zero at the rows where ``rows_on`` (bool ``[B, stop - start]`` or
    None) is off. Differentiable in ``v``. The sum of each tile of keys is taken once, here; each call scans its
    own tiles."""
    B, Tk, HKV, D = v.shape
    check_dim(D)
    kvalid = counts = None
    if key_valid is not None:
        kvalid = row_flags(key_valid, (B, Tk), "key_valid", "[B, Tk]")
        counts = torch.cumsum(key_valid, dim=1, dtype=torch.float32)
    NC = triton.cdiv(Tk, _TILE)
    with torch.no_grad():
        sums = torch.empty(B * HKV, NC, D, device=v.device, dtype=torch.float32)
        if NC and B * HKV:
            _value_tile_sums_kernel[(NC, B * HKV)](v, kvalid if kvalid is not None else sums, sums, Tk, NC,
                                                   *v.stride(), HKV=HKV, D=D, BT=_TILE, BD=check_dim(D),
                                                   HAS_KVALID=kvalid is not None, num_warps=4)
        carry = _exclusive_scan(sums)

    def means(start: int, stop: int, rows_on: torch.Tensor | None) -> torch.Tensor:
        if not 0 <= start <= stop <= Tk:
            raise ValueError(f"positions {start}..{stop} outside the {Tk} keys")
        on = row_flags(rows_on, (B, stop - start), what="[B, stop - start]")
        return _RunningMeans.apply(v, carry, kvalid, counts, on, int(group), int(start), int(stop))

    return means


__all__ = ["running_means"]
