"""Top-k block selection of VideoNSA on Triton, bit-compatible with the released model's kernel.

For query row ``r`` (position ``t = num_keys - Tq + r``, current block ``n = t // block_size``) and kv head
``g``, block ``c < n`` scores ``sum_j exp(scale * q_j . k_cmp[c] - L[r, j])`` over the query heads ``j`` of
group ``g`` and block ``n`` scores exactly 1 per head. ``L`` is the compression log-sum-exp ``[B, P, Tq]``
read as if it were laid out ``[B, Tq, P]`` (element ``P * r + j`` of each sample's flat array), the way the
authors' kernel reads it.

Ranking uses a bitonic network with the same compare-and-swap layout as fla's ``parallel_nsa_kernel_topk``,
so exact ties come out in the same order: candidates are walked in chunks of ``BC = block_size`` blocks in
index order; every chunk is sorted (stages 1 .. log2(BC) - 1 in alternating directions, then one final
stage), the first one descending, later ones ascending, and a later chunk's best half is merged with the
running best half by a descending bitonic merge. A pair is swapped iff ``(left > right) != descending``,
so in descending runs equal values trade places. Nothing of size ``T x NB`` is materialised: one program
handles a few consecutive rows of one kv head and streams the compressed keys.

Note on block sizes: the chunk width equals the block size, as in fla (``BC = BS``). The network needs
``S <= block_size``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import DEFAULT_LAUNCH, check_dim, dot_precision, head_block, log2_int, next_pow2
from .reference import check_lse_rows

# Several rows per program (LaunchSettings.topk_rows_per_program): rows that share a block share its
# compressed-key loads, one larger score product and the network work of a wider tile; a row whose candidates
# end earlier than its neighbours' simply stops updating.


@triton.jit
def _cas(vals, ids, desc, DIST: tl.constexpr):
    """One compare-and-swap layer on every row of ``[R, N]``: lane i pairs with lane i ^ DIST.

    ``desc`` (bool ``[N]``, equal within a pair) says whether the pair is ordered descending; the pair
    swaps iff (left > right) != desc, so equal values swap in descending pairs (fla's rule). The rows are
    viewed as ``[R, N / 2D, 2, D]``; the pair axis is split off, compared, and joined back.
    """
    R: tl.constexpr = vals.shape[0]
    N: tl.constexpr = vals.shape[1]
    OUTER: tl.constexpr = N // (2 * DIST)
    lv, rv = tl.split(tl.permute(tl.reshape(vals, [R, OUTER, 2, DIST]), (0, 1, 3, 2)))
    li, ri = tl.split(tl.permute(tl.reshape(ids, [R, OUTER, 2, DIST]), (0, 1, 3, 2)))
    dl, dr = tl.split(tl.permute(tl.reshape(desc.to(tl.int32), [OUTER, 2, DIST]), (0, 2, 1)))
    swap = (lv > rv) != (dl == 1)[None, :, :]
    vals = tl.reshape(tl.permute(tl.join(tl.where(swap, rv, lv), tl.where(swap, lv, rv)), (0, 1, 3, 2)), [R, N])
    ids = tl.reshape(tl.permute(tl.join(tl.where(swap, ri, li), tl.where(swap, li, ri)), (0, 1, 3, 2)), [R, N])
    return vals, ids


@triton.jit
def _rank_chunk(vals, ids, best_v, best_i, lane, first, LOG_N: tl.constexpr):
    """Sort one chunk (every row of ``[R, N]``) with the network and fold it into the running best half.

    Merges of runs 2, 4, .. 2**(LOG_N-1) alternate direction (a run is descending iff its index is odd);
    the last merge is descending for the first chunk and ascending otherwise. A later chunk's best half
    (its upper half, ascending) then replaces the upper half of the running best (descending), and the
    resulting bitonic sequence gets one descending merge.
    """
    N: tl.constexpr = 1 << LOG_N
    for stage in tl.static_range(1, LOG_N):
        desc = ((lane >> stage) & 1) == 1
        for step in tl.static_range(stage):
            vals, ids = _cas(vals, ids, desc, 1 << (stage - 1 - step))
    last_desc = (lane * 0 + first) == 1
    for step in tl.static_range(LOG_N):
        vals, ids = _cas(vals, ids, last_desc, 1 << (LOG_N - 1 - step))
    if first == 0:
        keep = (lane < N // 2)[None, :]
        vals = tl.where(keep, best_v, vals)
        ids = tl.where(keep, best_i, ids)
        all_desc = lane >= 0
        for step in tl.static_range(LOG_N):
            vals, ids = _cas(vals, ids, all_desc, 1 << (LOG_N - 1 - step))
    return vals, ids


@triton.jit
def _topk_kernel(
    q, k, lse, out,
    sqb, sqt, sqh, sqd,
    skb, skn, skh, skd,
    Tq, OFF, NB, scale, LSE_ROW0, LSE_T,
    P: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    BS: tl.constexpr, LOG_BC: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, R: tl.constexpr,
    PREC: tl.constexpr,
):
    # one program: R consecutive query rows of one kv head; the [R * BH, BD] query tile holds the BH heads
    # of the group for each row
    pid_r = tl.program_id(0).to(tl.int64)  # row offsets pass 2**31 elements beyond 256K tokens
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    BC: tl.constexpr = BS
    RH: tl.constexpr = R * BH
    rh = tl.arange(0, RH)
    row_of = pid_r * R + rh // BH  # query row of each tile line
    head_of = rh % BH
    line_ok = (row_of < Tq) & (head_of < GROUP)
    dd = tl.arange(0, BD)
    dmask = dd < D
    bq = tl.load(q + b * sqb + row_of[:, None] * sqt + (g * GROUP + head_of[:, None]) * sqh + dd[None, :] * sqd,
                 mask=line_ok[:, None] & dmask[None, :], other=0.0)
    # as the released kernel: q is scaled and rounded back to its dtype before the product
    bq = (bq * scale).to(bq.dtype)
    # the misread log-sum-exp: element P * r + j of this sample's flat [P, LSE_T] array, r counted from the
    # first row of the pass (LSE_ROW0 > 0 when this call holds a later chunk of the pass's rows)
    b_lse = tl.load(lse + b * P * LSE_T + (row_of + LSE_ROW0) * P + g * GROUP + head_of, mask=line_ok, other=0.0)
    line_cur = (row_of + OFF) // BS  # current block of each tile line's row
    rows = pid_r * R + tl.arange(0, R)
    row_ok = rows < Tq
    cur = tl.where(row_ok, (rows + OFF) // BS, -1)  # [R]; padding rows rank nothing
    lane = tl.arange(0, BC)
    best_v = tl.full([R, BC], -1.0, dtype=tl.float32)
    best_i = tl.zeros([R, BC], dtype=tl.int32)
    for c0 in range(0, tl.max(cur, 0) + 1, BC):
        cols = c0 + lane
        cmask = cols < NB
        bk = tl.load(k + b * skb + g * skh + cols[:, None] * skn + dd[None, :] * skd,
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(bq, tl.trans(bk), input_precision=PREC)  # [R * BH, BC]
        p = tl.where((cols[None, :] < line_cur[:, None]) & line_ok[:, None], tl.exp(s - b_lse[:, None]), 0.0)
        p = tl.where((cols[None, :] == line_cur[:, None]) & line_ok[:, None], 1.0, p)
        vals = tl.sum(tl.reshape(p, [R, BH, BC]), 1)
        ids = tl.where(cols[None, :] <= cur[:, None], cols[None, :] + 1, 0).to(tl.int32)
        first = tl.where(c0 == 0, 1, 0)
        new_v, new_i = _rank_chunk(vals, ids, best_v, best_i, lane, first, LOG_BC)
        # a row whose candidates ended before this chunk keeps its state: an extra merge would reorder ties
        live = (c0 <= cur)[:, None]
        best_v = tl.where(live, new_v, best_v)
        best_i = tl.where(live, new_i, best_i)
    tl.store(out + ((b * Tq + rows[:, None]) * HKV + g) * S + lane[None, :], best_i - 1,
             mask=row_ok[:, None] & (lane < S)[None, :])


def select_blocks(q, k_cmp, lse, block_count, block_size, scale=None, num_keys=None, lse_row_offset=0,
                  launch=DEFAULT_LAUNCH):
    """Triton top-k block selection.

    Args:
        q: ``[B, Tq, P, D]`` (any strides; all P heads, zero padded heads included: they take part in the
            scores); k_cmp: ``[B, NB, Hkv, D]``; lse: ``[B, P, T]`` float32 contiguous, from the compression
            branch, for every query row of the pass (``T = Tq`` unless ``q`` is a chunk of the pass's rows).
        num_keys: length of the key range (``Tq`` when omitted).
        lse_row_offset: row of the pass that ``q``'s first row is (``lse`` is misread by pass row).

    Returns:
        int32 ``[B, Tq, Hkv, S]``, ``S = next_power_of_2(block_count)``.
    """
    B, Tq, P, D = q.shape
    NB, HKV = k_cmp.shape[1], k_cmp.shape[2]
    if scale is None:
        scale = D ** -0.5
    num_keys = Tq if num_keys is None else int(num_keys)
    S = next_pow2(block_count)
    log_bc = log2_int(block_size)
    if S > block_size:
        raise ValueError(f"block_count {block_count} needs S={S} <= block_size={block_size}")
    lse = lse.contiguous()
    lse_row_offset = int(lse_row_offset)
    if lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 (the compression branch's log-sum-exp), got {lse.dtype}")
    check_lse_rows(lse, B, P, Tq, lse_row_offset)
    out = torch.empty(B, Tq, HKV, S, device=q.device, dtype=torch.int32)
    bd = check_dim(D)
    group = P // HKV
    rows = launch.topk_rows_per_program
    _topk_kernel[(triton.cdiv(Tq, rows), B * HKV)](
        q, k_cmp, lse, out,
        *q.stride(), *k_cmp.stride(),
        Tq, num_keys - Tq, NB, float(scale), lse_row_offset, lse.shape[2],
        P=P, HKV=HKV, GROUP=group, D=D, S=S, BS=block_size, LOG_BC=log_bc, BH=head_block(group), BD=bd,
        R=rows, PREC=dot_precision(q.dtype), num_warps=launch.topk_warps, num_stages=2,
    )
    return out


__all__ = ["select_blocks"]
