"""Triton implementation of the VideoNSA attention, with the signatures of :mod:`nsa_kernels.reference`.

Entry points (drop-in for the reference functions of the same name, CUDA tensors, float32/bfloat16/float16):

* :func:`compress_kv`, :func:`compression_attention`, :func:`select_blocks`, :func:`selected_attention`,
  :func:`window_attention`: the NSA steps (reference signatures, ``num_keys`` included);
* :func:`nsa_attention`: the three branches mixed by gates (``nsa_fn`` of ``reference.hybrid_attention``);
* :func:`dense_attention`: causal GQA attention (``dense_fn``); rows whose query is all zero (the
  text-masked query at vision rows of the mixed path) are computed as the running mean of the visible values
  instead of running attention on them;
* :func:`hybrid_attention`: ``reference.hybrid_attention`` routed through the two above.

Gradients flow to q, k, v and the gates (block choice is discrete and carries none, as in the authors'
kernels). See the module docs of each op file for the kernels.
"""

from __future__ import annotations

import functools

import torch

from . import reference as _ref
from ._triton_utils import DEFAULT_LAUNCH, LaunchSettings
from .compression import (compress_kv, compression_attention, compression_attention_bwd, compression_attention_fwd,
                          pool_blocks, unpool_grads)
from .gate_mix import mix_branches, mix_bwd, mix_fwd
from .head_layout import fold_query_grads, pad_query
from .running_mean import running_means
from .selected_attention import selected_attention, selected_attention_bwd, selected_attention_fwd
from .selection import select_blocks as _select_blocks
from .window_attention import band_attention, band_attention_bwd, band_attention_fwd, window_attention

__all__ = [
    "compress_kv",
    "compression_attention",
    "select_blocks",
    "selected_attention",
    "window_attention",
    "nsa_attention",
    "dense_attention",
    "hybrid_attention",
    "LaunchSettings",
    "DEFAULT_LAUNCH",
]


def select_blocks(q, k_cmp, lse, block_count, block_size, scale, num_keys=None, lse_row_offset=0):
    """Reference signature; int32 ``[B, Tq, Hkv, next_pow2(block_count)]``. The choice is discrete: no gradient."""
    with torch.no_grad():
        return _select_blocks(q.detach(), k_cmp.detach(), lse, block_count, block_size, scale, num_keys,
                              lse_row_offset)


def _active_heads(q: torch.Tensor, gates: torch.Tensor) -> int:
    """Number of heads before the trailing run of heads whose query and gates are all zero (padded heads)."""
    zero = (q.detach().abs().amax(dim=(0, 1, 3)) == 0) & (gates.detach().abs().amax(dim=(0, 1, 3)) == 0)
    nz = torch.nonzero(~zero).flatten()
    return int(nz.max()) + 1 if nz.numel() else 0


def nsa_attention(q, k, v, gates, *, block_count, block_size, window_size, scale, return_intermediates=False,
                  active_heads=None, launch=DEFAULT_LAUNCH, fold_to=None):
    """The three NSA branches mixed by gates: same contract as ``reference.nsa_attention``.

    ``active_heads``: heads from this index on are all-zero queries with zero gates (heads 56-63 of the 7B
    layout); their branch outputs are not computed, which leaves the value unchanged (their gates are 0),
    but the gradient of their gates is then 0 instead of the branch outputs: pass it only where those gates
    are constants (as in :func:`hybrid_attention`). When None, such heads are detected (one host sync) and
    skipped only if ``gates`` does not require grad. With ``return_intermediates`` every head is computed
    so that the intermediates equal the reference's. ``launch``: the kernels' launch settings.
    """
    num_keys = k.shape[1]
    if return_intermediates:
        active = q.shape[2]
    elif active_heads is not None:
        active = int(active_heads)
    elif gates.requires_grad:
        active = q.shape[2]
    else:
        active = _active_heads(q, gates)
    k_cmp, v_cmp = compress_kv(k, block_size), compress_kv(v, block_size)
    o_cmp, lse = compression_attention(q, k_cmp, v_cmp, block_size, scale, num_keys, active)
    block_indices = select_blocks(q, k_cmp, lse, block_count, block_size, scale, num_keys)
    o_slc = selected_attention(q, k, v, block_indices, block_size, scale, launch=launch, active_heads=active)
    o_swd = window_attention(q, k, v, window_size, scale, active)
    out = mix_branches(o_cmp, o_slc, o_swd, gates, fold_to)
    if not return_intermediates:
        return out
    return out, dict(k_cmp=k_cmp, v_cmp=v_cmp, lse_cmp=lse, block_indices=block_indices, o_cmp=o_cmp,
                     o_slc=o_slc, o_swd=o_swd)


