"""Side-by-side timing of VideoNSA's attention (Triton kernels) against dense causal attention.

Layout: B = 1, bf16, 64 query heads (the 28 -> 64 padded layout, heads 56-63 zero) over 4 kv heads, D = 128,
block 64, 32 selected blocks, window 256. Rows:

* ``sdpa-flash`` / ``sdpa-cudnn``: ``torch.nn.functional.scaled_dot_product_attention``, causal, GQA
  (``enable_gqa``), restricted to one backend;
* ``fla-nsa``: fla-core's ``parallel_nsa`` (compression + top-k + selection; its window branch needs
  flash-attn, absent here, so window_size = 0), when importable;
* ``ours``: ``nsa_kernels.triton_nsa.nsa_attention`` (compression, top-k, selection, window, gating), and
  its parts.

Times are medians over CUDA events after warm-up; inference rows run under ``torch.no_grad()``; peak memory is
``torch.cuda.max_memory_allocated`` during the timed region, inputs included.

Two more tables from the same run:

* ``--ceilings``: the GPU's measured ceilings (bf16 matmul TFLOP/s, HBM copy bandwidth, and the L2 bandwidth of
  gathering random 64 x 128 bf16 tiles from a buffer that fits in L2: the access pattern of selected
  attention) and, per kernel of ours, the work it must do (FLOPs counted from the actual block choice, bytes
  from HBM and bytes gathered from L2), its achieved rate and the fraction of the ceiling that binds it;
* ``--layer-lengths``: the whole hybrid attention layer (a prompt of text, one video, text; 28 query / 4 kv
  heads) as the model runs it, against the same function computed the authors' way (dense attention over
  every query + NSA over all 64 padded heads, prefix means by attention on zero queries) and against the
  PyTorch reference (the spec computed directly).

    python bench/bench_attention.py --lengths 8192,16384,32768,65536,131072 --ceilings --layer-lengths 32768 \
        --out bench.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

P, HKV, D, BS, BC, W = 64, 4, 128, 64, 32, 256


def timed(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def make_inputs(T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, P, D, device="cuda", generator=g, dtype=torch.bfloat16)
    q[:, :, 56:] = 0
    k = torch.randn(1, T, HKV, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, T, HKV, D, device="cuda", generator=g, dtype=torch.bfloat16)
    gates = torch.sigmoid(torch.randn(1, T, P, 3, device="cuda", generator=g)).to(torch.bfloat16)
    gates[:, :, 56:] = 0
    return q, k, v, gates


def bench_length(T, reps, rows):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nsa_kernels import triton_nsa as TN
    from nsa_kernels.compression import (compress_kv, compression_attention_bwd, compression_attention_bwd_kernels,
                                         compression_attention_fwd)
    from nsa_kernels.selected_attention import (selected_attention_bwd, selected_attention_bwd_kernels,
                                                selected_attention_fwd)
    from nsa_kernels.selection import select_blocks
    from nsa_kernels.window_attention import band_attention_bwd, band_attention_bwd_kernels, band_attention_fwd

    res = {}
    q, k, v, gates = make_inputs(T)
    scale = D ** -0.5
    do = torch.randn_like(q)

    def record(name, fn, train_fn=None):
        try:
            with torch.no_grad():
                t_fwd, m_fwd = timed(fn, reps)
            entry = {"fwd_ms": t_fwd, "fwd_peak_gib": m_fwd}
            if train_fn is not None:
                t_tr, m_tr = timed(train_fn, reps)
                entry.update({"fwdbwd_ms": t_tr, "fwdbwd_peak_gib": m_tr})
            res[name] = entry
        except Exception as e:  # report and continue
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        torch.cuda.empty_cache()
        print(f"  T={T} {name}: {res[name]}", flush=True)

    # dense SDPA, [B, H, T, D]
    qd, kd, vd = (x.transpose(1, 2) for x in (q, k, v))
    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        if rows and name not in rows:
            continue

        def fwd(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

        def train(backend=backend):
            xs = [x.detach().requires_grad_(True) for x in (qd, kd, vd)]
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(*xs, is_causal=True, enable_gqa=True)
            o.backward(do.transpose(1, 2))

        record(name, fwd, train)

    if not rows or "fla-nsa" in rows:
        try:
            from fla.ops.nsa import parallel_nsa
        except Exception as e:  # noqa: BLE001
            res["fla-nsa"] = {"error": f"not importable: {type(e).__name__}: {str(e)[:120]}"}
        else:
            g0, g1 = gates[..., 0].contiguous(), gates[..., 1].contiguous()

            def fla_fwd():
                return parallel_nsa(q, k, v, g0, g1, None, block_counts=BC, block_size=BS, window_size=0,
                                    scale=scale)

            def fla_train():
                xs = [x.detach().requires_grad_(True) for x in (q, k, v)]
                o = parallel_nsa(*xs, g0, g1, None, block_counts=BC, block_size=BS, window_size=0, scale=scale)
                o.backward(do)

            record("fla-nsa", fla_fwd, fla_train)

    def ours_fwd():
        return TN.nsa_attention(q, k, v, gates, block_count=BC, block_size=BS, window_size=W, scale=scale,
                                active_heads=56)

    def ours_train():
        xs = [x.detach().requires_grad_(True) for x in (q, k, v, gates)]
        o = TN.nsa_attention(*xs, block_count=BC, block_size=BS, window_size=W, scale=scale, active_heads=56)
        o.backward(do)

    record("ours", ours_fwd, ours_train)

    # parts of ours (forward and backward kernels alone)
    if not rows or "parts" in rows:
        kc, vc = compress_kv(k, BS), compress_kv(v, BS)
        o_c, lse = compression_attention_fwd(q, kc, vc, BS, scale, T, 56)
        bi = select_blocks(q, kc, lse, BC, BS, scale, T)
        o_s, lse_s = selected_attention_fwd(q, k, v, bi, BS, scale)
        o_w, lse_w = band_attention_fwd(q, k, v, scale, W, None, None, 56)
        parts = {
            "compress_kv": lambda: (compress_kv(k, BS), compress_kv(v, BS)),
            "cmp_fwd": lambda: compression_attention_fwd(q, kc, vc, BS, scale, T, 56),
            "topk": lambda: select_blocks(q, kc, lse, BC, BS, scale, T),
            "slc_fwd": lambda: selected_attention_fwd(q, k, v, bi, BS, scale),
            "swd_fwd": lambda: band_attention_fwd(q, k, v, scale, W, None, None, 56),
            "cmp_bwd": lambda: compression_attention_bwd(q, kc, vc, o_c, lse, do, BS, scale, T, 56),
            "slc_bwd": lambda: selected_attention_bwd(q, k, v, bi, o_s, lse_s, do, BS, scale),
            "swd_bwd": lambda: band_attention_bwd(q, k, v, o_w, lse_w, do, scale, W, None, None, 56),
        }
        import dataclasses

        from nsa_kernels._triton_utils import DEFAULT_LAUNCH

        def variant(**settings):
            return dataclasses.replace(DEFAULT_LAUNCH, **settings)

        # each backward's two launches timed apart (its buffers set up once)
        slc_dq, slc_dkv, _ = selected_attention_bwd_kernels(q, k, v, bi, o_s, lse_s, do, BS, scale)
        cmp_dq, cmp_dkv, _ = compression_attention_bwd_kernels(q, kc, vc, o_c, lse, do, BS, scale, T, 56)
        swd_dq, swd_dkv, _ = band_attention_bwd_kernels(q, k, v, o_w, lse_w, do, scale, W, None, None, 56)

        parts["slc_fwd_w4"] = lambda: selected_attention_fwd(q, k, v, bi, BS, scale, launch=variant(selected_warps=4))
        parts.update(slc_bwd_dq=slc_dq, slc_bwd_dkv=slc_dkv, cmp_bwd_dq=cmp_dq, cmp_bwd_dkv=cmp_dkv, swd_bwd_dq=swd_dq,
                     swd_bwd_dkv=swd_dkv)
        parts["cmp_fwd_w8"] = lambda: compression_attention_fwd(q, kc, vc, BS, scale, T, 56,
                                                                launch=variant(attention_warps=8))
        parts["swd_fwd_w8"] = lambda: band_attention_fwd(q, k, v, scale, W, None, None, 56,
                                                         launch=variant(attention_warps=8))
        for rows_per_program, warps in ((1, 1), (2, 2), (8, 4), (8, 8)):
            launch = variant(topk_rows_per_program=rows_per_program, topk_warps=warps)
            parts[f"topk_r{rows_per_program}_w{warps}"] = (
                lambda launch=launch: select_blocks(q, kc, lse, BC, BS, scale, T, launch=launch))
        from nsa_kernels.gate_mix import mix_branches
        gates_q = gates.to(q.dtype)
        parts["gate_mix"] = lambda: mix_branches(o_c, o_s, o_w, gates_q)
        parts["gate_mix_torch"] = lambda: o_c * gates_q[..., 0:1] + o_s * gates_q[..., 1:2] + o_w * gates_q[..., 2:3]
        out = {}
        with torch.no_grad():
            for name, fn in parts.items():
                try:
                    out[name] = timed(fn, reps)[0]
                except Exception as e:  # noqa: BLE001
                    out[name] = f"{type(e).__name__}: {str(e)[:100]}"
        res["parts_ms"] = out
        res["work"] = work_model(T, bi)
        print(f"  T={T} parts: {out}", flush=True)
    return res


# ------------------------------------------------------------------------------------------------------------
# ceilings of the GPU and the work each kernel has to do
# ------------------------------------------------------------------------------------------------------------
def _gather_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_tiles(src_k, src_v, idx, out, SLOTS: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr):
        # the loads of selected attention without its arithmetic: per program, SLOTS random (K, V) tiles
        pid = tl.program_id(0)
        rr = tl.arange(0, ROWS)
        dd = tl.arange(0, BD)
        acc = tl.zeros([ROWS, BD], dtype=tl.float32)
        for s in range(SLOTS):
            tile = tl.load(idx + pid * SLOTS + s)
            off = (tile * ROWS + rr[:, None]) * BD + dd[None, :]
            acc += tl.load(src_k + off).to(tl.float32) + tl.load(src_v + off).to(tl.float32)
        tl.store(out + pid * BD + dd, tl.sum(acc, 0))

    return gather_tiles


def measure_ceilings(reps=5):
    """bf16 matmul rate, HBM copy bandwidth and L2 tile-gather bandwidth, measured here."""
    n = 8192
    mats = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    t_mm, _ = timed(lambda: torch.mm(*mats), reps)
    bufs = [torch.empty(2**30, device="cuda", dtype=torch.uint8) for _ in range(2)]
    t_cp, _ = timed(lambda: bufs[1].copy_(bufs[0]), reps)
    mats.clear()
    bufs.clear()
    gather = _gather_kernel()
    tiles, slots, progs = 1024, 32, 65536  # 2 x 16 MiB of tiles (fits in L2), 32 slots per program
    ks = torch.randn(tiles * BS, D, device="cuda", dtype=torch.bfloat16)
    vs = torch.randn_like(ks)
    idx = torch.randint(0, tiles, (progs * slots,), device="cuda", dtype=torch.int32)
    out = torch.empty(progs, D, device="cuda", dtype=torch.float32)
    best = None
    for warps in (2, 4, 8):
        t_g, _ = timed(lambda: gather[(progs,)](ks, vs, idx, out, SLOTS=slots, ROWS=BS, BD=D, num_warps=warps), reps)
        best = t_g if best is None else min(best, t_g)
    gathered = progs * slots * 2 * BS * D * 2
    return {"matmul_tflops": 2 * n**3 / t_mm / 1e9, "hbm_tbps": 2 * 2**30 / t_cp / 1e9,
            "l2_gather_tbps": gathered / best / 1e9}


def work_model(T, bi):
    """FLOPs and bytes of each kernel of ours at length T (real heads: 56 of 64; block choice ``bi``).

    FLOPs count the matrix products over visible (query head, key) pairs: 4 D per pair forward, 6 D for the
    dq half and 8 D for the dk/dv half of a backward. "HBM" is the unique data a kernel must read and write;
    "L2" is what it re-reads from cache: the compressed keys streamed by every top-k program, and the 32 selected
    K/V blocks gathered by every (row, kv head) of selected attention.
    """
    from nsa_kernels._triton_utils import DEFAULT_LAUNCH

    heads, nb = 56, -(-T // BS)
    t = torch.arange(T, device="cuda", dtype=torch.float64)
    cur = torch.div(t, BS, rounding_mode="floor")
    pairs_cmp = heads * float((nb - cur).sum())
    pairs_swd = heads * float(torch.clamp(t + 1, max=W).sum())
    blk = bi.long()
    ok = (blk >= 0) & (blk * BS <= t.long()[None, :, None, None])
    keys = torch.clamp(t.long()[None, :, None, None] - blk * BS + 1, max=BS) * ok  # [1, T, Hkv, S]
    per_group = torch.tensor([min(16, max(0, heads - 16 * g)) for g in range(HKV)], device="cuda",
                             dtype=torch.float64)
    pairs_slc = float((keys.sum(dim=(0, 1, 3)).double() * per_group).sum())
    slots_slc = float(ok.sum())
    pairs_topk = heads * float(cur.sum())
    qbytes = T * heads * D * 2
    kvbytes = 2 * T * HKV * D * 2
    return {
        "cmp_fwd": dict(flops=4 * D * pairs_cmp, hbm=2 * qbytes + T * P * 4, l2=0.0),
        "topk": dict(flops=2 * D * pairs_topk, hbm=T * P * D * 2 + T * P * 4,
                     l2=HKV * float(((cur // BS + 1) * BS).sum()) * D * 2 / DEFAULT_LAUNCH.topk_rows_per_program),
        "slc_fwd": dict(flops=4 * D * pairs_slc, hbm=2 * T * P * D * 2 + kvbytes, l2=slots_slc * BS * D * 2 * 2),
        "swd_fwd": dict(flops=4 * D * pairs_swd, hbm=2 * qbytes + kvbytes, l2=0.0),
        "cmp_bwd": dict(flops=14 * D * pairs_cmp, hbm=4 * qbytes, l2=0.0),
        "slc_bwd_dq": dict(flops=6 * D * pairs_slc, hbm=3 * T * P * D * 2 + kvbytes, l2=slots_slc * BS * D * 2 * 2),
        "slc_bwd_dkv": dict(flops=8 * D * pairs_slc, hbm=2 * kvbytes * 2,
                            l2=slots_slc * 16 * D * 2 * 2),
        "swd_bwd": dict(flops=14 * D * pairs_swd, hbm=4 * qbytes + 2 * kvbytes, l2=0.0),
    }


def ceiling_rows(T, parts_ms, work, ceil):
    rows = []
    for name, w in work.items():
        ms = parts_ms.get(name)
        if not isinstance(ms, (int, float)):
            continue
        sec = ms / 1e3
        tflops = w["flops"] / sec / 1e12
        hbm = w["hbm"] / sec / 1e12
        l2 = w["l2"] / sec / 1e12
        fr = {"matmul": tflops / ceil["matmul_tflops"], "HBM": hbm / ceil["hbm_tbps"],
              "L2": l2 / ceil["l2_gather_tbps"]}
        bound = max(fr, key=fr.get)
        rows.append(f"| {T} | {name} | {ms:.2f} | {w['flops'] / 1e12:.2f} | {w['hbm'] / 1e9:.1f} | "
                    f"{w['l2'] / 1e9:.0f} | {tflops:.0f} | {hbm:.2f} | {l2:.2f} | {bound} {100 * fr[bound]:.0f}% |")
    return rows


# ------------------------------------------------------------------------------------------------------------
# the whole hybrid layer against the spec computed naively
# ------------------------------------------------------------------------------------------------------------
def profile_layer(T):
    """The CUDA kernels of one forward of the hybrid layer (ours), largest total time first."""
    from torch.profiler import ProfilerActivity, profile

    from nsa_kernels import triton_nsa as TN

    inputs = layer_inputs(T)
    with torch.no_grad():
        TN.hybrid_attention(*inputs, block_size=BS, block_count=BC, window_size=W)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            TN.hybrid_attention(*inputs, block_size=BS, block_count=BC, window_size=W)
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)


def layer_inputs(T):
    """query [1, 28, T, D], key/value [1, 4, T, D], gate logits [1, T, 28, 3], token_is_vision [1, T]: a chat
    prefix of 128 text tokens, the video, a 64-token question."""
    g = torch.Generator(device="cuda").manual_seed(1)
    H = 28
    query = torch.randn(1, H, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    key = torch.randn(1, HKV, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    value = torch.randn(1, HKV, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    logits = torch.randn(1, T, H, 3, device="cuda", generator=g, dtype=torch.bfloat16)
    vision = torch.zeros(1, T, dtype=torch.bool, device="cuda")
    vision[:, 128:T - 64] = True
    return query, key, value, logits, vision


def bench_layer(T, reps, naive_max):
    """One layer's attention on a text + video + text prompt (28 query / 4 kv heads)."""
    import functools

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nsa_kernels import reference as R
    from nsa_kernels import triton_nsa as TN

    query, key, value, logits, vision = layer_inputs(T)
    kw = dict(block_size=BS, block_count=BC, window_size=W)

    def authors_dense(q, zero_rows):
        # dense attention over every query; zero (text-masked) queries average all visible values
        q = q * ~zero_rows[:, None, :, None]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)

    impls = {
        "ours (Triton hybrid layer)": lambda: TN.hybrid_attention(query, key, value, logits, vision, **kw),
        "authors' structure (dense SDPA over all rows + NSA on 64 heads)": lambda: R.hybrid_attention(
            query, key, value, logits, vision, nsa_fn=functools.partial(TN.nsa_attention, active_heads=P),
            dense_fn=authors_dense, **kw),
    }
    if T <= naive_max:
        impls["naive (PyTorch reference)"] = lambda: R.hybrid_attention(query, key, value, logits, vision, **kw)
    out = {}
    ref_out = None
    for name, fn in impls.items():
        try:
            with torch.no_grad():
                ms, peak = timed(fn, reps if "naive" not in name else 1)
                y = fn().float()
            ref_out = y if ref_out is None else ref_out
            err = float((y - ref_out).abs().max() / ref_out.abs().max())
            out[name] = {"fwd_ms": ms, "peak_gib": peak, "max_rel_diff_vs_ours": err}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        torch.cuda.empty_cache()
        print(f"  layer T={T} {name}: {out[name]}", flush=True)
    return out


