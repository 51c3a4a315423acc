"""The user's comparison: one layer's attention of VideoNSA against the same model run dense.

Rows (B = 1, bf16, head dim 128, the 7B's 28 query / 4 kv heads, a prompt of 128 text tokens, the video, 64
text tokens):

* ``dense sdpa-flash`` / ``dense sdpa-cudnn``: what ``nsa_enabled=False`` runs, Qwen2.5-VL's attention through
  ``torch.nn.functional.scaled_dot_product_attention`` (causal, GQA) on one backend each (with torch 2.11 on an H200
  PyTorch's own choice is cuDNN: ``bench/sdpa_default_choice.py``);
* ``hybrid (random)`` / ``hybrid (video-like)``: ``nsa_kernels.triton_nsa.hybrid_attention`` as the model calls
  it (query ``[1, 28, T, D]``, key/value ``[1, 4, T, D]``, gate logits, vision flags), on i.i.d. random inputs and
  on video-like ones (``videonsa/video_like.py``).

Forward under ``no_grad`` and forward + backward, each timed as one call on an idle GPU and per call of calls queued
back to back, as the layers of a pass run (the hybrid rows get the pass's ``HybridPlan``, which the model builds once
per pass, so that no call waits on the GPU). Kernel diagnostics from the same run (padded 64-head layout,
never a headline): selected attention under each schedule of ``--selected`` (one row per program, tiles of R rows
over the union of their blocks, see :func:`schedule`), and the mean union size per tile.

    python bench/bench_layer.py --lengths 8192,16384,32768,65536,131072 --out docs/results/h200_layer.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import bench_attention  # the sibling script (this folder is on sys.path when a script here runs)
import torch
import torch.nn.functional as F

from videonsa.video_like import random_qkv, video_like_qkv

H, HKV, D, BS, BC, W = 28, 4, 128, 64, 32, 256
PREFIX, SUFFIX = 128, 64


def timed(fn, reps):
    """Median milliseconds of ``fn`` (CUDA events, after a warm-up): ``bench_attention``'s timer."""
    return bench_attention.timed(fn, reps)[0]


def back_to_back_ms(fn, calls=10):
    """Milliseconds per call of ``calls`` calls queued one after the other (CUDA events around all of them, after a
    warm-up), as the layers of a pass run: a call that never waits on the GPU is queued while the previous one
    runs, so its launch time hides behind the GPU's work."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / calls


def fwd_and_train_ms(run, inputs, reps):
    """``{"fwd_ms", "fwdbwd_ms", "fwd_b2b_ms", "fwdbwd_b2b_ms"}`` of ``run(*inputs)``: forward under no_grad, then
    forward + backward of a random output gradient to every input (``torch.autograd.grad``: the gradients are
    returned, as to the projections in the model, not added into ``.grad`` of leaves); each as one call on an idle
    GPU (median of ``reps``) and per call of calls queued back to back (:func:`back_to_back_ms`)."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    grad = torch.randn_like(run(*inputs))

    def train():
        return torch.autograd.grad(run(*leaves), leaves, grad)

    with torch.no_grad():
        fwd = timed(lambda: run(*inputs), reps)
        fwd_b2b = back_to_back_ms(lambda: run(*inputs), 2 * reps)
    return {"fwd_ms": fwd, "fwdbwd_ms": timed(train, reps), "fwd_b2b_ms": fwd_b2b,
            "fwdbwd_b2b_ms": back_to_back_ms(train, 2 * reps)}


def layer_inputs(T, kind, seed=0):
    make = video_like_qkv if kind == "video-like" else random_qkv
    q, k, v = make(T, H, HKV, D, seed=seed, **({"prefix": PREFIX} if kind == "video-like" else {}))
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    logits = torch.randn(1, T, H, 3, device="cuda", generator=g, dtype=torch.bfloat16)
    vision = torch.zeros(1, T, dtype=torch.bool, device="cuda")
    vision[:, PREFIX:T - SUFFIX] = True
    return q, k, v, logits, vision


