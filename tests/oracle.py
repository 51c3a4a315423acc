"""Independent, slow, per-query oracle of the VideoNSA attention function.

Written straight from ``/work/shared/reference-semantics.md`` (the contract) for ONE sample (no batch).
It is deliberately simple: a loop over query positions, each step a handful of small dense ops over
heads / keys, everything in float64 by default. It shares no code with ``nsa_kernels``.

Layout conventions (single sample):
    query  [Hq, T, D]     key / value [Hkv, T, D]
    gate_logits [T, Hq, 3]  (cmp, slc, swa), already divided by the gate temperature,
                            before vision masking and the sigmoid
    is_vision [T] bool

Padded NSA head layout (spec §4, generalised): G = max(16, next_pow2(ceil(2*Hq/Hkv))) query heads per
kv head, P = G*Hkv padded heads; padded head j uses kv head j // G; heads 0..Hq-1 are q, Hq..2Hq-1 are
q again, the rest are zero (with zero gates). For Hq=28, Hkv=4 this is the spec's P=64, G=16.
Dense GQA part: query head h uses kv head h // (Hq // Hkv).

Top-k tie-breaking reproduces the bitonic sorting network of fla's ``parallel_nsa_kernel_topk``
(chunk of BC = block_size candidates, stages 1..n-1 alternating, final stage descending, or for later
chunks ascending + merge of [previous best half | new best half] + descending merge). Block scores are
summed with scalar Python arithmetic (math.exp, left-to-right over the heads) so that exactly tied scores
stay exactly tied whatever the block's position (a vectorised reduction may round the tail lanes
differently and silently break ties).

``scale`` (default D^-1/2) is the NSA softmax scale; the dense part always uses D^-1/2 (Qwen2.5-VL's own
attention scaling).
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = [
    "next_power_of_2",
    "oracle_nsa_layout",
    "oracle_token_is_vision",
    "oracle_topk",
    "oracle_compress_kv",
    "oracle_select_blocks",
    "oracle_hybrid_attention",
]


@contextlib.contextmanager
def _single_thread():
    """The oracle does thousands of tiny ops; intra-op threads only add overhead (and stall badly on a
    busy machine), so run it on one thread and restore the caller's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def next_power_of_2(n: int) -> int:
    n = int(n)
    if n <= 1:
        return 1
    return 1 << (n - 1).bit_length()


