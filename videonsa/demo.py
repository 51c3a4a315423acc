"""The main job: load VideoNSA through AutoModel / AutoProcessor, ask a question about a video, print the answer.
(A checkpoint in the authors' release layout, a Qwen2.5-VL config without code files, loads with this package's
classes instead: ``videonsa.loading.load_checkpoint``.)

With no `--model`, a tiny random VideoNSA checkpoint (real Qwen2.5-VL structure, the released NSA settings, a
byte-level tokenizer with Qwen2.5-VL's special tokens) is built locally, because no weights can be downloaded
here; its answer is random tokens, but every step is the real one: remote code, the bundled kernels, the video
processor, the hybrid attention during the video prefill and dense decode steps. With `--model Enxin/VideoNSA`
the released model is used instead.

    videonsa-demo                                     # tiny local checkpoint, synthetic video
    videonsa-demo --model Enxin/VideoNSA --video clip.mp4 --question "What happens?"

(``bash scripts/demo.sh`` sets up ``.venv`` and runs it; ``python -m videonsa.demo`` is the same command.)
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch

from .loading import load_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="repo id or folder of a VideoNSA checkpoint (default: build a tiny one)")
    parser.add_argument("--video", help="video file or URL (default: a synthetic 4-second clip)")
    parser.add_argument("--question", default="What is moving in this video, and where does it go?")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="model dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default=".demo", help="where the tiny checkpoint and synthetic video go")
    return parser.parse_args(argv)


def record_attention_paths(model):
    """Forward hooks that log, per pass, which attention each text layer ran (``VideoNSAAttention.last_path``)."""
    passes = []

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if module.layer_idx == 0:
            passes.append({"tokens": hidden.shape[1], "paths": collections.Counter()})
        passes[-1]["paths"][module.last_path] += 1

    for layer in model.model.language_model.layers:
        layer.self_attn.register_forward_hook(hook, with_kwargs=True)
    return passes


def summarise(passes) -> list[str]:
    lines, decode = [], collections.Counter()
    for index, record in enumerate(passes):
        paths = ", ".join(f"{count} layers {path}" for path, count in record["paths"].items())
        if index == 0 or record["tokens"] > 1:
            lines.append(f"  pass {index} ({record['tokens']} tokens): {paths}")
        else:
            decode.update(record["paths"])
    if decode:
        steps = len(passes) - sum(1 for i, r in enumerate(passes) if i == 0 or r["tokens"] > 1)
        paths = ", ".join(f"{count // steps} layers {path}" for path, count in decode.items())
        lines.append(f"  {steps} decode steps (1 token each): {paths}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    workdir = Path(args.workdir)
    source = args.model
    if source is None:
        from .testing import build_tiny_checkpoint

        source = str(workdir / "tiny-videonsa")
        print(f"No --model given: building a tiny random VideoNSA checkpoint in {source}")
        build_tiny_checkpoint(source)  # rebuilt every run (a second), so it always carries this checkout's code
    video = args.video
    if video is None:
        from .testing import write_video

        video = str(workdir / "moving-square.mp4")
        if not Path(video).is_file():
            workdir.mkdir(parents=True, exist_ok=True)
            write_video(video, num_frames=32, fps=8, width=224, height=224)

    model, processor = load_checkpoint(source, dtype=args.dtype)
    model = model.to(args.device).eval()
    print(f"Loaded {type(model).__name__} from {source} ({type(processor).__name__}, {args.device})")

    messages = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": args.question}]}]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    ).to(args.device)
    num_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    print(f"Prompt: {inputs['input_ids'].shape[1]} tokens, {num_video} of them video "
          f"(grid t x h x w = {inputs['video_grid_thw'].tolist()})")

    passes = record_attention_paths(model)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    note = " (random weights: noise)" if args.model is None else ""
    print(f"Question: {args.question}\nAnswer{note}: {answer!r}")
    print("Attention that ran:")
    print("\n".join(summarise(passes)))
    return answer


def console() -> None:
    """The ``videonsa-demo`` command: :func:`main`, whose return value (the answer) is not an exit status."""
    main()


if __name__ == "__main__":
    main()
