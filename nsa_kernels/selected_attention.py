"""Selected-block attention of VideoNSA on Triton (forward and backward).

Query row ``r`` (position ``t = num_keys - Tq + r``) of padded head ``j`` attends the tokens of the blocks
listed in ``block_indices[b, r, j // G]`` that are at or before ``t``; slots holding ``-1`` or a block that
starts after ``t`` are skipped, as in the authors' kernel.

Forward and dq: one program per (row, kv head) holding the G query heads of that group. dk/dv: the
(row, slot) pairs are inverted into per-block lists of rows with a sort in torch, the lists are cut into
work items of at most ``_ROWS_PER_ITEM`` rows, and one program per item accumulates dk/dv of its block
over the rows (G heads each) and adds them to float32 buffers with atomics (one add per item and element).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import (LOG2E, check_dim, dkv_step, dot_precision, dq_step, head_block, load_group_query,
                           load_kv_tile, online_softmax_step, row_group_program)

_ROWS_PER_ITEM = 256
# launch settings (module level so that a benchmark can try others)
FWD_WARPS = 2
FWD_STAGES = 2
BWD_WARPS = 2
DKV_ROWS = 64  # (row, head) pairs per step of the dk/dv kernel
DKV_WARPS = 4


@triton.jit
def _slc_fwd_kernel(
    q, k, v, bi, o, lse,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, OFF, qk_scale,
    P: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BS: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    b, g, r, t, hh, hmask, dd, dmask = row_group_program(Tq, OFF, HKV, GROUP, D, BH, BD)
    qmask = hmask[:, None] & dmask[None, :]
    bq = load_group_query(q, b, r, g, GROUP, hh, dd, qmask, sqb, sqt, sqh, sqd)
    m_i = tl.full([BH], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BH], dtype=tl.float32)
    acc = tl.zeros([BH, BD], dtype=tl.float32)
    offs = tl.arange(0, BS)
    for s in range(S):
        # no branch on the slot: an empty slot (-1, or a block after t) just loads nothing, so the loop
        # has a fixed trip count and its loads can be pipelined
        blk = tl.load(bi + ((b * Tq + r) * HKV + g) * S + s)
        cols = blk * BS + offs
        kmask = (cols <= t) & (blk >= 0)
        bk, bv = load_kv_tile(k, v, b, g, cols, kmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd)
        m_i, l_i, acc = online_softmax_step(bq, bk, bv, kmask[None, :], m_i, l_i, acc, qk_scale, PREC)
    out = acc / l_i[:, None]
    tl.store(o + ((b * Tq + r) * P + g * GROUP + hh[:, None]) * D + dd[None, :], out.to(o.dtype.element_ty),
             mask=qmask)
    tl.store(lse + (b * Tq + r) * P + g * GROUP + hh, m_i + tl.log2(l_i), mask=hmask)


@triton.jit
def _slc_bwd_dq_kernel(
    q, k, v, bi, do, lse, delta, dq,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, OFF, qk_scale, scale,
    P: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BS: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    b, g, r, t, hh, hmask, dd, dmask = row_group_program(Tq, OFF, HKV, GROUP, D, BH, BD)
    qmask = hmask[:, None] & dmask[None, :]
    row_off = ((b * Tq + r) * P + g * GROUP + hh[:, None]) * D + dd[None, :]
    bq = load_group_query(q, b, r, g, GROUP, hh, dd, qmask, sqb, sqt, sqh, sqd)
    bdo = tl.load(do + row_off, mask=qmask, other=0.0)
    lse2 = tl.load(lse + (b * Tq + r) * P + g * GROUP + hh, mask=hmask, other=0.0)
    dlt = tl.load(delta + (b * Tq + r) * P + g * GROUP + hh, mask=hmask, other=0.0)
    acc = tl.zeros([BH, BD], dtype=tl.float32)
    offs = tl.arange(0, BS)
    for s in range(S):
        blk = tl.load(bi + ((b * Tq + r) * HKV + g) * S + s)
        cols = blk * BS + offs
        kmask = (cols <= t) & (blk >= 0)
        bk, bv = load_kv_tile(k, v, b, g, cols, kmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd)
        acc = dq_step(bq, bk, bv, bdo, kmask[None, :] & hmask[:, None], lse2, dlt, acc, qk_scale, PREC)
    tl.store(dq + row_off, (acc * scale).to(dq.dtype.element_ty), mask=qmask)


@triton.jit
def _slc_bwd_dkv_kernel(
    q, k, v, do, lse, delta, dk, dv,
    item_key, item_start, item_end, row_list,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, Tk, OFF, NB, qk_scale, scale,
    P: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BS: tl.constexpr, BH: tl.constexpr, BQ: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    # dk, dv: float32 [B, Tk, Hkv, D] (contiguous), accumulated with atomics
    item = tl.program_id(0)
    key = tl.load(item_key + item)
    start = tl.load(item_start + item)
    end = tl.load(item_end + item)
    blk = key % NB
    bg = key // NB
    g = bg % HKV
    b = bg // HKV
    cols = blk * BS + tl.arange(0, BS)
    cmask = cols < Tk
    dd = tl.arange(0, BD)
    dmask = dd < D
    kv_mask = cmask[:, None] & dmask[None, :]
    bk, bv = load_kv_tile(k, v, b, g, cols, cmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd)
    dk_acc = tl.zeros([BS, BD], dtype=tl.float32)
    dv_acc = tl.zeros([BS, BD], dtype=tl.float32)
    RB: tl.constexpr = BQ * BH
    rr = tl.arange(0, RB)
    hj = rr % BH
    for i0 in range(start, end, BQ):
        li = i0 + rr // BH
        valid = (li < end) & (hj < GROUP)
        row = tl.load(row_list + li, mask=valid, other=0).to(tl.int64)  # offsets pass 2**31 beyond 256K rows
        h = g * GROUP + hj
        io_mask = valid[:, None] & dmask[None, :]
        bq = tl.load(q + b * sqb + row[:, None] * sqt + h[:, None] * sqh + dd[None, :] * sqd, mask=io_mask, other=0.0)
        bdo = tl.load(do + ((b * Tq + row[:, None]) * P + h[:, None]) * D + dd[None, :], mask=io_mask, other=0.0)
        lse2 = tl.load(lse + (b * Tq + row) * P + h, mask=valid, other=0.0)
        dlt = tl.load(delta + (b * Tq + row) * P + h, mask=valid, other=0.0)
        vis = (cols[None, :] <= (row + OFF)[:, None]) & valid[:, None]
        dk_acc, dv_acc = dkv_step(bq, bk, bv, bdo, vis, lse2, dlt, dk_acc, dv_acc, qk_scale, PREC)
    out_off = ((b * Tk + cols[:, None]) * HKV + g) * D + dd[None, :]
    tl.atomic_add(dk + out_off, dk_acc * scale, mask=kv_mask)
    tl.atomic_add(dv + out_off, dv_acc, mask=kv_mask)


def _cfg(q, k, block_indices, block_size):
    B, Tq, P, D = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    S = block_indices.shape[-1]
    group = P // HKV
    if block_size & (block_size - 1) or block_size < 16:
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    return B, Tq, P, D, Tk, HKV, S, group


def selected_attention_fwd(q, k, v, block_indices, block_size, scale):
    B, Tq, P, D, Tk, HKV, S, group = _cfg(q, k, block_indices, block_size)
    bi = block_indices.to(torch.int32).contiguous()
    o = torch.empty(B, Tq, P, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Tq, P, device=q.device, dtype=torch.float32)
    bd = check_dim(D)
    _slc_fwd_kernel[(Tq, B * HKV)](
        q, k, v, bi, o, lse, *q.stride(), *k.stride(), *v.stride(), Tq, Tk - Tq, scale * LOG2E,
        P=P, HKV=HKV, GROUP=group, D=D, S=S, BS=block_size, BH=head_block(group), BD=bd,
        PREC=dot_precision(q.dtype), num_warps=FWD_WARPS, num_stages=FWD_STAGES,
    )
    return o, lse


def _invert(bi, Tq, Tk, HKV, S, block_size, OFF):
    """Per-block row lists: items (key, start, end) over ``row_list``; key = (b * Hkv + g) * NB + block."""
    B = bi.shape[0]
    NB = -(-Tk // block_size)
    dev = bi.device
    idx = bi.long()
    pos = torch.arange(Tq, device=dev) + OFF
    valid = (idx >= 0) & (idx * block_size <= pos[None, :, None, None])
    bg = (torch.arange(B, device=dev)[:, None] * HKV + torch.arange(HKV, device=dev)[None, :])[:, None, :, None]
    n_keys = B * HKV * NB
    keys = torch.where(valid, bg * NB + idx, n_keys).flatten()
    sorted_keys, perm = torch.sort(keys, stable=True)
    rows = (perm // (HKV * S)) % Tq
    counts = torch.bincount(keys, minlength=n_keys + 1)[:n_keys]
    offsets = torch.cumsum(counts, 0) - counts
    n_items = (counts + _ROWS_PER_ITEM - 1) // _ROWS_PER_ITEM
    total = int(n_items.sum())
    item_key = torch.repeat_interleave(torch.arange(n_keys, device=dev), n_items, output_size=total)
    first_item = torch.cumsum(n_items, 0) - n_items
    within = torch.arange(total, device=dev) - first_item[item_key]
    item_start = offsets[item_key] + within * _ROWS_PER_ITEM
    item_end = torch.minimum(item_start + _ROWS_PER_ITEM, offsets[item_key] + counts[item_key])
    i32 = torch.int32
    return (item_key.to(i32).contiguous(), item_start.to(i32).contiguous(), item_end.to(i32).contiguous(),
            rows.to(i32).contiguous(), NB, total)


def selected_attention_bwd(q, k, v, block_indices, o, lse, do, block_size, scale, dk_acc=None, dv_acc=None,
                           parts=("dq", "dkv")):
    """Returns ``dq`` (q dtype) and float32 ``dk``, ``dv`` (added into ``dk_acc``/``dv_acc`` when given).

    ``parts`` limits the work to the dq kernel or to the dk/dv half (inversion + kernel), for timing.
    """
    B, Tq, P, D, Tk, HKV, S, group = _cfg(q, k, block_indices, block_size)
    bi = block_indices.to(torch.int32).contiguous()
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1).contiguous()  # [B, Tq, P]
    dq = torch.empty(B, Tq, P, D, device=q.device, dtype=q.dtype)
    dk = torch.zeros(B, Tk, HKV, D, device=q.device, dtype=torch.float32) if dk_acc is None else dk_acc
    dv = torch.zeros(B, Tk, HKV, D, device=q.device, dtype=torch.float32) if dv_acc is None else dv_acc
    bd = check_dim(D)
    bh = head_block(group)
    prec = dot_precision(q.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride())
    if "dq" in parts:
        _slc_bwd_dq_kernel[(Tq, B * HKV)](
            q, k, v, bi, do, lse, delta, dq, *strides, Tq, Tk - Tq, scale * LOG2E, scale,
            P=P, HKV=HKV, GROUP=group, D=D, S=S, BS=block_size, BH=bh, BD=bd, PREC=prec, num_warps=BWD_WARPS,
            num_stages=FWD_STAGES,
        )
    if "dkv" in parts:
        item_key, item_start, item_end, rows, NB, total = _invert(bi, Tq, Tk, HKV, S, block_size, Tk - Tq)
        if total:
            bq_rows = max(1, DKV_ROWS // bh)
            _slc_bwd_dkv_kernel[(total,)](
                q, k, v, do, lse, delta, dk, dv, item_key, item_start, item_end, rows, *strides,
                Tq, Tk, Tk - Tq, NB, scale * LOG2E, scale,
                P=P, HKV=HKV, GROUP=group, D=D, BS=block_size, BH=bh, BQ=bq_rows, BD=bd, PREC=prec,
                num_warps=DKV_WARPS if bd > 64 else 4, num_stages=2,
            )
    return dq, dk, dv


class SelectedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, scale):
        o, lse = selected_attention_fwd(q, k, v, block_indices, block_size, scale)
        ctx.save_for_backward(q, k, v, block_indices, o, lse)
        ctx.cfg = (block_size, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, bi, o, lse = ctx.saved_tensors
        dq, dk, dv = selected_attention_bwd(q, k, v, bi, o, lse, do, *ctx.cfg)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def selected_attention(q, k, v, block_indices, block_size, scale=None):
    """Triton selected attention. q ``[B, Tq, P, D]``; k, v ``[B, Tk, Hkv, D]``; block_indices int
    ``[B, Tq, Hkv, S]``. Returns ``[B, Tq, P, D]`` in q's dtype."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return SelectedAttentionFunction.apply(q, k, v, block_indices, int(block_size), float(scale))


__all__ = ["selected_attention", "selected_attention_fwd", "selected_attention_bwd"]
