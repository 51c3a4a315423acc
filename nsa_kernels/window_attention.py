"""Causal band attention on Triton: the sliding-window branch of VideoNSA, and dense causal GQA attention.

Query row ``r`` at position ``pos[r]`` (``num_keys - Tq + r`` by default, or an explicit int32 ``[B, Tq]``
array for gathered rows, ``-1`` marking an empty padding row) of head ``h`` attends keys
``pos[r] - window + 1 ... pos[r]`` of kv head ``h // group``, optionally restricted to keys whose
``key_valid`` flag is set (padding). ``window = None`` is plain causal attention. Heads ``>= active_heads``
are all-zero queries with zero gates: they are not computed (output 0, no gradient).

A row that sees no key (padding rows) outputs 0.

When the row tiles are too few to fill the GPU (the dense part's text rows, a handful of tiles over the whole
sequence; one decoded row), each row tile's keys are split into runs of whole key tiles, one program each, and
the partial softmax states (forward) or partial ``dq`` (backward) are combined afterwards
(:func:`choose_key_splits`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._triton_utils import (DEFAULT_LAUNCH, LOG2E, attention_delta, check_dim, dkv_step, dot_precision, dq_step,
                           head_rows_offsets, load_head_rows, load_kv_tile, online_softmax_step, row_tile_program,
                           wide_offsets)


@triton.jit
def _row_positions(pos_ptr, b, rows, rmask, Tq, OFF, HAS_POS: tl.constexpr):
    if HAS_POS:
        pos = tl.load(pos_ptr + b * Tq + rows, mask=rmask, other=-1)
    else:
        pos = tl.where(rmask, rows + OFF, -1)
    return pos


@triton.jit
def _band_rows(pos_ptr, b, rows, rmask, Tq, Tk, OFF, W, HAS_POS: tl.constexpr):
    """Positions of a row tile and the key range ``[lo, hi)`` that covers every row's band."""
    pos = _row_positions(pos_ptr, b, rows, rmask, Tq, OFF, HAS_POS)
    hi = tl.max(pos, 0) + 1
    lo = tl.maximum(tl.min(tl.where(pos >= 0, pos, Tk), 0) - W + 1, 0)
    return pos, lo, hi


@triton.jit
def _band_visible(cols, pos, W, b, Tk, cmask, kvalid_ptr, HAS_KVALID: tl.constexpr):
    """``[rows, keys]``: key ``cols`` is inside the row's band (and a real token when flags are given)."""
    vis = (cols[None, :] <= pos[:, None]) & (cols[None, :] > pos[:, None] - W)
    if HAS_KVALID:
        kv_ok = tl.load(kvalid_ptr + b * Tk + cols, mask=cmask, other=0)
        vis = vis & (kv_ok != 0)[None, :]
    return vis


@triton.jit
def _store_normalized(o_ptr, lse_ptr, acc, m_i, l_i, io_mask, rmask):
    """The rows' output ``acc / l`` and base-2 log-sum-exp ``m + log2(l)``: 0 and ``inf`` for rows that saw no key."""
    empty = l_i == 0.0
    tl.store(o_ptr, (acc / tl.where(empty, 1.0, l_i)[:, None]).to(o_ptr.dtype.element_ty), mask=io_mask)
    tl.store(lse_ptr, tl.where(empty, float("inf"), m_i + tl.log2(l_i)), mask=rmask)


@triton.jit
def _split_range(lo, hi, BN: tl.constexpr, SPLIT: tl.constexpr):
    """This program's part of the key range ``[lo, hi)``: all of it, or with ``SPLIT`` the ``program_id(2)``-th of
    ``num_programs(2)`` runs of whole key tiles (so each tile is cut as without splits)."""
    if SPLIT:
        per = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), tl.num_programs(2)), BN) * BN
        lo = lo + tl.program_id(2) * per
        hi = tl.minimum(hi, lo + per)
    return lo, hi


