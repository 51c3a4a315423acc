"""Gate mixing of the three NSA branches on Triton: ``out = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swd``.

The same expression in torch is five elementwise kernels with three temporaries of the output's size (26 GB of
traffic at T = 128K in the 7B layout); here it is one pass that reads the three branch outputs and the gates
once and writes the result (8 GB), and one backward pass that writes the three branch gradients and the gate
gradients. Products and sums are taken in float32; the result is rounded once to the branch dtype.

With ``fold_to=H`` the pass also folds the padded layout back to the model's H heads, ``(mix[h] + mix[h + H]) / 2``
(``reference.fold_heads`` of the mix, rounded as those two steps round), so that neither the padded result nor its
gradient exists: the backward reads the H-head output gradient, and the padded heads past 2H get zero gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import DEFAULT_LAUNCH, check_dim, flat_row_tile, heads_first_index


@triton.jit
def _gated(o, gates, i: tl.constexpr, rows, rmask, off, mask):
    g = tl.load(gates + rows * 3 + i, mask=rmask, other=0.0).to(tl.float32)
    return tl.load(o + off, mask=mask, other=0.0).to(tl.float32) * g[:, None]


@triton.jit
def _mix(o_cmp, o_slc, o_swd, gates, rows, rmask, off, mask):
    """float32 ``sum_i g_i * o_i`` at the given rows of the branch outputs (``[rows, D]`` contiguous)."""
    acc = _gated(o_cmp, gates, 0, rows, rmask, off, mask)
    acc += _gated(o_slc, gates, 1, rows, rmask, off, mask)
    acc += _gated(o_swd, gates, 2, rows, rmask, off, mask)
    return acc


@triton.jit
def _mix_fwd_kernel(o_cmp, o_slc, o_swd, gates, out, n_rows, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    # branch outputs and out: contiguous [n_rows, D]; gates: contiguous [n_rows, 3]
    rows, rmask, off, mask = flat_row_tile(n_rows, D, BR, BD)
    tl.store(out + off, _mix(o_cmp, o_slc, o_swd, gates, rows, rmask, off, mask).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _mix_fold_fwd_kernel(o_cmp, o_slc, o_swd, gates, out, n_rows, H: tl.constexpr, P: tl.constexpr,
                         D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    # out: contiguous [n_rows = tokens * H, D]; branch outputs [tokens * P, D], gates [tokens * P, 3]
    rows, rmask, off, mask = flat_row_tile(n_rows, D, BR, BD)
    first = rows // H * P + rows % H  # padded row of the head's first copy; the second is H rows on
    first_off = off + (first - rows)[:, None] * D
    dt = out.dtype.element_ty
    a = _mix(o_cmp, o_slc, o_swd, gates, first, rmask, first_off, mask).to(dt)
    b = _mix(o_cmp, o_slc, o_swd, gates, first + H, rmask, first_off + H * D, mask).to(dt)
    folded = (a.to(tl.float32) + b.to(tl.float32)).to(dt).to(tl.float32) * 0.5
    tl.store(out + off, folded.to(dt), mask=mask)


@triton.jit
def _mix_bwd_branch(o, d_o, gates, dgates, i: tl.constexpr, do, rows, rmask, off, mask, delta, delta_rows,
                    DELTA: tl.constexpr):
    """Branch ``i``: ``d_o = g_i * dout`` and ``dg_i = <o_i, dout>`` per row; with ``DELTA`` also the branch's
    softmax-backward term ``<o_i, d_o>`` (of the rounded ``d_o``, as its backward would compute it) at
    ``delta_rows`` of ``delta``."""
    g = tl.load(gates + rows * 3 + i, mask=rmask, other=0.0).to(tl.float32)
    d_branch = (do * g[:, None]).to(d_o.dtype.element_ty)
    tl.store(d_o + off, d_branch, mask=mask)
    x = tl.load(o + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(dgates + rows * 3 + i, tl.sum(x * do, 1), mask=rmask)
    if DELTA:
        tl.store(delta + delta_rows, tl.sum(x * d_branch.to(tl.float32), 1), mask=rmask)


@triton.jit
def _mix_bwd_rows(o_cmp, o_slc, o_swd, gates, d_cmp, d_slc, d_swd, dgates, do, rows, rmask, off, mask,
                  delta_cmp, delta_slc, delta_swd, T, P: tl.constexpr, DELTA: tl.constexpr):
    # the compression branch keeps its log-sum-exp, and so its delta, heads first ([B, P, T])
    _mix_bwd_branch(o_cmp, d_cmp, gates, dgates, 0, do, rows, rmask, off, mask, delta_cmp,
                    heads_first_index(rows, T, P), DELTA)
    _mix_bwd_branch(o_slc, d_slc, gates, dgates, 1, do, rows, rmask, off, mask, delta_slc, rows, DELTA)
    _mix_bwd_branch(o_swd, d_swd, gates, dgates, 2, do, rows, rmask, off, mask, delta_swd, rows, DELTA)


@triton.jit
def _mix_bwd_kernel(o_cmp, o_slc, o_swd, gates, dout, d_cmp, d_slc, d_swd, dgates, n_rows,
                    D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    rows, rmask, off, mask = flat_row_tile(n_rows, D, BR, BD)
    do = tl.load(dout + off, mask=mask, other=0.0).to(tl.float32)
    _mix_bwd_rows(o_cmp, o_slc, o_swd, gates, d_cmp, d_slc, d_swd, dgates, do, rows, rmask, off, mask,
                  dgates, dgates, dgates, 1, 1, False)


@triton.jit
def _mix_fold_bwd_kernel(o_cmp, o_slc, o_swd, gates, dout, d_cmp, d_slc, d_swd, dgates, delta_cmp, delta_slc,
                         delta_swd, n_rows, T, H: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
                         BD: tl.constexpr, DELTA: tl.constexpr):
    # dout: contiguous [n_rows = tokens * H, D]; each copy of a head gets half of it (rounded, as fold_heads does)
    rows, rmask, off, mask = flat_row_tile(n_rows, D, BR, BD)
    dt = dout.dtype.element_ty
    do = (tl.load(dout + off, mask=mask, other=0.0).to(tl.float32) * 0.5).to(dt).to(tl.float32)
    first = rows // H * P + rows % H
    first_off = off + (first - rows)[:, None] * D
    deltas = (delta_cmp, delta_slc, delta_swd, T, P, DELTA)
    _mix_bwd_rows(o_cmp, o_slc, o_swd, gates, d_cmp, d_slc, d_swd, dgates, do, first, rmask, first_off, mask,
                  *deltas)
    _mix_bwd_rows(o_cmp, o_slc, o_swd, gates, d_cmp, d_slc, d_swd, dgates, do, first + H, rmask, first_off + H * D,
                  mask, *deltas)


def mix_fwd(o_cmp, o_slc, o_swd, gates, fold_to=None):
    """The mix of :func:`mix_branches` without autograd: contiguous branch outputs ``[..., P, D]`` and gates
    ``[..., P, 3]`` (the branches' dtype) -> ``[..., P, D]``, or ``[..., fold_to, D]`` folded."""
    P, D = o_cmp.shape[-2:]
    rows = DEFAULT_LAUNCH.mix_rows
    if fold_to is None:
        out = torch.empty_like(o_cmp)
        n_rows = out.numel() // D
        _mix_fwd_kernel[(triton.cdiv(n_rows, rows),)](o_cmp, o_slc, o_swd, gates, out, n_rows, D=D, BR=rows,
                                                      BD=check_dim(D), num_warps=4)
    else:
        out = o_cmp.new_empty(*o_cmp.shape[:-2], fold_to, D)
        n_rows = out.numel() // D
        _mix_fold_fwd_kernel[(triton.cdiv(n_rows, rows),)](o_cmp, o_slc, o_swd, gates, out, n_rows, H=fold_to, P=P,
                                                           D=D, BR=rows, BD=check_dim(D), num_warps=4)
    return out


def mix_bwd(o_cmp, o_slc, o_swd, gates, dout, fold_to=None, deltas=False):
    """Gradients of :func:`mix_fwd`: the three branch output gradients (the branches' dtype), float32 gate gradients
    and, with ``deltas`` (``fold_to`` only), each branch's float32 softmax-backward term ``<o_i, d o_i>`` per
    (token, head), the compression branch's ``[B, P, T]`` and the others' ``[B, T, P]`` (the layouts of their
    log-sum-exps), computed from the rounded gradients as the branches' own backward would. With ``deltas`` the
    padded heads' rows (``2 * fold_to`` on) of the branch gradients and deltas are left unset: their consumers, the
    branches' backward kernels, skip those heads or compute rows of them that nothing reads."""
    P, D = o_cmp.shape[-2:]
    grads = [torch.empty_like(o_cmp) for _ in range(3)]
    dgates = torch.empty(gates.shape, device=gates.device, dtype=torch.float32)
    rows = DEFAULT_LAUNCH.mix_rows
    n_rows = dout.numel() // D
    args = (o_cmp, o_slc, o_swd, gates, dout.contiguous(), *grads, dgates)
    if fold_to is None:
        if deltas:
            raise ValueError("mix_bwd computes the branch deltas only with fold_to")
        _mix_bwd_kernel[(triton.cdiv(n_rows, rows),)](*args, n_rows, D=D, BR=rows, BD=check_dim(D), num_warps=4)
        return (*grads, dgates)
    heads = fold_to
    B, T = o_cmp.shape[0], o_cmp.shape[1]
    if deltas:
        delta = (o_cmp.new_empty(B, P, T, dtype=torch.float32), o_cmp.new_empty(B, T, P, dtype=torch.float32),
                 o_cmp.new_empty(B, T, P, dtype=torch.float32))
    else:
        delta = (dgates,) * 3
    _mix_fold_bwd_kernel[(triton.cdiv(n_rows, rows),)](*args, *delta, n_rows, T, H=heads, P=P, D=D, BR=rows,
                                                       BD=check_dim(D), DELTA=deltas, num_warps=4)
    dgates[..., 2 * heads :, :] = 0
    if deltas:
        return (*grads, dgates, delta)
    for x in grads:
        x[..., 2 * heads :, :] = 0
    return (*grads, dgates)


class GateMixFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_swd, gates, fold_to):
        branches = [x.contiguous() for x in (o_cmp, o_slc, o_swd)]
        g = gates.contiguous()
        ctx.save_for_backward(*branches, g)
        ctx.fold_to = fold_to
        return mix_fwd(*branches, g, fold_to)

    @staticmethod
    def backward(ctx, dout):
        *grads, dgates = mix_bwd(*ctx.saved_tensors, dout, ctx.fold_to)
        return (*grads, dgates.to(ctx.saved_tensors[3].dtype), None)


