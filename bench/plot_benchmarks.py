"""Plot the recorded benchmarks (``docs/results/*.json``) into ``docs/benchmarks.png`` and ``docs/memory.png``.

Left: one layer's attention, forward, against the number of tokens, as the user compares it: the dense model's
attention (28 query / 4 kv heads, SDPA flash and cuDNN) and VideoNSA's hybrid layer on random and video-like inputs
(``bench/bench_layer.py``, H200). Right: end-to-end prefill of the 7B architecture (time to first token) against the
number of video tokens, VideoNSA and the same weights with dense attention on PyTorch's own SDPA choice (cuDNN there),
split into vision tower and text decoder (``bench/bench_end_to_end.py``, H200).

``docs/memory.png``: peak GPU memory of a 7B prompt with a 64-token answer against the number of video tokens, per
weight format, with the 24 GB and 80 GB caps it was run under (``bench/bench_memory.py``, H200).

    python bench/plot_benchmarks.py [--results docs/results] [--out docs/benchmarks.png] [--memory-out docs/memory.png]
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


LAYER_RUN = "h200_layer_2026-12-04_plan.json"
E2E_RUN = "h200_e2e_2026-12-04_vision.json"
MEMORY_RUNS = ("h200_memory_2026-12-03_run1.json", "h200_memory_2026-12-03_run3.json")


def plot_memory(results_dir, out):
    """Peak memory (allocated, GB) against video tokens per weight format and run; failed cells as crosses at the
    memory reached."""
    fig, axis = plt.subplots(figsize=(7.5, 4.5))
    for run in MEMORY_RUNS:
        data = json.load(open(os.path.join(results_dir, run)))
        tag = "pixels on GPU, before the final-norm pieces" if data["meta"].get("pixels_on", "cuda") == "cuda" else \
            "pixels on CPU"
        series = {}
        for cell in data["results"]:
            if not cell.get("length"):
                continue
            key = (cell["format"], cell["fits"])
            series.setdefault(key, []).append((cell["length"], cell.get("peak_gb")))
        for (fmt, fits), points in sorted(series.items()):
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            if fits:
                axis.plot(xs, ys, marker="o", label=f"{fmt} ({tag})", linestyle="-" if "CPU" in tag else ":")
            else:
                axis.scatter(xs, ys, marker="x", color="k", label=f"{fmt}: out of memory at the cap ({tag})")
    for cap, name in ((78.7 * 2**30 / 1e9, "80 GB cap"), (23.15 * 2**30 / 1e9, "24 GB cap")):
        axis.axhline(cap, color="0.5", linewidth=0.8)
        axis.text(300000, cap + 0.8, name, fontsize=8, color="0.3")
    axis.set(xlabel="video tokens (32 per frame at the released 4 fps)", ylabel="peak GPU memory (GB)",
             title="VideoNSA 7B: prompt + 64-token answer, prefill_chunk_tokens set (H200, 2026-12-03)")
    ticks = [16384, 65536, 131072, 196608, 262144, 327680, 393216]
    axis.set_xticks(ticks, [f"{t // 1024}K" for t in ticks])
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def attention_series(results_dir):
    """``{label: ([T], [fwd ms])}``: the dense baselines and the hybrid layer with the library's defaults."""
    runs = json.load(open(os.path.join(results_dir, LAYER_RUN)))["results"]
    series = {}
    for length, result in sorted(runs.items(), key=lambda kv: int(kv[0])):
        rows = result["rows"]
        for label, name in (("dense, SDPA cuDNN (PyTorch's choice)", "dense sdpa-cudnn"),
                            ("dense, SDPA flash", "dense sdpa-flash"),
                            ("VideoNSA, random inputs", "hybrid (random)"),
                            ("VideoNSA, video-like inputs", "hybrid (video-like)")):
            xs, ys = series.setdefault(label, ([], []))
            xs.append(int(length))
            ys.append(rows[name].get("fwd_b2b_ms", rows[name]["fwd_ms"]))  # calls queued back to back, as in a pass
    return series


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(ROOT, "docs", "results"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.png"))
    parser.add_argument("--memory-out", default=os.path.join(ROOT, "docs", "memory.png"))
    args = parser.parse_args(argv)
    plot_memory(args.results, args.memory_out)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, (xs, ys) in attention_series(args.results).items():
        left.plot(xs, ys, marker="o", label=label, linewidth=2.5 if label.startswith("VideoNSA") else 1.5)
    left.set(xscale="log", yscale="log", xlabel="tokens", ylabel="forward time per layer (ms), layers queued back to back",
             title="One layer's attention vs the dense model's, 28/4 heads, bf16 (H200)")
    left.set_xticks([8192, 16384, 32768, 65536, 131072], ["8K", "16K", "32K", "64K", "128K"])
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)

    e2e = json.load(open(os.path.join(args.results, E2E_RUN)))["results"]
    lengths = sorted(e2e, key=int)
    width = 0.38
    for i, row in enumerate(("videonsa", "dense")):
        xs = [j + (i - 0.5) * width for j in range(len(lengths))]
        vision = [e2e[n]["vision_s"] for n in lengths]
        text = [e2e[n][row]["prefill_s"] - e2e[n]["vision_s"] for n in lengths]
        right.bar(xs, vision, width, color="0.75", label="vision tower" if i == 0 else None)
        right.bar(xs, text, width, bottom=vision, color="C3" if row == "videonsa" else "C0",
                  label=f"text decoder, {'VideoNSA' if row == 'videonsa' else 'dense'}")
        for x, n in zip(xs, lengths):
            right.text(x, e2e[n][row]["prefill_s"], f"{e2e[n][row]['prefill_s']:.1f}", ha="center", va="bottom",
                       fontsize=8)
    right.set_xticks(range(len(lengths)), [f"{int(n) // 1024}K" for n in lengths])
    right.set(xlabel="video tokens", ylabel="prefill time (s)", title="7B prefill, time to first token (H200)")
    right.legend(fontsize=8)
    layer_date = json.load(open(os.path.join(args.results, LAYER_RUN)))["date"]
    e2e_date = json.load(open(os.path.join(args.results, E2E_RUN)))["meta"]["date"]
    dates = sorted({layer_date[:10], e2e_date[:10]})
    fig.suptitle(f"docs/benchmarks.md: one H200, {', '.join(dates)} (dense: PyTorch's SDPA choice, cuDNN; and flash)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