@triton.jit
def _band_fwd_kernel(
    q, k, v, o, lse, part_acc, part_stats, pos_ptr, kvalid_ptr,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, Tk, OFF, W, H_ACTIVE, qk_scale, split_stride,
    H: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_KVALID: tl.constexpr, WIDE: tl.constexpr, SPLIT: tl.constexpr,
):
    # SPLIT: write the unnormalised state of this program's keys (part_acc float32 [S, B, Tq, H, D], part_stats
    # float32 [S, 2, B, Tq, H] holding m and l, split_stride = B * Tq * H) for _band_combine_kernel
    b, h, g, rows, rmask, dd, dmask, io_mask = row_tile_program(Tq, H, GROUP, D, BM, BD, WIDE)
    o_ptr = o + head_rows_offsets(b, h, rows, dd, Tq, H, D)
    if h >= H_ACTIVE:
        if not SPLIT:  # with splits the combine writes the zeros
            tl.store(o_ptr, tl.zeros([BM, BD], dtype=o.dtype.element_ty), mask=io_mask)
    else:
        pos, lo, hi = _band_rows(pos_ptr, b, rows, rmask, Tq, Tk, OFF, W, HAS_POS)
        lo, hi = _split_range(lo, hi, BN, SPLIT)
        bq = load_head_rows(q, b, h, rows, dd, io_mask, sqb, sqt, sqh, sqd)
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        for c0 in range(lo, hi, BN):
            cols = c0 + tl.arange(0, BN)
            cmask = cols < hi
            bk, bv = load_kv_tile(k, v, b, g, cols, cmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd)
            vis = _band_visible(cols, pos, W, b, Tk, cmask, kvalid_ptr, HAS_KVALID)
            m_i, l_i, acc = online_softmax_step(bq, bk, bv, vis, m_i, l_i, acc, qk_scale, PREC)
        if SPLIT:
            split = tl.program_id(2)
            stat_off = (b * Tq + rows) * H + h
            tl.store(part_acc + split * split_stride * D + head_rows_offsets(b, h, rows, dd, Tq, H, D), acc,
                     mask=io_mask)
            tl.store(part_stats + 2 * split * split_stride + stat_off, m_i, mask=rmask)
            tl.store(part_stats + (2 * split + 1) * split_stride + stat_off, l_i, mask=rmask)
        else:
            _store_normalized(o_ptr, lse + (b * Tq + rows) * H + h, acc, m_i, l_i, io_mask, rmask)


@triton.jit
def _band_combine_kernel(
    part_acc, part_stats, o, lse, Tq, H_ACTIVE, n_splits, split_stride,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, WIDE: tl.constexpr,
):
    """Output and base-2 log-sum-exp of each row from the split programs' states (layout in _band_fwd_kernel)."""
    b, h, g, rows, rmask, dd, dmask, io_mask = row_tile_program(Tq, H, 1, D, BM, BD, WIDE)
    row_off = head_rows_offsets(b, h, rows, dd, Tq, H, D)
    if h >= H_ACTIVE:
        tl.store(o + row_off, tl.zeros([BM, BD], dtype=o.dtype.element_ty), mask=io_mask)
    else:
        stat_off = (b * Tq + rows) * H + h
        m = tl.full([BM], float("-inf"), dtype=tl.float32)
        for split in range(0, n_splits):
            m = tl.maximum(m, tl.load(part_stats + 2 * split * split_stride + stat_off, mask=rmask,
                                      other=float("-inf")))
        m_use = tl.where(m == float("-inf"), 0.0, m)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        for split in range(0, n_splits):
            m_s = tl.load(part_stats + 2 * split * split_stride + stat_off, mask=rmask, other=float("-inf"))
            alpha = tl.exp2(m_s - m_use)
            l_i += alpha * tl.load(part_stats + (2 * split + 1) * split_stride + stat_off, mask=rmask, other=0.0)
            acc += alpha[:, None] * tl.load(part_acc + split * split_stride * D + row_off, mask=io_mask, other=0.0)
        _store_normalized(o + row_off, lse + stat_off, acc, m, l_i, io_mask, rmask)