class _NSAOnModelHeads(torch.autograd.Function):
    """The NSA part of the hybrid layer as one autograd node (see :func:`nsa_attention_on_model_heads`).

    Forward: the model's query is laid out as the padded heads, text rows zeroed, in one pass
    (:func:`head_layout.pad_query`); keys and values get their text rows zeroed and their block means in one pass
    each (:func:`compression.pool_blocks`); the three branches run on them and the mix folds the heads back.
    Backward: the mix's backward also gives each branch its softmax-backward term, the selected and window branches
    add dk/dv into one float32 pair, the compression branch's block gradients are spread over the blocks' tokens and
    added to it in one pass each (:func:`compression.unpool_grads`), and the three padded dq come back to the
    model's heads in one pass (:func:`head_layout.fold_query_grads`)."""

    @staticmethod
    def forward(ctx, q, k, v, gates, rows_on, keys_on, block_count, block_size, window_size, scale, padded_heads,
                active, launch):
        num_keys, num_rows, heads = k.shape[1], q.shape[1], q.shape[2]
        q_pad = pad_query(q, padded_heads, rows_on)
        k_on, k_cmp = pool_blocks(k, block_size, keys_on)
        v_on, v_cmp = pool_blocks(v, block_size, keys_on)
        o_cmp, lse_cmp = compression_attention_fwd(q_pad, k_cmp, v_cmp, block_size, scale, num_keys, active, launch)
        block_indices = _select_blocks(q_pad, k_cmp, lse_cmp, block_count, block_size, scale, num_keys, 0, launch)
        o_slc, lse_slc = selected_attention_fwd(q_pad, k_on, v_on, block_indices, block_size, scale,
                                                launch.selected_schedule(num_rows), launch)
        o_swd, lse_swd = band_attention_fwd(q_pad, k_on, v_on, scale, window_size, None, None, active, launch)
        ctx.save_for_backward(q_pad, k_on, v_on, k_cmp, v_cmp, gates, rows_on, keys_on, o_cmp, lse_cmp,
                              block_indices, o_slc, lse_slc, o_swd, lse_swd)
        ctx.cfg = (block_size, window_size, scale, active, launch, heads, q.dtype, k.dtype)
        return mix_fwd(o_cmp, o_slc, o_swd, gates, heads)

    @staticmethod
    def backward(ctx, dout):
        (q_pad, k_on, v_on, k_cmp, v_cmp, gates, rows_on, keys_on, o_cmp, lse_cmp, block_indices, o_slc, lse_slc,
         o_swd, lse_swd) = ctx.saved_tensors
        block_size, window_size, scale, active, launch, heads, q_dtype, kv_dtype = ctx.cfg
        num_keys = k_on.shape[1]
        d_cmp, d_slc, d_swd, dgates, (delta_cmp, delta_slc, delta_swd) = mix_bwd(
            o_cmp, o_slc, o_swd, gates, dout, fold_to=heads, deltas=True)
        dq_cmp, dk_cmp, dv_cmp = compression_attention_bwd(q_pad, k_cmp, v_cmp, o_cmp, lse_cmp, d_cmp, block_size,
                                                           scale, num_keys, active, launch, delta_cmp, torch.float32)
        del d_cmp
        dq_slc, dk, dv = selected_attention_bwd(q_pad, k_on, v_on, block_indices, o_slc, lse_slc, d_slc, block_size,
                                                scale, launch=launch, active_heads=active, delta=delta_slc)
        del d_slc
        dq_swd, dk, dv = band_attention_bwd(q_pad, k_on, v_on, o_swd, lse_swd, d_swd, scale, window_size, None, None,
                                            active, dk, dv, launch, delta_swd)
        del d_swd
        dq = fold_query_grads([dq_cmp, dq_slc, dq_swd], heads, rows_on, q_dtype)
        dk = unpool_grads(dk_cmp, block_size, num_keys, dk, keys_on, kv_dtype)
        dv = unpool_grads(dv_cmp, block_size, num_keys, dv, keys_on, kv_dtype)
        return (dq, dk, dv, dgates.to(gates.dtype), None, None, None, None, None, None, None, None, None)