def mix_branches(o_cmp, o_slc, o_swd, gates, fold_to=None):
    """``[..., P, D]`` branch outputs (one shape and dtype) and ``[..., P, 3]`` gates -> ``[..., P, D]``, or with
    ``fold_to=H`` (``2H <= P``) the folded ``[..., H, D]`` of ``reference.mix_branches``.

    The gates are first rounded to the branches' dtype (the released kernels take them in the query dtype).
    Gradients flow to all four inputs.
    """
    if not (o_cmp.shape == o_slc.shape == o_swd.shape) or gates.shape != (*o_cmp.shape[:-1], 3):
        raise ValueError(f"branch outputs {tuple(o_cmp.shape)}, {tuple(o_slc.shape)}, {tuple(o_swd.shape)} and "
                         f"gates {tuple(gates.shape)} do not match: expected gates of shape "
                         f"{(*o_cmp.shape[:-1], 3)}")
    if fold_to is not None and not 0 < 2 * fold_to <= o_cmp.shape[-2]:
        raise ValueError(f"fold_to={fold_to} needs two copies of each head among the {o_cmp.shape[-2]} padded heads")
    return GateMixFunction.apply(o_cmp, o_slc, o_swd, gates.to(o_cmp.dtype), fold_to)


__all__ = ["mix_branches"]