@triton.jit
def _band_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, pos_ptr, kvalid_ptr,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, Tk, OFF, W, H_ACTIVE, qk_scale, scale, split_stride,
    H: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_KVALID: tl.constexpr, WIDE: tl.constexpr, SPLIT: tl.constexpr,
):
    # SPLIT: dq is float32 [S, B, Tq, H, D] (split_stride = B * Tq * H), each split's part of the sum over keys
    b, h, g, rows, rmask, dd, dmask, io_mask = row_tile_program(Tq, H, GROUP, D, BM, BD, WIDE)
    row_off = head_rows_offsets(b, h, rows, dd, Tq, H, D)
    if SPLIT:
        dq += tl.program_id(2) * split_stride * D
    if h >= H_ACTIVE:
        tl.store(dq + row_off, tl.zeros([BM, BD], dtype=dq.dtype.element_ty), mask=io_mask)
    else:
        pos, lo, hi = _band_rows(pos_ptr, b, rows, rmask, Tq, Tk, OFF, W, HAS_POS)
        lo, hi = _split_range(lo, hi, BN, SPLIT)
        bq = load_head_rows(q, b, h, rows, dd, io_mask, sqb, sqt, sqh, sqd)
        bdo = tl.load(do + row_off, mask=io_mask, other=0.0)
        lse2 = tl.load(lse + (b * Tq + rows) * H + h, mask=rmask, other=float("inf"))
        dlt = tl.load(delta + (b * Tq + rows) * H + h, mask=rmask, other=0.0)
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        for c0 in range(lo, hi, BN):
            cols = c0 + tl.arange(0, BN)
            cmask = cols < hi
            bk, bv = load_kv_tile(k, v, b, g, cols, cmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd)
            vis = _band_visible(cols, pos, W, b, Tk, cmask, kvalid_ptr, HAS_KVALID)
            acc = dq_step(bq, bk, bv, bdo, vis, lse2, dlt, acc, qk_scale, PREC)
        tl.store(dq + row_off, (acc * scale).to(dq.dtype.element_ty), mask=io_mask)


