"""Pure-PyTorch reference of the VideoNSA hybrid attention.

This module computes, readably and differentiably, the exact attention function the released VideoNSA
checkpoint was trained and evaluated with (``reference-semantics.md`` in the project docs), quirks included:

* token typing from the three M-RoPE rows (a token is text when temporal == height == width);
* the 28 -> 64 head layout: every query head is computed twice, against kv head ``h // 16`` and
  ``(h + 28) // 16``, and the two results are averaged; heads 56-63 are zero;
* compression attends to the query's own block and every *later* block;
* selection ranks blocks with a log-sum-exp read in the wrong layout (``[B, T, P]`` view of a
  ``[B, P, T]`` array) and breaks ties with fla's bitonic sorting network;
* in the mixed path text rows get half of three uniform averages of vision values, and vision rows get a
  causal running mean of all values.

Every function processes queries in chunks so that no ``T x T`` matrix is ever materialised.

Layouts follow fla's NSA ops (batch, time, heads, dim): ``q`` is ``[B, Tq, P, D]`` on the padded head
layout, ``k``/``v`` are ``[B, Tk, Hkv, D]``. Query row ``r`` sits at position ``Tk - Tq + r``: a pass that
continues a KV cache passes only its own queries but the whole key range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Elements of one score tile (query rows x heads x keys) before the query axis is chunked.
_TILE_ELEMENTS = 1 << 24


def records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an operation on ``tensors`` now (grad mode on and one of them requires grad): the
    one rule by which the attention decides to work in place, without keeping what a backward pass needs."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def check_lse_rows(lse: torch.Tensor, batch: int, heads: int, num_q: int, lse_row_offset: int) -> None:
    """Raise ValueError unless the compression log-sum-exp ``lse`` is ``[batch, heads, T]`` with room for ``num_q``
    query rows starting at pass row ``lse_row_offset`` (selection misreads it by pass row)."""
    if lse.dim() != 3 or lse.shape[:2] != (batch, heads) or not 0 <= lse_row_offset <= lse.shape[2] - num_q:
        raise ValueError(f"lse must be [{batch}, {heads}, T] with T >= lse_row_offset + Tq = {lse_row_offset + num_q}; "
                         f"got {tuple(lse.shape)}")


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): top-k slots, padded group widths, tile sizes."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# ----------------------------------------------------------------------------------------------------------
# Token typing and head layout
# ----------------------------------------------------------------------------------------------------------
def token_is_vision(position_ids: torch.Tensor) -> torch.Tensor:
    """Vision mask from multimodal RoPE position ids.

    Args:
        position_ids: ``[3, B, T]`` integer (temporal, height, width) ids, as Qwen2.5-VL builds them.

    Returns:
        ``[B, T]`` bool, True for vision. A token is text iff its three ids are equal, so a vision token whose
        coordinates coincide (the first token of every video, for instance) is typed text: the released
        weights were trained with exactly this rule.
    """
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(
            f"position_ids must be [3, batch, seq_len] multimodal RoPE ids, got shape {tuple(position_ids.shape)}"
        )
    temporal, height, width = position_ids.unbind(0)
    return ~((temporal == height) & (temporal == width))


def nsa_head_layout(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """Padded NSA head count ``P`` and group width ``G`` (query heads per kv head) of the reference layout.

    The authors' code lays the query heads out twice and pads to a group width that its Triton kernels
    accept (a power of two >= 16). For Qwen2.5-VL-7B (28 heads, 4 kv heads) this is ``(64, 16)``; other
    layouts follow the same rule.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    group = max(16, next_pow2(-(-2 * num_heads // num_kv_heads)))
    return group * num_kv_heads, group


def pad_heads(x: torch.Tensor, num_padded: int) -> torch.Tensor:
    """``[..., H, *rest]`` (head axis 2) -> ``[..., P, *rest]``: heads ``0..H-1``, the same again, then zeros."""
    num_heads = x.shape[2]
    zeros = x.new_zeros(*x.shape[:2], num_padded - 2 * num_heads, *x.shape[3:])
    return torch.cat([x, x, zeros], dim=2)


class _FoldHeads(torch.autograd.Function):
    """``(x[:, :, :H] + x[:, :, H:2H]) * 0.5`` with a backward that writes the padded gradient once (autograd's
    own zero-fills and copies a tensor of the padded size for each of the two slices, then adds them)."""

    @staticmethod
    def forward(ctx, x, num_heads):
        ctx.padded_shape = x.shape
        ctx.num_heads = num_heads
        return (x[:, :, :num_heads] + x[:, :, num_heads : 2 * num_heads]) * 0.5

    @staticmethod
    def backward(ctx, grad):
        heads = ctx.num_heads
        grad_x = grad.new_empty(ctx.padded_shape)
        torch.mul(grad, 0.5, out=grad_x[:, :, :heads])
        grad_x[:, :, heads : 2 * heads] = grad_x[:, :, :heads]
        grad_x[:, :, 2 * heads :] = 0
        return grad_x, None


def pad_query(q: torch.Tensor, num_padded: int, rows_on: torch.Tensor | None = None) -> torch.Tensor:
    """The NSA query on the padded layout: :func:`pad_heads` of ``q`` ``[B, T, H, D]`` with the rows whose
    ``rows_on`` flag (bool ``[B, T]``) is off zeroed (the mixed path's text rows)."""
    return pad_heads(q if rows_on is None else q * rows_on[:, :, None, None], num_padded)


def fold_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`pad_heads` for outputs: the average of the two copies of every head. ``x``
    ``[B, T, P, *rest]`` -> ``[B, T, num_heads, *rest]``."""
    return _FoldHeads.apply(x, num_heads)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32 for accumulation; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[B, T, Hkv, D]`` -> ``[B, T, Hkv * group, D]``: padded head ``j`` reads kv head ``j // group``."""
    return x.repeat_interleave(group, dim=2)


def _query_chunks(num_queries: int, heads: int, keys: int):
    """Yield ``(start, stop)`` query ranges whose score tile stays within ``_TILE_ELEMENTS``."""
    step = max(1, _TILE_ELEMENTS // max(1, heads * keys))
    for start in range(0, num_queries, step):
        yield start, min(num_queries, start + step)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float):
    """Softmax attention with an explicit visibility mask.

    Args:
        q: ``[B, Tc, P, D]``; k, v: ``[B, N, P, D]``; visible: bool, broadcastable to ``[B, Tc, P, N]``.

    Returns:
        output ``[B, Tc, P, D]`` and natural-log log-sum-exp ``[B, Tc, P]`` (float32 or wider). Every row of the NSA
        branches has at least one visible key, so no row is empty.
    """
    scores = torch.einsum("bqhd,bkhd->bqhk", _upcast(q), _upcast(k)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bqhk,bkhd->bqhd", probs, _upcast(v))
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------------------------------------
# The three NSA branches
# ----------------------------------------------------------------------------------------------------------
def compress_kv(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean-pool ``[B, T, Hkv, D]`` over consecutive blocks -> ``[B, ceil(T / block_size), Hkv, D]``.

    A final partial block is divided by the number of tokens it holds. Zeroed text tokens are counted (they
    are zeros, not removed).
    """
    batch, length, heads, dim = x.shape
    num_blocks = -(-length // block_size)
    padded = F.pad(_upcast(x), (0, 0, 0, 0, 0, num_blocks * block_size - length))
    sums = padded.view(batch, num_blocks, block_size, heads, dim).sum(dim=2)
    counts = torch.full((num_blocks,), float(block_size), device=x.device, dtype=padded.dtype)
    counts[-1] = length - (num_blocks - 1) * block_size
    return (sums / counts[None, :, None, None]).to(x.dtype)


def compression_attention(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_size: int, scale: float, num_keys: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the compressed blocks ``c >= t // block_size`` (own and later blocks).

    Args:
        q: ``[B, Tq, P, D]``, rows at positions ``num_keys - Tq ...``.
        k_cmp, v_cmp: ``[B, NB, Hkv, D]`` from :func:`compress_kv`.
        num_keys: length ``Tk`` of the key range the blocks were pooled from.

    Returns:
        ``o_cmp`` ``[B, Tq, P, D]`` and ``lse`` ``[B, P, Tq]`` float32, contiguous (the layout the selection
        step misreads).
    """
    num_q, heads = q.shape[1], q.shape[2]
    group = heads // k_cmp.shape[2]
    k_exp, v_exp = _expand_kv(k_cmp, group), _expand_kv(v_cmp, group)
    blocks = torch.arange(k_cmp.shape[1], device=q.device)
    outs, lses = [], []
    for start, stop in _query_chunks(num_q, heads, k_cmp.shape[1]):
        pos = torch.arange(start, stop, device=q.device) + (num_keys - num_q)
        visible = (blocks[None, :] >= (pos // block_size)[:, None])[None, :, None, :]
        out, lse = _masked_attention(q[:, start:stop], k_exp, v_exp, visible, scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1).transpose(1, 2).contiguous()


def _compare_and_swap(vals, ids, distance: int, flip: torch.Tensor):
    """One layer of a bitonic network over the last axis (length 64).

    Pairs are ``distance`` apart. A pair is swapped iff ``(left > right) != flip``; so where ``flip`` is set
    (descending order) EQUAL values are swapped too. This asymmetry decides ties and is reproduced exactly.
    """
    rows, width = vals.shape
    shape = (rows, width // (2 * distance), 2, distance)
    v, i = vals.view(shape), ids.view(shape)
    left, right = v[:, :, 0], v[:, :, 1]
    swap = (left > right) != flip.view(1, width // (2 * distance), distance)
    new_v = torch.stack([torch.where(swap, right, left), torch.where(swap, left, right)], dim=2)
    new_i = torch.stack([torch.where(swap, i[:, :, 1], i[:, :, 0]), torch.where(swap, i[:, :, 0], i[:, :, 1])], 2)
    return new_v.view(rows, width), new_i.view(rows, width)


def _bitonic_merge(vals, ids, stage: int, descending):
    """Bitonic merge of runs of ``2**stage`` elements.

    ``descending`` is a bool for the whole row, or None for alternating runs (run ``r`` sorted descending
    iff ``r`` is odd), as in the sorting phase of fla's network.
    """
    width = vals.shape[1]
    pos = torch.arange(width, device=vals.device)
    for step in range(stage):
        distance = 1 << (stage - 1 - step)
        left_pos = pos.view(width // (2 * distance), 2, distance)[:, 0]
        if descending is None:
            flip = ((left_pos >> stage) & 1).bool()
        else:
            flip = torch.full_like(left_pos, bool(descending), dtype=torch.bool)
        vals, ids = _compare_and_swap(vals, ids, distance, flip)
    return vals, ids


def _sort_chunk(vals, ids, descending: bool):
    """Sort rows of 64 with fla's network: alternating stages 1..5, then a final stage in one direction."""
    stages = int(math.log2(vals.shape[1]))
    for stage in range(1, stages):
        vals, ids = _bitonic_merge(vals, ids, stage, None)
    return _bitonic_merge(vals, ids, stages, descending)


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    block_count: int,
    block_size: int,
    scale: float,
    num_keys: int,
    lse_row_offset: int = 0,
) -> torch.Tensor:
    """Top-k block selection, as fla's ``parallel_nsa_topk`` computes it for the released model.

    For query position ``t`` (current block ``n = t // block_size``) and kv head ``g``, block ``c < n`` scores
    ``sum_{j in group g} exp(scale * q_j . k_cmp[c] - lse_read[t, j])`` and block ``n`` scores exactly 1 per
    head. ``lse_read`` is ``lse`` (``[B, P, Tq]``) read as if laid out ``[B, Tq, P]`` (the authors' kernel reads
    element ``P * t + j`` of the flat array). Blocks are ranked with fla's bitonic network (chunks of
    ``block_size`` candidates in index order, each merged with the running best half), which decides exact ties.

    Args:
        q: ``[B, Tq, P, D]``; k_cmp: ``[B, NB, Hkv, D]``; lse: ``[B, P, T]`` float32 for every query row of the
            pass (``T = Tq`` unless ``q`` holds a chunk of the pass's rows, starting at row ``lse_row_offset``:
            the misread indexes pass rows).

    Returns:
        int32 ``[B, Tq, Hkv, S]``, ``S = next_power_of_2(block_count)``: block numbers by descending score, -1
        in unused trailing slots.
    """
    batch, num_q, heads, dim = q.shape
    kv_heads, num_blocks = k_cmp.shape[2], k_cmp.shape[1]
    group = heads // kv_heads
    slots = next_pow2(block_count)
    # fla's kernel walks the candidates in chunks of `block_size` blocks and keeps the best half of each chunk
    chunk_width = block_size
    if slots > chunk_width:
        raise ValueError(
            f"next_power_of_2(block_count) must be <= block_size (the top-k network's chunk); got block_count "
            f"{block_count}, block_size {block_size}"
        )
    check_lse_rows(lse, batch, heads, num_q, lse_row_offset)
    lse_read = lse.reshape(batch, -1).view(batch, lse.shape[2], heads)[:, lse_row_offset : lse_row_offset + num_q]
    result = torch.empty(batch, num_q, kv_heads, slots, dtype=torch.int32, device=q.device)
    q_scaled = (_upcast(q) * scale).view(batch, num_q, kv_heads, group, dim)
    k_float = _upcast(k_cmp)
    keep_previous = torch.arange(chunk_width, device=q.device) < chunk_width // 2
    for start, stop in _query_chunks(num_q, heads, num_blocks):
        rows = stop - start
        current = (torch.arange(start, stop, device=q.device) + (num_keys - num_q)) // block_size  # [rows]
        num_chunks = int(current.max()) // chunk_width + 1
        padded_blocks = num_chunks * chunk_width
        # importance [B, rows, Hkv, padded_blocks]
        logits = torch.einsum("bqgjd,bcgd->bqgjc", q_scaled[:, start:stop], k_float)
        logits = logits - lse_read[:, start:stop].view(batch, rows, kv_heads, group, 1)
        blocks = torch.arange(num_blocks, device=q.device)
        earlier = (blocks[None, :] < current[:, None])[None, :, None, None, :]
        # Exactly tied scores (zero queries, all-text blocks) must stay exactly tied: ATen evaluates exp and
        # reductions differently in vector lanes and in a loop's scalar tail, which can split a tie by an ulp.
        # So exp in float64, the group summed head by head (lane-independent adds), then rounded to float32.
        probs = torch.where(earlier, torch.exp(logits.double()), torch.zeros((), device=q.device, dtype=torch.float64))
        probs = torch.where((blocks[None, :] == current[:, None])[None, :, None, None, :], 1.0, probs)
        importance = probs[:, :, :, 0]
        for head in range(1, group):
            importance = importance + probs[:, :, :, head]
        importance = F.pad(importance.float(), (0, padded_blocks - num_blocks))
        block_ids = torch.arange(padded_blocks, device=q.device)
        ids = torch.where(block_ids[None, :] <= current[:, None], block_ids[None, :] + 1, 0).to(torch.int32)
        ids = ids[None, :, None, :].expand(batch, rows, kv_heads, padded_blocks)

        flat = batch * rows * kv_heads
        importance = importance.reshape(flat, padded_blocks)
        ids = ids.reshape(flat, padded_blocks)
        active_until = current[None, :, None].expand(batch, rows, kv_heads).reshape(flat)
        best_vals, best_ids = _sort_chunk(importance[:, :chunk_width], ids[:, :chunk_width], descending=True)
        for chunk in range(1, num_chunks):
            lo = chunk * chunk_width
            vals, cids = _sort_chunk(importance[:, lo : lo + chunk_width], ids[:, lo : lo + chunk_width], False)
            # previous best 32 (descending) followed by this chunk's best 32 (ascending) is bitonic
            vals = torch.where(keep_previous, best_vals, vals)
            cids = torch.where(keep_previous, best_ids, cids)
            vals, cids = _bitonic_merge(vals, cids, int(math.log2(chunk_width)), True)
            active = (active_until >= lo)[:, None]
            best_vals = torch.where(active, vals, best_vals)
            best_ids = torch.where(active, cids, best_ids)
        result[:, start:stop] = (best_ids[:, :slots] - 1).view(batch, rows, kv_heads, slots)
    return result


def selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, block_size: int, scale: float
) -> torch.Tensor:
    """Attention of every query over the tokens of its selected blocks that are at or before it.

    Args:
        q: ``[B, Tq, P, D]``; k, v: ``[B, Tk, Hkv, D]``; block_indices: int ``[B, Tq, Hkv, S]`` (-1 = empty).

    Returns:
        ``[B, Tq, P, D]``.
    """
    batch, num_q, heads, _ = q.shape
    num_keys, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    num_blocks = -(-num_keys // block_size)
    k_exp, v_exp = _expand_kv(k, group), _expand_kv(v, group)
    key_pos = torch.arange(num_keys, device=q.device)
    outs = []
    for start, stop in _query_chunks(num_q, heads, num_keys):
        idx = block_indices[:, start:stop].long()
        chosen = torch.zeros(batch, stop - start, kv_heads, num_blocks + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, torch.where(idx < 0, num_blocks, idx), True)  # empty slots land in a spare column
        token_chosen = chosen[..., key_pos // block_size].repeat_interleave(group, dim=2)
        pos = torch.arange(start, stop, device=q.device) + (num_keys - num_q)
        causal = (key_pos[None, :] <= pos[:, None])[None, :, None, :]
        outs.append(_masked_attention(q[:, start:stop], k_exp, v_exp, token_chosen & causal, scale)[0])
    return torch.cat(outs, dim=1)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int, scale: float):
    """Causal sliding-window attention: query ``t`` sees keys ``t - window_size + 1 ... t``.

    Args:
        q: ``[B, Tq, P, D]``; k, v: ``[B, Tk, Hkv, D]``. Returns ``[B, Tq, P, D]``.
    """
    num_q, heads = q.shape[1], q.shape[2]
    num_keys = k.shape[1]
    group = heads // k.shape[2]
    outs = []
    step = max(1, min(window_size, _TILE_ELEMENTS // (heads * 2 * window_size)))  # a chunk sees <= 2W keys
    for start in range(0, num_q, step):
        stop = min(num_q, start + step)
        pos = torch.arange(start, stop, device=q.device) + (num_keys - num_q)
        first = max(0, int(pos[0]) - window_size + 1)
        last = int(pos[-1]) + 1
        key_pos = torch.arange(first, last, device=q.device)
        visible = ((key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - window_size))[
            None, :, None, :
        ]
        k_win = _expand_kv(k[:, first:last], group)
        v_win = _expand_kv(v[:, first:last], group)
        outs.append(_masked_attention(q[:, start:stop], k_win, v_win, visible, scale)[0])
    return torch.cat(outs, dim=1)


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    *,
    block_count: int,
    block_size: int,
    window_size: int,
    scale: float,
    return_intermediates: bool = False,
    fold_to: int | None = None,
):
    """The three NSA branches mixed by gates (the authors' ``nsa_func``).

    Args:
        q: ``[B, Tq, P, D]`` on the padded head layout; k, v: ``[B, Tk, Hkv, D]``;
        gates: ``[B, Tq, P, 3]`` sigmoid gates ordered (compression, selection, window).
        fold_to: return :func:`fold_heads` of the result to this many heads (the model's own).

    Returns:
        ``[B, Tq, P, D]`` (``[B, Tq, fold_to, D]``); with ``return_intermediates`` also a dict of ``k_cmp``,
        ``v_cmp``, ``lse_cmp``, ``block_indices``, ``o_cmp``, ``o_slc``, ``o_swd``.
    """
    num_keys = k.shape[1]
    k_cmp, v_cmp = compress_kv(k, block_size), compress_kv(v, block_size)
    o_cmp, lse = compression_attention(q, k_cmp, v_cmp, block_size, scale, num_keys)
    with torch.no_grad():  # block choice is discrete: no gradient flows through it, as in the authors' kernels
        block_indices = select_blocks(q, k_cmp, lse, block_count, block_size, scale, num_keys)
    o_slc = selected_attention(q, k, v, block_indices, block_size, scale)
    o_swd = window_attention(q, k, v, window_size, scale)
    out = mix_branches(o_cmp, o_slc, o_swd, gates, fold_to)
    if not return_intermediates:
        return out
    return out, dict(
        k_cmp=k_cmp, v_cmp=v_cmp, lse_cmp=lse, block_indices=block_indices, o_cmp=o_cmp, o_slc=o_slc, o_swd=o_swd
    )


def nsa_attention_on_model_heads(q, k, v, gates, *, block_count, block_size, window_size, scale, rows_on=None,
                                 keys_on=None):
    """The NSA part of the hybrid layer on the model's query heads (reference-semantics section 4).

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, Hkv, D]``; gates: ``[B, Tq, P, 3]`` on the padded layout
            (:func:`nsa_head_layout`); rows_on: bool ``[B, Tq]`` or None: the rows whose flag is off get a zero
            query (the mixed path's text rows); keys_on: bool ``[B, Tk]`` or None: the key rows whose flag is off
            get a zero key and value (the mixed path's text keys).

    Returns:
        ``[B, Tq, H, D]``: :func:`nsa_attention` of ``pad_heads(q)`` (masked by ``rows_on``) over ``k``, ``v``
        (masked by ``keys_on``) with ``fold_to=H``.
    """
    padded_heads, _ = nsa_head_layout(q.shape[2], k.shape[2])
    if keys_on is not None:
        k, v = k * keys_on[:, :, None, None], v * keys_on[:, :, None, None]
    return nsa_attention(pad_query(q, padded_heads, rows_on), k, v, gates, block_count=block_count,
                         block_size=block_size, window_size=window_size, scale=scale, fold_to=q.shape[2])


def mix_branches(o_cmp, o_slc, o_swd, gates, fold_to=None):
    """``[..., P, D]`` branch outputs and ``[..., P, 3]`` gates (cmp, slc, swa) -> ``[..., P, D]``, or its
    :func:`fold_heads` ``[..., fold_to, D]``."""
    out = o_cmp * gates[..., 0:1] + o_slc * gates[..., 1:2] + o_swd * gates[..., 2:3]
    return out if fold_to is None else fold_heads(out, fold_to)


@dataclass(frozen=True)
class NSABranches:
    """The NSA steps of one backend, with this module's signatures: what :func:`nsa_attention_in_chunks` runs.
    Backends bind their own options (active heads, schedules) into these callables."""

    compress_kv: Callable
    compression_attention: Callable
    select_blocks: Callable
    selected_attention: Callable
    window_attention: Callable
    mix_branches: Callable
    pad_query: Callable = pad_query


def nsa_attention_in_chunks(
    query_rows: Callable[[int, int], torch.Tensor],
    gate_rows: Callable[[int, int], torch.Tensor],
    num_rows: int,
    k: torch.Tensor,
    v: torch.Tensor,
    emit: Callable[[int, int, torch.Tensor], None],
    *,
    chunk_rows: int,
    block_count: int,
    block_size: int,
    window_size: int,
    scale: float,
    branches: NSABranches | None = None,
    fold_to: int | None = None,
) -> None:
    """:func:`nsa_attention` of a query that is built and consumed ``chunk_rows`` rows at a time (no gradients).

    Every step treats query rows independently given the pass-wide compressed keys and compression log-sum-exp,
    so the values are :func:`nsa_attention`'s while the working memory is that of one chunk. Two passes: the
    log-sum-exp of every row first (selection reads it at other rows' positions: the misread), then each chunk's
    three branches (its compression attention computed again).

    Args:
        query_rows: ``(start, stop) -> [B, stop - start, P, D]``, rows of the padded-layout query; row ``r`` is
            at position ``Tk - num_rows + r``.
        gate_rows: ``(start, stop) -> [B, stop - start, P, 3]``, their gates.
        k, v: ``[B, Tk, Hkv, D]``.
        emit: ``emit(start, stop, out)`` receives each chunk's output ``[B, stop - start, P, D]``
            (``[B, stop - start, fold_to, D]``: :func:`fold_heads` of it, when ``fold_to`` is given).
        chunk_rows: rows per chunk, rounded up to a multiple of 64 (chunks then start where the kernels' row
            tiles do, so any chunking gives the same bits).
        branches: the backend's steps (this module's by default).
    """
    ops = REFERENCE_BRANCHES if branches is None else branches
    chunk_rows = -(-max(1, int(chunk_rows)) // 64) * 64
    num_keys = k.shape[1]
    offset = num_keys - num_rows
    k_cmp, v_cmp = ops.compress_kv(k, block_size), ops.compress_kv(v, block_size)
    spans = [(start, min(num_rows, start + chunk_rows)) for start in range(0, num_rows, chunk_rows)]
    saved_cmp = None
    if len(spans) == 1:  # one chunk: its compression output is kept from the first pass
        saved_cmp, lse = ops.compression_attention(query_rows(0, num_rows), k_cmp, v_cmp, block_size, scale, num_keys)
    else:
        lse = None
        for start, stop in spans:
            _, lse_rows = ops.compression_attention(query_rows(start, stop), k_cmp, v_cmp, block_size, scale,
                                                    offset + stop)
            if lse is None:
                lse = lse_rows.new_empty(*lse_rows.shape[:2], num_rows)
            lse[:, :, start:stop] = lse_rows
            del lse_rows
    for start, stop in spans:
        q_rows = query_rows(start, stop)
        keys = offset + stop  # the keys at or before the chunk's last row: all that selection and window read
        if saved_cmp is None:
            o_cmp, _ = ops.compression_attention(q_rows, k_cmp, v_cmp, block_size, scale, keys)
        else:
            o_cmp, saved_cmp = saved_cmp, None
        block_indices = ops.select_blocks(q_rows, k_cmp, lse, block_count, block_size, scale, keys, start)
        o_slc = ops.selected_attention(q_rows, k[:, :keys], v[:, :keys], block_indices, block_size, scale)
        del block_indices
        o_swd = ops.window_attention(q_rows, k[:, :keys], v[:, :keys], window_size, scale)
        out = ops.mix_branches(o_cmp, o_slc, o_swd, gate_rows(start, stop), fold_to)
        del o_cmp, o_slc, o_swd, q_rows
        emit(start, stop, out)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal GQA attention (query head ``h`` reads kv head ``h // (Hq / Hkv)``), Qwen2.5-VL's text attention.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]``, query row ``r`` at position ``Tk - Tq + r``;
        key_padding_mask: bool ``[B, Tk]``, True for real tokens.

    Returns:
        ``[B, Tq, Hq, D]``. Rows of padding positions are zero.
    """
    num_q, num_keys = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    k_exp, v_exp = _expand_kv(k_t, group), _expand_kv(v_t, group)
    key_pos = torch.arange(num_keys, device=q.device)
    if key_padding_mask is None:
        key_padding_mask = torch.ones(q.shape[0], num_keys, dtype=torch.bool, device=q.device)
    outs = []
    for start, stop in _query_chunks(num_q, q.shape[1], num_keys):
        pos = torch.arange(start, stop, device=q.device) + (num_keys - num_q)
        visible = (key_pos[None, :] <= pos[:, None])[None] & key_padding_mask[:, None, :]
        # a padding query may see no key at all; let it see its causal prefix and zero it below
        query_is_padding = ~key_padding_mask[:, pos]
        visible = visible | (query_is_padding[..., None] & (key_pos[None, :] <= pos[:, None])[None])
        out, _ = _masked_attention(q_t[:, start:stop], k_exp, v_exp, visible[:, :, None, :], scale)
        outs.append(out * ~query_is_padding[..., None, None])
    return torch.cat(outs, dim=1)


REFERENCE_BRANCHES = NSABranches(compress_kv, compression_attention, select_blocks, selected_attention,
                                 window_attention, mix_branches)


def mask_mixed_inputs(q, k, v, gate_logits, query_vision: torch.Tensor, key_vision: torch.Tensor):
    """The mixed path's NSA inputs: queries, gate logits, keys and values of text positions are zeroed.

    Args:
        q: ``[1, Tq, H, D]``; k, v: ``[1, Tk, Hkv, D]`` (``v`` may be None); gate_logits: ``[1, Tq, H, 3]``;
        query_vision: bool ``[Tq]``; key_vision: bool ``[Tk]``.

    Returns:
        ``(q, k, v, gate_logits)`` masked (``v`` None when given None).
    """
    masked_v = None if v is None else _vision_rows(v, key_vision)
    return _vision_rows(q, query_vision), _vision_rows(k, key_vision), masked_v, _vision_rows(gate_logits, query_vision)


def _vision_rows(x: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """``x`` ``[1, T, H, *]`` with the rows of text positions (``vision`` bool ``[T]`` False) zeroed."""
    return x * vision[None, :, None, None]


def _add_nsa_in_chunks(target, rows, q, k, v, gate_logits, vision, mixed, padded_heads, chunk_rows, branches,
                       nsa_kwargs) -> None:
    """One sample's NSA part, built and folded chunk by chunk and added into ``target`` ``[Tq, Hq, D]`` at
    ``rows`` (a slice or index tensor of the sample's real rows); inputs as in :func:`hybrid_attention`'s loop:
    q ``[1, m, Hq, D]``, k/v ``[1, n, Hkv, D]``, gate_logits ``[1, m, Hq, 3]``, vision ``[n]``."""
    num_heads, num_rows = q.shape[2], q.shape[1]
    query_vision = vision[-num_rows:]
    if mixed:
        k, v = _vision_rows(k, vision), _vision_rows(v, vision)

    def masked(x, start, stop):
        return _vision_rows(x[:, start:stop], query_vision[start:stop]) if mixed else x[:, start:stop]

    def emit(start, stop, folded):
        folded = folded[0].to(target.dtype)
        if isinstance(rows, slice):
            target[start:stop].add_(folded)
        else:
            target.index_add_(0, rows[start:stop], folded)

    pad = (REFERENCE_BRANCHES if branches is None else branches).pad_query

    def query_rows(start, stop):
        return pad(q[:, start:stop], padded_heads, query_vision[None, start:stop] if mixed else None)

    nsa_attention_in_chunks(
        query_rows,
        lambda start, stop: pad_heads(torch.sigmoid(masked(gate_logits, start, stop)), padded_heads),
        num_rows, k, v, emit, chunk_rows=chunk_rows, branches=branches, fold_to=num_heads, **nsa_kwargs)


@dataclass(frozen=True)
class DenseRows:
    """The dense part's query rows in a pass: ``attend`` (bool ``[B, Tq]``) run attention, ``means_needed`` (bool
    ``[B, Tq]``) are real rows with a zero query, whose output is the running mean of the visible values; the host
    flags size the work: ``most_attending`` (the most attending rows of one sample), ``any_means``, ``all_attend``."""

    attend: torch.Tensor
    means_needed: torch.Tensor
    most_attending: int
    any_means: bool
    all_attend: bool


def _dense_rows_on_device(row_real: torch.Tensor, zero_rows: torch.Tensor):
    """``(attend, means_needed, facts)``: the :class:`DenseRows` masks and its host flags as one device tensor (None
    for an empty pass), which the caller reads with its other host values in one sync."""
    attend = row_real & ~zero_rows
    means_needed = row_real & zero_rows
    if not attend.numel():
        return attend, means_needed, None
    facts = torch.stack([attend.sum(dim=1).max(), means_needed.any().long(), attend.all().long()])
    return attend, means_needed, facts


def _dense_rows(attend, means_needed, facts: list[int] | None) -> DenseRows:
    most, any_means, all_attend = facts if facts is not None else (0, 0, 1)
    return DenseRows(attend, means_needed, int(most), bool(any_means), bool(all_attend))


def dense_rows(row_real: torch.Tensor, zero_rows: torch.Tensor) -> DenseRows:
    """The :class:`DenseRows` of a pass whose real query rows are ``row_real`` and zero-query rows ``zero_rows``
    (bool ``[B, Tq]`` each); one host sync."""
    attend, means_needed, facts = _dense_rows_on_device(row_real, zero_rows)
    return _dense_rows(attend, means_needed, None if facts is None else facts.tolist())


@dataclass(frozen=True)
class HybridPlan:
    """What a pass's hybrid attention decides from its token types alone, the same in every layer.

    Built once per pass by :func:`plan_hybrid`, where the host reads the GPU's answers in one sync; a layer given
    the plan queues all its work without waiting on the GPU (each layer would otherwise read them again).

    Attributes:
        num_keys, num_queries: the pass's key positions (cache included) and query rows.
        padded: whether an attention mask was given (each sample then runs on its real tokens, compacted).
        dense_zero_rows: bool ``[B, Tq]``, the rows whose query the dense part zeroes (vision rows of mixed samples).
        nsa_only: bool ``[B]``, samples whose every real token is vision (no dense part).
        nsa_samples, mixed_samples: per sample, whether it runs the NSA part, and whether on the mixed path.
        sample_keys, sample_rows: per sample, the indices of its real keys and query rows when ``padded`` and it
            runs the NSA part, else None.
        dense_rows: the dense part's :class:`DenseRows`.
    """

    num_keys: int
    num_queries: int
    padded: bool
    dense_zero_rows: torch.Tensor
    nsa_only: torch.Tensor
    nsa_samples: tuple[bool, ...]
    mixed_samples: tuple[bool, ...]
    sample_keys: tuple[torch.Tensor | None, ...]
    sample_rows: tuple[torch.Tensor | None, ...]
    dense_rows: DenseRows

    def check(self, token_is_vision: torch.Tensor, attention_mask: torch.Tensor | None, num_queries: int) -> None:
        """Raise ValueError unless this plan was built for a pass of these sizes (and padding or none)."""
        got = (token_is_vision.shape[0], token_is_vision.shape[1], num_queries, attention_mask is not None)
        want = (len(self.nsa_samples), self.num_keys, self.num_queries, self.padded)
        if got != want:
            raise ValueError(
                f"the HybridPlan was built for (batch, keys, queries, padded) = {want} but this call has {got}; "
                "build it with plan_hybrid(token_is_vision, attention_mask, num_queries) of this pass")


def plan_hybrid(token_is_vision: torch.Tensor, attention_mask: torch.Tensor | None, num_queries: int) -> HybridPlan:
    """The :class:`HybridPlan` of a pass: ``token_is_vision`` and ``attention_mask`` as :func:`hybrid_attention`
    takes them (bool ``[B, Tk]``, the mask None when nothing is padded), ``num_queries`` the pass's query rows (the
    last ones of the ``Tk`` positions). One host sync (plus one per padded NSA sample)."""
    if token_is_vision.dtype != torch.bool or token_is_vision.dim() != 2:
        raise ValueError(f"token_is_vision must be a bool tensor [batch, positions]; got {token_is_vision.dtype} "
                         f"{tuple(token_is_vision.shape)}")
    if attention_mask is not None and (attention_mask.dtype != torch.bool or
                                       attention_mask.shape != token_is_vision.shape):
        raise ValueError(f"attention_mask must be None or a bool tensor shaped like token_is_vision "
                         f"{tuple(token_is_vision.shape)}; got {attention_mask.dtype} {tuple(attention_mask.shape)}")
    batch, num_keys = token_is_vision.shape
    if not 0 <= num_queries <= num_keys:
        raise ValueError(f"num_queries must be between 0 and the {num_keys} key positions, got {num_queries}")
    padded = attention_mask is not None
    real = attention_mask if padded else torch.ones_like(token_is_vision)
    query_valid = real[:, num_keys - num_queries :]
    query_vision = token_is_vision[:, num_keys - num_queries :] & query_valid
    uses_nsa = query_vision.any(dim=1)
    all_vision = (token_is_vision | ~real).all(dim=1)
    mixed = uses_nsa & ~all_vision
    zero_rows = mixed[:, None] & query_vision
    attend, means_needed, facts = _dense_rows_on_device(query_valid, zero_rows)
    host = torch.cat([uses_nsa.long(), mixed.long()] + ([] if facts is None else [facts])).tolist()
    nsa_samples = tuple(bool(x) for x in host[:batch])
    mixed_samples = tuple(bool(x) for x in host[batch : 2 * batch])
    keys, rows = [None] * batch, [None] * batch
    for b in range(batch):
        if padded and nsa_samples[b]:
            keys[b] = torch.nonzero(attention_mask[b]).flatten()
            rows[b] = torch.nonzero(query_valid[b]).flatten()
    return HybridPlan(num_keys, num_queries, padded, zero_rows, uses_nsa & all_vision, nsa_samples,
                      mixed_samples, tuple(keys), tuple(rows),
                      _dense_rows(attend, means_needed, host[2 * batch :] if facts is not None else None))


def hybrid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gate_logits: torch.Tensor,
    token_is_vision: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    block_size: int = 64,
    block_count: int = 32,
    window_size: int = 256,
    scale: float | None = None,
    return_intermediates: bool = False,
    nsa_fn=None,
    dense_fn=None,
    query_chunk: int | None = None,
    nsa_branches: NSABranches | None = None,
    nsa_heads_fn=None,
    plan: HybridPlan | None = None,
):
    """The VideoNSA attention of one text decoder layer (reference-semantics sections 2-5).

    Each sample is computed on its own real tokens (``attention_mask``), compacted in order, so padding does
    not shift NSA blocks, and chooses its own path: no vision token among its queries -> dense attention;
    every token vision -> NSA on the padded head layout; otherwise the mixed path (NSA on vision-masked
    q/k/v with vision-masked gate logits, plus dense attention of the text-masked queries over all keys).

    Args:
        query: ``[B, Hq, Tq, D]`` after RoPE; key, value: ``[B, Hkv, Tk, D]`` (the cache included), query row
            ``r`` at position ``Tk - Tq + r``.
        gate_logits: ``[B, Tq, Hq, 3]`` = ``g_proj_2(gelu(g_proj_1(x))) / temperature``, (cmp, slc, swa).
        token_is_vision: bool ``[B, Tk]`` for every key position.
        attention_mask: bool ``[B, Tk]``, True for real tokens; None when nothing is padded.
        nsa_fn: the NSA implementation (:func:`nsa_attention` signature, ``fold_to`` included); defaults to this
            module's.
        dense_fn: ``dense_fn(q [B, Hq, Tq, D], zero_rows bool [B, Tq]) -> [B, Tq, Hq, D]``, causal GQA attention
            over ``key``/``value`` honouring the padding, of the query with the ``zero_rows`` rows zeroed (the
            vision rows of mixed samples: no masked copy of the query is made here); defaults to
            :func:`dense_attention` of the masked query.
        query_chunk: when set and nothing needs gradients, the NSA part runs over chunks of this many query rows
            (:func:`nsa_attention_in_chunks` with ``nsa_branches``), each chunk's output added in place: the padded
            64-head query, gates and branch outputs exist for one chunk at a time. Same values.
        nsa_branches: the backend's NSA steps for the chunked NSA part (this module's by default).
        nsa_heads_fn: when given, computes the NSA part of a pass without intermediates in place of ``nsa_fn``, on
            the model's heads: :func:`nsa_attention_on_model_heads` signature (the unmasked query, keys and values,
            and the mixed path's vision rows as ``rows_on`` and ``keys_on``), so that a backend lays out the padded
            query and the masked keys (and folds their gradients) its own way.
        plan: the pass's :class:`HybridPlan` (:func:`plan_hybrid` of ``token_is_vision``, ``attention_mask`` and
            ``Tq``), which every layer of a pass can share; built here when None (one host sync).

    Returns:
        ``[B, Tq, Hq, D]`` (the input of ``o_proj``); with ``return_intermediates``, also a list with one dict
        per sample (``None`` for dense-path samples) holding ``gates64``, the NSA intermediates and, for the
        mixed path, ``dense_output``.
    """
    _check_hybrid_inputs(query, key, value, gate_logits, token_is_vision, attention_mask)
    batch, num_heads, num_q, head_dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    padded_heads, _ = nsa_head_layout(num_heads, kv_heads)
    nsa_fn = nsa_attention if nsa_fn is None else nsa_fn
    if plan is None:
        plan = plan_hybrid(token_is_vision, attention_mask, num_q)
    else:
        plan.check(token_is_vision, attention_mask, num_q)
    padded, nsa_samples, mixed_samples = plan.padded, plan.nsa_samples, plan.mixed_samples
    if dense_fn is None:
        def dense_fn(q, zero_rows):
            return dense_attention(q * ~zero_rows[:, None, :, None], key, value, scale, attention_mask)

    # Dense part: the whole query for dense-path samples, the text-masked query for mixed samples.
    dense_out = dense_fn(query, plan.dense_zero_rows)
    in_chunks = query_chunk is not None and not return_intermediates and not records_grad(
        query, key, value, gate_logits)
    nsa_only = [n and not m for n, m in zip(nsa_samples, mixed_samples)]  # every real token is vision
    if in_chunks:  # nothing needs gradients: the NSA part is added into the dense part's rows in place
        out = dense_out
        for b in range(batch):
            if nsa_only[b]:
                out[b].zero_()
    elif any(nsa_only):
        out = dense_out * ~plan.nsa_only[:, None, None, None]
    else:
        out = dense_out

    intermediates = [None] * batch
    nsa_rows = []
    for b in (b for b in range(batch) if nsa_samples[b]):
        if padded:  # the sample's real tokens, compacted in order
            keys, rows = plan.sample_keys[b], plan.sample_rows[b]
            q_b = query[b][:, rows].transpose(0, 1)[None]  # [1, m, Hq, D]
            k_b = key[b][:, keys].transpose(0, 1)[None]
            v_b = value[b][:, keys].transpose(0, 1)[None]
            logits = gate_logits[b, rows][None]
            vision = token_is_vision[b, keys]
        else:  # every token real: views, no copies (and no slice for one sample: its backward would copy)
            def sample(x):
                return x if batch == 1 else x[b : b + 1]

            rows = slice(None)
            q_b = sample(query).transpose(1, 2)
            k_b, v_b = sample(key).transpose(1, 2), sample(value).transpose(1, 2)
            logits = sample(gate_logits)
            vision = token_is_vision[b]
        nsa_kwargs = dict(block_count=block_count, block_size=block_size, window_size=window_size, scale=scale)
        if in_chunks:
            _add_nsa_in_chunks(out[b], rows, q_b, k_b, v_b, logits, vision, mixed_samples[b], padded_heads,
                               query_chunk, nsa_branches, nsa_kwargs)
            continue
        # the mixed path's text rows are masked where the NSA part lays out its inputs: the query's by
        # pad_query, the keys' and values' by nsa_heads_fn (keys_on) or here
        rows_on = keys_on = None
        if mixed_samples[b]:
            query_vision_b = vision[-q_b.shape[1] :]
            rows_on, keys_on = query_vision_b[None], vision[None]
            logits = _vision_rows(logits, query_vision_b)
        gates = pad_heads(torch.sigmoid(logits), padded_heads)
        if nsa_heads_fn is not None and not return_intermediates:
            result = nsa_heads_fn(q_b, k_b, v_b, gates, rows_on=rows_on, keys_on=keys_on, **nsa_kwargs)
        else:
            if keys_on is not None:
                k_b, v_b = _vision_rows(k_b, vision), _vision_rows(v_b, vision)
            result = nsa_fn(pad_query(q_b, padded_heads, rows_on), k_b, v_b, gates, **nsa_kwargs, fold_to=num_heads,
                            **({"return_intermediates": True} if return_intermediates else {}))
        nsa_out, extra = result if return_intermediates else (result, None)
        nsa_rows.append((b, rows, nsa_out))  # [1, m, Hq, D]
        if return_intermediates:
            extra["gates64"] = gates
            if mixed_samples[b]:
                extra["dense_output"] = dense_out[b : b + 1, rows]
            intermediates[b] = extra
    if nsa_rows and not padded:  # every row of an NSA sample is its own: concatenate, no scatter
        by_sample = {b: rows_out.to(out.dtype) for b, _, rows_out in nsa_rows}
        parts = [by_sample[b] if b in by_sample else torch.zeros_like(out[b : b + 1]) for b in range(batch)]
        out = (parts[0] if batch == 1 else torch.cat(parts)) + out
    elif nsa_rows:  # out-of-place so that autograd sees every sample's rows
        nsa_full = torch.zeros_like(out)
        for b, rows, rows_out in nsa_rows:
            nsa_full = nsa_full.index_put((torch.full((), b, device=out.device), rows), rows_out[0].to(out.dtype))
        out = nsa_full + out
    return (out, intermediates) if return_intermediates else out


def _check_hybrid_inputs(query, key, value, gate_logits, token_is_vision, attention_mask) -> None:
    """Reject inputs of the wrong rank, shape or dtype with a message that says what to pass instead."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "query, key and value must be 4-D [batch, heads, seq_len, head_dim]; got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, num_heads, num_q, head_dim = query.shape
    if key.shape != value.shape or key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must both be [{batch}, kv_heads, seq_len, "
            f"{head_dim}] to match query {tuple(query.shape)}"
        )
    if num_heads % key.shape[1]:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({key.shape[1]})")
    if key.shape[2] < num_q:
        raise ValueError(f"key length ({key.shape[2]}) is shorter than the query length ({num_q})")
    if not query.is_floating_point() or key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            f"query, key and value must share one floating dtype; got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if gate_logits.shape != (batch, num_q, num_heads, 3):
        raise ValueError(
            f"gate_logits must be [{batch}, {num_q}, {num_heads}, 3] (cmp, slc, swa per head); "
            f"got {tuple(gate_logits.shape)}"
        )
    if token_is_vision.dtype != torch.bool or token_is_vision.shape != (batch, key.shape[2]):
        raise ValueError(
            f"token_is_vision must be a bool tensor [{batch}, {key.shape[2]}] (one flag per key position); got "
            f"{token_is_vision.dtype} {tuple(token_is_vision.shape)}"
        )
    if attention_mask is not None and (
        attention_mask.dtype != torch.bool or attention_mask.shape != (batch, key.shape[2])
    ):
        raise ValueError(
            f"attention_mask must be a bool tensor [{batch}, {key.shape[2]}] (True = real token); got "
            f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
        )
