"""Compression branch of VideoNSA on Triton: mean-pooled keys/values and attention over own + later blocks.

Query row ``r`` sits at position ``t = num_keys - Tq + r`` and attends every compressed block ``c`` with
``c >= t // block_size`` (its own block and all later ones: the released model's quirk). The output is in
the query dtype; the natural-log log-sum-exp is float32 ``[B, P, Tq]``, contiguous, because the selection
step reads that array in its (mis)read layout.

Heads ``>= active_heads`` are declared all-zero queries (the padded heads 56-63 of the 7B layout, whose gates
are 0): for them no attention runs, the output is left 0 and the log-sum-exp is written in closed form,
``log(number of visible blocks)``, which is exactly what softmax over all-zero scores gives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import (DEFAULT_LAUNCH, LOG2E, attention_delta, check_dim, dkv_step, dot_precision, dq_step,
                           head_rows_offsets, load_head_rows, load_kv_tile, online_softmax_step, row_flags,
                           row_tile_program, wide_offsets)


@triton.jit
def _block_rows(T, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    """Program ids of the pooling kernels (grid ``(NB, B * Hkv)``): sample, kv head, block, the block's token rows
    (int64: 2**31 elements of ``[B, T, Hkv, D]`` come at 4M tokens) and their mask, the feature lanes, the element
    offsets of the ``[BS, BD]`` tile in a contiguous ``[B, T, Hkv, D]`` tensor, its mask, the block's token count."""
    blk = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV
    g = pid_bg % HKV
    rows = (blk * BS + tl.arange(0, BS)).to(tl.int64)
    rmask = rows < T
    dd = tl.arange(0, BD)
    off = ((b * T + rows[:, None]) * HKV + g) * D + dd[None, :]
    count = tl.minimum(T - blk * BS, BS).to(tl.float32)
    return b, g, blk, rows, rmask, dd, off, rmask[:, None] & (dd < D)[None, :], count


@triton.jit
def _rows_on(x, on, b, rows, rmask, T, HAS_ON: tl.constexpr):
    """``x`` ``[BS, *]`` with the rows whose flag (int8 ``[B, T]``) is off zeroed."""
    if HAS_ON:
        x = tl.where((tl.load(on + b * T + rows, mask=rmask, other=0) != 0)[:, None], x, 0.0)
    return x


@triton.jit
def _pool_blocks_kernel(x, on, x_out, pooled, T, sxb, sxt, sxh, sxd, HKV: tl.constexpr, D: tl.constexpr,
                        BS: tl.constexpr, BD: tl.constexpr, HAS_ON: tl.constexpr, WRITE_X: tl.constexpr):
    # pooled: contiguous [B, NB, HKV, D]; x_out (WRITE_X): contiguous [B, T, HKV, D], x with its flagged-off rows zero
    b, g, blk, rows, rmask, dd, off, mask, count = _block_rows(T, HKV, D, BS, BD)
    xt = tl.load(x + b * sxb + g * sxh + rows[:, None] * sxt + dd[None, :] * sxd, mask=mask, other=0.0)
    xt = _rows_on(xt, on, b, rows, rmask, T, HAS_ON)
    if WRITE_X:
        tl.store(x_out + off, xt, mask=mask)
    mean = tl.sum(xt.to(tl.float32), 0) / count
    tl.store(pooled + ((b * tl.num_programs(0) + blk) * HKV + g) * D + dd, mean.to(pooled.dtype.element_ty),
             mask=dd < D)


@triton.jit
def _unpool_grads_kernel(acc, d_pooled, on, out, T, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                         BD: tl.constexpr, HAS_ACC: tl.constexpr, HAS_ON: tl.constexpr):
    # out[b, t, g] = on[t] * (acc[b, t, g] + d_pooled[b, t // BS, g] / count), float32 sums rounded once;
    # acc: float32 contiguous [B, T, HKV, D]; d_pooled: contiguous [B, NB, HKV, D]; out: contiguous like acc
    b, g, blk, rows, rmask, dd, off, mask, count = _block_rows(T, HKV, D, BS, BD)
    block_grad = tl.load(d_pooled + ((b * tl.num_programs(0) + blk) * HKV + g) * D + dd, mask=dd < D,
                         other=0.0).to(tl.float32) / count
    val = tl.zeros([BS, BD], dtype=tl.float32) + block_grad[None, :]
    if HAS_ACC:
        val += tl.load(acc + off, mask=mask, other=0.0)
    val = _rows_on(val, on, b, rows, rmask, T, HAS_ON)
    tl.store(out + off, val.to(out.dtype.element_ty), mask=mask)


