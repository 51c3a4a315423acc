"""The package reference (``nsa_kernels.reference``) against an independent float64 oracle (``tests/oracle.py``).

The oracle is a slow per-query transcription of ``reference-semantics.md`` (one sample, float64), itself held
to the authors' conformance vectors by ``test_oracle_matches_conformance``. The reference runs in float32
(one case in float64) on shapes the conformance vectors do not cover: any T, several videos, text between
videos, blocks made only of text, zero queries (exact ties), block counts under pressure, more than 64
candidate blocks (several chunks of the top-k network), the dense and pure-NSA paths, other head layouts,
batches with left padding, and a prefill that continues a cache.

``block_indices`` are compared exactly. The only mismatch tolerated between the float32 reference and the
float64 oracle is a swap of two entries whose oracle scores differ by less than 1e-5 relative but are not
exactly equal (a near-tie that float32 rounding may legitimately order the other way); exact ties must be
broken exactly as the kernel's bitonic network breaks them.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from oracle import (
    next_power_of_2,
    oracle_compress_kv,
    oracle_hybrid_attention,
    oracle_nsa_layout,
    oracle_select_blocks,
    oracle_token_is_vision,
    oracle_topk,
)

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
CONFORMANCE_CASES = sorted(CONFORMANCE.glob("case_*.safetensors"))

F32_TOL = dict(atol=1e-5, rtol=1e-4)
F64_TOL = dict(atol=1e-10, rtol=1e-9)
NEAR_TIE_F32 = 1e-5


def _reference():
    from nsa_kernels import reference

    return reference


# ------------------------------------------------------------------------------------------------------
# input builders
# ------------------------------------------------------------------------------------------------------
def vision_mask(T: int, spans, text_at=()) -> torch.Tensor:
    """bool [T]: True on the half-open spans [a, b), then False at the positions in text_at."""
    m = torch.zeros(T, dtype=torch.bool)
    for a, b in spans:
        m[a:b] = True
    for p in text_at:
        m[p] = False
    return m


def make_sample(T, vis, *, Hq=28, Hkv=4, D=16, seed=0, zero_q_rows=(), zero_q=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Hq, T, D, generator=g)
    k = torch.randn(Hkv, T, D, generator=g)
    v = torch.randn(Hkv, T, D, generator=g)
    logits = torch.randn(T, Hq, 3, generator=g) * 2.0
    if zero_q:
        q.zero_()
    for r in zero_q_rows:
        q[:, r] = 0.0
    return dict(q=q, k=k, v=v, logits=logits, vis=vis.clone())


def run_reference(samples, *, dtype=torch.float32, length=None, seed=1234, **kw):
    """Left-pad the samples into one batch (garbage in the padding), run the reference, and return
    ([per-sample output on its own tokens], [per-sample intermediates or None], full output, mask)."""
    ref = _reference()
    B = len(samples)
    Hq, _, D = samples[0]["q"].shape
    Hkv = samples[0]["k"].shape[0]
    L = length or max(s["q"].shape[1] for s in samples)
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, Hq, L, D, generator=g) * 3
    key = torch.randn(B, Hkv, L, D, generator=g) * 3
    value = torch.randn(B, Hkv, L, D, generator=g) * 3
    logits = torch.randn(B, L, Hq, 3, generator=g)
    is_vis = torch.rand(B, L, generator=g) < 0.5
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, s in enumerate(samples):
        T = s["q"].shape[1]
        query[b, :, L - T :] = s["q"]
        key[b, :, L - T :] = s["k"]
        value[b, :, L - T :] = s["v"]
        logits[b, L - T :] = s["logits"]
        is_vis[b, L - T :] = s["vis"]
        mask[b, L - T :] = True
    attention_mask = None if bool(mask.all()) else mask
    out, inter = ref.hybrid_attention(
        query.to(dtype), key.to(dtype), value.to(dtype), logits.to(dtype), is_vis, attention_mask,
        return_intermediates=True, **kw,
    )
    assert out.shape == (B, L, Hq, D)
    assert out.dtype == dtype
    outs, inters = [], []
    for b, s in enumerate(samples):
        T = s["q"].shape[1]
        outs.append(out[b, L - T :])
        inters.append(_sample_intermediates(inter, b, L - T))
        assert torch.all(out[b, : L - T] == 0), "padded positions must output zeros"
    return outs, inters, out, mask


def _sample_intermediates(inter, b, pad):
    """The intermediates of sample b as unbatched tensors (the reference returns one dict per sample, each
    batch-first with batch 1; a single batch-first dict is accepted too when nothing is padded)."""
    if isinstance(inter, (list, tuple)):
        d = inter[b]
        if d is None:
            return None
        return {name: x[0] if torch.is_tensor(x) else x for name, x in d.items()}
    assert pad == 0, "batch-first intermediates with padding are ambiguous"
    return {name: x[b] for name, x in inter.items()}


def run_oracle(s, **kw):
    return oracle_hybrid_attention(s["q"], s["k"], s["v"], s["logits"], s["vis"], **kw)


# ------------------------------------------------------------------------------------------------------
# comparison helpers
# ------------------------------------------------------------------------------------------------------
def assert_block_indices(ref_bi, orc_bi, importance, near_tie=NEAR_TIE_F32, where=""):
    """Exact comparison; see the module docstring for the only tolerated difference.
    Returns the number of rows that differ by a tolerated near-tie swap."""
    ref_bi = ref_bi.to(torch.int64).cpu()
    assert ref_bi.shape == orc_bi.shape, f"{where}block_indices shape {tuple(ref_bi.shape)} != {tuple(orc_bi.shape)}"
    bad = (ref_bi != orc_bi).any(-1).nonzero().tolist()
    unexplained = []
    for t, g in bad:
        r, o = ref_bi[t, g].tolist(), orc_bi[t, g].tolist()
        sc = importance[t][g].tolist()
        ok = near_tie > 0  # exact mode: any difference is a failure
        for a, c in zip(r, o):
            if a == c:
                continue
            if a < 0 or c < 0 or a >= len(sc) or c >= len(sc):
                ok = False
                break
            sa, sc_ = sc[a], sc[c]
            if sa == sc_ or abs(sa - sc_) > near_tie * max(abs(sa), abs(sc_)):
                ok = False
                break
        if not ok:
            unexplained.append(
                f"t={t} kv={g}: reference {r} oracle {o}; oracle scores "
                + ", ".join(f"{x}:{sc[x]:.9g}" for x in sorted(set(r + o)) if 0 <= x < len(sc))
            )
    assert not unexplained, (
        f"{where}block_indices differ in {len(unexplained)} of {ref_bi.shape[0] * ref_bi.shape[1]} rows, e.g.\n  "
        + "\n  ".join(unexplained[:8])
    )
    return len(bad)


def assert_matches_oracle(ref_out, ref_inter, orc, *, tol=F32_TOL, near_tie=NEAR_TIE_F32, where=""):
    """ref_out [T, Hq, D] and unbatched intermediates against the oracle's dict."""
    T = orc["output"].shape[0]
    if orc["path"] != "dense":
        assert ref_inter is not None, f"{where}no intermediates for an NSA-path sample"
        assert_block_indices(ref_inter["block_indices"], orc["block_indices"], orc["importance"], near_tie, where)
        names = ["gates64", "k_cmp", "v_cmp", "lse_cmp", "o_cmp", "o_slc", "o_swd"]
        if orc["path"] == "mixed":
            names.append("dense_output")
        for name in names:
            got = ref_inter[name]
            exp = orc[name]
            assert got.shape == exp.shape, f"{where}{name}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
            torch.testing.assert_close(got.double(), exp, **tol, msg=lambda m, n=name: f"{where}{n}: {m}")
    assert ref_out.shape == orc["output"].shape, f"{where}output shape {tuple(ref_out.shape)}"
    torch.testing.assert_close(ref_out.double(), orc["output"], **tol, msg=lambda m: f"{where}output (T={T}): {m}")


