"""Why are `generate`'s decode steps slower with VideoNSA on than off? Times and profiles them, side by side.

Builds the 7B architecture (``--layers`` text layers, random bf16 weights) on one GPU, prefills one video prompt with
``generate`` for ``nsa_enabled`` True and False (same weights, same prompt), and reports per decode step: wall time
(a logits processor notes the time of every step), and a ``torch.profiler`` table of ``--profile-steps`` steps (CPU
and CUDA time per op), so the two rows can be diffed.

    python bench/profile_decode.py --layers 4 --video-tokens 32768 --out $OUT/profile_decode.txt
"""

from __future__ import annotations

import argparse
import os
import statistics

import bench_end_to_end as e2e  # the sibling scripts (this folder is on sys.path when a script here runs)
import torch
from bench_memory import FirstTokenClock
from transformers import LogitsProcessorList


class StepClock(FirstTokenClock):
    """``bench_memory``'s step clock; with ``profiler``, also starts it at the first step (after the prefill), so
    that only decode steps are profiled."""

    def __init__(self, profiler=None):
        super().__init__()
        self.profiler = profiler

    def __call__(self, input_ids, scores):
        scores = super().__call__(input_ids, scores)
        if self.profiler is not None and len(self.times) == 1:
            self.profiler.start()
        return scores


def run(model, inputs, steps, profile_steps):
    from torch.profiler import ProfilerActivity, profile

    def generate(clock, count):
        model.model.rope_deltas = None
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                           logits_processor=LogitsProcessorList([clock]))

    clock = StepClock()
    generate(clock, steps)
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    generate(StepClock(profiler), profile_steps + 1)
    torch.cuda.synchronize()
    profiler.stop()
    return gaps, profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--video-tokens", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=8192, help="config.prefill_chunk_tokens")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    model = e2e.build_model(args.layers)
    model.config.prefill_chunk_tokens = args.chunk
    inputs = e2e.make_inputs(args.video_tokens)
    report = []
    for enabled in (True, False, True, False):  # twice each: the first pair warms up
        model.config.nsa_enabled = enabled
        gaps, table = run(model, inputs, args.steps, args.profile_steps)
        line = (f"nsa_enabled={enabled}: decode step median {1e3 * statistics.median(gaps):.1f} ms, "
                f"min {1e3 * min(gaps):.1f} ms over {len(gaps)} steps")
        print(line, flush=True)
        report.append(line + "\n" + table)
    text = "\n\n".join(report[2:])
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
