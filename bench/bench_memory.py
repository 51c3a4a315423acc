"""What fits where: long-video prompts of the VideoNSA 7B architecture under a GPU memory cap.

Builds Qwen2.5-VL-7B + VideoNSA gates with random bf16 weights (``bench_end_to_end.build_model``) on one GPU, caps the
process with ``torch.cuda.set_per_process_memory_fraction`` to the memory of a named card, and runs the user's path:
``model.generate(**inputs, max_new_tokens=N)`` with ``config.prefill_chunk_tokens`` set (the model's own pass in
pieces; vision tower in pieces too). Each cell is one weight format, one cap and one prompt length (video tokens at
the released 64 tokens per temporal patch, between a chat prefix and a question); it records whether prefill and
answer fit, the prefill time (time to the first token), decode tokens/s, and the peak memory of the prefill and of
the whole call (``torch.cuda.max_memory_allocated``: weights, inputs, KV cache and work; GB = 10^9 bytes).

Weight formats: ``bf16``; ``dense`` (bf16 with ``nsa_enabled=False``: Qwen2.5-VL's attention, the baseline);
``fp8``, ``int8``, ``nf4`` (transformers' ``FineGrainedFP8Config`` / ``BitsAndBytesConfig`` through
``videonsa.loading.quantization_config``: the random bf16 weights are saved once and loaded quantized, so every
format holds the same weights). For each quantized format the accuracy against bf16 is measured on one prompt
(``--accuracy-tokens``): the last position's logits (max and relative error, top-1 agreement), the greedy answer
(``--accuracy-answer`` tokens) and the selected blocks of every layer (mean share of a row's selected blocks that
bf16 selects too).

Caps (``--cap``): a card's usable memory, i.e. what ``torch.cuda.mem_get_info`` reports as total on it less the CUDA
context (~0.5 GiB): ``80GB`` = 78.7 GiB (H100 80GB: 79.2 GiB total), ``24GB`` = 23.1 GiB (RTX 4090: 23.65 GiB
total), or ``<n>GiB``.

    python bench/bench_memory.py --cells bf16@80GB:131072,327680 bf16@24GB/4096:65536 nf4@24GB/4096:131072
    python bench/bench_memory.py --cells bf16@24GB:4096 --layers 2 --answer-tokens 4    # smoke test

Results go to stdout as they come and, rewritten after every cell, to ``--out`` (markdown + JSON; default
``$OUT/bench_memory.md``), so a run that is cut off keeps what it measured. ``bench/plot_benchmarks.py`` draws the
peak-memory plot from the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time

import bench_end_to_end as e2e  # the sibling script (this folder is on sys.path when a script here runs)
import torch

GIB = 1 << 30
CAPS = {"80GB": 78.7 * GIB, "24GB": 23.15 * GIB}
FORMATS = ("bf16", "dense", "fp8", "int8", "nf4")


def parse_cap(text: str) -> float:
    if text in CAPS:
        return CAPS[text]
    if text.endswith("GiB"):
        return float(text[:-3]) * GIB
    raise argparse.ArgumentTypeError(f"unknown cap {text!r}: use one of {sorted(CAPS)} or '<n>GiB'")


def parse_cells(specs, default_chunk: int):
    """``fmt@cap[/chunk]:len,len`` -> ``[(fmt, cap name, cap bytes, chunk, [lengths])]`` in the order given."""
    cells = []
    for spec in specs:
        try:
            head, lengths = spec.split(":")
            fmt, cap = head.split("@")
            cap, _, chunk = cap.partition("/")
            cells.append((fmt, cap, parse_cap(cap), int(chunk) if chunk else default_chunk,
                          [int(x) for x in lengths.split(",") if x]))
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise SystemExit(f"--cells entries look like bf16@80GB:131072,327680 or nf4@24GB/4096:65536; got {spec!r} "
                             f"({error})") from None
        if fmt not in FORMATS:
            raise SystemExit(f"unknown weight format {fmt!r} in {spec!r}; choose among {FORMATS}")
    return cells


class FirstTokenClock:
    """A logits processor that notes, at each generation step, the time and the peak memory so far: the first call
    comes right after the prefill."""

    def __init__(self):
        self.times, self.peaks = [], []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.peaks.append(torch.cuda.max_memory_allocated())
        return scores


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def set_cap(cap_bytes: float | None):
    _free()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_bytes is None else min(1.0, cap_bytes / total))


def run_cell(model, length: int, answer_tokens: int, chunk: int, pixels_on: str = "cuda") -> dict:
    """One generate call on a ``length``-video-token prompt under the current cap (``pixels_on``: where the
    pixels wait; the vision tower moves its pieces to the GPU)."""
    from transformers import LogitsProcessorList

    inputs = e2e.make_inputs(length)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(pixels_on)
    result = {"prompt_tokens": int(inputs["input_ids"].shape[1])}
    model.config.prefill_chunk_tokens = chunk
    model.model.rope_deltas = None
    clock = FirstTokenClock()
    _free()
    torch.cuda.reset_peak_memory_stats()
    start = e2e._sync_time()
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens,
                                 do_sample=False, logits_processor=LogitsProcessorList([clock]))
        end = e2e._sync_time()
    except torch.cuda.OutOfMemoryError as error:
        result.update(fits=False, error=str(error).splitlines()[0][:160],
                      peak_gb=torch.cuda.max_memory_allocated() / 1e9)
        return result
    finally:
        del inputs
        _free()
    new = int(out.shape[1]) - result["prompt_tokens"]
    result.update(
        fits=True, answer_tokens=new, prefill_s=clock.times[0] - start,
        prefill_peak_gb=clock.peaks[0] / 1e9, peak_gb=torch.cuda.max_memory_allocated() / 1e9,
        decode_tok_s=(new - 1) / (end - clock.times[0]) if new > 1 else None,
        path=model.model.language_model.layers[0].self_attn.last_path,
    )
    return result


class SelectionRecorder:
    """Records the block indices every selection call of the Triton backend returns (moved to the CPU)."""

    def __init__(self):
        from nsa_kernels import triton_nsa

        self.module, self.original, self.calls = triton_nsa, triton_nsa.select_blocks, []

    def __enter__(self):
        def recorded(*args, **kwargs):
            indices = self.original(*args, **kwargs)
            self.calls.append(indices.cpu())
            return indices

        self.module.select_blocks = recorded
        return self

    def __exit__(self, *exc):
        self.module.select_blocks = self.original


def accuracy_run(model, length: int, answer: int, chunk: int) -> dict:
    """Last-position logits, greedy answer and every layer's selected blocks on one prompt."""
    inputs = e2e.make_inputs(length, seed=3)
    model.config.prefill_chunk_tokens = chunk
    model.model.rope_deltas = None
    with torch.no_grad(), SelectionRecorder() as recorder:
        out = model.generate(**inputs, max_new_tokens=answer, min_new_tokens=answer, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return dict(logits=out.logits[0][0].float().cpu(), answer=out.sequences[0, inputs["input_ids"].shape[1]:].cpu(),
                selections=recorder.calls)


def selection_agreement(mine, reference) -> float:
    """Mean share of a (row, kv head)'s selected blocks (valid slots) that the reference selects too."""
    shares = []
    for a, b in zip(mine, reference, strict=True):
        a, b = a.long(), b.long()
        valid = a >= 0
        same = (a[..., :, None] == b[..., None, :]).any(-1) & valid
        shares.append((same.sum(-1).float() / valid.sum(-1).clamp_min(1).float()).mean().item())
    return sum(shares) / len(shares)


def compare(mine: dict, reference: dict) -> dict:
    diff = (mine["logits"] - reference["logits"]).abs()
    return dict(
        logits_max_abs_err=diff.max().item(),
        logits_rel_l2_err=(diff.norm() / reference["logits"].norm()).item(),
        top1_equal=bool(mine["logits"].argmax() == reference["logits"].argmax()),
        answer_tokens_equal=int((mine["answer"] == reference["answer"]).cumprod(0).sum()),
        answer_tokens=len(reference["answer"]),
        selected_block_agreement=selection_agreement(mine["selections"], reference["selections"]),
    )


def load_quantized(path: str, fmt: str):
    from modeling_videonsa import VideoNSAForConditionalGeneration
    from videonsa.loading import quantization_config

    model = VideoNSAForConditionalGeneration.from_pretrained(path, quantization_config=quantization_config(fmt),
                                                             dtype=torch.bfloat16, device_map="cuda")
    return model.eval().requires_grad_(False)


def render(meta: dict, results: list, accuracy: dict) -> str:
    lines = [
        f"Date: {meta['date']}; device: {meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}",
        f"Command: {meta['command']}",
        f"Model: VideoNSA 7B architecture ({meta['layers']} text layers), random weights; generate with "
        f"prefill_chunk_tokens per cell (default {meta['chunk']}), {meta['answer_tokens']} answer tokens, pixels on "
        f"{meta['pixels_on']}; weights: "
        + ", ".join(f"{k} {v:.2f} GB" for k, v in meta["weights_gb"].items()),
        "",
        "| weights | cap | chunk | video tokens | frames (4 fps) | fits | prefill s | decode tok/s | peak prefill GB "
        "| peak prefill+answer GB | path |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in results:
        fits = "yes" if cell.get("fits") else f"no ({cell.get('error', '')[:60]})"
        lines.append(
            f"| {cell['format']} | {cell['cap']} | {cell.get('chunk', '')} | {cell['length']} | "
            f"{cell['length'] // 32} | {fits} | "
            f"{e2e.fmt(cell.get('prefill_s'))} | {e2e.fmt(cell.get('decode_tok_s'), 1)} | "
            f"{e2e.fmt(cell.get('prefill_peak_gb'), 1)} | {e2e.fmt(cell.get('peak_gb'), 1)} | {cell.get('path', '')} |")
    if accuracy:
        lines += ["", f"Accuracy against bf16 ({meta['accuracy_tokens']} video tokens, same weights):", "",
                  "| weights | last logits max abs err | rel L2 err | top-1 equal | greedy tokens equal "
                  "| selected-block agreement |", "|---|---|---|---|---|---|"]
        for fmt, acc in accuracy.items():
            lines.append(f"| {fmt} | {acc['logits_max_abs_err']:.3g} | {acc['logits_rel_l2_err']:.3g} | "
                         f"{acc['top1_equal']} | {acc['answer_tokens_equal']} of {acc['answer_tokens']} | "
                         f"{acc['selected_block_agreement']:.4f} |")
    return "\n".join(lines)


def write(path, meta, results, accuracy):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        file.write(render(meta, results, accuracy) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as file:
        json.dump(dict(meta=meta, results=results, accuracy=accuracy), file, indent=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", required=True, help="weights@cap:len,len,... (see above)")
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8192,
                        help="config.prefill_chunk_tokens of cells that name none (fmt@cap/chunk:...)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--pixels-on", choices=("cuda", "cpu"), default="cuda",
                        help="where the prompt's pixels wait (the processor's output moved with .to('cuda'), or left "
                             "on the CPU: the vision tower moves its pieces)")
    parser.add_argument("--accuracy-tokens", type=int, default=16384,
                        help="video tokens of the accuracy prompt (0: no accuracy comparison)")
    parser.add_argument("--accuracy-answer", type=int, default=16)
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where the random bf16 weights are saved for the quantized formats (a temp dir)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.cells = parse_cells(args.cells, args.chunk)
    if args.out is None and os.environ.get("OUT"):
        args.out = os.path.join(os.environ["OUT"], "bench_memory.md")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_memory.py needs a CUDA GPU")
    import transformers

    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                command="python bench/bench_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
                layers=args.layers, chunk=args.chunk, pixels_on=args.pixels_on, answer_tokens=args.answer_tokens,
                accuracy_tokens=args.accuracy_tokens, weights_gb={})
    results, accuracy = [], {}
    quantized = [fmt for fmt in dict.fromkeys(cell[0] for cell in args.cells) if fmt not in ("bf16", "dense")]

    def run_cells(model, formats):
        for fmt, cap_name, cap, chunk, lengths in args.cells:
            if fmt not in formats:
                continue
            model.config.nsa_enabled = fmt != "dense"
            for length in lengths:
                set_cap(cap)
                cell = dict(format=fmt, cap=cap_name, cap_gib=cap / GIB, chunk=chunk, length=length)
                try:
                    cell.update(run_cell(model, length, args.answer_tokens, chunk, args.pixels_on))
                except Exception as error:  # noqa: BLE001 - one failing cell must not lose the others
                    cell.update(fits=False, error=f"{type(error).__name__}: {str(error)[:200]}")
                set_cap(None)
                results.append(cell)
                print(json.dumps(cell), flush=True)
                write(args.out, meta, results, accuracy)
        model.config.nsa_enabled = True

    model = e2e.build_model(args.layers)
    meta["weights_gb"]["bf16"] = torch.cuda.memory_allocated() / 1e9
    e2e.warm_up(model, ["videonsa"], argparse.Namespace(warmup_tokens=4096, reps=1, decode_tokens=2,
                                                         prefill="chunked", chunk_size=args.chunk))
    run_cells(model, ("bf16", "dense"))
    reference = accuracy_run(model, args.accuracy_tokens, args.accuracy_answer, args.chunk) \
        if quantized and args.accuracy_tokens else None
    if quantized:
        folder = args.checkpoint_dir or tempfile.mkdtemp(prefix="videonsa-random-7b-")
        start = time.perf_counter()
        model.save_pretrained(folder)
        print(f"saved the random bf16 weights to {folder} in {time.perf_counter() - start:.1f} s", flush=True)
        del model
        _free()
        for fmt in quantized:
            start = time.perf_counter()
            try:
                model = load_quantized(folder, fmt)
            except Exception as error:  # noqa: BLE001 - reported, the other formats still run
                print(f"{fmt}: could not load: {type(error).__name__}: {error}", flush=True)
                results.append(dict(format=fmt, cap="-", length=0, fits=False,
                                    error=f"load failed: {type(error).__name__}: {str(error)[:160]}"))
                continue
            meta["weights_gb"][fmt] = torch.cuda.memory_allocated() / 1e9
            print(f"loaded {fmt} in {time.perf_counter() - start:.1f} s: {meta['weights_gb'][fmt]:.2f} GB", flush=True)
            if reference is not None:
                try:
                    accuracy[fmt] = compare(accuracy_run(model, args.accuracy_tokens, args.accuracy_answer,
                                                         args.chunk), reference)
                except Exception as error:  # noqa: BLE001 - reported, the cells still run
                    results.append(dict(format=fmt, cap="-", length=0, fits=False,
                                        error=f"accuracy run failed: {type(error).__name__}: {str(error)[:160]}"))
                print(f"{fmt} accuracy: {accuracy.get(fmt, results[-1])}", flush=True)
            run_cells(model, (fmt,))
            del model
            _free()
    write(args.out, meta, results, accuracy)
    print("\n" + render(meta, results, accuracy), flush=True)
    return results, accuracy


if __name__ == "__main__":
    main()