def check(samples, *, dtype=torch.float32, expect_paths=None, length=None, **kw):
    outs, inters, _, _ = run_reference(samples, dtype=dtype, length=length, **kw)
    tol, near = (F64_TOL, 0.0) if dtype == torch.float64 else (F32_TOL, NEAR_TIE_F32)
    for b, s in enumerate(samples):
        orc = run_oracle(s, **kw)
        if expect_paths is not None:
            assert orc["path"] == expect_paths[b]
        assert_matches_oracle(outs[b], inters[b], orc, tol=tol, near_tie=near, where=f"sample {b}: ")
    return outs, inters


# ------------------------------------------------------------------------------------------------------
# 0. the oracle itself against the authors' code
# ------------------------------------------------------------------------------------------------------
def _conformance_logits(t, meta):
    x = t["hidden_states"][0].double()
    h = torch.nn.functional.gelu(x @ t["g_proj_1.weight"].double().T + t["g_proj_1.bias"].double())
    logits = h @ t["g_proj_2.weight"].double().T + t["g_proj_2.bias"].double()
    return logits.view(x.shape[0], int(meta["num_heads"]), 3) / float(meta["gate_temperature"])


@pytest.mark.skipif(not CONFORMANCE_CASES, reason=f"conformance vectors not found in {CONFORMANCE}")
@pytest.mark.parametrize("path", CONFORMANCE_CASES, ids=lambda p: p.stem)
def test_oracle_matches_conformance(path):
    t = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    T = int(meta["T"])
    is_vision = oracle_token_is_vision(t["position_ids"][:, 0])
    assert torch.equal(is_vision, t["is_vision"][0].bool())
    assert oracle_nsa_layout(int(meta["num_heads"]), int(meta["num_kv_heads"])) == (int(meta["nsa_heads"]), 16)
    orc = oracle_hybrid_attention(
        t["query"][0], t["key"][0], t["value"][0], _conformance_logits(t, meta), is_vision,
        block_size=int(meta["block_size"]), block_count=int(meta["block_counts"]),
        window_size=int(meta["window_size"]),
    )
    assert orc["path"] == "mixed"
    assert torch.equal(orc["block_indices"], t["block_indices"][0].long())
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(orc["gates64"], t["gates"][0].double(), **tol)
    for name in ["k_cmp", "v_cmp", "lse_cmp"]:
        torch.testing.assert_close(orc[name], t[name][0].double(), **tol)
    for name in ["o_cmp", "o_slc", "o_swd", "dense_output"]:
        if name in t:
            torch.testing.assert_close(orc[name], t[name][0].double(), **tol)
    torch.testing.assert_close(orc["output"].reshape(T, -1), t["output"][0].double(), **tol)


