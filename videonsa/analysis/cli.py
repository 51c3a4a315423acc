"""``videonsa-analyze``: what VideoNSA's attention does on a video, as plots and a summary.

    videonsa-analyze --model Enxin/VideoNSA --video clip.mp4 --out analysis/

writes ``gates.png``, ``budget.png``, ``selected_frames.png``, ``sinks.png`` and ``summary.json`` (definitions in
``docs/analysis.md``).
"""

from __future__ import annotations

import argparse

import torch

from ..long_context import DEFAULT_CHUNK_SIZE
from .measure import DEFAULT_SINK_THRESHOLD, PAPER_CONTEXT, analyze
from .plots import write_report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder or Hub repo id of a VideoNSA checkpoint")
    parser.add_argument("--video", required=True, help="video file")
    parser.add_argument("--out", required=True, help="folder for the PNGs and summary.json")
    parser.add_argument("--question", default="Describe what happens in this video.")
    parser.add_argument("--fps", type=float, default=None, help="sampling rate (default: the processor's, 4)")
    parser.add_argument("--query-position", type=int, action="append", default=None,
                        help="prompt position whose selected blocks to show (repeatable; default: last video token)")
    parser.add_argument("--query-time", type=float, action="append", default=None,
                        help="seconds into the video: show the last video token of that moment (repeatable)")
    parser.add_argument("--sink", choices=("token", "block"), default="token")
    parser.add_argument("--sink-threshold", type=float, default=DEFAULT_SINK_THRESHOLD)
    parser.add_argument("--compare-dense", action="store_true", help="also measure dense attention's sinks")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--dtype", default="auto", help="model dtype (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from ..loading import load_checkpoint

    model, processor = load_checkpoint(args.model, dtype=args.dtype)  # the authors' release too, as VideoNSA
    model = model.to(args.device).eval()
    video_kwargs = {} if args.fps is None else {"fps": args.fps}
    messages = [{"role": "user", "content": [{"type": "video", "video": args.video},
                                             {"type": "text", "text": args.question}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt", **video_kwargs).to(args.device)
    plans = processor.plan_videos([args.video], **video_kwargs)
    analysis = analyze(model, inputs, queries=args.query_position, query_times=args.query_time, sink=args.sink,
                       sink_threshold=args.sink_threshold, compare_dense=args.compare_dense, plans=plans,
                       chunk_size=args.chunk_size)
    paths = write_report(analysis, args.out, extra=dict(model=args.model, video=args.video, question=args.question))
    summary = analysis.summary()
    budget = summary["budget"]
    gates = summary["gates"]["mean"]
    print(f"{summary['num_tokens']} tokens, {summary['num_vision_queries']} vision queries, "
          f"{len(analysis.layers)} NSA layers")
    print("mean gates: " + ", ".join(f"{b} {v:.3f}" for b, v in gates.items()))
    print(f"attention budget vs dense: {100 * budget['total_ratio']:.2f}% of the work over all vision queries, "
          f"{100 * budget['last_query_ratio']:.2f}% for the last one "
          f"(nominal at {PAPER_CONTEXT:,} tokens: {100 * budget[f'nominal_{PAPER_CONTEXT}']['last_query_ratio']:.2f}%)")
    print(f"sink ratio (weight on the first {args.sink} > {args.sink_threshold:g}): "
          + ", ".join(f"{b} {100 * v:.2f}%" for b, v in summary["sinks"]["ratio"].items()))
    for path in paths.values():
        print(f"wrote {path}")
    return paths


def console() -> None:
    """The ``videonsa-analyze`` command: :func:`main`, whose return value (the written paths) is not an exit status."""
    main()


if __name__ == "__main__":
    main()