def dense_rows(T, reps):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = random_qkv(T, H, HKV, D, seed=3)
    out = {}
    for name, backend in (("dense sdpa-flash", SDPBackend.FLASH_ATTENTION),
                          ("dense sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run(q=q, k=k, v=v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        try:
            out[name] = fwd_and_train_ms(run, (q, k, v), reps)
        except Exception as error:  # noqa: BLE001 - a backend missing on this GPU is a row, not a crash
            out[name] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
        print(f"  T={T} {name}: {out[name]}", flush=True)
    return out


def schedule(variant, T):
    """The selected-attention schedule named by ``variant`` as launch settings for a pass of ``T`` rows: "default"
    (the library's rule), "row" (one row per program), "union<R>" (tiles of R rows over the union of their
    blocks); a "+tma" suffix fetches the per-row kernels' blocks (forward and dq) with the tensor memory
    accelerator, "-tma" with pointer loads."""
    import dataclasses
    import re

    from nsa_kernels import triton_nsa as TN

    match = re.fullmatch(r"(default|row|union(\d))([+-]tma)?", variant)
    if not match:
        raise SystemExit(f"unknown selected-attention schedule {variant!r} (default, row, union<R>; +tma or -tma)")
    base, rows, tma = match.groups()
    launch = TN.DEFAULT_LAUNCH
    if tma:
        launch = dataclasses.replace(launch, selected_tma=tma == "+tma")
    if base == "row":
        return dataclasses.replace(launch, selected_tile_max_rows=0)
    if rows:
        return dataclasses.replace(launch, selected_rows_per_tile=int(rows), selected_tile_max_rows=T)
    return launch


def hybrid_rows(T, reps, kinds, variant):
    """The hybrid layer as the model calls it: with the pass's plan, which the model builds once per pass for all
    its layers (``plan_ms``: that build, timed on its own)."""
    from nsa_kernels import reference
    from nsa_kernels import triton_nsa as TN

    plan_hybrid = getattr(reference, "plan_hybrid", None)  # None in A/B runs of commits before plans
    out = {}
    for kind in kinds:
        q, k, v, logits, vision = layer_inputs(T, kind)
        kw = dict(block_size=BS, block_count=BC, window_size=W, launch=schedule(variant, T))
        if plan_hybrid is not None:
            kw["plan"] = plan_hybrid(vision, None, T)

        def run(q, k, v, logits):
            return TN.hybrid_attention(q, k, v, logits, vision, **kw)

        name = f"hybrid ({kind})"
        out[name] = fwd_and_train_ms(run, (q, k, v, logits), reps)
        if plan_hybrid is not None:
            out[name]["plan_ms"] = timed(lambda: plan_hybrid(vision, None, T), reps)
        print(f"  T={T} {name} [{variant}]: {out[name]}", flush=True)
    return out


def selected_diagnostics(T, reps, kinds, variants):
    """Selected attention alone on the layer's real block choice, per schedule (see :func:`schedule`): ms, largest
    difference to one row per program, and the mean union size of the tiles."""
    from nsa_kernels import triton_nsa as TN
    from nsa_kernels.reference import pad_heads
    from nsa_kernels.selected_attention import selected_attention_bwd_kernels, selected_attention_fwd, tile_unions

    out = {}
    for kind in kinds:
        q, k, v, logits, vision = layer_inputs(T, kind)
        vis = vision[0][None, :, None, None]
        q64 = pad_heads(q.transpose(1, 2) * vis, 64).contiguous()
        kt, vt = (k.transpose(1, 2) * vis).contiguous(), (v.transpose(1, 2) * vis).contiguous()
        row = {}
        with torch.no_grad():
            kc, vc = TN.compress_kv(kt, BS), TN.compress_kv(vt, BS)
            _, lse = TN.compression_attention(q64, kc, vc, BS, D**-0.5, T)
            bi = TN.select_blocks(q64, kc, lse, BC, BS, D**-0.5, T)
            o_row, lse_row = selected_attention_fwd(q64, kt, vt, bi, BS, D**-0.5, 1)
            ref, do = o_row.float(), torch.randn_like(o_row)
            do[:, :, 2 * H:] = 0  # the padded heads' gates are 0, so is their output gradient
            for variant in variants:
                if variant.startswith(("dq", "dkv")):  # a half of the backward: "dq", "dq+tma" (per row), "dkv"
                    half = "dkv" if variant == "dkv" else "dq"
                    launch = schedule("row" + variant[len(half):], T)
                    run_dq, run_dkv, _ = selected_attention_bwd_kernels(q64, kt, vt, bi, o_row, lse_row, do, BS,
                                                                        D**-0.5, launch=launch, active_heads=2 * H)
                    row[f"{variant} ms"] = timed(run_dkv if half == "dkv" else run_dq, reps)
                    continue
                launch = schedule(variant, T)
                R = launch.selected_schedule(T)
                row[f"{variant} ms"] = timed(lambda: selected_attention_fwd(q64, kt, vt, bi, BS, D**-0.5, R,
                                                                            launch), reps)
                got = selected_attention_fwd(q64, kt, vt, bi, BS, D**-0.5, R, launch)[0].float()
                row[f"{variant} max rel diff"] = float((got - ref).abs().max() / ref.abs().max())
                if R > 1 and f"R={R} mean blocks" not in row:
                    row[f"R={R} mean blocks"] = float(tile_unions(bi, R)[2].float().mean())
                    row[f"R={R} build ms"] = timed(lambda: tile_unions(bi, R), reps)
        out[kind] = row
        print(f"  T={T} selected {kind}: {row}", flush=True)
    return out


def profile_layer(T, kind, forward_only=False):
    """The CUDA work of one forward + backward (or, with ``forward_only``, one forward under no_grad) of the hybrid
    layer at ``T`` tokens (torch.profiler after a warm-up pass): operators and kernels by self CUDA time, largest
    first."""
    from torch.profiler import ProfilerActivity, profile

    from nsa_kernels import triton_nsa as TN
    from nsa_kernels.reference import plan_hybrid

    *inputs, vision = layer_inputs(T, kind)
    leaves = [x.detach().requires_grad_(not forward_only) for x in inputs]
    plan = plan_hybrid(vision, None, T)  # once per pass in the model

    def step():
        with torch.set_grad_enabled(not forward_only):
            out = TN.hybrid_attention(*leaves, vision, block_size=BS, block_count=BC, window_size=W, plan=plan)
        if not forward_only:
            torch.autograd.grad(out, leaves, torch.ones_like(out))

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=60,
                                                               max_name_column_width=50, max_shapes_column_width=60)
    what = "Forward (no_grad)" if forward_only else "Forward + backward"
    return f"{what} of the hybrid layer, T={T}, {kind} inputs\n{table}"


def profile_host(T, kind, calls=20):
    """Where the host's time goes in the hybrid layer's forward (no_grad, with the pass's plan): the mean time to
    queue one call (no sync), the GPU time of one call, and cProfile's functions by own time over ``calls`` calls."""
    import cProfile
    import io
    import pstats
    import time

    from nsa_kernels import triton_nsa as TN
    from nsa_kernels.reference import plan_hybrid

    *inputs, vision = layer_inputs(T, kind)
    plan = plan_hybrid(vision, None, T)

    def run():
        return TN.hybrid_attention(*inputs, vision, block_size=BS, block_count=BC, window_size=W, plan=plan)

    with torch.no_grad():
        run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            run()
        queued = (time.perf_counter() - start) / calls
        torch.cuda.synchronize()
        gpu = timed(run, 5)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            run()
        profiler.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(45)
    return (f"Host time of the hybrid layer's forward, T={T}, {kind} inputs: {queued * 1e3:.3f} ms to queue one call "
            f"(no sync), {gpu:.3f} ms a call timed (CUDA events)\n{text.getvalue()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kinds", default="random,video-like")
    ap.add_argument("--schedules", default="default",
                    help="selected-attention schedules of the hybrid rows, comma-separated: 'default' (the library's "
                         "rule) or a schedule forced at every length (row, union<R>; +tma / -tma)")
    ap.add_argument("--selected", default="row,row+tma,union4,dq,dq+tma,dkv",
                    help="schedules of the selected-attention kernel diagnostic (empty: none); 'dq', 'dq+tma' and "
                         "'dkv' time the two halves of its backward")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="T",
                    help="only profile one forward + backward of the hybrid layer at T tokens per input kind")
    ap.add_argument("--profile-forward", action="store_true", help="with --profile: the forward alone, no_grad")
    ap.add_argument("--profile-host", action="store_true",
                    help="with --profile: the host's time in the forward (queueing time, cProfile) instead")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    kinds = [x for x in args.kinds.split(",") if x]
    variants = [x for x in args.selected.split(",") if x]
    if args.profile:
        text = "\n\n".join(profile_host(args.profile, kind) if args.profile_host else
                             profile_layer(args.profile, kind, args.profile_forward) for kind in kinds)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import triton

    device = torch.cuda.get_device_name()
    results = {}
    for T in lengths:
        row = {} if args.skip_dense else dense_rows(T, args.reps)
        for choice in args.schedules.split(","):
            for name, e in hybrid_rows(T, args.reps, kinds, choice).items():
                row[name if choice == "default" else f"{name} [{choice}]"] = e
        results[T] = {"rows": row, "selected": selected_diagnostics(T, args.reps, kinds, variants) if variants else {}}
        torch.cuda.empty_cache()

    cmd = " ".join(["python bench/bench_layer.py"] + sys.argv[1:])
    lines = [f"Date: {stamp}; device: {device}; torch {torch.__version__}, triton {triton.__version__}",
             f"Command: `{cmd}`", "",
             "Each time as one call on an idle GPU (median of the repetitions) and, after the slash, per call of calls "
             "queued back to back as the layers of a pass run; the ratios are of the back-to-back times.", "",
             "| T | implementation | fwd ms | fwd+bwd ms | fwd vs flash | fwd vs cuDNN | fwd+bwd vs cuDNN |",
             "|---|---|---|---|---|---|---|"]
    for T, res in results.items():
        rows = res["rows"]
        flash = rows.get("dense sdpa-flash", {})
        cudnn = rows.get("dense sdpa-cudnn", {})
        for name, e in rows.items():
            if "error" in e:
                lines.append(f"| {T} | {name} | {e['error']} | | | | |")
                continue

            def ratio(a, base):
                return f"{a / base:.2f}x" if base else "—"

            lines.append(f"| {T} | {name} | {e['fwd_ms']:.2f} / {e['fwd_b2b_ms']:.2f} | "
                         f"{e['fwdbwd_ms']:.2f} / {e['fwdbwd_b2b_ms']:.2f} | "
                         f"{ratio(e['fwd_b2b_ms'], flash.get('fwd_b2b_ms'))} | "
                         f"{ratio(e['fwd_b2b_ms'], cudnn.get('fwd_b2b_ms'))} | "
                         f"{ratio(e['fwdbwd_b2b_ms'], cudnn.get('fwdbwd_b2b_ms'))} |")
    plans = [f"{T}: {e['plan_ms']:.3f} ms" for T, res in results.items() for name, e in res["rows"].items()
             if "plan_ms" in e and "random" in name]
    if plans:
        lines += ["", "The hybrid rows run with the pass's plan (`plan_hybrid`), which the model builds once per pass "
                  "for all its layers; that build alone: " + ", ".join(plans) + "."]
    if variants:
        tile_sizes = sorted({int(key[2:].split()[0]) for res in results.values() for d in res["selected"].values()
                             for key in d if key.startswith("R=") and key.endswith("mean blocks")})
        lines += ["", "Kernel diagnostic (padded 64-head layout): selected attention in ms per schedule, forward "
                  "(union build included) or a half of the backward (dq, dkv: row lists included); mean distinct "
                  "blocks per tile of R rows and kv head after them.", "",
                  "| " + " | ".join(["T", "input", *variants, *(f"blocks R={R}" for R in tile_sizes)]) + " |",
                  "|---|---|" + "---|" * (len(variants) + len(tile_sizes))]
        for T, res in results.items():
            for kind, d in res["selected"].items():
                cells = [f"{d[f'{v} ms']:.2f}" for v in variants]
                cells += [f"{d.get(f'R={R} mean blocks', float('nan')):.0f}" for R in tile_sizes]
                lines.append(f"| {T} | {kind} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"device": device, "date": stamp, "command": cmd,
                       "results": {str(k): v for k, v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
