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

    python bench/bench_attention.py --lengths 8192,16384,32768,65536,131072 --out bench.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    from nsa_kernels.compression import compress_kv, compression_attention_bwd, compression_attention_fwd
    from nsa_kernels.selected_attention import selected_attention_bwd, selected_attention_fwd
    from nsa_kernels.selection import select_blocks
    from nsa_kernels.window_attention import band_attention_bwd, band_attention_fwd

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
        import nsa_kernels.selected_attention as SA

        def slc_variant(warps, stages):
            def run():
                old = SA.FWD_WARPS, SA.FWD_STAGES
                SA.FWD_WARPS, SA.FWD_STAGES = warps, stages
                try:
                    return selected_attention_fwd(q, k, v, bi, BS, scale)
                finally:
                    SA.FWD_WARPS, SA.FWD_STAGES = old
            return run

        parts["slc_fwd_w4"] = slc_variant(4, 2)
        import nsa_kernels.selection as SEL

        def topk_variant(network, warps):
            def run():
                old = SEL.NETWORK, SEL.TOPK_WARPS
                SEL.NETWORK, SEL.TOPK_WARPS = network, warps
                try:
                    return select_blocks(q, kc, lse, BC, BS, scale, T)
                finally:
                    SEL.NETWORK, SEL.TOPK_WARPS = old
            return run


        def slc_bwd_variant(part, rows=64, warps=8, dq_warps=4):
            def run():
                old = SA.DKV_ROWS, SA.DKV_WARPS, SA.BWD_WARPS
                SA.DKV_ROWS, SA.DKV_WARPS, SA.BWD_WARPS = rows, warps, dq_warps
                try:
                    return selected_attention_bwd(q, k, v, bi, o_s, lse_s, do, BS, scale, parts=(part,))
                finally:
                    SA.DKV_ROWS, SA.DKV_WARPS, SA.BWD_WARPS = old
            return run

        parts["slc_bwd_dq"] = slc_bwd_variant("dq", dq_warps=SA.BWD_WARPS)
        parts["slc_bwd_dkv"] = slc_bwd_variant("dkv", SA.DKV_ROWS, SA.DKV_WARPS)
        import nsa_kernels.compression as CMP
        import nsa_kernels.window_attention as WIN

        def setting_variant(mod, settings, fn):
            def run():
                old = {n: getattr(mod, n) for n in settings}
                for n, val in settings.items():
                    setattr(mod, n, val)
                try:
                    return fn()
                finally:
                    for n, val in old.items():
                        setattr(mod, n, val)
            return run

        def cmp_bwd(part):
            return lambda: compression_attention_bwd(q, kc, vc, o_c, lse, do, BS, scale, T, 56, parts=(part,))

        def swd_bwd(part):
            return lambda: band_attention_bwd(q, k, v, o_w, lse_w, do, scale, W, None, None, 56, parts=(part,))

        parts["cmp_bwd_dq"] = cmp_bwd("dq")
        parts["cmp_bwd_dkv"] = cmp_bwd("dkv")
        parts["swd_bwd_dq"] = swd_bwd("dq")
        parts["swd_bwd_dkv"] = swd_bwd("dkv")
        parts["cmp_fwd_w8"] = setting_variant(CMP, {"FWD_WARPS": 8}, parts["cmp_fwd"])
        parts["swd_fwd_w8"] = setting_variant(WIN, {"FWD_WARPS": 8}, parts["swd_fwd"])
        parts["topk_w2"] = topk_variant("split", 2)
        out = {}
        with torch.no_grad():
            for name, fn in parts.items():
                try:
                    out[name] = timed(fn, reps)[0]
                except Exception as e:  # noqa: BLE001
                    out[name] = f"{type(e).__name__}: {str(e)[:100]}"
        res["parts_ms"] = out
        print(f"  T={T} parts: {out}", flush=True)
    return res


def fmt(x, unit=""):
    return f"{x:.2f}{unit}" if isinstance(x, (int, float)) else "—"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", default="", help="comma list among sdpa-flash,sdpa-cudnn,fla-nsa,parts (empty: all)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    lengths = [int(x) for x in args.lengths.split(",")]
    dev = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = {}
    for T in lengths:
        results[T] = bench_length(T, args.reps, rows)
    import triton

    lines = [f"Date: {stamp}; device: {dev}; torch {torch.__version__}, triton {triton.__version__}",
             f"Command: python bench/bench_attention.py --lengths {args.lengths} --reps {args.reps}", "",
             "| T | impl | fwd ms | fwd+bwd ms | peak GiB fwd | peak GiB fwd+bwd |", "|---|---|---|---|---|---|"]
    for T, res in results.items():
        for name, e in res.items():
            if name == "parts_ms":
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
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"device": dev, "date": stamp, "results": {str(k): v for k, v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