def nsa_attention_on_model_heads(q, k, v, gates, *, block_count, block_size, window_size, scale, rows_on=None,
                                 keys_on=None, launch=DEFAULT_LAUNCH):
    """The NSA part of the hybrid layer on the model's query heads: ``reference.nsa_attention_on_model_heads``.

    Args:
        q: ``[B, Tq, H, D]`` (any strides), the model's query; k, v: ``[B, Tk, Hkv, D]`` (any strides); gates:
            ``[B, Tq, P, 3]`` on the padded layout (``P`` from ``reference.nsa_head_layout``); rows_on: bool
            ``[B, Tq]`` or None, the query rows that keep their query (the others take the NSA of a zero query, as
            the mixed path's masked query does); keys_on: bool ``[B, Tk]`` or None, the key rows that keep their
            key and value (the others are zero, as the mixed path's masked keys and values).

    Returns:
        ``[B, Tq, H, D]``, equal to ``nsa_attention(pad_heads(q * rows_on), k * keys_on, v * keys_on, gates, ...,
        fold_to=H)`` and with the same gradients; the padded query is written once (no masked copy, no
        concatenation) and its gradient comes back from the three branches in one pass; keys and values are masked
        and pooled in one pass each way. The padded heads past ``2H`` (zero query, zero gates) are not computed.
    """
    heads = q.shape[2]
    padded_heads, _ = _ref.nsa_head_layout(heads, k.shape[2])
    if gates.shape != (*q.shape[:2], padded_heads, 3):
        raise ValueError(f"gates must be [B, Tq, {padded_heads}, 3] on the padded layout of {heads} heads, got "
                         f"{tuple(gates.shape)}")
    return _NSAOnModelHeads.apply(q, k, v, gates.to(q.dtype).contiguous(), rows_on, keys_on, int(block_count),
                                  int(block_size), int(window_size), float(scale), padded_heads, 2 * heads, launch)


# rows per step of the elementwise work on [Tq, H, D] tensors in a pass without gradients (bounded temporaries)
_ROW_STEP = 16384


def _row_spans(num_rows: int, step: int):
    return [(start, min(num_rows, start + step)) for start in range(0, num_rows, step)]


def _zero_rows(q_t: torch.Tensor) -> torch.Tensor:
    """bool ``[B, Tq]``: rows of ``q_t`` ``[B, Tq, H, D]`` that are all zero (computed a few rows at a time)."""
    with torch.no_grad():
        parts = [(q_t[:, a:e] == 0).flatten(2).all(dim=2) for a, e in _row_spans(q_t.shape[1], _ROW_STEP)]
    return torch.cat(parts, dim=1) if parts else q_t.new_zeros(q_t.shape[:2], dtype=torch.bool)


