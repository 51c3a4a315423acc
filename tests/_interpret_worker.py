"""Checks of the Triton kernels in Triton's CPU interpreter; run by ``test_kernels_interpret.py`` in a
subprocess (``TRITON_INTERPRET=1`` must be set before triton is imported, and must not leak into the other
test modules). Prints one JSON object: check name -> {"ok": bool, "detail": str}.

Usage: python tests/_interpret_worker.py SHARD NUM_SHARDS
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ["TRITON_INTERPRET"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # on PYTHONPATH (the parent test sets it)

import torch  # noqa: E402

torch.set_num_threads(1)
CONF = os.environ.get("NSA_CONFORMANCE_DIR", os.path.join(os.path.dirname(ROOT), "shared", "conformance"))
if not os.path.isdir(CONF):
    CONF = "/work/shared/conformance"

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def _close(name, a, b, tol):
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    if not err <= tol:
        raise AssertionError(f"{name}: max abs err {err:.3e} > {tol:.1e}")
    return f"{name} {err:.1e}"


def _load_case(case):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.path.join(CONF, f"{case}.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    t = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return t, meta


def _case_q64(t, meta):
    vis = t["is_vision"].bool()
    q = t["query"].transpose(1, 2) * vis[:, :, None, None]
    if meta.get("all_queries_zero", "false").lower() in ("true", "1"):
        q = q * 0
    k = t["key"].transpose(1, 2) * vis[:, :, None, None]
    v = t["value"].transpose(1, 2) * vis[:, :, None, None]
    return torch.cat([q, q, torch.zeros_like(q[:, :, :8])], 2), k, v


def _rows(q, lse, r0, r1):
    """Rows r0..r1-1 only: the same q rows, and the lse elements the selection kernel reads for them."""
    B, T, P, _ = q.shape
    return q[:, r0:r1], lse.reshape(B, T, P)[:, r0:r1].reshape(B, P, r1 - r0)


# ---------------------------------------------------------------------------------------------------------
# conformance vectors (real D = 128 cases; heavy ops restricted to row / head subsets to stay fast)
# ---------------------------------------------------------------------------------------------------------
def _conf_topk(case, windows):
    from nsa_kernels.selection import select_blocks

    t, meta = _load_case(case)
    q64, _, _ = _case_q64(t, meta)
    out = []
    for r0, r1 in windows:
        qs, ls = _rows(q64, t["lse_cmp"], r0, r1)
        bi = select_blocks(qs, t["k_cmp"], ls, int(meta["block_counts"]), 64, 128 ** -0.5, num_keys=r1)
        exp = t["block_indices"][:, r0:r1]
        if not torch.equal(bi, exp):
            bad = (bi != exp).any(-1).nonzero()[:5].tolist()
            raise AssertionError(f"{case} rows {r0}-{r1}: block_indices differ at {bad}")
        out.append(f"{r0}-{r1}")
    return f"{case} rows {','.join(out)} equal"


@check
def conf_topk_T200():
    return _conf_topk("case_T200", [(0, 6), (60, 68), (190, 200)])


@check
def conf_topk_T320_bc3():
    # rows >= 256: five candidates for four slots; t = 264 drops its own block
    return _conf_topk("case_T320_bc3", [(256, 270), (310, 320)])


@check
def conf_topk_T320_bc3_q0():
    # all scores tied: the sorting network decides every row
    return _conf_topk("case_T320_bc3_q0", [(0, 4), (62, 70), (126, 132), (254, 262), (316, 320)])


@check
def conf_branches_T200():
    """Compression / selected / window outputs and the lse on one kv group at a time (16 heads)."""
    from nsa_kernels.compression import compress_kv, compression_attention
    from nsa_kernels.selected_attention import selected_attention
    from nsa_kernels.window_attention import window_attention

    t, meta = _load_case("case_T200")
    q64, k, v = _case_q64(t, meta)
    sc = 128 ** -0.5
    msgs = [_close("k_cmp", compress_kv(k, 64), t["k_cmp"], 1e-5), _close("v_cmp", compress_kv(v, 64), t["v_cmp"], 1e-5)]
    g = 3  # holds real heads 48-55 and the zero heads 56-63
    hs = slice(16 * g, 16 * g + 16)
    o, lse = compression_attention(q64[:, :, hs], t["k_cmp"][:, :, g:g + 1], t["v_cmp"][:, :, g:g + 1], 64, sc)
    msgs += [_close("o_cmp", o, t["o_cmp"][:, :, hs], 1e-5), _close("lse", lse, t["lse_cmp"][:, hs], 1e-5)]
    o, lse2 = compression_attention(q64[:, :, hs], t["k_cmp"][:, :, g:g + 1], t["v_cmp"][:, :, g:g + 1], 64, sc,
                                    active_heads=8)
    msgs.append(_close("lse(closed form, zero heads)", lse2, t["lse_cmp"][:, hs], 1e-5))
    # selected and window branches on the last 72 rows only (rows 128-199: the partial last block, the
    # whole window), as a chunk that continues a cache: query row r sits at position 128 + r
    rows = slice(128, 200)
    g = 1
    hs = slice(16 * g, 16 * g + 16)
    o = selected_attention(q64[:, rows, hs], k[:, :, g:g + 1], v[:, :, g:g + 1], t["block_indices"][:, rows, g:g + 1],
                           64, sc)
    msgs.append(_close("o_slc", o, t["o_slc"][:, rows, hs], 1e-5))
    g = 2
    hs = slice(16 * g, 16 * g + 16)
    o = window_attention(q64[:, rows, hs], k[:, :, g:g + 1], v[:, :, g:g + 1], 256, sc)
    msgs.append(_close("o_swd", o, t["o_swd"][:, rows, hs], 1e-5))
    return "; ".join(msgs)


@check
def conf_dense_T200():
    from nsa_kernels.triton_nsa import dense_attention

    t, meta = _load_case("case_T200")
    vis = t["is_vision"].bool()
    q = t["query"] * (~vis)[:, None, :, None]
    out = dense_attention(q, t["key"], t["value"], 128 ** -0.5, None)
    return _close("dense_output", out, t["dense_output"], 1e-5)


# ---------------------------------------------------------------------------------------------------------
# small random shapes against the reference (forward and gradients)
# ---------------------------------------------------------------------------------------------------------
def _refused(call, words: str, what: str) -> None:
    """``call()`` raises a ValueError whose message names ``words``; ``what`` names the call in the failure."""
    try:
        call()
    except ValueError as error:
        assert words in str(error), error
    else:
        raise AssertionError(f"{what} was accepted")


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _grads(fn, inputs, seed):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    if isinstance(out, tuple):
        out = out[0]
    go = _rand(*out.shape, seed=seed)
    grads = torch.autograd.grad(out, inputs, go)
    return out.detach(), grads


def _compare_fn(name, ours, ref, inputs, tol=2e-5, seed=7, grad=True, grad_names="qkvg"):
    if not grad:
        with torch.no_grad():
            a, b = ours(*inputs), ref(*inputs)
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        return _close(name, a, b, tol)
    oa, ga = _grads(ours, inputs, seed)
    ob, gb = _grads(ref, inputs, seed)
    msgs = [_close(name, oa, ob, tol)]
    for i, (x, y) in enumerate(zip(ga, gb)):
        msgs.append(_close(f"d{grad_names[i]}", x, y, tol * 10))
    return " ".join(msgs)


SMALL = [  # (B, Tq, Tk, P, Hkv, D, block_size, block_count, window)
    (1, 70, 70, 16, 1, 16, 16, 4, 20),
    (1, 1, 1, 16, 1, 32, 16, 4, 8),
    (1, 21, 77, 32, 2, 32, 16, 2, 24),  # a chunk continuing a cache: Tq < Tk
]


def _small_inputs(cfg, seed):
    B, Tq, Tk, P, Hkv, D, bs, bc, w = cfg
    return _rand(B, Tq, P, D, seed=seed), _rand(B, Tk, Hkv, D, seed=seed + 1), _rand(B, Tk, Hkv, D, seed=seed + 2)


def _small_branches(cfg):
    from nsa_kernels import reference as R
    from nsa_kernels import triton_nsa as TN

    B, Tq, Tk, P, Hkv, D, bs, bc, w = cfg
    q, k, v = _small_inputs(cfg, seed=Tq)
    sc = D ** -0.5
    msgs = []
    msgs.append(_compare_fn(
        "cmp",
        lambda q, k, v: TN.compression_attention(q, TN.compress_kv(k, bs), TN.compress_kv(v, bs), bs, sc, Tk),
        lambda q, k, v: R.compression_attention(q, R.compress_kv(k, bs), R.compress_kv(v, bs), bs, sc, Tk),
        (q, k, v)))
    kc = R.compress_kv(k, bs)
    _, lse = R.compression_attention(q, kc, R.compress_kv(v, bs), bs, sc, Tk)
    _, lse_t = TN.compression_attention(q, kc, R.compress_kv(v, bs), bs, sc, Tk)
    msgs.append(_close("lse", lse_t, lse, 2e-5))
    bi = R.select_blocks(q, kc, lse, bc, bs, sc, Tk)
    if not torch.equal(TN.select_blocks(q, kc, lse, bc, bs, sc, Tk), bi):
        raise AssertionError("block_indices differ from the reference")
    msgs.append("topk equal")
    msgs.append(_compare_fn("slc", lambda q, k, v: TN.selected_attention(q, k, v, bi, bs, sc),
                            lambda q, k, v: R.selected_attention(q, k, v, bi, bs, sc), (q, k, v)))
    msgs.append(_compare_fn("swd", lambda q, k, v: TN.window_attention(q, k, v, w, sc),
                            lambda q, k, v: R.window_attention(q, k, v, w, sc), (q, k, v)))
    return "; ".join(msgs)


@check
def selected_union_tiles():
    """Tiles of R rows over the union of their blocks, and one row per program with the blocks fetched by the
    tensor memory accelerator (forward and dq): the same values as one row per program and as the reference, on a
    real block choice (rows of a chunk at an offset, a partial last tile, empty slots)."""
    import dataclasses

    from nsa_kernels import reference as R
    from nsa_kernels._triton_utils import DEFAULT_LAUNCH
    from nsa_kernels.selected_attention import selected_attention_bwd, selected_attention_fwd

    B, Tq, Tk, P, Hkv, D, bs, bc = 1, 45, 100, 32, 2, 16, 16, 2
    q, k, v = _rand(B, Tq, P, D, seed=11), _rand(B, Tk, Hkv, D, seed=12), _rand(B, Tk, Hkv, D, seed=13)
    sc = D ** -0.5
    kc = R.compress_kv(k, bs)
    _, lse = R.compression_attention(q, kc, R.compress_kv(v, bs), bs, sc, Tk)
    bi = R.select_blocks(q, kc, lse, bc, bs, sc, Tk)
    o_row, lse_row = selected_attention_fwd(q, k, v, bi, bs, sc, rows_per_tile=1)
    msgs = [_close("row vs reference", o_row, R.selected_attention(q, k, v, bi, bs, sc), 2e-5)]
    for rows in (2, 4):
        o_tile, lse_tile = selected_attention_fwd(q, k, v, bi, bs, sc, rows_per_tile=rows)
        msgs.append(_close(f"R={rows} out", o_tile, o_row, 2e-5))
        msgs.append(_close(f"R={rows} lse", lse_tile, lse_row, 2e-5))
    # key/value blocks by the tensor memory accelerator (per row; forward and dq; empty slots included)
    tma = dataclasses.replace(DEFAULT_LAUNCH, selected_tma=True)
    o_tma, lse_tma = selected_attention_fwd(q, k, v, bi, bs, sc, rows_per_tile=1, launch=tma)
    msgs.append(_close("tma out", o_tma, o_row, 2e-5))
    msgs.append(_close("tma lse", lse_tma, lse_row, 2e-5))
    do = _rand(B, Tq, P, D, seed=14)
    dq_row = selected_attention_bwd(q, k, v, bi, o_row, lse_row, do, bs, sc)[0]
    msgs.append(_close("tma dq", selected_attention_bwd(q, k, v, bi, o_row, lse_row, do, bs, sc, launch=tma)[0],
                       dq_row, 2e-5))
    qs, ks, vs = q[:, :40], k[:, :40], v[:, :40]  # rows from position 0: empty slots (-1) in the first blocks
    kc_s = R.compress_kv(ks, bs)
    bi_s = R.select_blocks(qs, kc_s, R.compression_attention(qs, kc_s, R.compress_kv(vs, bs), bs, sc, 40)[1], 4, bs,
                           sc, 40)
    assert (bi_s == -1).any()
    msgs.append(_close("tma out, empty slots", selected_attention_fwd(qs, ks, vs, bi_s, bs, sc, 1, tma)[0],
                       R.selected_attention(qs, ks, vs, bi_s, bs, sc), 2e-5))
    # the default launch settings tile a prompt this short
    msgs.append(_close("default out", selected_attention_fwd(q, k, v, bi, bs, sc)[0], o_row, 2e-5))
    return "; ".join(msgs)


@check
def tile_unions_against_sets():
    """The union lists and row bits of tiles of R rows equal what Python sets say, for random selections with
    empty slots, a partial last tile and two samples."""
    from nsa_kernels.selected_attention import tile_unions

    gen = torch.Generator().manual_seed(3)
    B, T, HKV, S, block = 2, 37, 3, 4, 8
    bi = torch.full((B, T, HKV, S), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            for g in range(HKV):
                chosen = torch.randperm(t // block + 1, generator=gen)[:S]
                bi[b, t, g, : len(chosen)] = chosen.to(torch.int32)
    for rows_per_tile in (1, 2, 4, 8):
        ids, bits, count = tile_unions(bi, rows_per_tile)
        assert ids.shape == bits.shape == (B, -(-T // rows_per_tile), HKV, rows_per_tile * S)
        for b in range(B):
            for tile in range(ids.shape[1]):
                for g in range(HKV):
                    rows = bi[b, tile * rows_per_tile:(tile + 1) * rows_per_tile, g].tolist()
                    expected = sorted({blk for row in rows for blk in row if blk >= 0})
                    n = int(count[b, tile, g])
                    assert ids[b, tile, g, :n].tolist() == expected, (rows_per_tile, b, tile, g)
                    for j, blk in enumerate(expected):
                        mask = int(bits[b, tile, g, j])
                        assert [bool(mask >> i & 1) for i in range(len(rows))] == [blk in row for row in rows]
    return "R = 1, 2, 4, 8 equal to sets"


@check
def small_branches_T70():
    return _small_branches(SMALL[0])


@check
def small_branches_T1():
    return _small_branches(SMALL[1])


@check
def small_branches_chunk():
    return _small_branches(SMALL[2])


@check
def small_nsa_with_gates_T100():
    """Whole nsa_attention (gates included) with trailing zero heads, vs the reference, values and grads.

    Gates that require grad keep every head computed (their gradient needs the branch outputs); with
    ``active_heads`` given, the zero heads are skipped and only the value is compared.
    """
    from nsa_kernels import reference as R
    from nsa_kernels import triton_nsa as TN

    B, T, P, Hkv, D, bs, bc, w = 1, 100, 16, 1, 16, 32, 2, 40
    q = _rand(B, T, P, D, seed=1)
    q[:, :, 12:] = 0
    k, v = _rand(B, T, Hkv, D, seed=2), _rand(B, T, Hkv, D, seed=3)
    gates = torch.sigmoid(_rand(B, T, P, 3, seed=4))
    gates[:, :, 12:] = 0
    kw = dict(block_count=bc, block_size=bs, window_size=w, scale=D ** -0.5)
    msg = _compare_fn("nsa", lambda q, k, v, g: TN.nsa_attention(q, k, v, g, **kw),
                      lambda q, k, v, g: R.nsa_attention(q, k, v, g, **kw), (q, k, v, gates))
    with torch.no_grad():
        skipped = TN.nsa_attention(q, k, v, gates, active_heads=12, **kw)
        msg += "; " + _close("nsa(active_heads=12)", skipped, R.nsa_attention(q, k, v, gates, **kw), 2e-5)
    return msg


@check
def topk_multichunk():
    """More than 64 candidate blocks (several chunks of the network), rows sampled, vs the reference."""
    from nsa_kernels import reference as R
    from nsa_kernels.selection import select_blocks

    B, T, P, Hkv, D, bs, bc = 1, 64 * 130 + 5, 16, 1, 16, 64, 32
    q = _rand(B, T, P, D, seed=11) * 0.5
    q[:, T // 2:T // 2 + 40] = 0  # exact ties
    kc = _rand(B, -(-T // bs), Hkv, D, seed=12)
    lse = _rand(B, P, T, seed=13).abs() * 2
    msgs = []
    for r0, r1 in [(4095, 4100), (T // 2, T // 2 + 6), (T - 6, T)]:
        qs, ls = _rows(q, lse, r0, r1)
        ref = R.select_blocks(qs, kc, ls, bc, bs, 1.0, r1)
        got = select_blocks(qs, kc, ls, bc, bs, 1.0, r1)
        if not torch.equal(got, ref):
            raise AssertionError(f"rows {r0}-{r1} differ")
        msgs.append(f"{r0}-{r1}")
    return "rows " + ",".join(msgs) + " equal"


def _mixed_padded_batch(T, num_q, video: slice, text_at: int, seed: int):
    """A batch of two mixed samples (2 query heads, 1 kv head, head dim 16): text | video (``video``, with one text
    token at ``text_at``) | text, sample 1 left-padded by 5 tokens; ``num_q`` query rows (a pass continuing a cache
    when fewer than ``T``). Returns query, key, value, gate logits, vision flags, attention mask."""
    B, Hq, Hkv, D = 2, 2, 1, 16
    query, key, value = (_rand(B, Hq, num_q, D, seed=seed), _rand(B, Hkv, T, D, seed=seed + 1),
                         _rand(B, Hkv, T, D, seed=seed + 2))
    logits = _rand(B, num_q, Hq, 3, seed=seed + 3)
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, video] = True
    vis[:, text_at] = False
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :5] = False  # left padding of sample 1
    return query, key, value, logits, vis, mask


@check
def small_hybrid_mixed_padded():
    """hybrid_attention (mixed path, batch of 2 with padding) through the Triton nsa/dense functions."""
    from nsa_kernels import reference as R
    from nsa_kernels import triton_nsa as TN

    query, key, value, logits, vis, mask = _mixed_padded_batch(40, 40, slice(6, 33), 23, seed=21)
    kw = dict(block_size=16, block_count=2, window_size=24)
    return _compare_fn("hybrid", lambda q, k, v, g: TN.hybrid_attention(q, k, v, g, vis, mask, **kw),
                       lambda q, k, v, g: R.hybrid_attention(q, k, v, g, vis, mask, **kw),
                       (query, key, value, logits))


@check
def hybrid_in_query_chunks():
    """hybrid_attention with its NSA part in query chunks (two passes, the misread lse indexed by pass row): the
    same bits as in one piece, and the reference's values; a padded mixed batch and a pass continuing a cache."""
    from nsa_kernels import reference as R
    from nsa_kernels import triton_nsa as TN

    kw = dict(block_size=16, block_count=4, window_size=24)
    msgs = []
    for num_q in (230, 150):
        query, key, value, logits, vis, mask = _mixed_padded_batch(230, num_q, slice(6, 200), 100, seed=41)
        with torch.no_grad():
            whole = TN.hybrid_attention(query, key, value, logits, vis, mask, **kw)
            pieces = TN.hybrid_attention(query, key, value, logits, vis, mask, query_chunk=64, **kw)
            ref = R.hybrid_attention(query, key, value, logits, vis, mask, **kw)
        if not torch.equal(pieces, whole):
            raise AssertionError(f"Tq={num_q}: chunked differs from one piece by {(pieces - whole).abs().max():.3g}")
        msgs.append(f"Tq={num_q}: chunks == whole; " + _close("vs reference", pieces, ref, 2e-5))
    return "; ".join(msgs)