def test_oracle_topk_spec_observations():
    """reference-semantics §6: all queries zero, one kv group (earlier blocks tie, current block on top)."""
    def kept(cur, S):
        ids = oracle_topk([1.0] * cur + [16.0], S)
        assert ids[0] == cur
        return sorted(ids[1:])

    assert kept(4, 4) == [1, 2, 3]
    assert kept(5, 4) == [2, 3, 4]
    assert kept(6, 4) == [2, 4, 5]
    assert kept(7, 4) == [4, 5, 6]
    r = lambda a, b: list(range(a, b + 1))  # noqa: E731
    assert kept(40, 32) == r(8, 11) + r(13, 39)
    assert kept(50, 32) == r(16, 23) + [26] + r(28, 49)
    assert kept(64, 32) == r(32, 47) + r(49, 63)
    assert kept(80, 32) == r(32, 39) + r(41, 47) + r(64, 79)
    assert kept(128, 32) == r(96, 111) + r(113, 127)
    # README of the conformance vectors, all-zero queries, S = 4 (not tied / tied with the current block)
    assert oracle_topk([0.5, 16.0], 4) == [1, 0, -1, -1]
    assert oracle_topk([16.0, 16.0], 4) == [1, 0, -1, -1]
    assert oracle_topk([1.0, 1.0, 16.0], 4) == [2, 1, 0, -1]
    assert oracle_topk([16.0, 16.0, 16.0], 4) == [1, 2, 0, -1]
    assert oracle_topk([1.0] * 3 + [16.0], 4) == [3, 2, 1, 0]
    assert oracle_topk([16.0] * 4, 4) == [2, 3, 1, 0]
    assert oracle_topk([1.0] * 4 + [16.0], 4) == [4, 2, 1, 3]
    assert oracle_topk([16.0] * 5, 4) == [2, 3, 1, 4]