def oracle_nsa_layout(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(P, G): padded head count and query heads per kv head in the NSA layout."""
    assert num_heads % num_kv_heads == 0
    G = max(16, next_power_of_2(math.ceil(2 * num_heads / num_kv_heads)))
    return G * num_kv_heads, G


# --------------------------------------------------------------------------------------------------
# 1. token typing
# --------------------------------------------------------------------------------------------------
def oracle_token_is_vision(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [3, T] (temporal, height, width) -> bool [T]; text iff all three rows are equal."""
    assert position_ids.dim() == 2 and position_ids.shape[0] == 3
    t, h, w = position_ids[0], position_ids[1], position_ids[2]
    T = position_ids.shape[1]
    out = torch.zeros(T, dtype=torch.bool)
    for i in range(T):
        is_text = int(t[i]) == int(h[i]) and int(h[i]) == int(w[i])
        out[i] = not is_text
    return out


# --------------------------------------------------------------------------------------------------
# 2. the top-k sorting network
# --------------------------------------------------------------------------------------------------
def _compare_and_swap(x: list, ids: list, flip: list, d: int) -> None:
    """Pairs (l, l+d) inside groups of 2d. Swap iff (x[l] > x[l+d]) != flip.

    flip 0: ascending, equal values stay. flip 1: descending, equal values ARE swapped."""
    for group in range(0, len(x), 2 * d):
        for l in range(group, group + d):
            r = l + d
            if (x[l] > x[r]) != flip[l]:
                x[l], x[r] = x[r], x[l]
                ids[l], ids[r] = ids[r], ids[l]


def _bitonic_merge(x: list, ids: list, stage: int, order) -> None:
    """`stage` rounds of compare-and-swap at distances 2^(stage-1), ..., 2, 1.

    order == "alt": flip of element e is bit `stage` of e (alternating directions);
    otherwise order is a constant flip (False = ascending, True = descending)."""
    n = len(x)
    if order == "alt":
        flip = [bool((e >> stage) & 1) for e in range(n)]
    else:
        flip = [bool(order)] * n
    for i in range(stage):
        _compare_and_swap(x, ids, flip, 1 << (stage - 1 - i))


def oracle_topk(scores, S: int, chunk: int = 64) -> list[int]:
    """Top-S selection of ONE query row / kv head, as the kernel's bitonic network does it.

    scores: 1-D sequence of the importances of ALL candidate blocks 0..n-1 of this row (n = current
            block + 1; every entry is a valid candidate). Blocks n.. of the last chunk are non-candidates:
            importance 0, id 0 (→ output -1).
    S: number of output slots (a power of two, <= chunk).
    chunk: BC, the candidate chunk width of the kernel (= block size; 64 in VideoNSA).
    Returns S block ids, descending importance, ties in the network's order, -1 for empty slots.
    """
    scores = [float(s) for s in (scores.tolist() if torch.is_tensor(scores) else scores)]
    n = len(scores)
    assert n >= 1
    n_dims = chunk.bit_length() - 1
    assert 1 << n_dims == chunk, "chunk must be a power of two"
    assert S == next_power_of_2(S) and S <= chunk
    half = chunk // 2
    prev_x: list | None = None
    prev_ids: list | None = None
    for start in range(0, n, chunk):
        x, ids = [], []
        for c in range(start, start + chunk):
            if c < n:
                x.append(scores[c])
                ids.append(c + 1)
            else:
                x.append(0.0)
                ids.append(0)
        for stage in range(1, n_dims):
            _bitonic_merge(x, ids, stage, "alt")
        if start == 0:
            _bitonic_merge(x, ids, n_dims, True)
        else:
            _bitonic_merge(x, ids, n_dims, False)  # ascending: this chunk's best are in the 2nd half
            x = prev_x[:half] + x[half:]
            ids = prev_ids[:half] + ids[half:]
            _bitonic_merge(x, ids, n_dims, True)
        prev_x, prev_ids = x, ids
    return [i - 1 for i in prev_ids[:S]]


# --------------------------------------------------------------------------------------------------
# 3. attention pieces
# --------------------------------------------------------------------------------------------------
def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allowed=None):
    """Grouped softmax attention of ONE query position.

    q [Hkv, Gh, D]: the Gh query heads that share kv head g are q[g]; k/v [Hkv, n, D]: the keys/values
    each kv head offers; allowed: optional bool [Hkv, n] (False = masked out).
    Returns (out [Hkv, Gh, D], lse [Hkv, Gh]) with a natural-log log-sum-exp."""
    s = torch.einsum("gjd,gnd->gjn", q, k) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("gjn,gnd->gjd", p, v), lse