@check
def dense_text_only_and_padding():
    from nsa_kernels import reference as R
    from nsa_kernels import triton_nsa as TN

    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 50, 66, 32
    q, k, v = _rand(B, Hq, Tq, D, seed=31), _rand(B, Hkv, Tk, D, seed=32), _rand(B, Hkv, Tk, D, seed=33)
    q[:, :, 10:20] = 0
    mask = torch.ones(B, Tk, dtype=torch.bool)
    mask[0, :5] = False
    mask[1, 40:45] = False
    return _compare_fn("dense", lambda q, k, v: TN.dense_attention(q, k, v, D ** -0.5, mask),
                       lambda q, k, v: R.dense_attention(q, k, v, D ** -0.5, mask), (q, k, v), grad=False) + \
        "; " + _compare_fn("dense_grad_nozero", lambda q, k, v: TN.dense_attention(q, k, v, D ** -0.5, mask),
                           lambda q, k, v: R.dense_attention(q, k, v, D ** -0.5, mask),
                           (_rand(B, Hq, Tq, D, seed=34), k, v))


@check
def selected_dkv_row_lists_in_items():
    """The selected dk/dv backward with each block's row list cut into items of 3 rows (many programs adding into
    one block with atomics, a last partial item) equals the reference's gradients, as with the default items."""
    import dataclasses

    from nsa_kernels import reference as R
    from nsa_kernels import triton_nsa as TN

    B, Tq, Tk, P, Hkv, D, bs, bc, w = SMALL[2]
    q, k, v = _small_inputs(SMALL[2], seed=5)
    sc = D ** -0.5
    kc = R.compress_kv(k, bs)
    _, lse = R.compression_attention(q, kc, R.compress_kv(v, bs), bs, sc, Tk)
    bi = R.select_blocks(q, kc, lse, bc, bs, sc, Tk)
    launch = dataclasses.replace(TN.DEFAULT_LAUNCH, selected_dkv_item_rows=3)
    rows_per_block = torch.bincount(bi[bi >= 0].long().flatten())
    assert rows_per_block.max() > 3, rows_per_block  # some block's list is really cut into several items
    return _compare_fn("slc items of 3", lambda q, k, v: TN.selected_attention(q, k, v, bi, bs, sc, launch=launch),
                       lambda q, k, v: R.selected_attention(q, k, v, bi, bs, sc), (q, k, v))