@triton.jit
def _band_bwd_dkv_kernel(
    q, k, v, do, lse, delta, dk, dv, pos_ptr, kvalid_ptr,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, Tk, OFF, W, H_ACTIVE, qk_scale, scale,
    H: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_KVALID: tl.constexpr, WIDE: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    # dk, dv: float32 contiguous [B, Tk, Hkv, D]; each program owns one key tile of one kv head. q is contiguous
    # like do, so both take one set of offsets (fewer registers: the kernel spilled with q's own strides)
    pid_n = tl.program_id(0)
    if WIDE:  # row offsets in int64 (wide_offsets)
        pid_n = pid_n.to(tl.int64)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < Tk
    dd = tl.arange(0, BD)
    dmask = dd < D
    kv_mask = cmask[:, None] & dmask[None, :]
    bk, bv = load_kv_tile(k, v, b, g, cols, cmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd)
    col_ok = cmask
    if HAS_KVALID:
        col_ok = col_ok & (tl.load(kvalid_ptr + b * Tk + cols, mask=cmask, other=0) != 0)
    dk_acc = tl.zeros([BN, BD], dtype=tl.float32)
    dv_acc = tl.zeros([BN, BD], dtype=tl.float32)
    k_lo = pid_n * BN
    k_hi = tl.minimum(pid_n * BN + BN, Tk) - 1  # inclusive
    if HAS_POS:
        r_lo = 0
        r_hi = Tq
    else:
        r_lo = tl.maximum(k_lo - OFF, 0)
        r_hi = tl.minimum(k_hi + W - OFF, Tq)
    n_heads = tl.minimum(tl.maximum(H_ACTIVE - g * GROUP, 0), GROUP)
    for j in range(0, n_heads):
        h = g * GROUP + j
        for r0 in range(r_lo, r_hi, BM):
            rows = r0 + tl.arange(0, BM)
            rmask = rows < r_hi
            pos = _row_positions(pos_ptr, b, rows, rmask, Tq, OFF, HAS_POS)
            if HAS_POS:  # gathered rows scan every tile: skip those that end before this key tile
                sees_tile = tl.max(pos, 0) >= k_lo
            else:
                sees_tile = True
            if sees_tile:
                io_mask = rmask[:, None] & dmask[None, :]
                row_off = head_rows_offsets(b, h, rows, dd, Tq, H, D)
                bq = tl.load(q + row_off, mask=io_mask, other=0.0)
                bdo = tl.load(do + row_off, mask=io_mask, other=0.0)
                lse2 = tl.load(lse + (b * Tq + rows) * H + h, mask=rmask, other=float("inf"))
                dlt = tl.load(delta + (b * Tq + rows) * H + h, mask=rmask, other=0.0)
                vis = (cols[None, :] <= pos[:, None]) & (cols[None, :] > pos[:, None] - W) & col_ok[None, :]
                dk_acc, dv_acc = dkv_step(bq, bk, bv, bdo, vis, lse2, dlt, dk_acc, dv_acc, qk_scale, PREC, False)
    out_off = ((b * Tk + cols[:, None]) * HKV + g) * D + dd[None, :]
    dk_acc = dk_acc * scale
    if ACCUMULATE:
        dk_acc += tl.load(dk + out_off, mask=kv_mask, other=0.0)
        dv_acc += tl.load(dv + out_off, mask=kv_mask, other=0.0)
    tl.store(dk + out_off, dk_acc, mask=kv_mask)
    tl.store(dv + out_off, dv_acc, mask=kv_mask)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_key_splits(row_programs: int, key_tiles: int, device: torch.device, launch=DEFAULT_LAUNCH) -> int:
    """Programs per row tile, each over a run of its ``key_tiles`` key tiles: 1 when the ``row_programs`` row
    tiles fill the GPU (``launch.band_programs_per_sm`` per SM), else as many as get there, at least 8 key tiles
    each. Off the GPU (the interpreter) 1."""
    if device.type != "cuda":
        return 1
    target = launch.band_programs_per_sm * _sm_count(device.index if device.index is not None else 0)
    if row_programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, row_programs), key_tiles // 8))


class _BandLaunch(NamedTuple):
    """What the band kernels are launched with: the sizes of q ``[B, Tq, H, D]`` and k ``[B, Tk, Hkv, D]``, the
    window ``W`` (``Tk + 1``: causal), row positions (int32) and key flags (int8) or None, the heads computed, the
    tile sizes (feature, rows, keys) and the programs per row tile over its keys."""

    B: int
    Tq: int
    H: int
    D: int
    Tk: int
    HKV: int
    W: int
    pos: torch.Tensor | None
    kvalid: torch.Tensor | None
    active: int
    bd: int
    bm: int
    bn: int
    splits: int


def _prep(q, k, window, positions, key_valid, active_heads, splits, launch) -> _BandLaunch:
    B, Tq, H, D = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    if H % HKV:
        raise ValueError(f"query heads {H} not a multiple of kv heads {HKV}")
    W = Tk + 1 if window is None else int(window)
    pos = positions.to(torch.int32).contiguous() if positions is not None else None
    kvalid = key_valid.to(torch.int8).contiguous() if key_valid is not None else None
    active = H if active_heads is None else int(active_heads)
    bd = check_dim(D)
    bm, bn = 64, 64
    if bd > 128:
        bm, bn = 32, 32
    row_programs = triton.cdiv(Tq, bm) * B * H
    if splits is None:
        splits = choose_key_splits(row_programs, triton.cdiv(min(Tk, W + bm - 1), bn), q.device, launch)
    elif splits < 1:
        raise ValueError(f"key_splits must be at least 1, got {splits}")
    return _BandLaunch(B, Tq, H, D, Tk, HKV, W, pos, kvalid, active, bd, bm, bn, int(splits))


