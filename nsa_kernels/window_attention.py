"""Causal band attention on Triton: the sliding-window branch of VideoNSA, and dense causal GQA attention.

Query row ``r`` at position ``pos[r]`` (``num_keys - Tq + r`` by default, or an explicit int32 ``[B, Tq]``
array for gathered rows, ``-1`` marking an empty padding row) of head ``h`` attends keys
``pos[r] - window + 1 ... pos[r]`` of kv head ``h // group``, optionally restricted to keys whose
``key_valid`` flag is set (padding). ``window = None`` is plain causal attention. Heads ``>= active_heads``
are all-zero queries with zero gates: they are not computed (output 0, no gradient).

A row that sees no key (padding rows) outputs 0.
"""

from __future__ import annotations

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
def _band_fwd_kernel(
    q, k, v, o, lse, pos_ptr, kvalid_ptr,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, Tk, OFF, W, H_ACTIVE, qk_scale,
    H: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_KVALID: tl.constexpr, WIDE: tl.constexpr,
):
    b, h, g, rows, rmask, dd, dmask, io_mask = row_tile_program(Tq, H, GROUP, D, BM, BD, WIDE)
    o_ptr = o + head_rows_offsets(b, h, rows, dd, Tq, H, D)
    if h >= H_ACTIVE:
        tl.store(o_ptr, tl.zeros([BM, BD], dtype=o.dtype.element_ty), mask=io_mask)
    else:
        pos, lo, hi = _band_rows(pos_ptr, b, rows, rmask, Tq, Tk, OFF, W, HAS_POS)
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
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(o_ptr, out.to(o.dtype.element_ty), mask=io_mask)
        tl.store(lse + (b * Tq + rows) * H + h, tl.where(empty, float("inf"), m_i + tl.log2(l_i)), mask=rmask)


@triton.jit
def _band_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, pos_ptr, kvalid_ptr,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, Tk, OFF, W, H_ACTIVE, qk_scale, scale,
    H: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_KVALID: tl.constexpr, WIDE: tl.constexpr,
):
    b, h, g, rows, rmask, dd, dmask, io_mask = row_tile_program(Tq, H, GROUP, D, BM, BD, WIDE)
    row_off = head_rows_offsets(b, h, rows, dd, Tq, H, D)
    if h >= H_ACTIVE:
        tl.store(dq + row_off, tl.zeros([BM, BD], dtype=dq.dtype.element_ty), mask=io_mask)
    else:
        pos, lo, hi = _band_rows(pos_ptr, b, rows, rmask, Tq, Tk, OFF, W, HAS_POS)
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


def _prep(q, k, window, positions, key_valid, active_heads):
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
    return B, Tq, H, D, Tk, HKV, W, pos, kvalid, active, bd, bm, bn


def band_attention_fwd(q, k, v, scale, window=None, positions=None, key_valid=None, active_heads=None,
                       launch=DEFAULT_LAUNCH):
    """q ``[B, Tq, H, D]``, k/v ``[B, Tk, Hkv, D]`` (any strides). Returns ``(o [B, Tq, H, D], lse2)``,
    ``lse2`` the base-2 log-sum-exp ``[B, Tq, H]`` float32 (``inf`` for empty rows)."""
    B, Tq, H, D, Tk, HKV, W, pos, kvalid, active, bd, bm, bn = _prep(q, k, window, positions, key_valid,
                                                                      active_heads)
    o = torch.empty(B, Tq, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Tq, H, device=q.device, dtype=torch.float32)
    dummy = o
    _band_fwd_kernel[(triton.cdiv(Tq, bm), B * H)](
        q, k, v, o, lse, pos if pos is not None else dummy, kvalid if kvalid is not None else dummy,
        *q.stride(), *k.stride(), *v.stride(), Tq, Tk, Tk - Tq, W, active, scale * LOG2E,
        H=H, HKV=HKV, GROUP=H // HKV, D=D, BM=bm, BN=bn, BD=bd, PREC=dot_precision(q.dtype),
        HAS_POS=pos is not None, HAS_KVALID=kvalid is not None, WIDE=wide_offsets(q, k, v, o),
        num_warps=launch.attention_warps, num_stages=2,
    )
    return o, lse


