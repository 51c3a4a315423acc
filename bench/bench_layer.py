"""The user's comparison: one layer's attention of VideoNSA against the same model run dense.

Rows (B = 1, bf16, head dim 128, the 7B's 28 query / 4 kv heads, a prompt of 128 text tokens, the video, 64
text tokens):

* ``dense sdpa-flash`` / ``dense sdpa-cudnn``: what ``nsa_enabled=False`` runs, Qwen2.5-VL's attention through
  ``torch.nn.functional.scaled_dot_product_attention`` (causal, GQA) on one backend (flash is PyTorch's default);
* ``hybrid (random)`` / ``hybrid (video-like)``: ``nsa_kernels.triton_nsa.hybrid_attention`` as the model calls
  it (query ``[1, 28, T, D]``, key/value ``[1, 4, T, D]``, gate logits, vision flags), on i.i.d. random inputs and
  on video-like ones (``videonsa/video_like.py``).

Forward under ``no_grad`` and forward + backward. Kernel diagnostics from the same run (padded 64-head layout,
never a headline): selected attention per row against tiles of R rows over the union of their blocks, and the
mean union size per tile.

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


def fwd_and_train_ms(run, inputs, reps):
    """``{"fwd_ms", "fwdbwd_ms"}`` of ``run(*inputs)``: forward under no_grad, then forward + backward of a random
    output gradient with every input a leaf that requires grad."""
    with torch.no_grad():
        fwd = timed(lambda: run(*inputs), reps)
    leaves = [x.detach().requires_grad_() for x in inputs]
    grad = torch.randn_like(run(*inputs))
    return {"fwd_ms": fwd, "fwdbwd_ms": timed(lambda: run(*leaves).backward(grad), reps)}


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


def hybrid_rows(T, reps, kinds, rows_per_tile):
    import dataclasses

    from nsa_kernels import triton_nsa as TN

    out = {}
    for kind in kinds:
        q, k, v, logits, vision = layer_inputs(T, kind)
        launch = TN.DEFAULT_LAUNCH if rows_per_tile is None else dataclasses.replace(
            TN.DEFAULT_LAUNCH, selected_rows_per_tile=rows_per_tile, selected_tile_max_rows=T)
        kw = dict(block_size=BS, block_count=BC, window_size=W, launch=launch)

        def run(q, k, v, logits):
            return TN.hybrid_attention(q, k, v, logits, vision, **kw)

        name = f"hybrid ({kind})"
        out[name] = fwd_and_train_ms(run, (q, k, v, logits), reps)
        print(f"  T={T} {name} [{rows_per_tile or 'default'}]: {out[name]}", flush=True)
    return out


def selected_diagnostics(T, reps, kinds, tile_rows):
    """Selected attention alone on the layer's real block choice: per row vs tiles of R rows; union sizes."""
    from nsa_kernels import triton_nsa as TN
    from nsa_kernels.reference import pad_heads
    from nsa_kernels.selected_attention import selected_attention_fwd, tile_unions

    out = {}
    for kind in kinds:
        q, k, v, logits, vision = layer_inputs(T, kind)
        vis = vision[0][None, :, None, None]
        q64 = pad_heads(q.transpose(1, 2) * vis, 64).contiguous()
        kt, vt = (k.transpose(1, 2) * vis).contiguous(), (v.transpose(1, 2) * vis).contiguous()
        with torch.no_grad():
            kc, vc = TN.compress_kv(kt, BS), TN.compress_kv(vt, BS)
            _, lse = TN.compression_attention(q64, kc, vc, BS, D**-0.5, T)
            bi = TN.select_blocks(q64, kc, lse, BC, BS, D**-0.5, T)
            row = {"per-row ms": timed(lambda: selected_attention_fwd(q64, kt, vt, bi, BS, D**-0.5, 1), reps)}
            ref = selected_attention_fwd(q64, kt, vt, bi, BS, D**-0.5, 1)[0].float()
            for R in tile_rows:
                row[f"R={R} ms"] = timed(lambda R=R: selected_attention_fwd(q64, kt, vt, bi, BS, D**-0.5, R), reps)
                got = selected_attention_fwd(q64, kt, vt, bi, BS, D**-0.5, R)[0].float()
                row[f"R={R} max rel diff"] = float((got - ref).abs().max() / ref.abs().max())
                ids, bits, count = tile_unions(bi, R)
                row[f"R={R} mean blocks"] = float(count.float().mean())
                row[f"R={R} build ms"] = timed(lambda R=R: tile_unions(bi, R), reps)
        out[kind] = row
        print(f"  T={T} selected {kind}: {row}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kinds", default="random,video-like")
    ap.add_argument("--rows-per-tile", default="default",
                    help="selected-attention forward rows per program of the hybrid rows: 'default' (the launch "
                         "settings' rule), or numbers (1 = per row) forced at every length")
    ap.add_argument("--tile-rows", default="2,4,8", help="R values of the union-tile diagnostics (empty: none)")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    kinds = [x for x in args.kinds.split(",") if x]
    tile_rows = [int(x) for x in args.tile_rows.split(",") if x]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import triton

    device = torch.cuda.get_device_name()
    results = {}
    for T in lengths:
        row = {} if args.skip_dense else dense_rows(T, args.reps)
        for choice in args.rows_per_tile.split(","):
            rows_per_tile = None if choice == "default" else int(choice)
            for name, e in hybrid_rows(T, args.reps, kinds, rows_per_tile).items():
                row[name if rows_per_tile is None else f"{name} [R={rows_per_tile}]"] = e
        results[T] = {"rows": row, "selected": selected_diagnostics(T, args.reps, kinds, tile_rows) if tile_rows else {}}
        torch.cuda.empty_cache()

    cmd = " ".join(["python bench/bench_layer.py"] + sys.argv[1:])
    lines = [f"Date: {stamp}; device: {device}; torch {torch.__version__}, triton {triton.__version__}",
             f"Command: `{cmd}`", "",
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

            lines.append(f"| {T} | {name} | {e['fwd_ms']:.2f} | {e['fwdbwd_ms']:.2f} | "
                         f"{ratio(e['fwd_ms'], flash.get('fwd_ms'))} | {ratio(e['fwd_ms'], cudnn.get('fwd_ms'))} | "
                         f"{ratio(e['fwdbwd_ms'], cudnn.get('fwdbwd_ms'))} |")
    if tile_rows:
        lines += ["", "Kernel diagnostic (padded 64-head layout): selected attention forward in ms, one row per "
                  "program vs tiles of R rows over the union of their blocks (union build included; mean distinct "
                  "blocks per tile and kv head in brackets).", "",
                  "| T | input | per row | " + " | ".join(f"R={R} (blocks)" for R in tile_rows) + " |",
                  "|---|---|---|" + "---|" * len(tile_rows)]
        for T, res in results.items():
            for kind, d in res["selected"].items():
                cells = [f"{d[f'R={R} ms']:.2f} ({d[f'R={R} mean blocks']:.0f})" for R in tile_rows]
                lines.append(f"| {T} | {kind} | {d['per-row ms']:.2f} | " + " | ".join(cells) + " |")
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