def fmt(x, unit=""):
    return f"{x:.2f}{unit}" if isinstance(x, (int, float)) else "—"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", default="", help="comma list among sdpa-flash,sdpa-cudnn,fla-nsa,parts (empty: all)")
    ap.add_argument("--ceilings", action="store_true", help="measure the GPU's ceilings and rate each kernel")
    ap.add_argument("--layer-lengths", default="", help="lengths for the whole-layer comparison (empty: none)")
    ap.add_argument("--profile-layer", type=int, default=0, help="print the kernels of one layer forward at this T")
    ap.add_argument("--naive-max", type=int, default=32768, help="longest prompt for the PyTorch-reference row")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    layer_lengths = [int(x) for x in args.layer_lengths.split(",") if x]
    dev = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ceil = measure_ceilings() if args.ceilings else None
    if ceil:
        print(f"ceilings: {ceil}", flush=True)
    if args.profile_layer:
        print(profile_layer(args.profile_layer), flush=True)
    results = {T: bench_length(T, args.reps, rows) for T in lengths}
    layers = {T: bench_layer(T, args.reps, args.naive_max) for T in layer_lengths}
    import triton

    cmd = " ".join(["python bench/bench_attention.py"] + sys.argv[1:])
    lines = [f"Date: {stamp}; device: {dev}; torch {torch.__version__}, triton {triton.__version__}",
             f"Command: {cmd}", "",
             "| T | impl | fwd ms | fwd+bwd ms | peak GiB fwd | peak GiB fwd+bwd |", "|---|---|---|---|---|---|"]
    for T, res in results.items():
        for name, e in res.items():
            if name in ("parts_ms", "work"):
                continue
            if "error" in e:
                lines.append(f"| {T} | {name} | {e['error']} | | | |")
                continue
            lines.append(f"| {T} | {name} | {fmt(e.get('fwd_ms'))} | {fmt(e.get('fwdbwd_ms'))} | "
                         f"{fmt(e.get('fwd_peak_gib'))} | {fmt(e.get('fwdbwd_peak_gib'))} |")
    part_names = list(dict.fromkeys(n for r in results.values() for n in r.get("parts_ms", {})))
    if part_names:
        lines += ["", "Parts of ours (ms, each kernel alone, same inputs):", "",
                  "| part | " + " | ".join(str(T) for T in results) + " |", "|---|" + "---|" * len(results)]
        for n in part_names:
            lines.append(f"| {n} | " + " | ".join(fmt(r.get("parts_ms", {}).get(n)) for r in results.values()) + " |")
    if ceil:
        lines += ["", f"Measured ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, HBM copy "
                  f"{ceil['hbm_tbps']:.2f} TB/s, L2 tile gather {ceil['l2_gather_tbps']:.2f} TB/s.", "",
                  "| T | kernel | ms | TFLOP | HBM GB | L2 GB | TFLOP/s | HBM TB/s | L2 TB/s | nearest ceiling |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for T, res in results.items():
            if "work" in res:
                lines += ceiling_rows(T, res["parts_ms"], res["work"], ceil)
    if layers:
        lines += ["", "Whole hybrid attention layer (text 128 + video + text 64 tokens; forward, no_grad):", "",
                  "| T | implementation | fwd ms | peak GiB | ours is faster by | max rel. diff vs ours |",
                  "|---|---|---|---|---|---|"]
        for T, res in layers.items():
            ours = next(iter(res.values())).get("fwd_ms")
            for name, e in res.items():
                if "error" in e:
                    lines.append(f"| {T} | {name} | {e['error']} | | | |")
                    continue
                speed = f"{e['fwd_ms'] / ours:.1f}x" if ours else "—"
                lines.append(f"| {T} | {name} | {e['fwd_ms']:.2f} | {e['peak_gib']:.2f} | {speed} | "
                             f"{e['max_rel_diff_vs_ours']:.1e} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"device": dev, "date": stamp, "ceilings": ceil, "layers": {str(k): v for k, v in layers.items()},
                       "results": {str(k): v for k, v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