# ------------------------------------------------------------------------------------------------------
# 1. building blocks
# ------------------------------------------------------------------------------------------------------
def test_token_is_vision():
    ref = _reference()
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 3, (3, 2, 300), generator=g)  # small range: many coinciding coordinates
    pos[:, 1, :40] = torch.arange(40)  # text run: all three rows equal
    got = ref.token_is_vision(pos)
    assert got.dtype == torch.bool and got.shape == (2, 300)
    for b in range(2):
        assert torch.equal(got[b], oracle_token_is_vision(pos[:, b]))
    for path in CONFORMANCE_CASES:
        t = load_file(path)
        assert torch.equal(ref.token_is_vision(t["position_ids"])[0], t["is_vision"][0].bool())


@pytest.mark.parametrize("hq,hkv", [(28, 4), (4, 2), (8, 1), (12, 2), (40, 4), (32, 8), (16, 16)])
def test_nsa_head_layout(hq, hkv):
    assert tuple(_reference().nsa_head_layout(hq, hkv)) == oracle_nsa_layout(hq, hkv)


def test_fold_heads_inverts_pad_heads_and_its_gradient_is_the_plain_expressions():
    """fold_heads averages the two copies of each head that pad_heads lays out; its hand-written backward gives
    the gradient autograd gives the plain expression: half to each copy, zero to the padded heads."""
    ref = _reference()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, 4, generator=g)
    assert torch.equal(ref.fold_heads(ref.pad_heads(x, 16), 7), x)
    padded = torch.randn(2, 5, 16, 4, generator=g, requires_grad=True)
    grad = torch.randn(2, 5, 7, 4, generator=g).transpose(1, 2).contiguous().transpose(1, 2)  # a strided grad
    ours = torch.autograd.grad(ref.fold_heads(padded, 7), padded, grad)[0]
    plain = torch.autograd.grad((padded[:, :, :7] + padded[:, :, 7:14]) * 0.5, padded, grad)[0]
    assert torch.equal(ours, plain)
    assert torch.equal(ours[:, :, 14:], torch.zeros(2, 5, 2, 4))


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_compress_kv(T):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(2, T, 4, 16, generator=g)
    got = _reference().compress_kv(x, 64)
    assert got.shape == (2, math.ceil(T / 64), 4, 16)
    for b in range(2):
        torch.testing.assert_close(got[b].double(), oracle_compress_kv(x[b].transpose(0, 1).double(), 64), **F32_TOL)


def _select_blocks(q, k_cmp, lse, block_count, block_size, scale):
    ref = _reference()
    kwargs = {}
    if "num_keys" in inspect.signature(ref.select_blocks).parameters:
        kwargs["num_keys"] = q.shape[1]
    return ref.select_blocks(q, k_cmp, lse, block_count, block_size, scale, **kwargs)


