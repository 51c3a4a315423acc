"""GPU validation of the Triton kernels against the float32 PyTorch reference (7B layout: 64 padded heads,
4 kv heads, D = 128, block 64, 32 blocks, window 256).

Run on a CUDA machine from the repository root:

    python -m pytest tests/gpu -q -s        # NSA_GPU_T=1024,4096 to choose the lengths

Conformance vectors are looked up in $NSA_CONFORMANCE_DIR, ../shared/conformance, .device/conformance.
Skips cleanly when CUDA or Triton is missing.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from nsa_kernels import reference as R  # noqa: E402
from nsa_kernels import triton_nsa as TN  # noqa: E402

DEV = "cuda"
P, HKV, D, BS, BC, W = 64, 4, 128, 64, 32, 256
SCALE = D ** -0.5
LENGTHS = [int(x) for x in os.environ.get("NSA_GPU_T", "1024,4096,16384,32768").split(",")]
GRAD_REF_MAX_T = 4096  # autograd through the reference materialises T x T probabilities beyond this


def _conf_dir():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    for d in (os.environ.get("NSA_CONFORMANCE_DIR", ""), os.path.join(os.path.dirname(root), "shared", "conformance"),
              os.path.join(root, ".device", "conformance"), "/work/shared/conformance"):
        if d and os.path.isdir(d):
            return d
    return None


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(T, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(1, T, P, D, device=DEV, generator=g)
    q[:, :, 56:] = 0
    k = torch.randn(1, T, HKV, D, device=DEV, generator=g)
    v = torch.randn(1, T, HKV, D, device=DEV, generator=g)
    gates = torch.sigmoid(torch.randn(1, T, P, 3, device=DEV, generator=g))
    gates[:, :, 56:] = 0
    return [x.to(dtype) for x in (q, k, v, gates)]


# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["case_T200", "case_T320", "case_T320_bc3", "case_T320_bc3_q0"])
def test_conformance_fp32(case):
    d = _conf_dir()
    if d is None or not os.path.exists(os.path.join(d, f"{case}.safetensors")):
        pytest.skip("conformance vectors not found")
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.path.join(d, f"{case}.safetensors")
    t = {k: v.to(DEV) for k, v in load_file(path).items()}
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    x = t["hidden_states"]
    h1 = torch.nn.functional.gelu(x @ t["g_proj_1.weight"].T + t["g_proj_1.bias"])
    logits = (h1 @ t["g_proj_2.weight"].T + t["g_proj_2.bias"]).view(1, -1, 28, 3) / 0.3
    query = t["query"]
    if meta.get("all_queries_zero", "false").lower() in ("true", "1"):
        query = query * 0
    out, inter = TN.hybrid_attention(query, t["key"], t["value"], logits, t["is_vision"].bool(), None,
                                     block_size=64, block_count=int(meta["block_counts"]), window_size=256,
                                     return_intermediates=True)
    T = out.shape[1]
    assert torch.equal(inter[0]["block_indices"], t["block_indices"])
    torch.testing.assert_close(inter[0]["lse_cmp"], t["lse_cmp"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inter[0]["k_cmp"], t["k_cmp"], rtol=1e-5, atol=1e-5)
    if meta.get("all_queries_zero", "false").lower() not in ("true", "1"):
        torch.testing.assert_close(out.reshape(1, T, -1), t["output"], rtol=1e-4, atol=1e-4)
    out2 = TN.hybrid_attention(query, t["key"], t["value"], logits, t["is_vision"].bool(), None,
                               block_size=64, block_count=int(meta["block_counts"]), window_size=256)
    if meta.get("all_queries_zero", "false").lower() not in ("true", "1"):
        torch.testing.assert_close(out2.reshape(1, T, -1), t["output"], rtol=1e-4, atol=1e-4)


def _assert_near_ties(q, kc, lse, bi_ours, bi_ref, rel_tol=1e-5, max_rows=256, offset=0):
    """Rows where the two selections differ must differ only between blocks whose float64 scores are
    equal to within ``rel_tol`` (rounding-level near-ties): rank by rank the scores agree. Row ``t`` of ``q``
    sits at position ``t + offset``."""
    diff = (bi_ours != bi_ref).any(-1).nonzero().tolist()
    G = q.shape[2] // kc.shape[2]
    lse_read = lse.reshape(q.shape[0], q.shape[1], q.shape[2])
    worst = 0.0
    for b, t, g in diff[:max_rows]:
        qs = q[b, t, g * G:(g + 1) * G].double() * SCALE
        sc = torch.exp(qs @ kc[b, :, g].double().T - lse_read[b, t, g * G:(g + 1) * G, None].double()).sum(0)
        cur = (t + offset) // BS
        sc[cur] = G
        a, r = bi_ours[b, t, g].long(), bi_ref[b, t, g].long()
        assert torch.equal(a >= 0, r >= 0)
        va, vr = sc[a[a >= 0]], sc[r[r >= 0]]
        worst = max(worst, ((va - vr).abs() / vr.abs().max()).max().item())
    assert worst <= rel_tol, f"selection differs beyond near-ties: relative score gap {worst:.2e}"
    return len(diff), worst


# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", LENGTHS)
def test_layout_7b_forward(T):
    """Per-branch forward: fp32 kernels == fp32 reference (selection identical), bf16 kernels close."""
    q, k, v, gates = _inputs(T, torch.float32, seed=T)
    kc, vc = R.compress_kv(k, BS), R.compress_kv(v, BS)
    with torch.no_grad():
        o_ref, lse_ref = R.compression_attention(q, kc, vc, BS, SCALE, T)
        bi_ref = R.select_blocks(q, kc, lse_ref, BC, BS, SCALE, T)
        slc_ref = R.selected_attention(q, k, v, bi_ref, BS, SCALE)
        swd_ref = R.window_attention(q, k, v, W, SCALE)
        out_ref = o_ref * gates[..., 0:1] + slc_ref * gates[..., 1:2] + swd_ref * gates[..., 2:3]
        # float32 kernels
        o32, lse32 = TN.compression_attention(q, TN.compress_kv(k, BS), TN.compress_kv(v, BS), BS, SCALE, T)
        bi32 = TN.select_blocks(q, kc, lse_ref, BC, BS, SCALE, T)
        rows_diff = (bi32 != bi_ref).any(-1).float().mean().item()
        slc32 = TN.selected_attention(q, k, v, bi_ref, BS, SCALE)
        swd32 = TN.window_attention(q, k, v, W, SCALE)
        out32, inter32 = TN.nsa_attention(q, k, v, gates, block_count=BC, block_size=BS, window_size=W,
                                          scale=SCALE, return_intermediates=True)
        print(f"\nT={T} fp32: o_cmp {_rel(o32, o_ref):.1e} lse {(lse32 - lse_ref).abs().max().item():.1e} "
              f"topk rows differing {rows_diff:.2e} slc {_rel(slc32, slc_ref):.1e} swd {_rel(swd32, swd_ref):.1e} "
              f"out {_rel(out32, out_ref):.1e}")
        assert _rel(o32, o_ref) < 1e-5 and (lse32 - lse_ref).abs().max().item() < 1e-4
        n_diff, gap = _assert_near_ties(q, kc, lse_ref, bi32, bi_ref)
        print(f"T={T} fp32 topk: {n_diff} (row, kv head) differ, all near-ties (max rel score gap {gap:.1e})")
        assert rows_diff < 5e-3
        assert _rel(slc32, slc_ref) < 1e-5 and _rel(swd32, swd_ref) < 1e-5
        # rows whose selection (made with our own lse inside nsa_attention) agrees for every kv head
        same = ~(inter32["block_indices"] != bi_ref).any(-1).any(-1)
        assert _rel(out32[same], out_ref[same]) < 1e-5
        # bfloat16 kernels vs the float32 reference (same block choice for the selected branch)
        qb, kb, vb, gb = (x.to(torch.bfloat16) for x in (q, k, v, gates))
        ob, lseb = TN.compression_attention(qb, TN.compress_kv(kb, BS), TN.compress_kv(vb, BS), BS, SCALE, T)
        bib = TN.select_blocks(qb, TN.compress_kv(kb, BS), lseb, BC, BS, SCALE, T)
        rows_diff_b = (bib != bi_ref).any(-1).float().mean().item()
        set_diff_b = (bib.sort(-1).values != bi_ref.sort(-1).values).any(-1).float().mean().item()
        slcb = TN.selected_attention(qb, kb, vb, bi_ref, BS, SCALE)
        swdb = TN.window_attention(qb, kb, vb, W, SCALE)
        outb = TN.nsa_attention(qb, kb, vb, gb, block_count=BC, block_size=BS, window_size=W, scale=SCALE)
        print(f"T={T} bf16: o_cmp {_rel(ob, o_ref):.1e} lse {(lseb - lse_ref).abs().max().item():.1e} "
              f"topk rows in other order {rows_diff_b:.2e} other set {set_diff_b:.2e} slc {_rel(slcb, slc_ref):.1e} "
              f"swd {_rel(swdb, swd_ref):.1e} out {_rel(outb, out_ref):.1e}")
        assert _rel(ob, o_ref) < 2e-2 and _rel(slcb, slc_ref) < 2e-2 and _rel(swdb, swd_ref) < 2e-2
        assert (lseb - lse_ref).abs().max().item() < 0.1
        assert set_diff_b < 0.15  # bf16 rounding moves near-boundary blocks (6% of rows at 32K)
        assert _rel(outb, out_ref) < 5e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_rows_per_program_agree(dtype):
    """Ranking one row per program or several (sharing loads, one wider score product and network tile) picks
    the same blocks: identical on exactly tied rows, near-ties only elsewhere (the score sums are rounded in
    another order), also for a chunk whose programs straddle block boundaries (rows at positions 1001..)."""
    import nsa_kernels.selection as SEL
    from nsa_kernels._triton_utils import DEFAULT_LAUNCH

    T, off = 16384, 1001
    q, k, v, _ = _inputs(T, dtype, seed=5)
    q[:, 5000:5300] = 0  # exact ties
    kc = TN.compress_kv(k, BS)
    _, lse = TN.compression_attention(q, kc, TN.compress_kv(v, BS), BS, SCALE, T)
    q_chunk = q[:, off:]
    lse_chunk = lse.reshape(1, -1)[:, off * P:].reshape(1, P, T - off)  # the chunk's own misread array
    got = {}
    for rows in (1, 4, 8):
        launch = dataclasses.replace(DEFAULT_LAUNCH, topk_rows_per_program=rows)
        got[rows] = (SEL.select_blocks(q, kc, lse, BC, BS, SCALE, T, launch=launch),
                     SEL.select_blocks(q_chunk, kc, lse_chunk, BC, BS, SCALE, T, launch=launch))
    for rows in (4, 8):
        for part, (qq, ll, shift) in enumerate(((q, lse, 0), (q_chunk, lse_chunk, off))):
            a, b = got[rows][part], got[1][part]
            assert torch.equal(a[:, 5000 - shift:5300 - shift], b[:, 5000 - shift:5300 - shift])
            if dtype == torch.float32:
                _assert_near_ties(qq, kc, ll, a, b, offset=shift)
            else:
                assert (a != b).any(-1).float().mean().item() < 0.005


@pytest.mark.parametrize("T", LENGTHS)
def test_layout_7b_gradients(T):
    """Gradients of nsa_attention: fp32 kernels vs reference autograd (T <= 4096), bf16 vs fp32 kernels."""
    q, k, v, gates = _inputs(T, torch.float32, seed=T + 1)
    kw = dict(block_count=BC, block_size=BS, window_size=W, scale=SCALE)
    go = torch.randn(1, T, P, D, device=DEV)

    def grads(fn, xs, dtype):
        xs = [x.to(dtype).detach().requires_grad_(True) for x in xs]
        out = fn(*xs, **kw)
        return torch.autograd.grad(out, xs, go.to(dtype))

    g32 = grads(TN.nsa_attention, (q, k, v, gates), torch.float32)
    if T <= GRAD_REF_MAX_T:
        gref = grads(R.nsa_attention, (q, k, v, gates), torch.float32)
        errs = [_rel(a[..., :56, :] if i in (0, 3) else a, b[..., :56, :] if i in (0, 3) else b)
                for i, (a, b) in enumerate(zip(g32, gref))]
        print(f"\nT={T} fp32 grads vs reference: dq {errs[0]:.1e} dk {errs[1]:.1e} dv {errs[2]:.1e} dg {errs[3]:.1e}")
        assert max(errs) < 1e-4
        del gref
    gb = grads(TN.nsa_attention, (q, k, v, gates), torch.bfloat16)
    errs = [_rel(a, b) for a, b in zip(gb, g32)]
    print(f"T={T} bf16 grads vs fp32 kernels: dq {errs[0]:.1e} dk {errs[1]:.1e} dv {errs[2]:.1e} dg {errs[3]:.1e}")
    assert max(errs) < 5e-2


def test_offsets_beyond_int32_rows():
    """More than 2**31 / (64 * 128) = 262144 query rows: element offsets of the [B, T, 64, 128] tensors pass
    int32. The window branch and the gate mixing on the last rows equal the same kernels on a short tail
    (the window sees the same 256 keys), so a wrapped offset shows up as a mismatch or a fault."""
    from nsa_kernels.gate_mix import mix_branches

    T, tail = 262144 + 200, 100
    g = torch.Generator(device=DEV).manual_seed(3)
    q = torch.randn(1, T, P, D, device=DEV, generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, T, HKV, D, device=DEV, generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, T, HKV, D, device=DEV, generator=g, dtype=torch.bfloat16)
    with torch.no_grad():
        full = TN.window_attention(q, k, v, W, SCALE)[:, -tail:].float()
        short = TN.window_attention(q[:, -tail:], k[:, -tail - W:], v[:, -tail - W:], W, SCALE).float()
        torch.testing.assert_close(full, short, rtol=2e-2, atol=2e-2)
        gates = torch.rand(1, T, P, 3, device=DEV, generator=g).to(torch.bfloat16)
        mixed = mix_branches(q, q, q, gates)[:, -tail:].float()
        expect = q[:, -tail:].float() * gates[:, -tail:].float().sum(-1, keepdim=True)
        torch.testing.assert_close(mixed, expect, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_per_tile", [2, 4, 8])
def test_selected_union_tiles_match_rows(dtype, rows_per_tile):
    """Tiles of R rows over the union of their blocks compute what the per-row schedule computes, output and
    log-sum-exp, on the real block choice of a random and of a video-like input (chunk rows at an offset too)."""
    from nsa_kernels.selected_attention import selected_attention_fwd
    from videonsa.video_like import video_like_qkv

    T, off = 4096, 777
    for kind in ("random", "video-like"):
        if kind == "random":
            q, k, v, _ = _inputs(T, dtype, seed=rows_per_tile)
        else:
            q28, k, v = video_like_qkv(T, 28, HKV, D, dtype=dtype, seed=rows_per_tile)
            q = R.pad_heads(q28.transpose(1, 2), P)
            k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        kc = TN.compress_kv(k, BS)
        _, lse = TN.compression_attention(q, kc, TN.compress_kv(v, BS), BS, SCALE, T)
        bi = TN.select_blocks(q, kc, lse, BC, BS, SCALE, T)
        for qq, bb in ((q, bi), (q[:, off:], bi[:, off:])):
            o_row, lse_row = selected_attention_fwd(qq, k, v, bb, BS, SCALE, rows_per_tile=1)
            o_tile, lse_tile = selected_attention_fwd(qq, k, v, bb, BS, SCALE, rows_per_tile=rows_per_tile)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert torch.isfinite(o_tile).all()
            assert _rel(o_tile, o_row) < tol, (kind, _rel(o_tile, o_row))
            assert _rel(lse_tile[..., :56], lse_row[..., :56]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selected_tma_matches_pointer_loads(dtype):
    """Per-row selected attention with its key/value blocks fetched by the tensor memory accelerator gives the
    pointer-load kernels' output, log-sum-exp and dq (the same arithmetic in the same order), on the
    real block choice of random and video-like inputs, chunk rows at an offset and the padded 64-head layout."""
    import dataclasses

    from nsa_kernels._triton_utils import DEFAULT_LAUNCH
    from nsa_kernels.selected_attention import selected_attention_bwd, selected_attention_fwd, tma_usable
    from videonsa.video_like import video_like_qkv

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the tensor memory accelerator needs a Hopper or newer GPU")
    T, off = 4096, 777
    tma = dataclasses.replace(DEFAULT_LAUNCH, selected_tma=True)
    for kind in ("random", "video-like"):
        if kind == "random":
            q, k, v, _ = _inputs(T, dtype, seed=5)
        else:
            q28, k, v = video_like_qkv(T, 28, HKV, D, dtype=dtype, seed=5)
            q = R.pad_heads(q28.transpose(1, 2), P)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # head-major strides, as the model passes them
        assert tma_usable(k, v, D)
        kc = TN.compress_kv(k, BS)
        _, lse = TN.compression_attention(q, kc, TN.compress_kv(v, BS), BS, SCALE, T)
        bi = TN.select_blocks(q, kc, lse, BC, BS, SCALE, T)
        for qq, bb in ((q, bi), (q[:, off:], bi[:, off:])):
            o_ptr, lse_ptr = selected_attention_fwd(qq, k, v, bb, BS, SCALE, rows_per_tile=1)
            o_tma, lse_tma = selected_attention_fwd(qq, k, v, bb, BS, SCALE, rows_per_tile=1, launch=tma)
            assert _rel(o_tma, o_ptr) < 1e-6 and _rel(lse_tma, lse_ptr) < 1e-6, (kind, _rel(o_tma, o_ptr))
            do = torch.randn_like(o_ptr)
            dq_ptr = selected_attention_bwd(qq, k, v, bb, o_ptr, lse_ptr, do, BS, SCALE)[0]
            dq_tma = selected_attention_bwd(qq, k, v, bb, o_ptr, lse_ptr, do, BS, SCALE, launch=tma)[0]
            assert _rel(dq_tma, dq_ptr) < 1e-6, (kind, _rel(dq_tma, dq_ptr))


@pytest.mark.parametrize("T", [40000, 300000])
def test_hybrid_in_query_chunks_equals_one_piece(T):
    """The hybrid layer of the 7B (28 / 4 heads, a text | video | text prompt, video-like inputs) with its NSA part
    in query chunks of 8192 rows gives the bits of the whole-query pass (300K: beyond int32 element offsets of the
    padded query, where the misread log-sum-exp of a chunk's rows lies in other chunks)."""
    from videonsa.video_like import video_like_qkv

    q, k, v = video_like_qkv(T, 28, HKV, D, seed=5, prefix=100)
    g = torch.Generator(device=DEV).manual_seed(6)
    logits = torch.randn(1, T, 28, 3, device=DEV, generator=g, dtype=torch.bfloat16)
    vision = torch.zeros(1, T, dtype=torch.bool, device=DEV)
    vision[:, 100:T - 40] = True
    kw = dict(block_size=BS, block_count=BC, window_size=W)
    with torch.no_grad():
        pieces = TN.hybrid_attention(q, k, v, logits, vision, None, query_chunk=8192, **kw)
        whole = TN.hybrid_attention(q, k, v, logits, vision, None, **kw)
    assert torch.isfinite(pieces).all()
    assert torch.equal(pieces, whole)


@pytest.mark.parametrize("T", [2048])
def test_hybrid_on_model_heads_gradients(T):
    """The hybrid layer as the model calls it (28 / 4 heads, text | video | text, the query a [B, H, T, D] tensor):
    its NSA part reads the model's query in place and folds the three branches' dq in one pass. float32 values
    and gradients of query, key, value and gate logits against the reference's autograd; bf16 against float32."""
    g = torch.Generator(device=DEV).manual_seed(T)
    query = torch.randn(1, 28, T, D, device=DEV, generator=g)
    key = torch.randn(1, HKV, T, D, device=DEV, generator=g)
    value = torch.randn(1, HKV, T, D, device=DEV, generator=g)
    logits = torch.randn(1, T, 28, 3, device=DEV, generator=g)
    vision = torch.zeros(1, T, dtype=torch.bool, device=DEV)
    vision[:, 100:T - 40] = True
    go = torch.randn(1, T, 28, D, device=DEV, generator=g)
    kw = dict(block_size=BS, block_count=BC, window_size=W)

    def run(fn, dtype):
        xs = [x.to(dtype).detach().requires_grad_(True) for x in (query, key, value, logits)]
        out = fn(*xs, vision, **kw)
        return out, torch.autograd.grad(out, xs, go.to(dtype))

    out32, g32 = run(TN.hybrid_attention, torch.float32)
    out_ref, g_ref = run(R.hybrid_attention, torch.float32)
    errs = [_rel(out32, out_ref)] + [_rel(a, b) for a, b in zip(g32, g_ref)]
    print(f"\nT={T} fp32 vs reference: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} "
          f"dlogits {errs[4]:.1e}")
    assert max(errs) < 1e-4
    outb, gb = run(TN.hybrid_attention, torch.bfloat16)
    errs = [_rel(outb, out32)] + [_rel(a, b) for a, b in zip(gb, g32)]
    print(f"T={T} bf16 vs fp32 kernels: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} "
          f"dlogits {errs[4]:.1e}")
    assert max(errs) < 5e-2


def test_band_key_splits_on_text_rows():
    """The dense part's text rows of a 4K prompt (192 gathered rows, 28 / 4 heads) are few enough that the
    automatic choice splits each row tile's keys over programs; values and gradients equal the unsplit kernels'
    (float32: within 1e-5; bf16: within its rounding)."""
    from nsa_kernels.window_attention import band_attention, choose_key_splits

    T, rows = 4096, 192
    g = torch.Generator(device=DEV).manual_seed(11)
    positions = torch.cat([torch.arange(100), torch.arange(T - 92, T)]).to(DEV)[None].to(torch.int32)
    q = torch.randn(1, rows, 28, D, device=DEV, generator=g)
    k = torch.randn(1, T, HKV, D, device=DEV, generator=g)
    v = torch.randn(1, T, HKV, D, device=DEV, generator=g)
    go = torch.randn(1, rows, 28, D, device=DEV, generator=g)
    assert choose_key_splits(3 * 28, T // 64, q.device) > 1

    def run(dtype, splits):
        xs = [x.to(dtype).detach().requires_grad_(True) for x in (q, k, v)]
        out = band_attention(*xs, SCALE, None, positions, key_splits=splits)
        return [out] + list(torch.autograd.grad(out, xs, go.to(dtype)))

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        split, whole = run(dtype, None), run(dtype, 1)
        errs = [_rel(a, b) for a, b in zip(split, whole)]
        print(f"\n{dtype} split vs unsplit: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e}")
        assert max(errs) < tol, errs


def test_hybrid_layer_given_its_plan_never_waits_on_the_gpu():
    """Given the pass's plan (as the model gives it to every layer), the hybrid layer's forward and backward (28 / 4
    heads, text | video | text: the text rows split over keys, the selected dk/dv row lists) queue every launch
    without a host sync, and give the values of a call that plans for itself (dk / dv within the float32 atomics'
    order)."""
    T = 8192
    g = torch.Generator(device=DEV).manual_seed(T)
    xs = [torch.randn(1, h, T, D, device=DEV, generator=g, dtype=torch.bfloat16) for h in (28, HKV, HKV)]
    xs.append(torch.randn(1, T, 28, 3, device=DEV, generator=g, dtype=torch.bfloat16))
    xs = [x.requires_grad_(True) for x in xs]
    vision = torch.zeros(1, T, dtype=torch.bool, device=DEV)
    vision[:, 128:T - 64] = True
    go = torch.randn(1, T, 28, D, device=DEV, generator=g, dtype=torch.bfloat16)
    plan = R.plan_hybrid(vision, None, T)

    def step(plan):
        out = TN.hybrid_attention(*xs, vision, block_size=BS, block_count=BC, window_size=W, plan=plan)
        return [out, *torch.autograd.grad(out, xs, go)]

    want = step(None)  # (compiles every kernel)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step(plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlogits"), got, want):
        assert torch.equal(a, b) if name in ("out", "dq", "dlogits") else _rel(a, b) < 1e-2, name