def pool_blocks(x: torch.Tensor, block_size: int, rows_on: torch.Tensor | None = None):
    """``x`` ``[B, T, Hkv, D]`` (any strides) -> ``(x_on, pooled)``: ``x`` with the rows whose ``rows_on`` flag (bool
    ``[B, T]``) is off zeroed (``x`` itself when no flags are given; else a contiguous copy) and the mean of each
    block of ``block_size`` rows of it, ``[B, ceil(T / block_size), Hkv, D]`` in ``x``'s dtype (float32 sums over
    the tokens present, rounded once). One pass, no float32 copy; no autograd (see :func:`unpool_grads`)."""
    B, T, HKV, D = x.shape
    NB = -(-T // block_size)
    flags = row_flags(rows_on, x.shape[:2])
    x_on = x if flags is None else torch.empty(B, T, HKV, D, device=x.device, dtype=x.dtype)
    pooled = torch.empty(B, NB, HKV, D, device=x.device, dtype=x.dtype)
    if NB and B * HKV:
        _pool_blocks_kernel[(NB, B * HKV)](x, flags if flags is not None else x, x_on, pooled, T, *x.stride(),
                                           HKV=HKV, D=D, BS=block_size, BD=check_dim(D), HAS_ON=flags is not None,
                                           WRITE_X=flags is not None, num_warps=4)
    return x_on, pooled


def unpool_grads(d_pooled: torch.Tensor, block_size: int, num_rows: int, acc: torch.Tensor | None = None,
                 rows_on: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The gradient of ``x`` through :func:`pool_blocks` ``[B, num_rows, Hkv, D]``: each block's gradient
    ``d_pooled`` ``[B, NB, Hkv, D]`` spread over its tokens, plus ``acc`` (float32 ``[B, num_rows, Hkv, D]``, the
    gradient ``x_on`` received elsewhere) when given, zero at the rows whose flag is off; float32 sums, rounded
    once to ``dtype`` (``d_pooled``'s by default)."""
    B, NB, HKV, D = d_pooled.shape
    out = torch.empty(B, num_rows, HKV, D, device=d_pooled.device, dtype=dtype or d_pooled.dtype)
    flags = row_flags(rows_on, out.shape[:2])
    if NB and B * HKV:
        _unpool_grads_kernel[(NB, B * HKV)](acc if acc is not None else out, d_pooled.contiguous(),
                                            flags if flags is not None else out, out, num_rows, HKV=HKV, D=D,
                                            BS=block_size, BD=check_dim(D), HAS_ACC=acc is not None,
                                            HAS_ON=flags is not None, num_warps=4)
    return out


class _CompressKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block_size):
        ctx.cfg = (block_size, x.shape[1])
        return pool_blocks(x, block_size)[1]

    @staticmethod
    def backward(ctx, grad):
        block_size, num_rows = ctx.cfg
        return unpool_grads(grad, block_size, num_rows), None


def compress_kv(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean-pool ``[B, T, Hkv, D]`` over consecutive blocks -> ``[B, ceil(T / block_size), Hkv, D]``, as
    ``reference.compress_kv`` (a final partial block divided by the tokens present, float32 sums, the input dtype
    out); one Triton pass each way (:func:`pool_blocks`)."""
    return _CompressKV.apply(x, int(block_size))


@triton.jit
def _first_block(rows, OFF, BS: tl.constexpr):
    """The lowest block a row tile sees (rows see their own block and later ones)."""
    return (tl.min(rows, 0) + OFF) // BS


@triton.jit
def _cmp_fwd_kernel(
    q, k, v, o, lse,
    sqb, sqt, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    Tq, OFF, NB, H_ACTIVE, qk_scale,
    P: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
):
    b, h, g, rows, rmask, dd, dmask, io_mask = row_tile_program(Tq, P, GROUP, D, BM, BD, WIDE)
    cur = (rows + OFF) // BS
    o_ptr = o + head_rows_offsets(b, h, rows, dd, Tq, P, D)
    l_ptr = lse + (b * P + h) * Tq + rows
    if h >= H_ACTIVE:
        # all-zero queries: softmax over n equal scores -> lse = log(n); the output is never used (gate 0)
        n_vis = (NB - cur).to(tl.float32)
        tl.store(l_ptr, tl.log(n_vis), mask=rmask)
        tl.store(o_ptr, tl.zeros([BM, BD], dtype=o.dtype.element_ty), mask=io_mask)
    else:
        bq = load_head_rows(q, b, h, rows, dd, io_mask, sqb, sqt, sqh, sqd)
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        for c0 in range(_first_block(rows, OFF, BS), NB, BN):
            cols = c0 + tl.arange(0, BN)
            cmask = cols < NB
            bk, bv = load_kv_tile(k, v, b, g, cols, cmask, dd, dmask, skb, skn, skh, skd, svb, svn, svh, svd)
            vis = (cols[None, :] >= cur[:, None]) & cmask[None, :]
            m_i, l_i, acc = online_softmax_step(bq, bk, bv, vis, m_i, l_i, acc, qk_scale, PREC)
        out = acc / l_i[:, None]
        tl.store(o_ptr, out.to(o.dtype.element_ty), mask=io_mask)
        tl.store(l_ptr, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)  # base 2 -> natural


@triton.jit
def _cmp_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq,
    sqb, sqt, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    Tq, OFF, NB, H_ACTIVE, qk_scale, scale,
    P: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
):
    # do, dq: contiguous [B, Tq, P, D]; lse: [B, P, Tq] (natural log); delta: [B, P, Tq]
    b, h, g, rows, rmask, dd, dmask, io_mask = row_tile_program(Tq, P, GROUP, D, BM, BD, WIDE)
    cur = (rows + OFF) // BS
    row_off = head_rows_offsets(b, h, rows, dd, Tq, P, D)
    if h >= H_ACTIVE:
        tl.store(dq + row_off, tl.zeros([BM, BD], dtype=dq.dtype.element_ty), mask=io_mask)
    else:
        bq = load_head_rows(q, b, h, rows, dd, io_mask, sqb, sqt, sqh, sqd)
        bdo = tl.load(do + row_off, mask=io_mask, other=0.0)
        lse2 = tl.load(lse + (b * P + h) * Tq + rows, mask=rmask, other=0.0) * 1.4426950408889634  # to base 2
        dlt = tl.load(delta + (b * P + h) * Tq + rows, mask=rmask, other=0.0)
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        for c0 in range(_first_block(rows, OFF, BS), NB, BN):
            cols = c0 + tl.arange(0, BN)
            cmask = cols < NB
            bk, bv = load_kv_tile(k, v, b, g, cols, cmask, dd, dmask, skb, skn, skh, skd, svb, svn, svh, svd)
            vis = (cols[None, :] >= cur[:, None]) & cmask[None, :] & rmask[:, None]
            acc = dq_step(bq, bk, bv, bdo, vis, lse2, dlt, acc, qk_scale, PREC)
        tl.store(dq + row_off, (acc * scale).to(dq.dtype.element_ty), mask=io_mask)


@triton.jit
def _cmp_bwd_dkv_kernel(
    q, k, v, do, lse, delta, dk, dv,
    skb, skn, skh, skd,
    svb, svt, svh, svd,
    Tq, OFF, NB, H_ACTIVE, qk_scale, scale,
    P: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
    RC: tl.constexpr,
):
    # one program: a tile of BN compressed blocks, one kv head, a chunk of RC query rows, all heads of the
    # group; adds its share into the float32 dk, dv [B, NB, Hkv, D] (zero-initialised) with atomics. q is
    # contiguous like do, so both take one set of offsets (fewer registers: the kernel spilled with q's strides)
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    if WIDE:  # row offsets in int64 (wide_offsets)
        pid_r = pid_r.to(tl.int64)
    pid_bg = tl.program_id(2)
    b = pid_bg // HKV
    g = pid_bg % HKV
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < NB
    c_hi = tl.minimum(pid_n * BN + BN, NB)  # exclusive
    r_lo = pid_r * RC
    r_hi = tl.minimum(tl.minimum(Tq, c_hi * BS - OFF), r_lo + RC)  # rows with (r + OFF) // BS < c_hi
    n_heads = tl.minimum(tl.maximum(H_ACTIVE - g * GROUP, 0), GROUP)
    if (r_lo < r_hi) & (n_heads > 0):
        dd = tl.arange(0, BD)
        dmask = dd < D
        kv_mask = cmask[:, None] & dmask[None, :]
        bk, bv = load_kv_tile(k, v, b, g, cols, cmask, dd, dmask, skb, skn, skh, skd, svb, svt, svh, svd)
        dk_acc = tl.zeros([BN, BD], dtype=tl.float32)
        dv_acc = tl.zeros([BN, BD], dtype=tl.float32)
        for j in range(0, n_heads):
            h = g * GROUP + j
            for r0 in range(r_lo, r_hi, BM):
                rows = r0 + tl.arange(0, BM)
                rmask = rows < r_hi
                io_mask = rmask[:, None] & dmask[None, :]
                row_off = head_rows_offsets(b, h, rows, dd, Tq, P, D)
                bq = tl.load(q + row_off, mask=io_mask, other=0.0)
                bdo = tl.load(do + row_off, mask=io_mask, other=0.0)
                lse2 = tl.load(lse + (b * P + h) * Tq + rows, mask=rmask, other=0.0) * 1.4426950408889634  # to base 2
                dlt = tl.load(delta + (b * P + h) * Tq + rows, mask=rmask, other=0.0)
                cur = (rows + OFF) // BS
                vis_t = (cols[:, None] >= cur[None, :]) & cmask[:, None] & rmask[None, :]
                dk_acc, dv_acc = dkv_step(bq, bk, bv, bdo, vis_t, lse2, dlt, dk_acc, dv_acc, qk_scale, PREC, True)
        out_off = ((b * NB + cols[:, None]) * HKV + g) * D + dd[None, :]
        tl.atomic_add(dk + out_off, dk_acc * scale, mask=kv_mask)
        tl.atomic_add(dv + out_off, dv_acc, mask=kv_mask)


def _blocks(d: int):
    bd = check_dim(d)
    bm = 64
    bn = 64 if bd <= 128 else 32
    return bd, bm, bn


def compression_attention_fwd(q, k_cmp, v_cmp, block_size, scale, num_keys=None, active_heads=None,
                              launch=DEFAULT_LAUNCH):
    B, Tq, P, D = q.shape
    NB, HKV = k_cmp.shape[1], k_cmp.shape[2]
    num_keys = Tq if num_keys is None else int(num_keys)
    active_heads = P if active_heads is None else int(active_heads)
    bd, bm, bn = _blocks(D)
    o = torch.empty(B, Tq, P, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, P, Tq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Tq, bm), B * P)
    _cmp_fwd_kernel[grid](
        q, k_cmp, v_cmp, o, lse,
        *q.stride(), *k_cmp.stride(), *v_cmp.stride(),
        Tq, num_keys - Tq, NB, active_heads, scale * LOG2E,
        P=P, GROUP=P // HKV, D=D, BS=block_size, BM=bm, BN=bn, BD=bd, PREC=dot_precision(q.dtype),
        WIDE=wide_offsets(q, o), num_warps=launch.attention_warps, num_stages=2,
    )
    return o, lse


def compression_attention_bwd(q, k_cmp, v_cmp, o, lse, do, block_size, scale, num_keys=None, active_heads=None,
                              launch=DEFAULT_LAUNCH, delta=None, kv_grads_dtype=None):
    """``dq`` (q dtype), ``dk_cmp``, ``dv_cmp`` (``kv_grads_dtype``, by default k_cmp's; the kernels sum them in
    float32). ``delta``: ``<o, do>`` ``[B, P, Tq]`` float32 when already known (computed here otherwise)."""
    run_dq, run_dkv, (dq, dk, dv) = compression_attention_bwd_kernels(q, k_cmp, v_cmp, o, lse, do, block_size, scale,
                                                                      num_keys, active_heads, launch, delta)
    run_dq()
    run_dkv()
    kv_dtype = kv_grads_dtype or k_cmp.dtype
    return dq, dk.to(kv_dtype), dv.to(kv_dtype)


def compression_attention_bwd_kernels(q, k_cmp, v_cmp, o, lse, do, block_size, scale, num_keys=None,
                                      active_heads=None, launch=DEFAULT_LAUNCH, delta=None):
    """The backward as two launches: ``(run_dq, run_dkv, (dq, dk, dv))``, each ``run_*`` a no-argument call that
    fills its buffers (float32 ``dk``/``dv``). :func:`compression_attention_bwd` runs both; timing runs each."""
    B, Tq, P, D = q.shape
    NB, HKV = k_cmp.shape[1], k_cmp.shape[2]
    num_keys = Tq if num_keys is None else int(num_keys)
    active_heads = P if active_heads is None else int(active_heads)
    bd, bm, bn = _blocks(D)
    do = do.contiguous()
    delta = attention_delta(o, do, heads_first=True) if delta is None else delta  # [B, P, Tq]
    dq = torch.empty(B, Tq, P, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, NB, HKV, D, device=q.device, dtype=torch.float32)
    dv = torch.empty_like(dk)
    prec = dot_precision(q.dtype)
    common = dict(P=P, GROUP=P // HKV, D=D, BS=block_size, BM=bm, BN=bn, BD=bd, PREC=prec, WIDE=wide_offsets(q, do),
                  num_stages=2)
    kv_strides = (*k_cmp.stride(), *v_cmp.stride())
    scalars = (Tq, num_keys - Tq, NB, active_heads, scale * LOG2E, scale)
    rc = launch.compression_dkv_rows or (256 if Tq <= 16384 else 1024)

    def run_dq():
        _cmp_bwd_dq_kernel[(triton.cdiv(Tq, bm), B * P)](q, k_cmp, v_cmp, do, lse, delta, dq, *q.stride(),
                                                          *kv_strides, *scalars, num_warps=launch.attention_warps,
                                                          **common)

    def run_dkv():
        dk.zero_()
        dv.zero_()
        _cmp_bwd_dkv_kernel[(triton.cdiv(NB, bn), triton.cdiv(Tq, rc), B * HKV)](
            q.contiguous(), k_cmp, v_cmp, do, lse, delta, dk, dv, *kv_strides, *scalars, HKV=HKV, RC=rc,
            num_warps=launch.attention_warps, **common)

    return run_dq, run_dkv, (dq, dk, dv)


class CompressionAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, block_size, scale, num_keys, active_heads):
        o, lse = compression_attention_fwd(q, k_cmp, v_cmp, block_size, scale, num_keys, active_heads)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.cfg = (block_size, scale, num_keys, active_heads)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        dq, dk, dv = compression_attention_bwd(q, k_cmp, v_cmp, o, lse, do, *ctx.cfg)
        return dq, dk, dv, None, None, None, None


def compression_attention(q, k_cmp, v_cmp, block_size, scale=None, num_keys=None, active_heads=None):
    """Triton compression attention.

    Args:
        q: ``[B, Tq, P, D]`` (any strides); k_cmp, v_cmp: ``[B, NB, Hkv, D]`` from :func:`compress_kv`.
        num_keys: length of the key range (``Tq`` when omitted); query row ``r`` is at ``num_keys - Tq + r``.
        active_heads: heads ``>= active_heads`` are all-zero queries (closed-form lse, output left 0).

    Returns:
        ``(o [B, Tq, P, D] in q.dtype, lse [B, P, Tq] float32 natural log)``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return CompressionAttentionFunction.apply(q, k_cmp.contiguous(), v_cmp.contiguous(), int(block_size),
                                              float(scale), num_keys, active_heads)


__all__ = ["compress_kv", "pool_blocks", "unpool_grads", "compression_attention", "compression_attention_fwd",
           "compression_attention_bwd", "compression_attention_bwd_kernels"]