@pytest.mark.parametrize("block_count", [3, 32])
def test_select_blocks_many_chunks(block_count):
    """More than 64 candidate blocks (up to three chunks of the kernel's network): random scores, blocks
    with zero pooled keys (ties among earlier blocks) and zero-query rows (every earlier block tied)."""
    g = torch.Generator().manual_seed(block_count)
    BS, P, Hkv, D = 64, 32, 2, 8
    NB = 140
    T = NB * BS - 17  # last block partial
    q = torch.randn(1, T, P, D, generator=g)
    rows = sorted(set([0, 63, 64, 2047, 2048, 4095, 4096, 4159, T - 1]
                      + torch.randint(0, T, (40,), generator=g).tolist()))
    for r in rows[::3]:
        q[0, r] = 0.0
    k_cmp = torch.randn(1, NB, Hkv, D, generator=g)
    k_cmp[0, ::5] = 0.0
    lse = torch.rand(1, P, T, generator=g) * 4 - 1
    scale = D**-0.5
    got = _select_blocks(q, k_cmp, lse, block_count, BS, scale)
    S = next_power_of_2(block_count)
    assert got.shape == (1, T, Hkv, S) and got.dtype == torch.int32
    exp, imp = oracle_select_blocks(
        q[0].transpose(0, 1).double(), k_cmp[0].double(), lse[0].double(), G=P // Hkv,
        block_count=block_count, block_size=BS, scale=scale, rows=rows, return_importance=True,
    )
    assert_block_indices(got[0][rows], exp[rows], [imp[r] for r in rows])


def test_select_blocks_spec_observations():
    """§6: all queries zero, one kv group, S = 32; the current block 40/50/64/80/128 keeps these blocks."""
    BS, P, D = 64, 16, 8
    NB = 129
    T = NB * BS
    q = torch.zeros(1, T, P, D)
    k_cmp = torch.randn(1, NB, 1, D, generator=torch.Generator().manual_seed(0))
    lse = torch.ones(1, P, T)  # every earlier block scores 16/e < 16
    got = _select_blocks(q, k_cmp, lse, 32, BS, D**-0.5)
    r = lambda a, b: list(range(a, b + 1))  # noqa: E731
    expected = {40: r(8, 11) + r(13, 39), 50: r(16, 23) + [26] + r(28, 49), 64: r(32, 47) + r(49, 63),
                80: r(32, 39) + r(41, 47) + r(64, 79), 128: r(96, 111) + r(113, 127)}
    for cur, keep in expected.items():
        for t in (cur * BS, cur * BS + 63):
            ids = got[0, t, 0].tolist()
            assert ids[0] == cur and sorted(ids[1:]) == keep, f"current block {cur}, row {t}: {ids}"
            assert ids == oracle_topk([16 / math.e] * cur + [16.0], 32)


# ------------------------------------------------------------------------------------------------------
# 2. the hybrid attention, one sample
# ------------------------------------------------------------------------------------------------------
SHORT_CASES = {
    # T: (vision spans, isolated text positions inside them); spans avoid block boundaries
    1: ([(0, 1)], ()),
    63: ([(5, 50)], (27,)),
    64: ([(10, 64)], ()),
    65: ([(0, 30), (40, 65)], (0,)),
    200: ([(19, 179)], (19, 51)),
}


@pytest.mark.parametrize("T", sorted(SHORT_CASES))
def test_hybrid_short(T):
    spans, text_at = SHORT_CASES[T]
    vis = vision_mask(T, spans, text_at)
    s = make_sample(T, vis, seed=T)
    path = "nsa" if bool(vis.all()) else "mixed"
    check([s], expect_paths=[path])


def test_hybrid_single_text_token_is_dense():
    s = make_sample(1, vision_mask(1, []), seed=11)
    outs, inters = check([s], expect_paths=["dense"])
    assert inters[0] is None


def test_hybrid_T1000_two_videos_block_count_32():
    """16 blocks for 32 slots: every candidate kept; two videos, text before/between/after, the first token
    of every 'frame' typed text."""
    T = 1000
    vis = vision_mask(T, [(37, 421), (500, 957)], text_at=list(range(37, 421, 97)) + list(range(500, 957, 113)))
    check([make_sample(T, vis, seed=1000)], block_count=32, expect_paths=["mixed"])


def test_hybrid_block_count_3_under_pressure_with_ties():
    """S = 4 with up to 8 candidates: two videos; blocks 2 and 3 are text only (pooled keys zero, so
    exactly tied for every vision query); zero-query vision rows (every earlier block tied)."""
    T = 470
    vis = vision_mask(T, [(20, 128), (256, 430)], text_at=(300,))
    s = make_sample(T, vis, seed=470, zero_q_rows=list(range(330, 345)) + [400, 469])
    check([s], block_count=3, expect_paths=["mixed"])