def _dense_causal_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Hq, T, D], k/v [Hkv, T, D] -> [T, Hq, D]; query head h uses kv head h // (Hq // Hkv),
    i.e. heads h = g*(Hq//Hkv) + i form group g. Keys 0..t."""
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    out = torch.zeros(T, Hq, D, dtype=q.dtype)
    for t in range(T):
        qt = q[:, t].reshape(Hkv, Hq // Hkv, D)
        o, _ = _attend(qt, k[:, : t + 1], v[:, : t + 1], scale)
        out[t] = o.reshape(Hq, D)
    return out


def oracle_compress_kv(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [Hkv, T, D] -> [NB, Hkv, D]; a final partial block is divided by its own token count."""
    Hkv, T, D = x.shape
    NB = (T + block_size - 1) // block_size
    out = torch.zeros(NB, Hkv, D, dtype=x.dtype)
    for c in range(NB):
        lo, hi = c * block_size, min(T, (c + 1) * block_size)
        out[c] = x[:, lo:hi].sum(dim=1) / (hi - lo)
    return out


def oracle_select_blocks(
    q64: torch.Tensor,
    k_cmp: torch.Tensor,
    lse_cmp: torch.Tensor,
    *,
    G: int,
    block_count: int,
    block_size: int,
    scale: float,
    rows=None,
    return_importance: bool = False,
):
    """Spec §4b / §6: top-k blocks of every query row and kv head.

    q64 [P, T, D] (padded layout), k_cmp [NB, Hkv, D], lse_cmp [P, T] as the compression returns it.
    The kernel reads lse as if it were [T, P]: for row t and padded head j it uses element P*t + j of the
    flat [P, T] array. Block c < t // BS scores sum over the G heads of kv head g of
    exp(scale * q_j . k_cmp[c, g] - lse_read[t, j]); the current block scores exactly 1 per head.
    rows: optional iterable of the query rows to compute (others stay -1).
    Returns block_indices [T, Hkv, S] int64 (and, with return_importance, a dict row -> [Hkv, n] scores).
    """
    P, T, D = q64.shape
    Hkv = k_cmp.shape[1]
    assert P == G * Hkv
    BS = block_size
    S = next_power_of_2(block_count)
    kc = k_cmp.transpose(0, 1).to(q64.dtype)  # [Hkv, NB, D]
    lse_read = lse_cmp.to(q64.dtype).reshape(-1).reshape(T, P)
    block_indices = torch.full((T, Hkv, S), -1, dtype=torch.int64)
    importance_of = {}
    for t in range(T) if rows is None else rows:
        cur = t // BS
        s = torch.einsum("gjd,gcd->gjc", q64[:, t].reshape(Hkv, G, D), kc[:, :cur]) * scale  # [Hkv, G, cur]
        x = (s - lse_read[t].reshape(Hkv, G)[..., None]).tolist()
        imp = torch.zeros(Hkv, cur + 1, dtype=torch.float64)
        for g in range(Hkv):
            # Exact ties (zero queries, zero pooled keys) must stay exact: every block's score is computed
            # by the same scalar operations (math.exp, left-to-right sum over the heads), never by a
            # vectorised reduction whose rounding could depend on the block's position.
            row = []
            for c in range(cur):
                total = 0.0
                for j in range(G):
                    total += math.exp(x[g][j][c])
                row.append(total)
            row.append(float(G))  # the current block: exactly 1 per head
            imp[g] = torch.tensor(row, dtype=torch.float64)
            block_indices[t, g] = torch.tensor(oracle_topk(row, S, chunk=BS))
        importance_of[t] = imp
    return (block_indices, importance_of) if return_importance else block_indices


def _nsa(q64, k, v, gates64, *, G, block_size, block_count, window_size, scale):
    """Spec §4 on the padded layout. q64 [P, T, D], k/v [Hkv, T, D], gates64 [T, P, 3].

    Padded head j uses kv head j // G, so q64[:, t].reshape(Hkv, G, D)[g] are the heads of kv head g."""
    P, T, D = q64.shape
    Hkv = k.shape[0]
    BS = block_size
    S = next_power_of_2(block_count)
    assert S <= BS, "the kernel's network needs S <= BC (= block_size)"

    def heads_of(t):  # [Hkv, G, D]
        return q64[:, t].reshape(Hkv, G, D)

    # a. compression: mean-pooled k/v; query t sees blocks c with t <= BS*(c+1) - 1, i.e. c >= t // BS
    k_cmp = oracle_compress_kv(k, BS)  # [NB, Hkv, D]
    v_cmp = oracle_compress_kv(v, BS)
    kc = k_cmp.transpose(0, 1)  # [Hkv, NB, D]
    vc = v_cmp.transpose(0, 1)
    o_cmp = torch.zeros(T, P, D, dtype=q64.dtype)
    lse_cmp = torch.zeros(P, T, dtype=q64.dtype)
    for t in range(T):
        first = t // BS
        o, lse = _attend(heads_of(t), kc[:, first:], vc[:, first:], scale)
        o_cmp[t] = o.reshape(P, D)
        lse_cmp[:, t] = lse.reshape(P)

    # b. selection
    block_indices, importance = oracle_select_blocks(
        q64, k_cmp, lse_cmp, G=G, block_count=block_count, block_size=BS, scale=scale, return_importance=True
    )

    # c. selected attention: the tokens of the selected blocks that are at or before t
    #    (slots with index < 0 or index*BS > t are skipped)
    o_slc = torch.zeros(T, P, D, dtype=q64.dtype)
    for t in range(T):
        allowed = torch.zeros(Hkv, t + 1, dtype=torch.bool)
        for g in range(Hkv):
            valid = [b for b in block_indices[t, g].tolist() if b >= 0]
            assert len(valid) == len(set(valid)), "a block selected twice"
            for b in valid:
                if b * BS <= t:
                    allowed[g, b * BS : min(b * BS + BS, t + 1)] = True
        o, _ = _attend(heads_of(t), k[:, : t + 1], v[:, : t + 1], scale, allowed=allowed)
        o_slc[t] = o.reshape(P, D)

    # d. window: keys t-W+1 .. t
    o_swd = torch.zeros(T, P, D, dtype=q64.dtype)
    for t in range(T):
        lo = max(0, t - window_size + 1)
        o, _ = _attend(heads_of(t), k[:, lo : t + 1], v[:, lo : t + 1], scale)
        o_swd[t] = o.reshape(P, D)

    # e. gating
    o = o_cmp * gates64[..., 0:1] + o_slc * gates64[..., 1:2] + o_swd * gates64[..., 2:3]
    return dict(
        o64=o,
        k_cmp=k_cmp,
        v_cmp=v_cmp,
        lse_cmp=lse_cmp,
        block_indices=block_indices,
        importance=importance,
        o_cmp=o_cmp,
        o_slc=o_slc,
        o_swd=o_swd,
    )


# --------------------------------------------------------------------------------------------------
# 4. the hybrid attention function (spec §2–5)
# --------------------------------------------------------------------------------------------------
def oracle_hybrid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gate_logits: torch.Tensor,
    is_vision: torch.Tensor,
    block_size: int = 64,
    block_count: int = 32,
    window_size: int = 256,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """One sample. Returns a dict with ``output`` [T, Hq, D] (fed to o_proj) and ``path``
    ("dense" | "nsa" | "mixed"); the NSA paths add ``gates64`` [T,P,3], ``k_cmp``/``v_cmp`` [NB,Hkv,D],
    ``lse_cmp`` [P,T], ``block_indices`` [T,Hkv,S] (int64), ``o_cmp``/``o_slc``/``o_swd`` [T,P,D],
    ``importance`` (row t -> [Hkv, t//BS + 1] candidate scores, for diagnosing near-ties),
    ``nsa_output`` [T,Hq,D]; the mixed path adds ``dense_output`` [T,Hq,D]."""
    Hq, T, D = query.shape
    Hkv = key.shape[0]
    assert key.shape == (Hkv, T, D) and value.shape == (Hkv, T, D)
    assert gate_logits.shape == (T, Hq, 3)
    is_vision = is_vision.to(torch.bool).reshape(T)
    q = query.to(dtype)
    k = key.to(dtype)
    v = value.to(dtype)
    logits = gate_logits.to(dtype)
    dense_scale = D ** -0.5
    if scale is None:
        scale = D ** -0.5

    # §2: no vision token -> plain dense causal GQA attention
    if not bool(is_vision.any()):
        return dict(path="dense", output=_dense_causal_gqa(q, k, v, dense_scale))

    pure = bool(is_vision.all())
    if pure:  # every token is vision: unmasked q/k/v and gates
        qn, kn, vn, gl = q, k, v, logits
    else:  # §5: vision-masked q/k/v, gate logits times the vision mask
        m = is_vision.to(dtype)
        qn = q * m[None, :, None]
        kn = k * m[None, :, None]
        vn = v * m[None, :, None]
        gl = logits * m[:, None, None]
    gates = torch.sigmoid(gl)  # [T, Hq, 3]

    P, G = oracle_nsa_layout(Hq, Hkv)
    q64 = torch.zeros(P, T, D, dtype=dtype)
    q64[:Hq] = qn
    q64[Hq : 2 * Hq] = qn
    gates64 = torch.zeros(T, P, 3, dtype=dtype)
    gates64[:, :Hq] = gates
    gates64[:, Hq : 2 * Hq] = gates

    res = _nsa(
        q64, kn, vn, gates64,
        G=G, block_size=block_size, block_count=block_count, window_size=window_size, scale=scale,
    )
    o64 = res.pop("o64")
    nsa_out = (o64[:, :Hq] + o64[:, Hq : 2 * Hq]) * 0.5  # [T, Hq, D]
    res.update(gates64=gates64, nsa_output=nsa_out)
    if pure:
        res.update(path="nsa", output=nsa_out)
        return res

    # dense part: text-masked query, causal GQA over UNMASKED k and v
    text = (~is_vision).to(dtype)
    dense = _dense_causal_gqa(q * text[None, :, None], k, v, dense_scale)
    res.update(path="mixed", dense_output=dense, output=nsa_out + dense)
    return res