def band_attention_bwd(q, k, v, o, lse, do, scale, window=None, positions=None, key_valid=None,
                       active_heads=None, dk_acc=None, dv_acc=None, launch=DEFAULT_LAUNCH, delta=None):
    """Returns ``dq`` (q dtype) and float32 ``dk``, ``dv`` (added into ``dk_acc``/``dv_acc`` when given).
    ``delta``: ``<o, do>`` ``[B, Tq, H]`` float32 when already known (computed here otherwise)."""
    run_dq, run_dkv, grads = band_attention_bwd_kernels(q, k, v, o, lse, do, scale, window, positions, key_valid,
                                                        active_heads, dk_acc, dv_acc, launch, delta)
    run_dq()
    run_dkv()
    return grads


def band_attention_bwd_kernels(q, k, v, o, lse, do, scale, window=None, positions=None, key_valid=None,
                               active_heads=None, dk_acc=None, dv_acc=None, launch=DEFAULT_LAUNCH, delta=None):
    """The backward as two launches: ``(run_dq, run_dkv, (dq, dk, dv))``, each ``run_*`` a no-argument call that
    fills its buffers. :func:`band_attention_bwd` runs both; timing runs each."""
    B, Tq, H, D, Tk, HKV, W, pos, kvalid, active, bd, bm, bn = _prep(q, k, window, positions, key_valid,
                                                                      active_heads)
    do = do.contiguous()
    delta = attention_delta(o, do) if delta is None else delta  # [B, Tq, H]
    dq = torch.empty(B, Tq, H, D, device=q.device, dtype=q.dtype)
    accumulate = dk_acc is not None
    dk = dk_acc if accumulate else torch.empty(B, Tk, HKV, D, device=q.device, dtype=torch.float32)
    dv = dv_acc if accumulate else torch.empty(B, Tk, HKV, D, device=q.device, dtype=torch.float32)
    dummy = dq
    common = dict(H=H, HKV=HKV, GROUP=H // HKV, D=D, BM=bm, BN=bn, BD=bd, PREC=dot_precision(q.dtype),
                  HAS_POS=pos is not None, HAS_KVALID=kvalid is not None, WIDE=wide_offsets(q, k, v, do), num_stages=2)
    flags = (pos if pos is not None else dummy, kvalid if kvalid is not None else dummy)
    kv_strides = (*k.stride(), *v.stride())
    scalars = (Tq, Tk, Tk - Tq, W, active, scale * LOG2E, scale)

    def run_dq():
        _band_bwd_dq_kernel[(triton.cdiv(Tq, bm), B * H)](q, k, v, do, lse, delta, dq, *flags, *q.stride(),
                                                          *kv_strides, *scalars, num_warps=launch.attention_warps,
                                                          **common)

    def run_dkv():
        _band_bwd_dkv_kernel[(triton.cdiv(Tk, bn), B * HKV)](q.contiguous(), k, v, do, lse, delta, dk, dv, *flags,
                                                             *kv_strides, *scalars, ACCUMULATE=accumulate,
                                                             num_warps=launch.attention_warps, **common)

    return run_dq, run_dkv, (dq, dk, dv)


class BandAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, window, positions, key_valid, active_heads):
        o, lse = band_attention_fwd(q, k, v, scale, window, positions, key_valid, active_heads)
        ctx.save_for_backward(q, k, v, o, lse, positions, key_valid)
        ctx.cfg = (scale, window, active_heads)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, positions, key_valid = ctx.saved_tensors
        scale, window, active = ctx.cfg
        dq, dk, dv = band_attention_bwd(q, k, v, o, lse, do, scale, window, positions, key_valid, active)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def window_attention(q, k, v, window_size, scale=None, active_heads=None):
    """Sliding-window branch: q ``[B, Tq, P, D]``, k/v ``[B, Tk, Hkv, D]``; keys ``t - W + 1 .. t``."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return BandAttentionFunction.apply(q, k, v, float(scale), int(window_size), None, None, active_heads)


def band_attention(q, k, v, scale=None, window=None, positions=None, key_valid=None, active_heads=None):
    """General entry: causal (``window=None``) or windowed attention with optional gathered row positions
    (int ``[B, Tq]``, ``-1`` = empty row) and key validity flags (bool ``[B, Tk]``)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return BandAttentionFunction.apply(q, k, v, float(scale), window, positions, key_valid, active_heads)


__all__ = ["window_attention", "band_attention", "band_attention_fwd", "band_attention_bwd",
           "band_attention_bwd_kernels"]