def test_hybrid_all_queries_zero_block_count_3():
    """Every score of a row tied (as in case_T320_bc3_q0), on a layout with text between two videos."""
    T = 333
    vis = vision_mask(T, [(19, 150), (170, 320)])
    check([make_sample(T, vis, seed=333, zero_q=True)], block_count=3, expect_paths=["mixed"])


def test_hybrid_all_text_is_dense():
    T = 200
    check([make_sample(T, vision_mask(T, []), seed=5)], expect_paths=["dense"])


@pytest.mark.parametrize("block_count", [3, 32])
def test_hybrid_all_vision_is_pure_nsa(block_count):
    T = 300 if block_count == 3 else 130
    s = make_sample(T, vision_mask(T, [(0, T)]), seed=300 + block_count, zero_q_rows=(T // 2, T - 1))
    check([s], block_count=block_count, expect_paths=["nsa"])


def test_hybrid_small_window_and_block():
    """Non-default sizes: block 16 (S = 4 of up to 13 candidates in one chunk of 16), window 40."""
    T = 210
    vis = vision_mask(T, [(9, 100), (120, 201)], text_at=(50,))
    check([make_sample(T, vis, seed=21)], block_size=16, block_count=4, window_size=40, expect_paths=["mixed"])


@pytest.mark.parametrize("hq,hkv", [(4, 2), (12, 2)])
def test_hybrid_other_head_layout(hq, hkv):
    T = 330
    vis = vision_mask(T, [(30, 140), (150, 320)])
    s = make_sample(T, vis, Hq=hq, Hkv=hkv, seed=hq, zero_q_rows=(200,))
    check([s], block_count=3, expect_paths=["mixed"])
    s2 = make_sample(100, vision_mask(100, [(0, 100)]), Hq=hq, Hkv=hkv, seed=hq + 1)
    check([s2], block_count=3, expect_paths=["nsa"])


def test_hybrid_float64():
    """float64 in, float64 out: the reference is then held to the oracle at float64 precision, block
    order included with no near-tie allowance."""
    T = 300
    vis = vision_mask(T, [(19, 140), (160, 290)])
    check([make_sample(T, vis, seed=64, zero_q_rows=(100,))], dtype=torch.float64, block_count=3,
          expect_paths=["mixed"])


# ------------------------------------------------------------------------------------------------------
# 3. batches with left padding: every sample as if it were alone, on its own tokens
# ------------------------------------------------------------------------------------------------------
def test_batch2_left_padding():
    a = make_sample(150, vision_mask(150, [(7, 120)], (60,)), seed=150)
    b = make_sample(230, vision_mask(230, [(0, 230)]), seed=230)
    check([a, b], block_count=3, expect_paths=["mixed", "nsa"])


def test_batch3_left_padding_mixed_dense_nsa():
    a = make_sample(100, vision_mask(100, []), seed=100)
    b = make_sample(180, vision_mask(180, [(3, 70), (90, 170)]), seed=180, zero_q_rows=(120,))
    c = make_sample(64, vision_mask(64, [(0, 64)]), seed=64)
    outs, inters = check([a, b, c], block_count=3, length=200, expect_paths=["dense", "mixed", "nsa"])
    assert inters[0] is None


def test_batch_padding_does_not_shift_blocks():
    """The same sample alone and left-padded by 37 (not a block multiple) gives the same numbers."""
    s = make_sample(140, vision_mask(140, [(10, 130)]), seed=7)
    alone, _, _, _ = run_reference([s], block_count=3)
    padded, _, _, _ = run_reference([s], block_count=3, length=177)
    torch.testing.assert_close(padded[0], alone[0], atol=1e-6, rtol=1e-5)


def test_one_plan_serves_every_layer_of_a_pass():
    """A pass's plan (plan_hybrid), built once, gives each layer's call the numbers of a call that plans for itself,
    on a left-padded batch of a dense, a mixed and an NSA-only sample; a plan of other sizes and bad flags are
    refused with what to do."""
    ref = _reference()
    samples = [make_sample(100, vision_mask(100, []), seed=1),
               make_sample(180, vision_mask(180, [(3, 70), (90, 170)]), seed=2, zero_q_rows=(120,)),
               make_sample(64, vision_mask(64, [(0, 64)]), seed=3)]
    is_vis, mask = torch.zeros(3, 200, dtype=torch.bool), torch.zeros(3, 200, dtype=torch.bool)
    for b, s in enumerate(samples):
        is_vis[b, 200 - s["vis"].shape[0]:] = s["vis"]
        mask[b, 200 - s["vis"].shape[0]:] = True
    plan = ref.plan_hybrid(is_vis, mask, 200)
    assert (plan.nsa_samples, plan.mixed_samples) == ((False, True, True), (False, True, False))
    assert plan.sample_keys[0] is None and plan.sample_rows[2].tolist() == list(range(136, 200))
    g = torch.Generator().manual_seed(9)
    for layer in range(2):  # two layers' inputs, one plan
        q, k, v = (torch.randn(3, h, 200, 16, generator=g) for h in (28, 4, 4))
        logits = torch.randn(3, 200, 28, 3, generator=g)
        alone = ref.hybrid_attention(q, k, v, logits, is_vis, mask, block_count=3)
        planned = ref.hybrid_attention(q, k, v, logits, is_vis, mask, block_count=3, plan=plan)
        assert torch.equal(alone, planned), layer
    with pytest.raises(ValueError, match="plan_hybrid"):  # a continuation's 150 query rows, the pass's plan
        ref.hybrid_attention(q[:, :, 50:], k, v, logits[:, 50:], is_vis, mask, block_count=3, plan=plan)
    with pytest.raises(ValueError, match="plan_hybrid"):  # planned without the padding mask
        ref.hybrid_attention(q, k, v, logits, is_vis, mask, block_count=3, plan=ref.plan_hybrid(is_vis, None, 200))
    with pytest.raises(ValueError, match="attention_mask must be None or a bool"):
        ref.plan_hybrid(is_vis, mask.long(), 200)
    with pytest.raises(ValueError, match="num_queries"):
        ref.plan_hybrid(is_vis, mask, 201)


# ------------------------------------------------------------------------------------------------------
# 4. a pass that continues a cache (spec §7: chunked prefill = unchunked; a decode step is dense)
# ------------------------------------------------------------------------------------------------------
def _run_continuation(s, start, **kw):
    ref = _reference()
    q = s["q"][None, :, start:]
    out = ref.hybrid_attention(q, s["k"][None], s["v"][None], s["logits"][None, start:], s["vis"][None], None, **kw)
    return out[0]


def test_chunked_prefill_matches_unchunked():
    """T <= 64*S: every candidate block is kept, so the output cannot depend on the misread log-sum-exp of
    rows outside the chunk; a second chunk with vision tokens must reproduce the unchunked rows."""
    T, start = 400, 230
    vis = vision_mask(T, [(20, 180), (210, 380)])
    s = make_sample(T, vis, seed=400)
    orc = run_oracle(s, block_count=32)
    got = _run_continuation(s, start, block_count=32)
    torch.testing.assert_close(got.double(), orc["output"][start:], **F32_TOL)


def test_decode_step_after_video_is_dense():
    """§2: a one-token decode step (a text token) is plain dense attention over the whole cache."""
    T = 300
    vis = vision_mask(T, [(20, 290)])
    s = make_sample(T, vis, seed=301)
    got = _run_continuation(s, T - 1, block_count=3)
    dense = oracle_hybrid_attention(s["q"], s["k"], s["v"], s["logits"], torch.zeros(T, dtype=torch.bool))
    torch.testing.assert_close(got.double(), dense["output"][T - 1 :], **F32_TOL)
