"""The vision tower of the VideoNSA 7B architecture (Qwen2.5-VL-7B's, 32 blocks) on one GPU: ours vs transformers'.

Random bf16 weights; one video of ``N / 64`` temporal patches of 16 x 16 patches (224 x 224 frames, 64 merged tokens
each), encoded in pieces of ``--piece-tokens`` merged tokens as ``videonsa.long_context.video_features`` does in a
chunked prefill. Rows, all on the same weights (the blocks' attention and MLP classes are swapped in place, and the
fast path switched, see ``set_row``; they hold the same parameters):

* ``transformers``: Qwen2.5-VL's blocks as transformers runs them without flash-attn (one SDPA call per attention
  segment; the MLP's 3,420-wide products on unaligned rows);
* ``batched attention``: :class:`VideoNSAVisionAttention` (segments of equal length batched) + Qwen2.5-VL's MLP;
* ``ours, transformers' operations``: :class:`VideoNSAVisionAttention` + :class:`VideoNSAVisionMLP` (inner width
  padded to 16-byte rows), with the rest as transformers computes it (``set_fast_path(False)``);
* ``ours``: the same on the fast path: the patch embedding as one matrix product, the rotary embedding, RMSNorm and
  ``silu(gate) * up`` in one Triton pass each (``nsa_kernels.vision``). The package's tower.

Per row and length: the tower's time (best of ``--reps``, CUDA-synchronised, after one warm-up pass) and the largest
difference of its output to the ``transformers`` row's. ``--rows-max`` skips the ``transformers`` row above a length
(its per-segment loop is slow). Markdown to stdout and ``--out`` (default ``$OUT/bench_vision.md``). Every length also
states the tower's arithmetic (:func:`tower_flops`) and the time it takes at ``--peak-tflops``: its floor.
``--profile`` instead prints, for the package's tower at the first length, its CUDA time by kernel and by kind
(matrix products, attention, the rest) against that floor.

    python bench/bench_vision.py --lengths 32768,131072
    python bench/bench_vision.py --lengths 131072 --profile
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
from bench_end_to_end import GRID_HW, config_7b  # the prefill benchmark's model and video geometry
ROWS = ("transformers", "batched attention", "ours, transformers' operations", "ours")


def tower_flops(config, steps: int, grid_hw: int = GRID_HW) -> float:
    """Floating-point operations of one pass of the vision tower (``config``: Qwen2.5-VL's vision config) over a video
    of ``steps`` temporal patches of ``grid_hw x grid_hw`` patches: the patch embedding, every block's products
    (qkv, projection, the gated MLP) and attention (windows of ``(window_size / patch_size)**2`` patches, one temporal
    patch per segment in the full-attention blocks), and the merger. Two operations per multiply-add."""
    h, inner = config.hidden_size, config.intermediate_size
    patches = steps * grid_hw * grid_hw
    window = min(config.window_size // config.patch_size, grid_hw) ** 2
    full_blocks = len(config.fullatt_block_indexes)
    embed = 2 * config.in_channels * config.temporal_patch_size * config.patch_size**2 * h
    products = 2 * (3 * h * h + h * h + 3 * h * inner)
    attention = 4 * h * ((config.depth - full_blocks) * window + full_blocks * grid_hw * grid_hw)
    merged_width = h * config.spatial_merge_size**2
    merger = 2 * (merged_width * merged_width + merged_width * config.out_hidden_size) / config.spatial_merge_size**2
    return patches * (embed + config.depth * products + attention + merger)


def profile_tower(tower, pixels, steps: int, piece_steps: int, floor_s: float) -> str:
    """The package's tower over one video (after a warm-up): CUDA time by kernel, largest first, and by kind against
    the arithmetic floor ``floor_s``."""
    from torch.profiler import ProfilerActivity, profile

    set_row(tower, "ours")
    with torch.no_grad():
        encode(tower, pixels, steps, piece_steps)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            encode(tower, pixels, steps, piece_steps)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kinds = {"matrix products": 0.0, "attention": 0.0, "the rest (norms, rotary, casts, copies, activations)": 0.0}
    for event in events:
        name = event.key.lower()
        # attention first: flash's template arguments name cutlass types
        kind = ("attention" if any(x in name for x in ("flash", "fmha", "attention")) else
                "matrix products" if any(x in name for x in ("gemm", "cutlass", "xmma", "sm90_", "cublas")) else
                "the rest (norms, rotary, casts, copies, activations)")
        kinds[kind] += event.self_device_time_total / 1e6
    total = sum(kinds.values())
    lines = [f"CUDA time of the package's tower: {total:.3f} s; arithmetic floor {floor_s:.3f} s "
             f"({total / floor_s:.1f}x)"]
    lines += [f"- {kind}: {seconds:.3f} s" for kind, seconds in kinds.items()]
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=120)
    return "\n".join(lines) + "\n\n" + table


def build_tower():
    from modeling_videonsa import VideoNSAVisionTransformer

    config = config_7b().vision_config
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        tower = VideoNSAVisionTransformer._from_config(config, dtype=torch.bfloat16)
    return tower.eval().requires_grad_(False)


def set_row(tower, row: str):
    """Point every block at the attention and MLP classes of ``row`` (same parameters, other forward) and switch the
    tower's fast path on for ``ours`` only."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP, Qwen2_5_VLVisionAttention

    from modeling_videonsa import VideoNSAVisionAttention, VideoNSAVisionMLP

    attention = Qwen2_5_VLVisionAttention if row == "transformers" else VideoNSAVisionAttention
    mlp = VideoNSAVisionMLP if row.startswith("ours") else Qwen2_5_VLMLP
    for block in tower.blocks:
        block.attn.__class__, block.mlp.__class__ = attention, mlp
    tower.set_fast_path(row == "ours")


def encode(tower, pixels, steps: int, piece_steps: int) -> torch.Tensor:
    outputs = []
    per_step = GRID_HW * GRID_HW
    for first in range(0, steps, piece_steps):
        count = min(piece_steps, steps - first)
        grid = torch.tensor([[count, GRID_HW, GRID_HW]], device="cuda")
        piece = pixels[first * per_step:(first + count) * per_step]
        outputs.append(tower(piece, grid_thw=grid).pooler_output)
    return torch.cat(outputs)


def timed(fn, reps: int):
    fn()  # warm-up at this length
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768,131072", help="merged video tokens, multiples of 64")
    parser.add_argument("--piece-tokens", type=int, default=8192, help="merged tokens per tower call")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rows-max", type=int, default=32768, help="longest video for the transformers row")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="the GPU's dense bf16 rate for the floor (an H200's, as measured on the device machine)")
    parser.add_argument("--profile", action="store_true", help="profile the package's tower at the first length")
    parser.add_argument("--out", default=os.path.join(os.environ["OUT"], "bench_vision.md") if "OUT" in os.environ
                        else None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_vision.py needs a CUDA GPU")
    torch.backends.cuda.enable_cudnn_sdp(False)  # as bench_end_to_end.py
    tower = build_tower()
    per_step = GRID_HW * GRID_HW // 4
    lines = [
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: "
        f"{torch.cuda.get_device_name()}; torch {torch.__version__}",
        "Command: python bench/bench_vision.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "",
        "| video tokens | patches | row | tower s | vs transformers | max abs diff vs transformers |",
        "|---|---|---|---|---|---|",
    ]
    floors = ["", "The tower's arithmetic (`tower_flops`) and the time it takes at the rate given: its floor."]
    for length in [int(x) for x in args.lengths.split(",") if x]:
        steps = length // per_step
        generator = torch.Generator(device="cuda").manual_seed(0)
        pixels = torch.randn(steps * GRID_HW * GRID_HW, 3 * 2 * 14 * 14, device="cuda", generator=generator,
                             dtype=torch.bfloat16)
        flops = tower_flops(tower.config, steps)
        floor_s = flops / (args.peak_tflops * 1e12)
        if args.profile:
            text = profile_tower(tower, pixels, steps, max(1, args.piece_tokens // per_step), floor_s)
            print(text)
            if args.out:
                with open(args.out, "w") as file:
                    file.write(" ".join(["python bench/bench_vision.py", *(sys.argv[1:] if argv is None else argv)])
                               + f"\n{lines[0]}\n\n{text}\n")
            return
        floors.append(f"- {length} video tokens: {flops / 1e12:.0f} TFLOP, {floor_s:.3f} s at "
                      f"{args.peak_tflops:.0f} TFLOP/s")
        reference = reference_s = None
        for row in ROWS:
            if row == "transformers" and length > args.rows_max:
                lines.append(f"| {length} | {pixels.shape[0]} | {row} | skipped (> --rows-max) | | |")
                continue
            set_row(tower, row)
            with torch.no_grad():
                seconds, out = timed(lambda: encode(tower, pixels, steps, max(1, args.piece_tokens // per_step)),
                                     args.reps)
            if row == "transformers":
                reference, reference_s = out, seconds
            diff = f"{(out.float() - reference.float()).abs().max().item():.1e}" if reference is not None else "—"
            ratio = f"{seconds / reference_s:.2f}x" if reference_s else "—"
            lines.append(f"| {length} | {pixels.shape[0]} | {row} | {seconds:.3f} | {ratio} | {diff} |")
            print(lines[-1], flush=True)
            del out
        del pixels, reference
        torch.cuda.empty_cache()
    text = "\n".join(lines + floors)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