@check
def selected_dkv_skips_inactive_heads():
    """Selected attention with ``active_heads``: the dk/dv pass takes only the heads below it (a group with part of
    its heads, packed several rows to a step; a group with none, skipped). With those heads' queries and output
    gradient zero, as in the 7B layout, output and every gradient equal the reference's."""
    from nsa_kernels import reference as R
    from nsa_kernels import selected_attention as S
    from nsa_kernels import triton_nsa as TN

    B, Tq, Tk, P, Hkv, D, bs, bc, w = SMALL[2]
    q, k, v = _small_inputs(SMALL[2], seed=9)
    sc = D ** -0.5
    kc = R.compress_kv(k, bs)
    msgs = []
    for active in (24, 21, 12, 0):  # group 1 keeps 8 heads, 5 heads (rows do not fill a step), none; no head at all
        q_act = q.clone()
        q_act[:, :, active:] = 0
        _, lse = R.compression_attention(q_act, kc, R.compress_kv(v, bs), bs, sc, Tk)
        bi = R.select_blocks(q_act, kc, lse, bc, bs, sc, Tk)
        go = _rand(B, Tq, P, D, seed=active)
        go[:, :, active:] = 0
        results = []
        for fn in (lambda q, k, v: TN.selected_attention(q, k, v, bi, bs, sc, active_heads=active),
                   lambda q, k, v: R.selected_attention(q, k, v, bi, bs, sc)):
            leaves = [x.detach().clone().requires_grad_(True) for x in (q_act, k, v)]
            out = fn(*leaves)
            results.append((out.detach(), *torch.autograd.grad(out, leaves, go)))
        for name, ours, ref in zip(("o", "dq", "dk", "dv"), *results):
            msgs.append(_close(f"active {active} {name}", ours, ref, 2e-5 if name == "o" else 2e-4))
    # a kv head of class -1 gets no work item; the other's items list each of its (row, block) pairs once, in
    # items of at most 3 rows, and the end of its region is empty
    keys, starts, ends, rows, NB, regions = S._invert(bi, Tq, Tk, Hkv, bi.shape[-1], bs, Tk - Tq, 3, [0, -1], 1)
    pos = torch.arange(Tq) + Tk - Tq
    listed = (bi[:, :, 0] >= 0) & (bi[:, :, 0] * bs <= pos[None, :, None])  # [B, Tq, S] of kv head 0
    items = ends > starts
    assert regions == [(0, keys.numel())] and bool(((keys[items] // NB) % Hkv == 0).all()), keys
    assert bool((ends - starts <= 3).all()) and not bool(items[int(items.sum()):].any()), (starts, ends)
    pairs = sorted((int(keys[i]) // (Hkv * NB), int(keys[i]) % NB, int(rows[j]))
                   for i in range(keys.numel()) for j in range(starts[i], ends[i]))
    want = sorted((b, int(bi[b, r, 0, s]), r) for b, r, s in torch.nonzero(listed).tolist())
    assert pairs == want, (pairs, want)
    return "; ".join(msgs) + "; a kv head without heads gets no item"


@check
def int64_offsets():
    """Every branch with the int64 row offsets that tensors of 2**31 elements and more take (forced here on small
    ones) against the reference, forward and gradients, as with the int32 offsets of smaller tensors."""
    from nsa_kernels import _triton_utils as U

    q = torch.zeros(1, 4, 2, 8)
    assert not U.wide_offsets(q, q.transpose(1, 2))
    U.INT32_OFFSET_LIMIT = q.numel() + 255
    try:
        assert U.wide_offsets(q) and not U.wide_offsets(q[:, :3])
        U.INT32_OFFSET_LIMIT = 0
        return _small_branches(SMALL[2])
    finally:
        U.INT32_OFFSET_LIMIT = 2**31


@check
def gate_mix_folded():
    """The gate mix folded to the model's heads in the same pass (``fold_to``) equals the reference's mix and
    fold_heads, values and the gradients of the three branches and the gates (zero for the padded heads)."""
    from nsa_kernels import reference as R
    from nsa_kernels import triton_nsa as TN

    shape = (2, 5, 16, 24)  # 7 heads laid out twice and 2 padded heads; a head dim below the tile width
    inputs = [_rand(*shape, seed=60 + i) for i in range(3)] + [torch.sigmoid(_rand(*shape[:3], 3, seed=63))]
    msg = _compare_fn("mix folded", lambda *x: TN.mix_branches(*x, fold_to=7),
                      lambda *x: R.mix_branches(*x, fold_to=7), inputs, tol=1e-6)
    _, grads = _grads(lambda *x: TN.mix_branches(*x, fold_to=7), inputs, seed=7)
    assert all(bool((g[:, :, 14:] == 0).all()) for g in grads), "padded heads got a gradient"
    _refused(lambda: TN.mix_branches(*inputs, fold_to=9), "fold_to=9", "fold_to past half the padded heads")
    return msg + "; padded heads get zero gradients; fold_to=9 refused"


@check
def nsa_on_model_heads():
    """The NSA part on the model's heads as one autograd node (the padded, row-masked query written in one pass; keys
    and values row-masked and pooled in one pass, their block gradients spread back in one; the mix's backward giving
    each branch its delta; dk/dv of two branches in one float32 pair; the three branches' dq folded back in one pass)
    against the reference's composition (masked copies, ``pad_heads``, ``nsa_attention``):
    values and the gradients of the query (a strided view, as the model passes it), keys, values and gates. 12 heads
    over 2 kv heads lay out as 32 padded heads, so kv group 0 holds copies of both kinds and group 1 ends in zero
    heads (the 7B's layout in small); with and without row flags, and one chunk continuing a cache (selected
    attention one row per program, the others in tiles of rows over the union of their blocks). Also the layout
    passes alone: pool_blocks equals masking and the reference's compress_kv, unpool_grads their autograd gradient
    (a partial last block, row flags), pad_query equals the reference's, fold_query_grads its autograd gradient."""
    from nsa_kernels import head_layout as HL
    from nsa_kernels import reference as R
    from nsa_kernels import triton_nsa as TN

    import dataclasses

    Hq, Hkv, D, bs, bc, w = 12, 2, 16, 16, 4, 24
    P, _ = R.nsa_head_layout(Hq, Hkv)
    per_row = dataclasses.replace(TN.DEFAULT_LAUNCH, selected_tile_max_rows=0)
    msgs = []
    for Tq, Tk, flagged in ((90, 90, False), (90, 90, True), (40, 75, True)):
        query = _rand(1, Hq, Tq, D, seed=Tq + Tk)  # [B, H, T, D] as the model holds it; the NSA reads a view
        k, v = _rand(1, Tk, Hkv, D, seed=81), _rand(1, Tk, Hkv, D, seed=82)
        gates = torch.sigmoid(_rand(1, Tq, P, 3, seed=83))
        gates[:, :, 2 * Hq:] = 0
        rows_on = (torch.arange(Tq) % 7 != 3)[None] if flagged else None
        keys_on = (torch.arange(Tk) % 5 != 1)[None] if flagged else None
        kw = dict(block_count=bc, block_size=bs, window_size=w, scale=D ** -0.5, rows_on=rows_on, keys_on=keys_on)
        launch = per_row if Tq < Tk else TN.DEFAULT_LAUNCH  # the chunk: one row per selected program
        msgs.append(f"T={Tq}/{Tk}{' flags' if flagged else ''}: " + _compare_fn(
            "nsa", lambda q, k, v, g: TN.nsa_attention_on_model_heads(q.transpose(1, 2), k, v, g, launch=launch,
                                                                     **kw),
            lambda q, k, v, g: R.nsa_attention_on_model_heads(q.transpose(1, 2), k, v, g, **kw),
            (query, k, v, gates)))
    from nsa_kernels.compression import pool_blocks, unpool_grads

    x = _rand(2, 5, 40, 24, seed=87).transpose(1, 2)  # strided [B, T, Hkv, D], a partial last block of 8 rows
    x_on = torch.rand(2, 40, generator=torch.Generator().manual_seed(88)) > 0.3
    masked, pooled = pool_blocks(x, 16, x_on)
    leaf = x.detach().clone().requires_grad_(True)
    expect_pooled = R.compress_kv(leaf * x_on[:, :, None, None], 16)
    msgs.append(_close("pool_blocks", masked, x * x_on[:, :, None, None], 0.0) + " " +
                _close("pooled", pooled, expect_pooled, 1e-6))
    d_pooled, d_masked = _rand(*pooled.shape, seed=89), _rand(*masked.shape, seed=90)
    (expect,) = torch.autograd.grad([expect_pooled, leaf * x_on[:, :, None, None]], leaf, [d_pooled, d_masked])
    msgs.append(_close("unpool_grads", unpool_grads(d_pooled, 16, 40, d_masked, x_on, torch.float32), expect, 1e-6))
    q = _rand(2, 5, 9, 24, seed=84).transpose(1, 2)  # strided [B, T, H, D]
    on = torch.rand(2, 9, generator=torch.Generator().manual_seed(85)) > 0.4
    msgs.append(_close("pad_query", HL.pad_query(q, 16, on), R.pad_query(q, 16, on), 0.0))
    grads = [_rand(2, 9, 16, 24, seed=86 + i) for i in range(3)]
    leaf = q.detach().clone().requires_grad_(True)
    (expect,) = torch.autograd.grad(R.pad_heads(leaf * on[:, :, None, None], 16), leaf, sum(grads))
    msgs.append(_close("fold_query_grads", HL.fold_query_grads(grads, 5, on), expect, 1e-6))
    return "; ".join(msgs)


@check
def running_means_against_cumsum():
    """The dense part's running means (a scan over tiles of 64 keys) against cumsum / count repeated over each
    group's heads, values and the gradient of the values: with and without key padding and row flags, ranges that
    start and stop inside tiles, one that ends before the last key, and an empty one; bad ranges and flags
    refused."""
    from nsa_kernels.running_mean import running_means

    B, Tk, Hkv, group, D = 2, 150, 2, 3, 24
    key_valid = torch.ones(B, Tk, dtype=torch.bool)
    key_valid[0, :7] = False
    key_valid[1, 60:130] = False
    msgs = []
    for padded in (False, True):
        kv = key_valid if padded else None
        w = (kv if padded else torch.ones(B, Tk, dtype=torch.bool)).float()
        for start, stop, flagged in ((0, Tk, False), (70, Tk, True), (5, 100, True), (64, 64, False)):
            on = (torch.arange(stop - start) % 4 != 1)[None].expand(B, -1) if flagged else None

            def expected(v, start=start, stop=stop, on=on, w=w):
                sums = torch.cumsum(v * w[:, :, None, None], dim=1)[:, start:stop]
                mean = sums / torch.cumsum(w, 1)[:, start:stop].clamp_min(1)[:, :, None, None]
                mean = mean.repeat_interleave(group, dim=2)
                return mean if on is None else mean * on[:, :, None, None]

            v = _rand(B, Tk, Hkv, D, seed=start + stop)
            msgs.append(f"{'padded ' if padded else ''}{start}..{stop}: " + _compare_fn(
                "means", lambda v, start=start, stop=stop, on=on, kv=kv: running_means(v, kv, group)(start, stop, on),
                expected, (v,), tol=1e-6, grad_names="v"))
    means = running_means(v, None, group)
    for bad, words in (((10, Tk + 1, None), "outside"), ((10, 5, None), "outside"),
                       ((0, 9, torch.ones(B, 8, dtype=torch.bool)), "rows_on")):
        _refused(lambda: means(*bad), words, f"running means of {bad[:2]}")
    return "; ".join(msgs) + "; bad ranges and flags refused"


def _naive_band(q, k, v, scale, window, positions, key_valid, active_heads):
    """Band attention written out: [B, Tq, H, D] rows at ``positions`` (-1: empty row) over keys of the window
    that ``key_valid`` marks; rows that see no key and heads from ``active_heads`` on give 0."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    cols = torch.arange(Tk)
    vis = (cols[None, None, :] <= positions[:, :, None]) & (cols[None, None, :] > positions[:, :, None] - window)
    vis = vis & key_valid[:, None, :]
    group = H // k.shape[2]
    kx, vx = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kx) * scale
    s = s.masked_fill(~vis[:, None], float("-inf"))
    p = torch.where(vis[:, None], torch.softmax(s.masked_fill(~vis[:, None].any(-1, keepdim=True), 0.0), -1), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vx)
    return out * (torch.arange(H) < active_heads)[None, None, :, None]


@check
def band_key_splits():
    """Band attention with each row tile's keys split over programs (the dense part's few text rows over a long
    sequence) against the attention written out, values and gradients: gathered rows (empty ones and rows that see
    a single key tile included) with key padding, and windowed rows with inactive heads; splits that divide the
    key tiles, that do not, and more splits than key tiles (empty programs). key_splits=0 refused."""
    from nsa_kernels.window_attention import band_attention

    B, H, Hkv, D, Tk = 2, 4, 2, 32, 300
    k, v = _rand(B, Tk, Hkv, D, seed=91), _rand(B, Tk, Hkv, D, seed=92)
    key_valid = torch.ones(B, Tk, dtype=torch.bool)
    key_valid[1, 20:90] = False
    gathered = torch.tensor([[3, 40, 150, 299, -1, -1, 298, 297], [0, 1, 64, 100, 200, 250, 280, 299]])
    plain = torch.arange(Tk - 70, Tk)[None].expand(B, 70)
    msgs = []
    for name, positions, window, active in (("gathered", gathered, Tk + 1, H), ("window", plain, 100, 3)):
        q = _rand(B, positions.shape[1], H, D, seed=93)
        pos_arg = positions if name == "gathered" else None
        win_arg = None if name == "gathered" else window
        for splits in (1, 2, 3, 9):
            msgs.append(f"{name} splits={splits}: " + _compare_fn(
                "band", lambda q, k, v: band_attention(q, k, v, D ** -0.5, win_arg, pos_arg, key_valid, active,
                                                       key_splits=splits),
                lambda q, k, v: _naive_band(q, k, v, D ** -0.5, window, positions, key_valid, active), (q, k, v)))
    _refused(lambda: band_attention(q, k, v, key_splits=0), "key_splits", "key_splits=0")
    return "; ".join(msgs) + "; key_splits=0 refused"


@check
def attention_delta_layouts():
    """The backward's delta = sum_d o * do in one pass: both output layouts, a head dim below the tile width and a
    row count that is no multiple of the rows per program; mismatched shapes refused."""
    from nsa_kernels._triton_utils import attention_delta

    o, do = _rand(2, 7, 6, 24, seed=41), _rand(2, 7, 6, 24, seed=42)
    expect = (o.double() * do.double()).sum(-1)
    msgs = [_close("tokens first", attention_delta(o, do), expect, 1e-5),
            _close("heads first", attention_delta(o, do, heads_first=True), expect.transpose(1, 2), 1e-5)]
    _refused(lambda: attention_delta(o, do[:, :6]), "one shape", "attention_delta of o and do of different shapes")
    return "; ".join(msgs) + "; mismatched shapes refused"


def _ulps(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    """Largest difference in units of the last place of ``dtype`` (default ``want``'s), relative to ``want``."""
    eps = torch.finfo(dtype or want.dtype).eps
    return ((got.float() - want.float()).abs() / eps / want.float().abs().clamp_min(1e-30)).max().item()


@check
def vision_kernels_equal_transformers():
    """The vision tower's one-pass kernels against transformers' operations, in float32 and bfloat16 (the interpreter
    rounds to bfloat16 and takes exp its own way, so bfloat16 and silu are held to a unit or two of the last place
    here; the GPU tests hold the rotary embedding and silu bit for bit):

    * the rotary embedding, q and k as the strided views of the fused qkv product, a row count that is no multiple
      of the rows per program: equal in float32;
    * RMSNorm on rows as wide as no power of two, strided rows, a float32 weight on bfloat16 inputs (the output
      takes the promoted dtype as in transformers);
    * ``silu(gate) * up`` on a row-strided ``gate | up`` product of odd width;
    * bad shapes refused."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision as theirs

    from nsa_kernels import vision

    N, H, D = 37, 3, 20
    angles = _rand(N, D // 2, seed=71) * 5
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    msgs = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, _ = (_rand(N, 3, H, D, seed=72) * 3).to(dtype).unbind(1)
        got, want = vision.apply_rotary_pos_emb_vision(q, k, cos, sin), theirs(q, k, cos, sin)
        for name, a, b in zip("qk", got, want):
            assert a.dtype == b.dtype and (torch.equal(a, b) if dtype == torch.float32 else _ulps(a, b) <= 1), dtype
        wide = _rand(N, 2, 45, seed=73)[:, 1] * 4  # rows of 45 with a row stride of 90
        for weight_dtype in {dtype, torch.float32}:
            norm = Qwen2_5_VLRMSNorm(45, eps=1e-6)
            norm.weight.data = (_rand(45, seed=74) + 1).to(weight_dtype)
            x = wide.to(dtype)
            a, b = vision.rms_norm(x, norm.weight.data, norm.variance_epsilon), norm(x).detach()
            # float32: the sum of squares in another order; bfloat16 (the input's rounding of the normed row, then
            # the product's if the weight is bfloat16 too)
            assert a.dtype == b.dtype and a.shape == b.shape and _ulps(a, b, dtype) <= (4 if dtype == torch.float32
                                                                                       else 2)
        gate_up = (_rand(N, 2, 2 * 13, seed=75)[:, 0] * 4).to(dtype)  # row stride 52
        gate, up = gate_up.chunk(2, dim=-1)
        a, b = vision.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up
        # two roundings (silu, then its product), each of which the interpreter may take a unit off
        assert a.dtype == b.dtype and a.shape == b.shape and _ulps(a, b) <= (4 if dtype == torch.float32 else 2)
        msgs.append(f"{dtype}: rotary {'equal' if dtype == torch.float32 else 'within 1 ulp'}, norm and silu close")
    bad_calls = [(vision.apply_rotary_pos_emb_vision, (q, k[:5], cos, sin), "head_dim"),
                 (vision.apply_rotary_pos_emb_vision, (q[..., :5], k[..., :5], cos[:, :5], sin[:, :5]), "even"),
                 (vision.rms_norm, (wide, torch.ones(44), 1e-6), "weight must be [45]"),
                 (vision.silu_and_mul, (gate_up[:, :25],), "2 * width")]
    for fn, args, words in bad_calls:
        _refused(lambda: fn(*args), words, f"{fn.__name__} of bad shapes")
    return "; ".join(msgs) + "; bad shapes refused"


def main():
    shard, num = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (0, 1)
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 and sys.argv[3] else None
    results = {}
    for i, (name, fn) in enumerate(CHECKS.items()):
        if only is not None and name not in only:
            continue
        if only is None and i % num != shard:
            continue
        t0 = time.time()
        try:
            detail = fn()
            results[name] = {"ok": True, "detail": f"{detail} ({time.time() - t0:.1f}s)"}
        except FileNotFoundError as e:
            results[name] = {"ok": None, "detail": f"missing {e}"}
        except Exception:
            results[name] = {"ok": False, "detail": traceback.format_exc()[-3000:]}
    print("@@RESULTS@@" + json.dumps(results))


if __name__ == "__main__":
    main()