def band_attention_fwd(q, k, v, scale, window=None, positions=None, key_valid=None, active_heads=None,
                       launch=DEFAULT_LAUNCH, key_splits=None):
    """q ``[B, Tq, H, D]``, k/v ``[B, Tk, Hkv, D]`` (any strides). Returns ``(o [B, Tq, H, D], lse2)``,
    ``lse2`` the base-2 log-sum-exp ``[B, Tq, H]`` float32 (``inf`` for empty rows). ``key_splits``: programs
    per row tile over its keys (chosen by :func:`choose_key_splits` when None)."""
    B, Tq, H, D, Tk, HKV, W, pos, kvalid, active, bd, bm, bn, splits = _prep(q, k, window, positions, key_valid,
                                                                              active_heads, key_splits, launch)
    o = torch.empty(B, Tq, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Tq, H, device=q.device, dtype=torch.float32)
    split = splits > 1
    part_acc = torch.empty(splits, B, Tq, H, D, device=q.device, dtype=torch.float32) if split else o
    part_stats = torch.empty(splits, 2, B, Tq, H, device=q.device, dtype=torch.float32) if split else o
    wide = wide_offsets(q, k, v, o, part_acc)
    dummy = o
    _band_fwd_kernel[(triton.cdiv(Tq, bm), B * H, splits)](
        q, k, v, o, lse, part_acc, part_stats, pos if pos is not None else dummy,
        kvalid if kvalid is not None else dummy,
        *q.stride(), *k.stride(), *v.stride(), Tq, Tk, Tk - Tq, W, active, scale * LOG2E, B * Tq * H,
        H=H, HKV=HKV, GROUP=H // HKV, D=D, BM=bm, BN=bn, BD=bd, PREC=dot_precision(q.dtype),
        HAS_POS=pos is not None, HAS_KVALID=kvalid is not None, WIDE=wide, SPLIT=split,
        num_warps=launch.attention_warps, num_stages=2,
    )
    if split:
        _band_combine_kernel[(triton.cdiv(Tq, bm), B * H)](part_acc, part_stats, o, lse, Tq, active, splits,
                                                            B * Tq * H, H=H, D=D, BM=bm, BD=bd, WIDE=wide,
                                                            num_warps=4)
    return o, lse


def band_attention_bwd(q, k, v, o, lse, do, scale, window=None, positions=None, key_valid=None,
                       active_heads=None, dk_acc=None, dv_acc=None, launch=DEFAULT_LAUNCH, delta=None,
                       key_splits=None):
    """Returns ``dq`` (q dtype) and float32 ``dk``, ``dv`` (added into ``dk_acc``/``dv_acc`` when given).
    ``delta``: ``<o, do>`` ``[B, Tq, H]`` float32 when already known (computed here otherwise)."""
    run_dq, run_dkv, grads = band_attention_bwd_kernels(q, k, v, o, lse, do, scale, window, positions, key_valid,
                                                        active_heads, dk_acc, dv_acc, launch, delta, key_splits)
    run_dq()
    run_dkv()
    return grads


