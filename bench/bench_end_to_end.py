"""End-to-end long-video inference of the VideoNSA 7B architecture (random weights) on one GPU.

Builds Qwen2.5-VL-7B + VideoNSA gates (28 layers, hidden 3584, 28 query / 4 kv heads, the 32-layer vision tower)
with random bf16 weights directly on the GPU, and measures, side by side in one run, for a prompt of N video tokens
(one video of N / 64 temporal patches of 16 x 16 patches = 64 tokens, one NSA block each, as at the released
resolution, between a short chat prefix and a question):

* ``videonsa``: the hybrid attention with the bundled Triton kernels (``nsa_backend="triton"``);
* ``dense``: the same weights with NSA off (``nsa_enabled=False``: Qwen2.5-VL's SDPA attention);
* ``naive``: the released function computed by the PyTorch reference (``nsa_backend="torch"``); slow, so by
  default only up to ``--naive-max-tokens``.

Per row and length: prefill time = time to first token (vision tower + text decoder + the last position's logits,
through ``videonsa.long_context.chunked_prefill``: one pass computed in pieces, no logits but the last; with
``--prefill forward``, ``model(..., logits_to_keep=1)`` instead), the vision tower's share of it (timed alone per
length, best of ``--reps`` as the prefill), decode tokens/s (greedy steps on the prefill's cache; steps are dense in
every row, as in VideoNSA),
peak GPU memory of the prefill and of prefill + decode (``torch.cuda.max_memory_allocated``, weights and inputs
included; GB = 10^9 bytes). Results go to stdout as they come, and as a markdown table (plus JSON) to ``--out``
(default ``$OUT/bench_end_to_end.md`` when ``$OUT`` is set), rewritten after every cell so a cut-off run keeps
what it measured.

    python bench/bench_end_to_end.py                                      # 16K, 32K, 64K, 128K; all rows
    python bench/bench_end_to_end.py --lengths 262144 --rows videonsa     # a 256K-token prompt on one 80 GB GPU
    python bench/bench_end_to_end.py --layers 2 --lengths 4096 --decode-tokens 4   # smoke test

Needs CUDA, Triton, transformers >= 5.17; no network, no flash-attn.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

from configuration_videonsa import VideoNSAConfig
from videonsa.long_context import chunked_prefill, video_features
from videonsa.training.presets import apply_config_overrides, preset_config

ROWS = ("videonsa", "dense", "naive")
ROW_SETTINGS = {
    "videonsa": dict(nsa_enabled=True, nsa_backend="triton"),
    "dense": dict(nsa_enabled=False, nsa_backend="triton"),
    "naive": dict(nsa_enabled=True, nsa_backend="torch"),
}
VIDEO, VISION_START, VISION_END = 151656, 151652, 151653  # the ids of the 7b preset
PREFIX, QUESTION = 15, 24  # chat-template tokens before the video, question + assistant header after it
GRID_HW = 16  # 16 x 16 patches of 14 px = 224 x 224 frames -> 64 merged tokens per temporal patch


def config_7b(num_layers: int = 28) -> VideoNSAConfig:
    """Qwen2.5-VL-7B-Instruct's architecture with the released NSA settings (``videonsa.training.presets``'
    ``7b`` preset), with ``num_layers`` text layers."""
    return apply_config_overrides(preset_config("7b"), None if num_layers == 28 else f"num_hidden_layers={num_layers}")


def build_model(num_layers: int):
    from modeling_videonsa import VideoNSAForConditionalGeneration

    config = config_7b(num_layers)
    with torch.device("cuda"):
        model = VideoNSAForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                               dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    gc.collect()
    torch.cuda.empty_cache()
    return model


def make_inputs(num_video_tokens: int, seed: int = 0) -> dict:
    """One prompt: PREFIX text tokens, vision start, the video, vision end, QUESTION text tokens."""
    per_step = GRID_HW * GRID_HW // 4
    if num_video_tokens % per_step:
        raise ValueError(f"video tokens must be a multiple of {per_step} (one temporal patch), got {num_video_tokens}")
    steps = num_video_tokens // per_step
    generator = torch.Generator(device="cuda").manual_seed(seed)
    text = torch.randint(1000, 150000, (PREFIX + QUESTION,), device="cuda", generator=generator)
    ids = torch.cat([
        text[:PREFIX],
        torch.tensor([VISION_START], device="cuda"),
        torch.full((num_video_tokens,), VIDEO, device="cuda"),
        torch.tensor([VISION_END], device="cuda"),
        text[PREFIX:],
    ])[None]
    types = (ids == VIDEO).long() * 2
    pixels = torch.randn(steps * GRID_HW * GRID_HW, 3 * 2 * 14 * 14, device="cuda", generator=generator,
                         dtype=torch.bfloat16)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=types,
        pixel_values_videos=pixels,
        video_grid_thw=torch.tensor([[steps, GRID_HW, GRID_HW]], device="cuda"),
        second_per_grid_ts=torch.tensor([0.5], device="cuda"),  # 4 fps, 2 frames per temporal patch
    )


def _sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def set_row(model, row: str):
    for key, value in ROW_SETTINGS[row].items():
        setattr(model.config, key, value)


def prefill(model, inputs, mode: str, chunk_size: int):
    model.model.rope_deltas = None
    if mode == "chunked":
        return chunked_prefill(model, chunk_size=chunk_size, **inputs)
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values


def measure(model, row: str, inputs: dict, args) -> dict:
    """Prefill (best of ``--reps``), then greedy decode steps on the last prefill's cache."""
    set_row(model, row)
    result = {}
    with torch.no_grad():
        times = []
        for _ in range(args.reps):
            _free()
            torch.cuda.reset_peak_memory_stats()
            start = _sync_time()
            logits, cache = prefill(model, inputs, args.prefill, args.chunk_size)
            times.append(_sync_time() - start)
            if len(times) < args.reps:
                del logits, cache
        result["prefill_s"] = min(times)
        result["prefill_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["path"] = model.model.language_model.layers[0].self_attn.last_path
        token = logits.argmax(dim=-1, keepdim=True)
        step_times = []
        for _ in range(args.decode_tokens):
            start = _sync_time()
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            step_times.append(_sync_time() - start)
        if step_times:
            timed = step_times[1:] or step_times  # the first step also warms the decode kernels up
            result["decode_tok_s"] = len(timed) / sum(timed)
            result["decode_path"] = model.model.language_model.layers[0].self_attn.last_path
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        del logits, cache, token
    _free()
    return result


def warm_up(model, rows, args):
    """Compile the Triton kernels and pick SDPA kernels on a short prompt, so the first timed cell is fair."""
    inputs = make_inputs(args.warmup_tokens, seed=1)
    for row in rows:
        start = time.perf_counter()
        try:
            measure(model, row, inputs, argparse.Namespace(**{**vars(args), "reps": 1, "decode_tokens": 2}))
        except Exception as error:  # noqa: BLE001 - reported in the cells
            print(f"warm-up {row}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        print(f"warm-up {row} ({args.warmup_tokens} video tokens): {time.perf_counter() - start:.1f} s", flush=True)
    del inputs
    _free()


def profile_prefill(model, row: str, inputs: dict, args) -> str:
    """The CUDA kernels of one vision-tower pass and of one whole prefill of ``row`` (torch.profiler), largest total
    time first: where the prefill's time goes."""
    from torch.profiler import ProfilerActivity, profile

    set_row(model, row)
    tables = []
    with torch.no_grad():
        prefill(model, inputs, args.prefill, args.chunk_size)  # warm at this length
        for part, run in (
            ("vision tower", lambda: video_features(model, inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                                    args.chunk_size if args.prefill == "chunked" else None)),
            (f"prefill ({row})", lambda: prefill(model, inputs, args.prefill, args.chunk_size)),
        ):
            _free()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                result = run()
                torch.cuda.synchronize()
            del result
            tables.append(f"## {part}\n\n" + prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    _free()
    return "\n\n".join(tables)


def fmt(value, digits=2):
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "—"


def _ratio(value, reference) -> str:
    return f"{value / reference:.2f}x" if value is not None and reference else "—"


def render(meta: dict, results: dict, args) -> str:
    lines = [
        f"Date: {meta['date']}; device: {meta['device']}; torch {meta['torch']}, transformers "
        f"{meta['transformers']}, triton {meta['triton']}",
        f"Model: VideoNSA 7B architecture, {args.layers} text layers, random bf16 weights, attn_implementation=sdpa; "
        f"prefill: {args.prefill}" + (f" (chunk {args.chunk_size})" if args.prefill == "chunked" else "")
        + f"; SDPA backends allowed: {meta['sdpa_backends']}",
        f"Command: {meta['command']}",
        "Text decoder s = prefill - vision tower s (the tower is timed alone per length, best of --reps; the same "
        "in every row).",
        "",
        "| video tokens | prompt tokens | row | prefill (TTFT) s | vs dense | vision tower s | text decoder s "
        "| vs dense | decode tok/s | peak prefill GB | peak prefill+decode GB | attention path |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for length, cell in results.items():
        dense = cell.get("dense", {}).get("prefill_s")
        for row in args.rows:
            entry = cell.get(row)
            if entry is None:
                continue
            if "skipped" in entry or "error" in entry:
                why = entry.get("skipped") or entry.get("error")
                lines.append(f"| {length} | {cell['prompt_tokens']} | {row} | {why} | | | | | | | | |")
                continue
            vision = cell.get("vision_s")
            decoder = entry["prefill_s"] - vision if vision is not None else None
            dense_decoder = dense - vision if dense is not None and vision is not None else None
            lines.append(
                f"| {length} | {cell['prompt_tokens']} | {row} | {fmt(entry['prefill_s'])} | "
                f"{_ratio(entry['prefill_s'], dense)} | {fmt(vision)} | {fmt(decoder)} | "
                f"{_ratio(decoder, dense_decoder)} | {fmt(entry.get('decode_tok_s'), 1)} | "
                f"{fmt(entry['prefill_peak_gb'], 1)} | {fmt(entry['peak_gb'], 1)} | {entry['path']} |"
            )
    # issue #13's prefill targets against the dense model (one H200, same run)
    for length, goal in ((32768, 0.85), (131072, 0.45)):
        mine, dense = results.get(length, {}).get("videonsa", {}), results.get(length, {}).get("dense", {})
        if "prefill_s" in mine and "prefill_s" in dense:
            lines += ["", f"Target at {length} video tokens: prefill {mine['prefill_s'] / dense['prefill_s']:.2f}x "
                          f"the dense model's (target <= {goal}x)."]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768,65536,131072", help="video tokens, multiples of 64")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list among {ROWS}")
    parser.add_argument("--naive-max-tokens", type=int, default=32768,
                        help="the naive row is skipped above this many video tokens (it is quadratic and slow)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=1, help="prefill repetitions per cell (the best is kept)")
    parser.add_argument("--prefill", choices=("chunked", "forward"), default="chunked")
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=28, help="text layers (28 for the 7B; fewer for a smoke test)")
    parser.add_argument("--warmup-tokens", type=int, default=4096)
    parser.add_argument("--cudnn-sdpa", action=argparse.BooleanOptionalAction, default=True,
                        help="leave PyTorch's SDPA backend choice alone (default: what a user runs; it is cuDNN with "
                             "torch 2.11 on an H200, bench/sdpa_default_choice.py); --no-cudnn-sdpa disables cuDNN, "
                             "which builds an execution plan for every new sequence length, i.e. every decode step, "
                             "and so charges whichever row decodes first at a length")
    parser.add_argument("--out", default=None, help="markdown table path (a .json with the raw numbers beside it)")
    parser.add_argument("--profile", default=None, metavar="ROW",
                        help="after the table, profile one vision-tower pass and one prefill of ROW at the first "
                             "length (torch.profiler); the kernel tables go to stdout and beside --out")
    args = parser.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = set(args.rows + ([args.profile] if args.profile else [])) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose among {ROWS}")
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    if args.out is None and os.environ.get("OUT"):
        args.out = os.path.join(os.environ["OUT"], "bench_end_to_end.md")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_end_to_end.py needs a CUDA GPU")
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        triton=triton_version,
        command="python bench/bench_end_to_end.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    if not args.cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    meta["sdpa_backends"] = ", ".join(
        name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                              ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                              ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                              ("math", torch.backends.cuda.math_sdp_enabled())) if on)
    start = time.perf_counter()
    model = build_model(args.layers)
    weights_gb = torch.cuda.memory_allocated() / 1e9
    print(f"built the model in {time.perf_counter() - start:.1f} s: {weights_gb:.1f} GB of weights on "
          f"{meta['device']}", flush=True)
    meta["weights_gb"] = weights_gb
    warm_up(model, [r for r in args.rows if r != "naive" or args.warmup_tokens <= args.naive_max_tokens], args)

    results = {}
    for length in args.lengths:
        inputs = make_inputs(length)
        cell = results[length] = {"prompt_tokens": int(inputs["input_ids"].shape[1])}
        with torch.no_grad():
            timings = []
            for _ in range(args.reps):  # the best, as for the prefill, which includes a warm tower
                begin = _sync_time()
                features = video_features(model, inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                          args.chunk_size if args.prefill == "chunked" else None)
                timings.append(_sync_time() - begin)
                del features
            cell["vision_s"] = min(timings)
        _free()
        for row in args.rows:
            if row == "naive" and length > args.naive_max_tokens:
                cell[row] = {"skipped": f"skipped (> --naive-max-tokens {args.naive_max_tokens})"}
                continue
            try:
                cell[row] = measure(model, row, inputs, args)
            except torch.cuda.OutOfMemoryError as error:
                cell[row] = {"error": f"out of memory ({str(error).splitlines()[0][:120]})"}
                _free()
            except Exception as error:  # noqa: BLE001 - one failing cell must not lose the others
                cell[row] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
                _free()
            print(f"{length} video tokens, {row}: {cell[row]}", flush=True)
            if args.out:
                _write(args.out, meta, results, args)
        del inputs
        _free()
    table = render(meta, results, args)
    print("\n" + table, flush=True)
    if args.out:
        _write(args.out, meta, results, args)
        print(f"\nwrote {args.out} and {os.path.splitext(args.out)[0]}.json")
    if args.profile:
        text = profile_prefill(model, args.profile, make_inputs(args.lengths[0]), args)
        print(text, flush=True)
        if args.out:
            with open(os.path.splitext(args.out)[0] + f"_profile_{args.profile}.txt", "w") as file:
                file.write(text + "\n")
    return results


def _write(path, meta, results, args):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        file.write(render(meta, results, args) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as file:
        json.dump(dict(meta=meta, args={k: v for k, v in vars(args).items()},
                       results={str(k): v for k, v in results.items()}), file, indent=1)


if __name__ == "__main__":
    main()
