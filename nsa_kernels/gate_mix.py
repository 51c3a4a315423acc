"""Gate mixing of the three NSA branches on Triton: ``out = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swd``.

The same expression in torch is five elementwise kernels with three temporaries of the output's size (26 GB of
traffic at T = 128K in the 7B layout); here it is one pass that reads the three branch outputs and the gates
once and writes the result (8 GB), and one backward pass that writes the three branch gradients and the gate
gradients. Products and sums are taken in float32; the result is rounded once to the branch dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import DEFAULT_LAUNCH, check_dim



@triton.jit
def _mix_fwd_kernel(o_cmp, o_slc, o_swd, gates, out, n_rows, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    # branch outputs and out: contiguous [n_rows, D]; gates: contiguous [n_rows, 3]
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # offsets pass 2**31 beyond 256K tokens
    dd = tl.arange(0, BD)
    rmask = rows < n_rows
    mask = rmask[:, None] & (dd < D)[None, :]
    off = rows[:, None] * D + dd[None, :]
    g0 = tl.load(gates + rows * 3, mask=rmask, other=0.0).to(tl.float32)
    g1 = tl.load(gates + rows * 3 + 1, mask=rmask, other=0.0).to(tl.float32)
    g2 = tl.load(gates + rows * 3 + 2, mask=rmask, other=0.0).to(tl.float32)
    acc = tl.load(o_cmp + off, mask=mask, other=0.0).to(tl.float32) * g0[:, None]
    acc += tl.load(o_slc + off, mask=mask, other=0.0).to(tl.float32) * g1[:, None]
    acc += tl.load(o_swd + off, mask=mask, other=0.0).to(tl.float32) * g2[:, None]
    tl.store(out + off, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _mix_bwd_branch(o, d_o, gates, dgates, i: tl.constexpr, do, rows, rmask, off, mask):
    """Branch ``i``: ``d_o = g_i * dout`` and ``dg_i = <o_i, dout>`` per row."""
    g = tl.load(gates + rows * 3 + i, mask=rmask, other=0.0).to(tl.float32)
    tl.store(d_o + off, (do * g[:, None]).to(d_o.dtype.element_ty), mask=mask)
    x = tl.load(o + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(dgates + rows * 3 + i, tl.sum(x * do, 1), mask=rmask)


@triton.jit
def _mix_bwd_kernel(o_cmp, o_slc, o_swd, gates, dout, d_cmp, d_slc, d_swd, dgates, n_rows,
                    D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # offsets pass 2**31 beyond 256K tokens
    dd = tl.arange(0, BD)
    rmask = rows < n_rows
    mask = rmask[:, None] & (dd < D)[None, :]
    off = rows[:, None] * D + dd[None, :]
    do = tl.load(dout + off, mask=mask, other=0.0).to(tl.float32)
    _mix_bwd_branch(o_cmp, d_cmp, gates, dgates, 0, do, rows, rmask, off, mask)
    _mix_bwd_branch(o_slc, d_slc, gates, dgates, 1, do, rows, rmask, off, mask)
    _mix_bwd_branch(o_swd, d_swd, gates, dgates, 2, do, rows, rmask, off, mask)


class GateMixFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_swd, gates):
        branches = [x.contiguous() for x in (o_cmp, o_slc, o_swd)]
        g = gates.contiguous()
        D = branches[0].shape[-1]
        n_rows = branches[0].numel() // D
        out = torch.empty_like(branches[0])
        rows = DEFAULT_LAUNCH.mix_rows
        _mix_fwd_kernel[(triton.cdiv(n_rows, rows),)](*branches, g, out, n_rows, D=D, BR=rows, BD=check_dim(D),
                                                      num_warps=4)
        ctx.save_for_backward(*branches, g)
        return out

    @staticmethod
    def backward(ctx, dout):
        o_cmp, o_slc, o_swd, g = ctx.saved_tensors
        D = o_cmp.shape[-1]
        n_rows = o_cmp.numel() // D
        grads = [torch.empty_like(o_cmp) for _ in range(3)]
        dgates = torch.empty(g.shape, device=g.device, dtype=torch.float32)
        rows = DEFAULT_LAUNCH.mix_rows
        _mix_bwd_kernel[(triton.cdiv(n_rows, rows),)](o_cmp, o_slc, o_swd, g, dout.contiguous(), *grads, dgates,
                                                      n_rows, D=D, BR=rows, BD=check_dim(D), num_warps=4)
        return (*grads, dgates.to(g.dtype))


def mix_branches(o_cmp, o_slc, o_swd, gates):
    """``[..., P, D]`` branch outputs (one shape and dtype) and ``[..., P, 3]`` gates -> ``[..., P, D]``.

    The gates are first rounded to the branches' dtype (the released kernels take them in the query dtype).
    Gradients flow to all four inputs.
    """
    if not (o_cmp.shape == o_slc.shape == o_swd.shape) or gates.shape != (*o_cmp.shape[:-1], 3):
        raise ValueError(f"branch outputs {tuple(o_cmp.shape)}, {tuple(o_slc.shape)}, {tuple(o_swd.shape)} and "
                         f"gates {tuple(gates.shape)} do not match: expected gates of shape "
                         f"{(*o_cmp.shape[:-1], 3)}")
    return GateMixFunction.apply(o_cmp, o_slc, o_swd, gates.to(o_cmp.dtype))


__all__ = ["mix_branches"]