def band_attention_bwd_kernels(q, k, v, o, lse, do, scale, window=None, positions=None, key_valid=None,
                               active_heads=None, dk_acc=None, dv_acc=None, launch=DEFAULT_LAUNCH, delta=None,
                               key_splits=None):
    """The backward as two launches: ``(run_dq, run_dkv, (dq, dk, dv))``, each ``run_*`` a no-argument call that
    fills its buffers. :func:`band_attention_bwd` runs both; timing runs each. ``dq`` is split over keys as the
    forward (``key_splits``), its parts summed in float32."""
    B, Tq, H, D, Tk, HKV, W, pos, kvalid, active, bd, bm, bn, splits = _prep(q, k, window, positions, key_valid,
                                                                              active_heads, key_splits, launch)
    do = do.contiguous()
    delta = attention_delta(o, do) if delta is None else delta  # [B, Tq, H]
    dq = torch.empty(B, Tq, H, D, device=q.device, dtype=q.dtype)
    dq_parts = torch.empty(splits, B, Tq, H, D, device=q.device, dtype=torch.float32) if splits > 1 else dq
    accumulate = dk_acc is not None
    dk = dk_acc if accumulate else torch.empty(B, Tk, HKV, D, device=q.device, dtype=torch.float32)
    dv = dv_acc if accumulate else torch.empty(B, Tk, HKV, D, device=q.device, dtype=torch.float32)
    dummy = dq
    common = dict(H=H, HKV=HKV, GROUP=H // HKV, D=D, BM=bm, BN=bn, BD=bd, PREC=dot_precision(q.dtype),
                  HAS_POS=pos is not None, HAS_KVALID=kvalid is not None, num_stages=2)
    flags = (pos if pos is not None else dummy, kvalid if kvalid is not None else dummy)
    kv_strides = (*k.stride(), *v.stride())
    scalars = (Tq, Tk, Tk - Tq, W, active, scale * LOG2E, scale)

    def run_dq():
        _band_bwd_dq_kernel[(triton.cdiv(Tq, bm), B * H, splits)](
            q, k, v, do, lse, delta, dq_parts, *flags, *q.stride(), *kv_strides, *scalars, B * Tq * H,
            num_warps=launch.attention_warps, WIDE=wide_offsets(q, k, v, do, dq_parts), SPLIT=splits > 1, **common)
        if splits > 1:
            dq.copy_(dq_parts.sum(dim=0))

    def run_dkv():
        _band_bwd_dkv_kernel[(triton.cdiv(Tk, bn), B * HKV)](q.contiguous(), k, v, do, lse, delta, dk, dv, *flags,
                                                             *kv_strides, *scalars, ACCUMULATE=accumulate,
                                                             num_warps=launch.attention_warps,
                                                             WIDE=wide_offsets(q, k, v, do), **common)

    return run_dq, run_dkv, (dq, dk, dv)


class BandAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, window, positions, key_valid, active_heads, splits):
        o, lse = band_attention_fwd(q, k, v, scale, window, positions, key_valid, active_heads, key_splits=splits)
        ctx.save_for_backward(q, k, v, o, lse, positions, key_valid)
        ctx.cfg = (scale, window, active_heads, splits)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, positions, key_valid = ctx.saved_tensors
        scale, window, active, splits = ctx.cfg
        dq, dk, dv = band_attention_bwd(q, k, v, o, lse, do, scale, window, positions, key_valid, active,
                                        key_splits=splits)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def window_attention(q, k, v, window_size, scale=None, active_heads=None):
    """Sliding-window branch: q ``[B, Tq, P, D]``, k/v ``[B, Tk, Hkv, D]``; keys ``t - W + 1 .. t``."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return BandAttentionFunction.apply(q, k, v, float(scale), int(window_size), None, None, active_heads, None)


def band_attention(q, k, v, scale=None, window=None, positions=None, key_valid=None, active_heads=None,
                   key_splits=None):
    """General entry: causal (``window=None``) or windowed attention with optional gathered row positions
    (int ``[B, Tq]``, ``-1`` = empty row) and key validity flags (bool ``[B, Tk]``). ``key_splits``: programs per
    row tile over its keys, :func:`choose_key_splits`'s choice when None."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return BandAttentionFunction.apply(q, k, v, float(scale), window, positions, key_valid, active_heads, key_splits)


__all__ = ["window_attention", "band_attention", "band_attention_fwd", "band_attention_bwd",
           "band_attention_bwd_kernels", "choose_key_splits"]