def dense_attention(q, k, v, scale, key_padding_mask=None, zero_rows=None, rows=None):
    """Causal GQA attention, the reference's ``dense_attention`` contract.

    Rows whose query is all zero (the text-masked query at vision rows of the mixed path), or that ``zero_rows``
    (bool ``[B, Tq]``) declares zero whatever ``q`` holds there, get the running mean of the visible values, exactly
    what attention with a zero query returns, with no attention run and no gradient to their query. Without
    gradients the output is built in place, a few rows at a time, so that no temporary of the output's size exists
    beside it.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]``; query row ``r`` at position ``Tk - Tq + r``.
        key_padding_mask: bool ``[B, Tk]`` (True = real token) or None.
        rows: the pass's ``reference.DenseRows`` when already known (``HybridPlan.dense_rows``; ``zero_rows`` is
            then not read); found here otherwise, with one host sync.

    Returns:
        ``[B, Tq, Hq, D]``; rows at padding positions are zero.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dev = q.device
    in_place = not _ref.records_grad(q, k, v)
    q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    pos_all = torch.arange(Tq, device=dev) + (Tk - Tq)
    if rows is None:  # one host sync, before any attention work of this call is queued
        row_real = torch.ones(B, Tq, dtype=torch.bool, device=dev) if key_padding_mask is None else \
            key_padding_mask[:, Tk - Tq:]
        rows = _ref.dense_rows(row_real, _zero_rows(q_t) if zero_rows is None else zero_rows)
    attend, means_needed = rows.attend, rows.means_needed
    n_att, any_means, all_attend = rows.most_attending, rows.any_means, rows.all_attend
    means = running_means(v_t, key_padding_mask, group) if any_means else None
    means_first = any_means and not in_place and n_att < Tq  # the means make the output, attending rows added
    if n_att == Tq:  # some sample attends with every row: run all rows in place of a gather
        out = band_attention(q_t, k_t, v_t, scale, None, None, key_padding_mask)
        if not all_attend:
            out = out.mul_(attend[:, :, None, None]) if in_place else out * attend[:, :, None, None]
    elif means_first:  # zero at the attending rows
        out = means(Tk - Tq, Tk, means_needed)
    else:
        out = torch.zeros(B, Tq, Hq, D, device=dev, dtype=q.dtype)
    if 0 < n_att < Tq:
        # gather the attending rows of every sample, in order, padded with empty rows (position -1)
        order = torch.argsort((~attend).to(torch.int8), dim=1, stable=True)[:, :n_att]  # [B, n]
        took = torch.gather(attend, 1, order)
        positions = torch.where(took, pos_all[order], -1).to(torch.int32)
        q_g = torch.gather(q_t, 1, order[:, :, None, None].expand(B, n_att, Hq, D))
        o_g = band_attention(q_g, k_t, v_t, scale, None, positions, key_padding_mask)
        o_g = o_g * took[:, :, None, None]
        index = order[:, :, None, None].expand(B, n_att, Hq, D)
        # in place also under autograd: `out` is this function's own tensor, which no backward reads
        out = out.scatter_add_(1, index, o_g.to(out.dtype))
    if any_means and not means_first:
        if in_place:
            for a, e in _row_spans(Tq, _ROW_STEP):
                out[:, a:e] += means(Tk - Tq + a, Tk - Tq + e, means_needed[:, a:e])
        else:
            out = out + means(Tk - Tq, Tk, means_needed)
    return out


def nsa_branches(active_heads: int, pass_rows: int, launch=DEFAULT_LAUNCH) -> _ref.NSABranches:
    """The Triton NSA steps for ``reference.nsa_attention_in_chunks``: heads from ``active_heads`` on skipped (see
    :func:`nsa_attention`), the selected-attention schedule chosen for a pass of ``pass_rows`` query rows, each
    chunk's padded query written in one pass."""
    return _ref.NSABranches(
        compress_kv=compress_kv,
        compression_attention=functools.partial(compression_attention, active_heads=active_heads),
        select_blocks=select_blocks,
        selected_attention=functools.partial(selected_attention, rows_per_tile=launch.selected_schedule(pass_rows),
                                             launch=launch),
        window_attention=functools.partial(window_attention, active_heads=active_heads),
        mix_branches=mix_branches,
        pad_query=pad_query,
    )


def hybrid_attention(query, key, value, gate_logits, token_is_vision, attention_mask=None, *, block_size=64,
                     block_count=32, window_size=256, scale=None, return_intermediates=False, query_chunk=None,
                     plan=None, launch=DEFAULT_LAUNCH):
    """``reference.hybrid_attention`` with the Triton NSA and dense attention (same signature and result). Given the
    pass's ``plan`` (``reference.plan_hybrid``), it queues its work without a host sync."""
    head_dim = query.shape[-1]
    sc = head_dim ** -0.5 if scale is None else scale
    if plan is None:  # built here for the dense part's row counts; the reference checks the inputs against it
        plan = _ref.plan_hybrid(token_is_vision, attention_mask, query.shape[2])

    def dense_fn(q, zero_rows):  # zero_rows is plan.dense_zero_rows, whose rows the plan has counted
        return dense_attention(q, key, value, sc, attention_mask, zero_rows, plan.dense_rows)

    # the padded heads 2*Hq.. have constant zero queries and gates: skip them (see nsa_attention)
    active = 2 * query.shape[1]
    nsa_fn = functools.partial(nsa_attention, active_heads=active, launch=launch)
    return _ref.hybrid_attention(query, key, value, gate_logits, token_is_vision, attention_mask,
                                 block_size=block_size, block_count=block_count, window_size=window_size,
                                 scale=sc, return_intermediates=return_intermediates, nsa_fn=nsa_fn,
                                 dense_fn=dense_fn, query_chunk=query_chunk,
                                 nsa_branches=nsa_branches(active, query.shape[2], launch),
                                 nsa_heads_fn=functools.partial(nsa_attention_on_model_heads, launch=launch),
                                 plan=plan)
