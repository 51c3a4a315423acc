"""Selected-block attention of VideoNSA on Triton (forward and backward).

Query row ``r`` (position ``t = num_keys - Tq + r``) of padded head ``j`` attends the tokens of the blocks
listed in ``block_indices[b, r, j // G]`` that are at or before ``t``; slots holding ``-1`` or a block that
starts after ``t`` are skipped, as in the authors' kernel.

Forward, two schedules of the same function:

* per row: one program per (row, kv head) holding the G query heads of that group, loading the row's own
  blocks (at most S key/value tiles per row);
* per tile of rows: one program per (R consecutive rows, kv head) holding R x G query rows, walking the
  union of the blocks those rows selected once and masking each row to its own blocks. Neighbouring video
  queries select many of the same blocks, so a tile loads far fewer key/value tiles than its rows would
  alone, at the price of computing every union block for all R x G rows.

The per-row kernels (forward and dq) can fetch their blocks with Hopper's tensor memory accelerator instead of
pointer loads (``LaunchSettings.selected_tma``; off by default: it measured within a few percent of the pointer
loads, both at the rate the memory system delivers scattered blocks, ``docs/benchmarks.md``).

dq: one program per (row, kv head). dk/dv: the (row, slot) pairs are inverted into per-block lists of rows with a
sort in torch, the lists are cut into work items of at most ``LaunchSettings.selected_dkv_item_rows`` rows, and one
program per item accumulates dk/dv of its block over the rows (the group's heads below ``active_heads`` each, scores
computed key-major) and adds them to float32 buffers with atomics (one add per item and element). A kv head with
fewer such heads (the 7B's last, 8 of 16) gets its own launch that packs more rows into a step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._triton_utils import (DEFAULT_LAUNCH, LOG2E, attention_delta, check_dim, dkv_step, dot_precision, dq_step,
                           head_block, interpreting, load_group_query, load_kv_tile, online_softmax_step,
                           row_group_program, wide_offsets)
from .reference import next_pow2


@triton.jit
def _load_block(k, v, b, g, blk, cols, kmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd,
                BS: tl.constexpr, BD: tl.constexpr, TMA: tl.constexpr):
    """Key and value tiles ``[BS, BD]`` of block ``blk`` of kv head ``g``. With ``TMA``, ``k`` and ``v`` are tensor
    descriptors over ``[B, Tk, Hkv, D]`` with boxes ``[1, BS, 1, BD]`` and the copy engine fetches each block as one
    box (rows outside the tensor, such as an empty slot's, arrive as zeros); otherwise pointer loads under
    ``kmask``."""
    if TMA:
        bk = k.load([b, blk * BS, g, 0]).reshape(BS, BD)
        bv = v.load([b, blk * BS, g, 0]).reshape(BS, BD)
    else:
        bk, bv = load_kv_tile(k, v, b, g, cols, kmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd)
    return bk, bv


@triton.jit
def _slc_fwd_kernel(
    q, k, v, bi, o, lse,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, OFF, qk_scale,
    P: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BS: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
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
        bk, bv = _load_block(k, v, b, g, blk, cols, kmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd, BS, BD,
                             TMA)
        m_i, l_i, acc = online_softmax_step(bq, bk, bv, kmask[None, :], m_i, l_i, acc, qk_scale, PREC)
    out = acc / l_i[:, None]
    tl.store(o + ((b * Tq + r) * P + g * GROUP + hh[:, None]) * D + dd[None, :], out.to(o.dtype.element_ty),
             mask=qmask)
    tl.store(lse + (b * Tq + r) * P + g * GROUP + hh, m_i + tl.log2(l_i), mask=hmask)


@triton.jit
def _tile_union_kernel(bi, ids, bits, count, Tq, NT, HKV: tl.constexpr, S: tl.constexpr, R: tl.constexpr):
    """Grid ``(NT, B * Hkv)``: the distinct blocks of one tile of R rows (ascending), which rows chose each, and
    how many there are. All pairs of the tile's R x S entries are compared at once (no sort)."""
    tile = tl.program_id(0).to(tl.int64)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    E: tl.constexpr = R * S
    e = tl.arange(0, E)
    row = tile * R + e // S
    blk = tl.load(bi + ((b * Tq + row) * HKV + g) * S + e % S, mask=row < Tq, other=-1)
    blk = tl.where(blk >= 0, blk, 2147483647)
    valid = blk != 2147483647
    # [E, E]: entry i against entry j
    same = blk[:, None] == blk[None, :]
    first = valid & (tl.sum((same & (e[None, :] < e[:, None])).to(tl.int32), 1) == 0)  # first entry of its block
    slot = tl.sum(((blk[None, :] < blk[:, None]) & first[None, :]).to(tl.int32), 1)  # rank among distinct blocks
    row_bit = (1 << (e // S)).to(tl.int32)
    chosen_by = tl.sum(tl.where(same, row_bit[None, :], 0), 1)  # a row lists a block once: the sum is an or
    base = ((b * NT + tile) * HKV + g) * E
    tl.store(ids + base + slot, blk, mask=first)
    tl.store(bits + base + slot, chosen_by, mask=first)
    tl.store(count + (b * NT + tile) * HKV + g, tl.sum(first.to(tl.int32), 0))


@triton.jit
def _slc_fwd_tile_kernel(
    q, k, v, union_ids, union_bits, union_count, o, lse,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, Tk, OFF, NT, qk_scale,
    P: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    R: tl.constexpr, BS: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    # grid (NT, B * Hkv): R rows x BH heads of one kv group walk the union of the rows' blocks once, each row
    # masked to its own blocks
    tile = tl.program_id(0).to(tl.int64)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    base = (b * NT + tile) * HKV + g
    mm = tl.arange(0, R * BH)
    ri = mm // BH
    hj = mm % BH
    r = tile * R + ri
    rmask = (r < Tq) & (hj < GROUP)
    t = r + OFF
    dd = tl.arange(0, BD)
    dmask = dd < D
    qmask = rmask[:, None] & dmask[None, :]
    bq = tl.load(q + b * sqb + r[:, None] * sqt + (g * GROUP + hj)[:, None] * sqh + dd[None, :] * sqd,
                 mask=qmask, other=0.0)
    m_i = tl.full([R * BH], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([R * BH], dtype=tl.float32)
    acc = tl.zeros([R * BH, BD], dtype=tl.float32)
    offs = tl.arange(0, BS)
    for u in range(0, tl.load(union_count + base)):
        blk = tl.load(union_ids + base * (R * S) + u)
        chosen = ((tl.load(union_bits + base * (R * S) + u) >> ri) & 1) != 0
        cols = blk * BS + offs
        bk, bv = load_kv_tile(k, v, b, g, cols, cols < Tk, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd)
        vis = chosen[:, None] & (cols[None, :] <= t[:, None])
        m_i, l_i, acc = online_softmax_step(bq, bk, bv, vis, m_i, l_i, acc, qk_scale, PREC)
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # rows past Tq and padded heads see nothing (not stored)
    row_off = (b * Tq + r) * P + g * GROUP + hj
    tl.store(o + row_off[:, None] * D + dd[None, :], (acc / l_safe[:, None]).to(o.dtype.element_ty), mask=qmask)
    tl.store(lse + row_off, m_i + tl.log2(l_safe), mask=rmask)


@triton.jit
def _slc_bwd_dq_kernel(
    q, k, v, bi, do, lse, delta, dq,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, OFF, qk_scale, scale,
    P: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BS: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
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
        bk, bv = _load_block(k, v, b, g, blk, cols, kmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd, BS, BD,
                             TMA)
        acc = dq_step(bq, bk, bv, bdo, kmask[None, :] & hmask[:, None], lse2, dlt, acc, qk_scale, PREC)
    tl.store(dq + row_off, (acc * scale).to(dq.dtype.element_ty), mask=qmask)


@triton.jit
def _slc_bwd_dkv_kernel(
    q, k, v, do, lse, delta, dk, dv,
    item_key, item_start, item_end, row_list,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    Tq, Tk, OFF, NB, ITEM0, qk_scale, scale,
    P: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    HEADS: tl.constexpr, NH: tl.constexpr, BQ: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
    WIDE: tl.constexpr,
):
    # q, do: contiguous [B, Tq, P, D], addressed with int32 offsets unless WIDE (wide_offsets; int64 offsets
    # cost the registers that keep this kernel clear of spills). dk, dv: float32 [B, Tk, Hkv, D]
    # (contiguous), accumulated with atomics. The launch's items belong to kv heads whose first HEADS query heads
    # are computed (the rest have zero q and dO: they add 0). A step takes BQ (row, head) pairs, BQ // NH rows x
    # NH >= HEADS head lanes, so that a kv head with few such heads packs more rows.
    item = ITEM0 + tl.program_id(0)
    key = tl.load(item_key + item)
    start = tl.load(item_start + item)
    end = tl.load(item_end + item)
    blk = key % NB
    bg = key // NB
    g = bg % HKV
    b = bg // HKV
    cols = blk * BS + tl.arange(0, BS)
    cmask = (cols < Tk) & (start < end)  # an empty item (the unused end of its class's region) moves no data
    dd = tl.arange(0, BD)
    dmask = dd < D
    kv_mask = cmask[:, None] & dmask[None, :]
    bk, bv = load_kv_tile(k, v, b, g, cols, cmask, dd, dmask, skb, skt, skh, skd, svb, svt, svh, svd)
    dk_acc = tl.zeros([BS, BD], dtype=tl.float32)
    dv_acc = tl.zeros([BS, BD], dtype=tl.float32)
    pair = tl.arange(0, BQ)
    hj = pair % NH
    h = g * GROUP + hj
    for i0 in range(start, end, BQ // NH):
        li = i0 + pair // NH
        valid = li < end
        if HEADS < NH:
            valid = valid & (hj < HEADS)
        row = tl.load(row_list + li, mask=valid, other=0)
        if WIDE:
            row = row.to(tl.int64)
        io_mask = valid[:, None] & dmask[None, :]
        io_off = ((b * Tq + row[:, None]) * P + h[:, None]) * D + dd[None, :]
        bq = tl.load(q + io_off, mask=io_mask, other=0.0)
        bdo = tl.load(do + io_off, mask=io_mask, other=0.0)
        lse2 = tl.load(lse + (b * Tq + row) * P + h, mask=valid, other=0.0)
        dlt = tl.load(delta + (b * Tq + row) * P + h, mask=valid, other=0.0)
        vis_t = (cols[:, None] <= (row + OFF)[None, :]) & valid[None, :]
        dk_acc, dv_acc = dkv_step(bq, bk, bv, bdo, vis_t, lse2, dlt, dk_acc, dv_acc, qk_scale, PREC, True)
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


def tile_unions(block_indices: torch.Tensor, rows_per_tile: int):
    """The blocks selected by each tile of ``rows_per_tile`` consecutive query rows, per kv head.

    Args:
        block_indices: int ``[B, Tq, Hkv, S]`` (-1 = empty slot); a row lists each block at most once.

    Returns:
        ``ids`` int32 ``[B, NT, Hkv, R * S]``: the tile's distinct blocks ascending (entries past ``count`` are
        unspecified); ``bits`` int32 of the same shape: bit ``i`` set iff row ``i`` of the tile chose that block;
        ``count`` int32 ``[B, NT, Hkv]``: distinct blocks per tile. ``NT = ceil(Tq / R)``.
    """
    R = int(rows_per_tile)
    if R not in (1, 2, 4, 8):
        raise ValueError(f"rows_per_tile must be 1, 2, 4 or 8 (R x 16 query rows per tile), got {R}")
    bi = block_indices.to(torch.int32).contiguous()
    B, Tq, HKV, S = bi.shape
    NT = -(-Tq // R)
    ids = torch.empty(B, NT, HKV, R * S, dtype=torch.int32, device=bi.device)
    bits = torch.empty_like(ids)
    count = torch.empty(B, NT, HKV, dtype=torch.int32, device=bi.device)
    if NT:
        _tile_union_kernel[(NT, B * HKV)](bi, ids, bits, count, Tq, NT, HKV=HKV, S=S, R=R, num_warps=4)
    return ids, bits, count


def selected_attention_fwd(q, k, v, block_indices, block_size, scale, rows_per_tile=None, launch=DEFAULT_LAUNCH):
    """Forward: output ``[B, Tq, P, D]`` (q dtype) and base-2 log-sum-exp ``[B, Tq, P]`` float32.

    ``rows_per_tile``: 1 for one row per program, R in (2, 4, 8) for tiles of R rows over the union of their
    blocks; None for the launch settings' choice by length (tiles up to ``launch.selected_tile_max_rows`` query
    rows, where they measured faster). Every schedule computes the same function.
    """
    B, Tq, P, D, Tk, HKV, S, group = _cfg(q, k, block_indices, block_size)
    bi = block_indices.to(torch.int32).contiguous()
    o = torch.empty(B, Tq, P, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Tq, P, device=q.device, dtype=torch.float32)
    bd = check_dim(D)
    bh = head_block(group)
    if rows_per_tile is None:
        rows_per_tile = launch.selected_schedule(Tq)
    strides = (*q.stride(), *k.stride(), *v.stride())
    common = dict(P=P, HKV=HKV, GROUP=group, D=D, S=S, BS=block_size, BH=bh, BD=bd, PREC=dot_precision(q.dtype),
                  num_stages=launch.selected_stages)
    if rows_per_tile > 1:
        ids, bits, count = tile_unions(bi, rows_per_tile)
        NT = ids.shape[1]
        _slc_fwd_tile_kernel[(NT, B * HKV)](
            q, k, v, ids, bits, count, o, lse, *strides, Tq, Tk, Tk - Tq, NT, scale * LOG2E, R=int(rows_per_tile),
            num_warps=4 if rows_per_tile * bh <= 64 else 8, **common)
        return o, lse
    kv = _block_sources(k, v, block_size, bd, launch)
    _slc_fwd_kernel[(Tq, B * HKV)](q, *kv, bi, o, lse, *strides, Tq, Tk - Tq, scale * LOG2E,
                                   num_warps=launch.selected_warps, TMA=kv[0] is not k, **common)
    return o, lse


def _block_sources(k, v, block_size, bd, launch):
    """What the per-row kernels read key/value blocks from: tensor descriptors when ``launch.selected_tma`` is set
    and :func:`tma_usable`, else the tensors themselves."""
    if launch.selected_tma and tma_usable(k, v, bd):
        return tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), [1, block_size, 1, bd]) for x in (k, v))
    return k, v


def tma_usable(k: torch.Tensor, v: torch.Tensor, bd: int) -> bool:
    """Whether key/value blocks can be fetched by the tensor memory accelerator: a Hopper-or-newer GPU (or Triton's
    interpreter), the feature axis contiguous and as wide as the tile, 16-byte-aligned strides and bases."""
    if not interpreting() and not (k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9):
        return False
    for x in (k, v):
        if x.stride(-1) != 1 or x.shape[-1] != bd or x.data_ptr() % 16:
            return False
        if any(stride * x.element_size() % 16 for stride in x.stride()[:-1]):
            return False
    return True


def _invert(bi, Tq, Tk, HKV, S, block_size, OFF, item_rows, group_class, num_classes):
    """Per-block row lists, built without reading the GPU: items (key, start, end) of at most ``item_rows`` rows
    over ``row_list``, key = (b * Hkv + g) * NB + block. ``group_class`` (a list per kv head) puts kv head ``g``'s
    items in class ``group_class[g]`` (-1: none). Each class owns a region of the item arrays as long as its most
    items can be (every listed pair of its kv heads, plus one partial item per block); its items come first, the
    rest of the region is empty (start = end = 0). Returns the arrays, ``NB`` and the regions as (first item,
    length) per class, so that each class can have its own launch over its region."""
    B = bi.shape[0]
    NB = -(-Tk // block_size)
    dev = bi.device
    # int32 slots: the radix sort runs half the passes of int64 keys; the lists' bounds come from the sorted slots
    # by binary search (an atomic histogram of millions of entries took longer than the sort)
    i32 = torch.int32
    idx = bi.to(i32)
    pos = torch.arange(Tq, device=dev, dtype=i32) + OFF
    # (no blocking copy: torch.tensor(..., device=cuda) would wait for the queued work)
    cls = torch.tensor(group_class, dtype=i32).to(dev, non_blocking=True)[None, None, :, None]
    valid = (idx >= 0) & (idx * block_size <= pos[None, :, None, None]) & (cls >= 0)
    bg = (torch.arange(B, device=dev, dtype=i32)[:, None] * HKV +
          torch.arange(HKV, device=dev, dtype=i32)[None, :])[:, None, :, None]
    n_keys = B * HKV * NB
    n_slots = num_classes * n_keys  # slot = class * n_keys + key: class-major order
    slots = torch.where(valid, cls * n_keys + bg * NB + idx, n_slots).flatten()
    sorted_slots, perm = torch.sort(slots, stable=True)
    rows = (perm // (HKV * S)) % Tq
    bounds = torch.searchsorted(sorted_slots, torch.arange(n_slots + 1, device=dev, dtype=i32))
    offsets = bounds[:-1]
    counts = bounds[1:] - offsets
    n_items = (counts + item_rows - 1) // item_rows
    last_item = torch.cumsum(n_items, 0)  # items before each slot's end, class-major
    class_first = torch.cat([last_item.new_zeros(1), last_item.view(num_classes, n_keys)[:-1, -1]])
    class_items = last_item.view(num_classes, n_keys)[:, -1] - class_first
    regions, first = [], 0
    for c in range(num_classes):
        heads_in_class = B * group_class.count(c)
        length = -(-heads_in_class * Tq * S // item_rows) + heads_in_class * NB
        regions.append((first, length))
        first += length
    region_class = torch.cat([torch.full((length,), c, device=dev) for c, (_, length) in enumerate(regions)])
    within_class = torch.cat([torch.arange(length, device=dev) for _, length in regions])
    live = within_class < class_items[region_class]
    item = class_first[region_class] + within_class  # the item's number in the class-major order
    item_slot = torch.searchsorted(last_item, item, right=True).clamp_(max=max(n_slots - 1, 0))
    within = item - (last_item[item_slot] - n_items[item_slot])
    item_start = offsets[item_slot] + within * item_rows
    item_end = torch.minimum(item_start + item_rows, offsets[item_slot] + counts[item_slot])
    item_start, item_end = item_start * live, item_end * live
    return (item_slot.remainder(n_keys).to(i32).contiguous(), item_start.to(i32).contiguous(),
            item_end.to(i32).contiguous(), rows.to(i32).contiguous(), NB, regions)


def selected_attention_bwd(q, k, v, block_indices, o, lse, do, block_size, scale, dk_acc=None, dv_acc=None,
                           launch=DEFAULT_LAUNCH, active_heads=None, delta=None):
    """Returns ``dq`` (q dtype) and float32 ``dk``, ``dv`` (added into ``dk_acc``/``dv_acc`` when given).
    ``active_heads``: see :func:`selected_attention`. ``delta``: ``<o, do>`` ``[B, Tq, P]`` float32 when already
    known (computed here otherwise)."""
    run_dq, run_dkv, grads = selected_attention_bwd_kernels(q, k, v, block_indices, o, lse, do, block_size, scale,
                                                            dk_acc, dv_acc, launch, active_heads, delta)
    run_dq()
    run_dkv()
    return grads


def selected_attention_bwd_kernels(q, k, v, block_indices, o, lse, do, block_size, scale, dk_acc=None, dv_acc=None,
                                   launch=DEFAULT_LAUNCH, active_heads=None, delta=None):
    """The backward as two launches: ``(run_dq, run_dkv, (dq, dk, dv))``, each ``run_*`` a no-argument call that
    fills its buffers (``run_dkv``: the per-block row lists, then the dk/dv kernel, adding into ``dk``/``dv``).
    :func:`selected_attention_bwd` runs both; timing runs each."""
    B, Tq, P, D, Tk, HKV, S, group = _cfg(q, k, block_indices, block_size)
    bi = block_indices.to(torch.int32).contiguous()
    do = do.contiguous()
    delta = attention_delta(o, do) if delta is None else delta  # [B, Tq, P]
    dq = torch.empty(B, Tq, P, D, device=q.device, dtype=q.dtype)
    dk = torch.zeros(B, Tk, HKV, D, device=q.device, dtype=torch.float32) if dk_acc is None else dk_acc
    dv = torch.zeros(B, Tk, HKV, D, device=q.device, dtype=torch.float32) if dv_acc is None else dv_acc
    bd = check_dim(D)
    bh = head_block(group)
    prec = dot_precision(q.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride())
    active = P if active_heads is None else int(active_heads)

    def run_dq():
        kv = _block_sources(k, v, block_size, bd, launch)
        _slc_bwd_dq_kernel[(Tq, B * HKV)](
            q, *kv, bi, do, lse, delta, dq, *strides, Tq, Tk - Tq, scale * LOG2E, scale,
            P=P, HKV=HKV, GROUP=group, D=D, S=S, BS=block_size, BH=bh, BD=bd, PREC=prec, TMA=kv[0] is not k,
            num_warps=launch.selected_warps, num_stages=launch.selected_stages,
        )

    def run_dkv():
        # one launch per number of heads below `active` that a kv head has (all of them, a part, none: skipped)
        group_heads = [min(max(active - g * group, 0), group) for g in range(HKV)]
        classes = sorted(set(group_heads) - {0}, reverse=True)
        group_class = [classes.index(n) if n else -1 for n in group_heads]
        if not classes:  # no head computed: dk and dv stay as they are
            return
        item_key, item_start, item_end, rows, NB, regions = _invert(
            bi, Tq, Tk, HKV, S, block_size, Tk - Tq, launch.selected_dkv_item_rows, group_class, len(classes))
        pairs = max(launch.selected_dkv_rows, bh)
        q_rows = q.contiguous()  # read with do's offsets
        wide = wide_offsets(q_rows, do)
        for heads, (first, n_items) in zip(classes, regions):
            if n_items:
                _slc_bwd_dkv_kernel[(n_items,)](
                    q_rows, k, v, do, lse, delta, dk, dv, item_key, item_start, item_end, rows, *k.stride(),
                    *v.stride(), Tq, Tk, Tk - Tq, NB, first, scale * LOG2E, scale,
                    P=P, HKV=HKV, GROUP=group, D=D, BS=block_size, HEADS=heads, NH=next_pow2(heads), BQ=pairs,
                    BD=bd, PREC=prec, WIDE=wide,
                    num_warps=launch.selected_dkv_warps if bd > 64 else 4, num_stages=launch.selected_dkv_stages,
                )

    return run_dq, run_dkv, (dq, dk, dv)


class SelectedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, scale, rows_per_tile, launch, active_heads):
        o, lse = selected_attention_fwd(q, k, v, block_indices, block_size, scale, rows_per_tile, launch)
        ctx.save_for_backward(q, k, v, block_indices, o, lse)
        ctx.cfg = (block_size, scale)
        ctx.launch = launch
        ctx.active_heads = active_heads
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, bi, o, lse = ctx.saved_tensors
        dq, dk, dv = selected_attention_bwd(q, k, v, bi, o, lse, do, *ctx.cfg, launch=ctx.launch,
                                            active_heads=ctx.active_heads)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def selected_attention(q, k, v, block_indices, block_size, scale=None, rows_per_tile=None, launch=DEFAULT_LAUNCH,
                       active_heads=None):
    """Triton selected attention. q ``[B, Tq, P, D]``; k, v ``[B, Tk, Hkv, D]``; block_indices int
    ``[B, Tq, Hkv, S]``. Returns ``[B, Tq, P, D]`` in q's dtype. ``rows_per_tile``: the forward's schedule
    (see :func:`selected_attention_fwd`). ``active_heads``: heads from this index on are declared all-zero queries
    whose output gradient is zero (the padded heads 56-63 of the 7B layout, gates 0); the dk/dv pass skips them,
    which leaves dk and dv unchanged."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return SelectedAttentionFunction.apply(q, k, v, block_indices, int(block_size), float(scale), rows_per_tile,
                                           launch, active_heads)


__all__ = ["selected_attention", "selected_attention_fwd", "selected_attention_bwd", "selected_attention_bwd_kernels",
           "tile_unions"]
