"""Assemble, verify and publish the VideoNSA Hub repository in one command.

    python push_to_hub.py SOURCE --output hub/ --repo-id Enxin/VideoNSA [--dry-run]

SOURCE (a folder or a Hub repo id) holds the weights, in one of three layouts:

* the authors' release: a Qwen2.5-VL checkpoint (`model_type: qwen2_5_vl`) whose text attention layers carry
  VideoNSA's gate MLPs (`g_proj_1`, `g_proj_2`), in the transformers 4.x key layout (`model.layers.N`,
  `visual.*`) or the 5.x one (`model.language_model.layers.N`, `model.visual.*`);
* a plain Qwen2.5-VL checkpoint (no gate MLPs): the gates are initialised as the authors initialised them before
  training (weights normal(0, 0.02), first bias 0, output bias logit(0.5) = 0, so every gate starts at 0.5);
* a checkpoint this package saved (`model_type: videonsa`).

The command then

1. plans the conversion and checks everything it can before writing anything (architecture, every tensor name and
   shape against `VideoNSAConfig`, the tokenizer's special tokens against the config, the output folder);
2. writes a folder that holds exactly the Hub repository's files (an allow-list: no secret, cache, `__pycache__`
   or stray file of the source or of this checkout can ship, and a file that would be read or shipped but is a
   symbolic link or not a regular file is refused by name): `config.json` (`VideoNSAConfig` with
   `auto_map`), `generation_config.json`, safetensors shards of at most `--max-shard-size` with their index
   (keys in the layout `save_pretrained` writes and the release uses: `model.layers.N`, `visual.*`, `lm_head`),
   the processor / tokenizer / chat-template files (written by `VideoNSAProcessor.save_pretrained`), the
   code files, `nsa_kernels/`, `model_card.md` as `README.md` and the images it shows (`CARD_IMAGES`). Weights
   are streamed tensor by tensor from the source files into the shards (at most one output shard is in
   memory), with a progress bar;
3. verifies the folder (`--verify`): every tensor of the source landed unchanged (names mapped, dtypes kept,
   nothing dropped, nothing unexpected; initialised gates are what the seed gives), then a fresh Python process,
   whose `sys.path` does not hold this checkout, loads the folder with `AutoConfig` / `AutoModel` /
   `AutoProcessor` and `trust_remote_code=True` and runs a tiny video prompt through processor, forward and
   `generate`;
4. uploads the folder as one commit (`--dry-run` prints the files and the commit and uploads nothing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checks import card_problems, load_generation_config, load_processor, read_card
from .convert import plan_conversion, resolve_source
from .layout import MODEL_CARD, PROCESSOR_PATTERNS, SOURCE_PATTERNS, PushError, hub_files, parse_size
from .upload import print_dry_run, upload
from .verify import check_written_weights, verify_in_fresh_process
from .write import check_output, missing_required, write_folder

DEFAULT_MAX_SHARD_SIZE = "5GB"
FULL_VERIFY_LIMIT = 4 * 2**30  # --verify auto: full below this many bytes of weights, load above


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 2)[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "The Hub token comes from the standard places of huggingface_hub: the HF_TOKEN environment variable or "
            "the token stored by `hf auth login`.\n\nExamples:\n"
            "  python push_to_hub.py Enxin/VideoNSA --output hub --dry-run\n"
            "  python push_to_hub.py Qwen/Qwen2.5-VL-7B-Instruct --output hub --repo-id me/VideoNSA-init --private\n"
            "  python push_to_hub.py ./checkpoint --output hub --repo-id Enxin/VideoNSA --create-pr"
        ),
    )
    parser.add_argument(
        "source",
        help="where the weights come from: a folder or a Hub repo id holding the authors' released checkpoint, a "
        "plain Qwen2.5-VL checkpoint or a checkpoint saved by this package (safetensors, single file or sharded)",
    )
    parser.add_argument(
        "--output", "-o", required=True, type=Path,
        help="folder to write the Hub repository into; it must not exist or be empty (see --overwrite)",
    )
    parser.add_argument(
        "--repo-id",
        help="Hub repository to publish to, e.g. Enxin/VideoNSA; required unless --dry-run",
    )
    parser.add_argument(
        "--revision", default="main",
        help="branch to commit to (created from the default branch when missing); with --create-pr, the branch the "
        "pull request targets (default: main)",
    )
    parser.add_argument(
        "--private", action="store_true",
        help="create the repository as private when it does not exist yet (an existing repository keeps its "
        "visibility)",
    )
    parser.add_argument(
        "--create-pr", action="store_true",
        help="open a pull request with the commit instead of committing to --revision directly",
    )
    parser.add_argument(
        "--commit-message", default="Upload VideoNSA: weights, config, processor, code, nsa_kernels and model card",
        help="title of the commit (or of the pull request)",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="write and verify the folder, print its files with sizes and the commit that would be made, and "
        "upload nothing (no network access)",
    )
    parser.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
        help="largest safetensors shard, e.g. 5GB, 500MB or a number of bytes; a single tensor larger than this "
        "gets a shard of its own (default: %(default)s)",
    )
    parser.add_argument(
        "--verify", choices=("auto", "full", "load", "skip"), default="auto",
        help="how the written folder is checked before the upload. full: every source tensor is compared with the "
        "written one, then a fresh process (this checkout off sys.path) loads config, processor and model with "
        "trust_remote_code from the folder, on CPU, and runs a tiny video prompt through forward and generate; "
        "needs RAM for the model. load: the same tensor comparison, and the fresh process loads config and "
        "processor, builds the model on the meta device and checks that every weight of the folder maps onto it "
        "(no missing, unexpected or mismatched key) and that the processor expands a video; no forward, little "
        "memory, for the 7B model on a small machine. skip: no check (not recommended). auto (default): full "
        "when the weights are under 4 GiB, load otherwise",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing, non-empty --output folder (never a folder holding .git, this checkout or the "
        "source); it is replaced only once the new folder is complete",
    )
    parser.add_argument(
        "--processor-source",
        help="folder or repo id to take the tokenizer and processor files from when SOURCE has none, e.g. "
        "Qwen/Qwen2.5-VL-7B-Instruct (default: SOURCE)",
    )
    parser.add_argument(
        "--source-revision",
        help="revision (branch, tag or commit) of SOURCE when it is a repo id (default: its default branch; "
        "--processor-source is always read at its default branch)",
    )
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the gate initialisation for a plain Qwen2.5-VL source (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except PushError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> Path:
    """Plan (all checks), write, verify, then upload or print the dry run. Returns the written folder."""
    max_shard_size = parse_size(args.max_shard_size)
    if not args.dry_run and not args.repo_id:
        raise PushError("--repo-id is required to upload (or pass --dry-run to only write and verify the folder)")
    card_text = read_card(MODEL_CARD)
    problems = card_problems(card_text)
    if problems and not args.dry_run:
        raise PushError(f"{MODEL_CARD.name} is not ready to publish: " + "; ".join(problems))
    source = resolve_source(args.source, args.source_revision, SOURCE_PATTERNS)
    output = args.output.resolve()
    check_output(output, source, args.overwrite)
    plan = plan_conversion(source, seed=args.seed)
    processor_dir = source
    if args.processor_source:
        processor_dir = resolve_source(args.processor_source, None, PROCESSOR_PATTERNS)
    processor = load_processor(processor_dir, plan.config)
    generation_config = load_generation_config(source, plan.config)
    print(plan.summary())

    # ---------------------------------------------------------------- write (nothing was written before this)
    write_folder(plan, processor, generation_config, card_text, output, max_shard_size)

    # ---------------------------------------------------------------- verify
    mode = args.verify
    if mode == "auto":
        mode = "full" if plan.total_bytes <= FULL_VERIFY_LIMIT else "load"
    if mode != "skip":
        print(check_written_weights(plan, output))
        report = verify_in_fresh_process(output, mode)
        print(f"Verified in a fresh process ({mode}): {report['model']} and {report['processor']} from remote code, "
              f"nsa_kernels from {report['kernels']}" + (f", attention {', '.join(report['attention_paths'])}"
                                                         if mode == "full" else ""))
    else:
        print("Verification skipped (--verify skip).")

    # ---------------------------------------------------------------- publish
    files = hub_files(output)
    missing = missing_required(output, files)
    if missing:
        raise PushError(f"{output} lacks files the Hub repository needs: {', '.join(missing)}")
    # a local source is named by its folder only: its absolute path is nobody's business on the Hub
    label = Path(args.source).name if Path(args.source).expanduser().is_dir() else args.source
    if args.source_revision and label == args.source:
        label += f"@{args.source_revision}"
    description = f"Assembled by push_to_hub.py from `{label}` ({plan.kind_description}); verification: {mode}."
    if args.dry_run:
        print_dry_run(output, files, args, description)
        if problems:
            print(f"Note: an upload would refuse {MODEL_CARD.name} as it is: " + "; ".join(problems))
    else:
        upload(output, args, description)
    return output

