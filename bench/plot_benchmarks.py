"""Plot the recorded H100 benchmarks (``docs/results/*.json``) into ``docs/benchmarks_h100.png``.

Left: one layer's attention, forward, against the number of tokens (dense SDPA with its flash and cuDNN backends,
fla-core's NSA, ours). Right: end-to-end prefill of the 7B architecture (time to first token) against the number of
video tokens, VideoNSA and the same weights with dense attention, split into vision tower and text decoder.

    python bench/plot_benchmarks.py [--results docs/results] [--out docs/benchmarks_h100.png]
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def attention_series(results_dir):
    """``{impl: ([T], [fwd ms])}`` from the attention runs (fla rows from their own run)."""
    series = {}
    for name in ("h100_attention.json", "h100_attention_fla.json"):
        runs = json.load(open(os.path.join(results_dir, name)))["results"]
        for length, rows in sorted(runs.items(), key=lambda kv: int(kv[0])):
            for impl, entry in rows.items():
                if not isinstance(entry, dict) or "fwd_ms" not in entry:
                    continue
                if impl == "ours" and name.endswith("_fla.json"):
                    continue  # the first run's row is the one plotted
                xs, ys = series.setdefault(impl, ([], []))
                xs.append(int(length))
                ys.append(entry["fwd_ms"])
    return series


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(ROOT, "docs", "results"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks_h100.png"))
    args = parser.parse_args(argv)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = {"sdpa-flash": "dense SDPA (flash)", "sdpa-cudnn": "dense SDPA (cuDNN)",
              "fla-nsa": "fla-core parallel_nsa (no window)", "ours": "VideoNSA kernels (ours)"}
    for impl, (xs, ys) in attention_series(args.results).items():
        left.plot(xs, ys, marker="o", label=labels.get(impl, impl), linewidth=2.5 if impl == "ours" else 1.5)
    left.set(xscale="log", yscale="log", xlabel="tokens", ylabel="forward time per layer (ms)",
             title="One layer's attention, 64/4 heads, D 128, bf16")
    left.set_xticks([8192, 16384, 32768, 65536, 131072], ["8K", "16K", "32K", "64K", "128K"])
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)

    e2e = json.load(open(os.path.join(args.results, "h100_end_to_end.json")))["results"]
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
    right.set(xlabel="video tokens", ylabel="prefill time (s)", title="7B prefill (time to first token)")
    right.legend(fontsize=8)
    fig.suptitle("Measured on one NVIDIA H100 80GB (docs/benchmarks.md, 2026-11-21)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
