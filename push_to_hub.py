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
   or stray file of the source or of this checkout can ship): `config.json` (`VideoNSAConfig` with
   `auto_map`), `generation_config.json`, safetensors shards of at most `--max-shard-size` with their index
   (keys in the layout `save_pretrained` writes and the release uses: `model.layers.N`, `visual.*`, `lm_head`),
   the processor / tokenizer / chat-template files (written by `VideoNSAProcessor.save_pretrained`), the three
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
import contextlib
import copy
import fnmatch
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # the package modules beside this file, however the script is started
    sys.path.insert(0, str(ROOT))

CODE_FILES = ("configuration_videonsa.py", "modeling_videonsa.py", "processing_videonsa.py", "video_processing_videonsa.py")
KERNELS_DIR = "nsa_kernels"
MODEL_CARD = ROOT / "model_card.md"
# Images the card shows, shipped at the repository's top level under their own names (the card links them so).
CARD_IMAGES = {"benchmarks_h100.png": ROOT / "docs" / "benchmarks_h100.png"}
DEFAULT_MAX_SHARD_SIZE = "5GB"
FULL_VERIFY_LIMIT = 4 * 2**30  # --verify auto: full below this many bytes of weights, load above
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# The allow-list: the only files a Hub repository of VideoNSA holds. Everything else in the output folder (and in
# the source, which is never copied wholesale) stays out of the upload.
SHIPPED_TOP_LEVEL = frozenset(
    {
        "README.md",
        *CARD_IMAGES,
        "config.json",
        "generation_config.json",
        WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        *CODE_FILES,
        "processor_config.json",
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "added_tokens.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
    }
)
REQUIRED_FILES = frozenset(
    {
        "README.md",
        "config.json",
        "generation_config.json",
        *CODE_FILES,
        f"{KERNELS_DIR}/__init__.py",
        "processor_config.json",
        "chat_template.jinja",
        "tokenizer_config.json",
    }
)
# Files of an existing Hub repository that an upload replaces: when the new commit does not hold one of them it is
# deleted in the same commit (old shards, old kernels, an older chat template or .bin weights). Other files of the
# repository (.gitattributes, images, anything a maintainer added) are left alone.
REPLACED_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                     "pytorch_model.bin.index.json", "chat_template.json", f"{KERNELS_DIR}/*")
# Files fetched from a Hub repo id given as source (weights, configs, tokenizer and processor files).
SOURCE_PATTERNS = ["config.json", "generation_config.json", "model*.safetensors", WEIGHTS_INDEX_NAME, "tokenizer*",
                   "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template*"]
PROCESSOR_PATTERNS = [p for p in SOURCE_PATTERNS if "safetensors" not in p]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
VISION_TOKENS = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
                 "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}

# Gate MLP initialisation of the authors (for a plain Qwen2.5-VL source): weights normal(0, 0.02), g_proj_1's
# bias 0, g_proj_2's (output) bias logit(0.5) = log(0.5 / 0.5) = 0, so that every gate starts at sigmoid(0) = 0.5
# (the temperature divides a zero logit, which stays zero).
GATE_WEIGHT_STD = 0.02
GATE_OUTPUT_BIAS = math.log(0.5 / (1 - 0.5))
GATE_RE = re.compile(r"^model\.language_model\.layers\.(\d+)\.self_attn\.g_proj_[12]\.(weight|bias)$")

# safetensors dtypes a gate MLP can be initialised in (that of a neighbouring attention weight): torch name, bytes.
GATE_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8)}


class PushError(Exception):
    """A problem the user can fix; reported as one clear message, before anything is written where possible."""


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="push_to_hub.py",
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
        print(f"push_to_hub.py: error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> Path:
    """Plan (all checks), write, verify, then upload or print the dry run. Returns the written folder."""
    max_shard_size = _parse_size(args.max_shard_size)
    if not args.dry_run and not args.repo_id:
        raise PushError("--repo-id is required to upload (or pass --dry-run to only write and verify the folder)")
    card_text = _read_card()
    problems = card_problems(card_text)
    if problems and not args.dry_run:
        raise PushError(f"{MODEL_CARD.name} is not ready to publish: " + "; ".join(problems))
    source = resolve_source(args.source, args.source_revision, SOURCE_PATTERNS)
    output = args.output.resolve()
    _check_output(output, source, args.overwrite)
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
    missing = _missing_required(output, files)
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


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------
def resolve_source(source: str, revision: str | None, patterns: list[str]) -> Path:
    """A local folder as it is, or the files of a Hub repo id (through the HF cache, so offline works too)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise PushError(f"{source} is a file; give the folder that holds config.json and the weights")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source) or source.startswith((".", "/")):
        raise PushError(f"{source} is neither an existing folder nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=patterns))
    except Exception as error:  # noqa: BLE001 - every hub failure becomes one message
        raise PushError(f"could not fetch {source} from the Hub: {error}") from error


@dataclass
class TensorSpec:
    """One tensor of the written checkpoint: where it comes from, or how it is initialised."""

    target: str  # name in the written files (transformers 4.x layout, as save_pretrained writes it)
    canonical: str  # name in the model's state dict (transformers 5 layout)
    shape: tuple
    dtype: str  # safetensors dtype string, e.g. "BF16"
    nbytes: int
    source_file: Path | None = None  # None: a gate MLP tensor initialised here
    source_name: str | None = None


@dataclass
class Plan:
    source: Path
    kind: str  # "videonsa" | "release" | "qwen2_5_vl"
    config: object
    tensors: list[TensorSpec]
    seed: int
    source_layouts: set = field(default_factory=set)

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)

    @property
    def initialised(self) -> list[TensorSpec]:
        return [spec for spec in self.tensors if spec.source_file is None]

    @property
    def kind_description(self) -> str:
        return {
            "videonsa": "a VideoNSA checkpoint",
            "release": "the authors' released layout (Qwen2.5-VL with gate MLPs)",
            "qwen2_5_vl": f"a plain Qwen2.5-VL checkpoint, gate MLPs initialised with seed {self.seed}",
        }[self.kind]

    def summary(self) -> str:
        layouts = " and ".join(sorted(self.source_layouts)) or "no"
        copied = len(self.tensors) - len(self.initialised)
        text = (f"Source {self.source}: {self.kind_description}; {copied} tensors in the transformers {layouts} key "
                f"layout, {_format_size(self.total_bytes)} to write")
        if self.initialised:
            text += f"; {len(self.initialised)} gate tensors to initialise"
        return text


def read_safetensors_header(path: Path) -> dict:
    """``{name: {"dtype", "shape", "data_offsets"}}`` from a safetensors file's header, without reading tensors."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise PushError(f"{path} is not a readable safetensors file: {error}") from error
    header.pop("__metadata__", None)
    return header


def list_source_tensors(folder: Path) -> dict[str, tuple[Path, str, tuple, int]]:
    """``{name: (file, dtype, shape, nbytes)}`` of every tensor of the checkpoint in ``folder``."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise PushError(f"{index} is not a safetensors index (no weight_map): {error}") from error
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_NAME).is_file():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        others = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        hint = f" (found {', '.join(others)}: convert them to safetensors first)" if others else ""
        raise PushError(f"no safetensors weights in {folder}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}")
    tensors = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise PushError(f"{WEIGHTS_INDEX_NAME} in {folder} names {name}, which is missing")
        for key, info in read_safetensors_header(path).items():
            if weight_map is not None and weight_map.get(key) != name:
                raise PushError(f"{name} holds {key}, which {WEIGHTS_INDEX_NAME} places in {weight_map.get(key)}")
            start, end = info["data_offsets"]
            tensors[key] = (path, info["dtype"], tuple(info["shape"]), end - start)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise PushError(f"{WEIGHTS_INDEX_NAME} in {folder} lists tensors its files lack: {_few(absent)}")
    return tensors


def canonical_name(name: str) -> str:
    """Checkpoint key -> the model's state-dict key (the mapping modeling_videonsa registers for loading)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + name[len("model."):]
    return name


def hub_name(canonical: str) -> str:
    """State-dict key -> the key written to the Hub: the layout transformers' save_pretrained writes for
    Qwen2.5-VL models, which is also the authors' release layout (``model.layers.N``, ``visual.*``)."""
    if canonical.startswith("model.visual."):
        return canonical[len("model."):]
    if canonical.startswith("model.language_model."):
        return "model." + canonical[len("model.language_model."):]
    return canonical


def load_source_config(folder: Path):
    """``(kind, VideoNSAConfig)``; kind is "videonsa" or "qwen2_5_vl" (told apart from "release" by the weights)."""
    from configuration_videonsa import AUTO_MAP, VideoNSAConfig

    path = folder / "config.json"
    if not path.is_file():
        raise PushError(f"{folder} has no config.json")
    try:
        raw = json.loads(path.read_text())
    except ValueError as error:
        raise PushError(f"{path} is not valid JSON: {error}") from error
    model_type = raw.get("model_type")
    try:
        if model_type == "videonsa":
            config = VideoNSAConfig.from_pretrained(folder)
            kind = "videonsa"
        elif model_type == "qwen2_5_vl":
            from transformers import Qwen2_5_VLConfig

            values = Qwen2_5_VLConfig.from_pretrained(folder).to_dict()
            for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
                values.pop(key, None)
            values["text_config"].pop("model_type", None)
            config = VideoNSAConfig(**values)
            kind = "qwen2_5_vl"
        else:
            architectures = ", ".join(raw.get("architectures") or []) or "no architectures"
            raise PushError(
                f"{folder} holds a {model_type!r} checkpoint ({architectures}), not Qwen2.5-VL: push_to_hub.py "
                "converts Qwen2.5-VL checkpoints (model_type 'qwen2_5_vl', with or without VideoNSA's gate MLPs) "
                "and VideoNSA checkpoints (model_type 'videonsa')"
            )
    except (ValueError, TypeError) as error:
        raise PushError(f"{path} is not a valid {model_type} configuration: {error}") from error
    config.architectures = ["VideoNSAForConditionalGeneration"]
    # the code files shipped beside the config, never a reference to another repository's code ("repo--module.X",
    # as save_pretrained writes after loading a model by repo id)
    config.auto_map = dict(AUTO_MAP)
    return kind, config


def expected_state(config) -> dict[str, tuple]:
    """Every state-dict key of VideoNSA with this config and its shape (the model is built on the meta device)."""
    import torch

    from modeling_videonsa import VideoNSAForConditionalGeneration

    with torch.device("meta"):
        model = VideoNSAForConditionalGeneration(copy.deepcopy(config))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def plan_conversion(source: Path, seed: int = 0) -> Plan:
    """Map every source tensor onto VideoNSA's state dict and decide what to initialise; raise on any mismatch."""
    kind, config = load_source_config(source)
    tensors = list_source_tensors(source)
    expected = expected_state(config)
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings",
                                                                         False))
    optional = {"lm_head.weight"} if tied else set()

    by_canonical, layouts = {}, set()
    for name in tensors:
        canonical = canonical_name(name)
        if name.startswith(("model.language_model.", "model.visual.")):
            layouts.add("5.x")
        elif canonical != name:
            layouts.add("4.x")
        if canonical in by_canonical:
            raise PushError(f"the checkpoint holds {by_canonical[canonical]} and {name}, which are the same tensor "
                            "in two key layouts")
        by_canonical[canonical] = name

    gates = {key for key in expected if GATE_RE.match(key)}
    present_gates = gates & set(by_canonical)
    if kind == "qwen2_5_vl" and present_gates:
        kind = "release"
    to_initialise = set()
    if kind == "qwen2_5_vl":
        to_initialise = gates
    elif present_gates != gates:
        layers = sorted({int(GATE_RE.match(k).group(1)) for k in gates - present_gates})
        what = "the VideoNSA checkpoint" if kind == "videonsa" else "the checkpoint has gate MLPs in some layers but"
        raise PushError(f"{what} lacks gate MLP tensors (g_proj_1 / g_proj_2) of text layers {layers}: "
                        f"{_few(sorted(gates - present_gates))}")

    unexpected = sorted(by_canonical[c] for c in set(by_canonical) - set(expected))
    missing = sorted(set(expected) - set(by_canonical) - to_initialise - optional)
    mismatched = [f"{by_canonical[c]}: checkpoint {list(tensors[by_canonical[c]][2])} vs config {list(expected[c])}"
                  for c in sorted(set(by_canonical) & set(expected))
                  if tensors[by_canonical[c]][2] != expected[c]]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensors do not have the shape config.json gives them: {_few(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} tensors of the model are missing from the checkpoint: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of the checkpoint are not part of VideoNSA with this config: "
                        f"{_few(unexpected)}")
    if problems:
        raise PushError(f"{source} does not match its config.json: " + "; ".join(problems))

    specs = []
    for canonical, name in by_canonical.items():
        path, dtype, shape, nbytes = tensors[name]
        specs.append(TensorSpec(hub_name(canonical), canonical, shape, dtype, nbytes, path, name))
    for canonical in sorted(to_initialise):
        layer = GATE_RE.match(canonical).group(1)
        neighbour = by_canonical[f"model.language_model.layers.{layer}.self_attn.q_proj.weight"]
        dtype = tensors[neighbour][1]
        if dtype not in GATE_DTYPES:
            raise PushError(f"cannot initialise gate MLPs next to {neighbour}, whose dtype is {dtype}")
        shape = expected[canonical]
        specs.append(TensorSpec(hub_name(canonical), canonical, shape, dtype,
                                math.prod(shape) * GATE_DTYPES[dtype][1]))
    specs.sort(key=lambda spec: _natural_key(spec.target))
    return Plan(source, kind, config, specs, seed, layouts)


def initial_gate_tensor(spec: TensorSpec, seed: int):
    """The authors' initialisation of one gate tensor, reproducible from the seed and the tensor's name."""
    import torch

    dtype = getattr(torch, GATE_DTYPES[spec.dtype][0])
    if spec.canonical.endswith(".bias"):
        bias = 0.0 if ".g_proj_1." in spec.canonical else GATE_OUTPUT_BIAS
        return torch.full(spec.shape, bias, dtype=dtype)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(spec.canonical.encode())) % 2**63)
    return torch.empty(spec.shape, dtype=torch.float32).normal_(0.0, GATE_WEIGHT_STD, generator=generator).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Processor, generation config, card
# ----------------------------------------------------------------------------------------------------------
def load_processor(folder: Path, config):
    """A VideoNSAProcessor with the source's tokenizer (and image processor settings), checked against the config.

    A VideoNSA folder's processor loads as it is; otherwise the tokenizer (and ``preprocessor_config.json``, when
    present) of the folder are wrapped into VideoNSAProcessor, whose save_pretrained writes our
    ``processor_config.json`` (with ``auto_map``), the video processor settings of the release and the chat
    template."""
    processor_config = folder / "processor_config.json"
    try:
        with _quiet_transformers():
            processor = _load_processor_files(folder, processor_config, config)
    except PushError:
        raise
    except Exception as error:  # noqa: BLE001 - any loading failure is reported with the folder
        raise PushError(f"could not load the tokenizer / processor files of {folder}: {error}") from error
    tokenizer = processor.tokenizer
    wrong = []
    for token, key in VISION_TOKENS.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != getattr(config, key):
            wrong.append(f"{token} is {token_id} in the tokenizer but {key} = {getattr(config, key)}")
    if len(tokenizer) > config.text_config.vocab_size:
        wrong.append(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary "
                     f"{config.text_config.vocab_size}")
    if wrong:
        raise PushError(f"the tokenizer of {folder} does not belong to this model: " + "; ".join(wrong))
    processor.nsa_block_size = config.nsa_block_size
    return processor


def _load_processor_files(folder: Path, processor_config: Path, config):
    from processing_videonsa import VideoNSAProcessor

    if processor_config.is_file() and "VideoNSAProcessor" in processor_config.read_text():
        return VideoNSAProcessor.from_pretrained(folder, trust_remote_code=False)
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer, Qwen2VLImageProcessor

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        image_processor = None
        if (folder / "preprocessor_config.json").is_file():
            image_processor = Qwen2VLImageProcessor.from_pretrained(folder)
        return VideoNSAProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 nsa_block_size=config.nsa_block_size)
    raise PushError(
        f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass --processor-source with a folder or "
        "repo id that has them (e.g. Qwen/Qwen2.5-VL-7B-Instruct)"
    )


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings off for a moment: AutoTokenizer reads config.json without remote code and warns that
    it does not know the model type "videonsa", which is expected here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_generation_config(folder: Path, config):
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig.from_model_config(config)


def _read_card() -> str:
    if not MODEL_CARD.is_file():
        raise PushError(f"{MODEL_CARD} is missing; it becomes the repository's README.md")
    return MODEL_CARD.read_text(encoding="utf-8")


def card_problems(text: str) -> list[str]:
    """What keeps the card from being published: unparsable metadata, missing keys, unfinished sections."""
    from huggingface_hub import ModelCard

    problems = []
    try:
        data = ModelCard(text).data.to_dict()
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises several types for bad metadata
        return [f"its metadata does not parse: {error}"]
    for key in ("license", "library_name", "pipeline_tag", "base_model"):
        if not data.get(key):
            problems.append(f"metadata key {key!r} is missing")
    for link in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", text):
        if "://" not in link and link not in CARD_IMAGES:
            problems.append(f"image {link!r} is not shipped with the card (CARD_IMAGES: {sorted(CARD_IMAGES)})")
    unfinished = [line.strip() for line in text.splitlines() if "TODO" in line]
    if unfinished:
        problems.append(f"unfinished sections (lines with TODO): {_few(unfinished, 3)}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------
def _check_output(output: Path, source: Path, overwrite: bool) -> None:
    for protected, what in ((ROOT, "this checkout"), (source.resolve(), "the source")):
        if output == protected or output in protected.parents:
            raise PushError(f"--output {output} would replace {what}; choose another folder")
    if output.exists() and not output.is_dir():
        raise PushError(f"--output {output} is a file")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise PushError(f"--output {output} is not empty; pass --overwrite to replace it")
        if (output / ".git").exists():
            raise PushError(f"--output {output} holds a .git folder; --overwrite never replaces a git clone")


def write_folder(plan: Plan, processor, generation_config, card_text: str, output: Path, max_shard_size: int):
    """Write the repository into a staging folder beside ``output``, keep only allow-listed files, then move it into
    place (an existing ``output`` is replaced only now, when the new folder is complete)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-", dir=output.parent))
    try:
        write_weights(plan, staging, max_shard_size)
        plan.config.save_pretrained(staging)
        generation_config.save_pretrained(staging)
        processor.save_pretrained(staging)
        for name in CODE_FILES:
            shutil.copyfile(ROOT / name, staging / name)
        (staging / KERNELS_DIR).mkdir(exist_ok=True)
        for path in sorted((ROOT / KERNELS_DIR).glob("*.py")):
            shutil.copyfile(path, staging / KERNELS_DIR / path.name)
        (staging / "README.md").write_text(card_text, encoding="utf-8")
        for name, path in CARD_IMAGES.items():
            shutil.copyfile(path, staging / name)
        dropped = _drop_unlisted(staging)
        if dropped:
            print(f"Not shipped (outside the allow-list): {', '.join(dropped)}")
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"Wrote {len(hub_files(output))} files to {output}")


def write_weights(plan: Plan, folder: Path, max_shard_size: int) -> None:
    """Stream the tensors into shards: each tensor is read from its source file (or initialised) when its shard is
    written, so at most one output shard is in memory."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory
    from huggingface_hub.utils import tqdm
    from safetensors import safe_open
    from safetensors.torch import save_file

    by_target = {spec.target: spec for spec in plan.tensors}
    split = split_state_dict_into_shards_factory(
        by_target, get_storage_size=lambda spec: spec.nbytes, filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    with contextlib.ExitStack() as stack, tqdm(total=plan.total_bytes, unit="B", unit_scale=True,
                                                desc="Writing weights") as bar:
        handles = {}
        for filename, names in split.filename_to_tensors.items():
            shard = {}
            for name in names:
                spec = by_target[name]
                if spec.source_file is None:
                    shard[name] = initial_gate_tensor(spec, plan.seed)
                else:
                    if spec.source_file not in handles:
                        handles[spec.source_file] = stack.enter_context(safe_open(spec.source_file, framework="pt"))
                    shard[name] = handles[spec.source_file].get_tensor(spec.source_name)
                bar.update(spec.nbytes)
            save_file(shard, folder / filename, metadata={"format": "pt"})
            del shard
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": sum(math.prod(s.shape) for s in plan.tensors),
                         "total_size": split.metadata["total_size"]},
            "weight_map": dict(sorted(split.tensor_to_filename.items())),
        }
        (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def is_shipped(relative: str) -> bool:
    """Whether a path (relative, with '/') belongs to the Hub repository: the allow-list."""
    parts = relative.split("/")
    if any(part.startswith(".") or part == "__pycache__" for part in parts):
        return False
    if len(parts) == 1:
        return parts[0] in SHIPPED_TOP_LEVEL or bool(SHARD_RE.fullmatch(parts[0]))
    return len(parts) == 2 and parts[0] == KERNELS_DIR and parts[1].endswith(".py")


def hub_files(folder: Path) -> list[str]:
    """The allow-listed regular files of ``folder`` (symbolic links are never followed nor shipped)."""
    files = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            relative = path.relative_to(folder).as_posix()
            if not path.is_symlink() and path.is_file() and is_shipped(relative):
                files.append(relative)
    return sorted(files, key=_natural_key)


def _drop_unlisted(folder: Path) -> list[str]:
    dropped = []
    for path in sorted(folder.rglob("*"), reverse=True):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink() or path.is_file():
            if not is_shipped(relative):
                path.unlink()
                dropped.append(relative)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return sorted(dropped)


def _missing_required(folder: Path, files: list[str]) -> list[str]:
    names = set(files)
    missing = sorted(REQUIRED_FILES - names)
    if WEIGHTS_INDEX_NAME in names:
        shards = set(json.loads((folder / WEIGHTS_INDEX_NAME).read_text())["weight_map"].values())
        missing += sorted(shards - names)
    elif WEIGHTS_NAME not in names:
        missing.append(f"{WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
    return missing


# ----------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------
def check_written_weights(plan: Plan, folder: Path) -> str:
    """Every planned tensor is in the written files under its mapped name, with its dtype and shape, and holds the
    source's bytes exactly (initialised gates: exactly what the seed gives); nothing else is there."""
    import torch
    from safetensors import safe_open

    written = list_source_tensors(folder)
    planned = {spec.target: spec for spec in plan.tensors}
    problems = []
    if set(written) != set(planned):
        dropped, extra = sorted(set(planned) - set(written)), sorted(set(written) - set(planned))
        if dropped:
            problems.append(f"dropped: {_few(dropped)}")
        if extra:
            problems.append(f"unexpected: {_few(extra)}")
    with contextlib.ExitStack() as stack:
        handles = {}

        def read(path, name):
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt"))
            return handles[path].get_tensor(name)

        for target, spec in planned.items():
            if target not in written:
                continue
            path, dtype, shape, _ = written[target]
            if (dtype, shape) != (spec.dtype, spec.shape):
                problems.append(f"{target}: {dtype} {list(shape)} written, {spec.dtype} {list(spec.shape)} planned")
                continue
            expected = (read(spec.source_file, spec.source_name) if spec.source_file is not None
                        else initial_gate_tensor(spec, plan.seed))
            actual = read(path, target)
            if not torch.equal(expected.reshape(-1).view(torch.uint8), actual.reshape(-1).view(torch.uint8)):
                origin = f"{spec.source_file.name}:{spec.source_name}" if spec.source_file else "its initialisation"
                problems.append(f"{target} differs from {origin}")
    if problems:
        raise PushError(f"the written weights in {folder} do not match the plan: " + "; ".join(problems[:10]))
    copied = len(plan.tensors) - len(plan.initialised)
    renamed = sum(1 for spec in plan.tensors if spec.source_name is not None and spec.source_name != spec.target)
    text = f"Checked {len(plan.tensors)} tensors: {copied} copied bit for bit ({renamed} renamed, dtypes kept)"
    if plan.initialised:
        text += f", {len(plan.initialised)} gate tensors as initialised"
    return text + ", nothing dropped or added."


VERIFY_SCRIPT = r"""
import json, os, sys
from pathlib import Path
folder, mode, checkout = sys.argv[1:4]
leaked = [p for p in sys.path if p and Path(p).resolve() == Path(checkout)]
assert not leaked, f"the package source {checkout} is on sys.path"
import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor
from transformers.video_utils import VideoMetadata

config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
extra = {"device_map": "meta"} if mode == "load" else {}
model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True, **extra)
module = sys.modules[type(model).__module__]
kernels = module.load_nsa_kernels(model.config)
report = dict(config=type(config).__name__, model=type(model).__name__, processor=type(processor).__name__,
              module=module.__name__, kernels=kernels.__file__,
              loading_info={key: sorted(map(str, value)) for key, value in info.items()})
frames = np.random.default_rng(0).integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)
messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens in this video?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(text=[text], videos=[frames], return_tensors="pt",
                   video_metadata=[VideoMetadata(total_num_frames=8, fps=4.0, width=56, height=56)])
report["video_tokens"] = int((inputs["input_ids"] == config.video_token_id).sum())
if mode == "full":
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        report["attention_paths"] = sorted({layer.self_attn.last_path for layer in model.model.language_model.layers})
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    report.update(logits_shape=list(logits.shape), finite=bool(torch.isfinite(logits.float()).all()),
                  new_tokens=int(generated.shape[1] - inputs["input_ids"].shape[1]))
print("VERIFY-REPORT " + json.dumps(report))
"""


def verify_in_fresh_process(folder: Path, mode: str) -> dict:
    """Load ``folder`` as a user would, with remote code, in a new interpreter that cannot see this checkout."""
    with tempfile.TemporaryDirectory(prefix="videonsa-verify-") as workdir:
        modules = Path(workdir) / "modules"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_MODULES_CACHE=str(modules), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
        # -I: isolated mode, so neither the working directory nor PYTHON* variables put the checkout on sys.path
        result = subprocess.run(
            [sys.executable, "-I", "-c", VERIFY_SCRIPT, str(folder), mode, str(ROOT)],
            cwd=workdir, env=env, capture_output=True, text=True,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("VERIFY-REPORT ")]
        if result.returncode != 0 or not lines:
            raise PushError(f"{folder} does not load in a fresh process (verify {mode}):\n{result.stderr[-4000:]}")
        report = json.loads(lines[-1][len("VERIFY-REPORT "):])
        problems = [f"{key}: {_few(value)}" for key, value in report["loading_info"].items() if value]
        if report["model"] != "VideoNSAForConditionalGeneration" or report["processor"] != "VideoNSAProcessor":
            problems.append(f"AutoModel gave {report['model']}, AutoProcessor {report['processor']}")
        if not report["module"].startswith("transformers_modules"):
            problems.append(f"the model class came from {report['module']}, not from the folder's remote code")
        if not Path(report["kernels"]).resolve().is_relative_to(modules.resolve()):
            problems.append(f"nsa_kernels was imported from {report['kernels']}, not from the folder")
        if report["video_tokens"] <= 0:
            problems.append("the processor put no video token into the prompt")
        if mode == "full":
            if not report["finite"]:
                problems.append("the forward pass gave non-finite logits")
            if not any(path.startswith("hybrid") for path in report["attention_paths"]):
                problems.append(f"the video prompt did not run the hybrid attention: {report['attention_paths']}")
            if report["new_tokens"] < 1:
                problems.append("generate produced no token")
    if problems:
        raise PushError(f"verification ({mode}) of {folder} failed: " + "; ".join(problems))
    return report


# ----------------------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------------------
def commit_operations(folder: Path, remote_files=()) -> list:
    """One ``CommitOperationAdd`` per allow-listed file, plus a ``CommitOperationDelete`` for each file of the
    existing repository that this upload replaces and does not carry any more (e.g. shards of an older split)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    files = hub_files(folder)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    stale = sorted(name for name in remote_files if name not in files
                   and any(fnmatch.fnmatchcase(name, pattern) for pattern in REPLACED_PATTERNS))
    operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
    return operations


def print_dry_run(folder: Path, files: list[str], args, description: str) -> None:
    sizes = {name: (folder / name).stat().st_size for name in files}
    print(f"\nFiles of the Hub repository ({folder}):")
    for name in files:
        print(f"  {_format_size(sizes[name]):>10}  {name}")
    print(f"  {_format_size(sum(sizes.values())):>10}  total, {len(files)} files")
    operations = commit_operations(folder)
    target = args.repo_id or "<--repo-id>"
    where = f"a pull request against {args.revision}" if args.create_pr else f"branch {args.revision}"
    print(f"\nDry run: would create {target} if missing ({'private' if args.private else 'default visibility'}) and "
          f"make one commit on {where} with {len(operations)} CommitOperationAdd operations "
          "(and delete files of an older upload that this one replaces)")
    print(f"  title: {args.commit_message}\n  description: {description}")
    print("Nothing was uploaded.")


def upload(folder: Path, args, description: str):
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        return _upload(folder, args, description)
    except LocalTokenNotFoundError as error:
        raise PushError(f"no Hub token: run `hf auth login` or set HF_TOKEN ({error})") from error
    except HfHubHTTPError as error:
        raise PushError(f"the Hub refused the upload to {args.repo_id}: {error}") from error


def _upload(folder: Path, args, description: str):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    api = HfApi()  # token: HF_TOKEN or the one `hf auth login` stored
    url = api.create_repo(args.repo_id, private=True if args.private else None, exist_ok=True, repo_type="model")
    print(f"Repository: {url}")
    if args.revision != "main" and not args.create_pr:
        api.create_branch(args.repo_id, branch=args.revision, exist_ok=True, repo_type="model")
    try:
        remote = api.list_repo_files(args.repo_id, revision=args.revision, repo_type="model")
    except RevisionNotFoundError:
        remote = []
    operations = commit_operations(folder, remote)
    info = api.create_commit(
        args.repo_id, operations=operations, commit_message=args.commit_message, commit_description=description,
        revision=args.revision, create_pr=args.create_pr, repo_type="model",
    )
    deleted = sum(1 for op in operations if type(op).__name__ == "CommitOperationDelete")
    print(f"Committed {len(operations) - deleted} files" + (f" and deleted {deleted} stale ones" if deleted else "")
          + f": {getattr(info, 'pr_url', None) or getattr(info, 'commit_url', info)}")
    return info


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------
def _parse_size(value) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        size = int(value) if str(value).isdigit() else parse_size_to_int(str(value))
    except ValueError as error:
        raise PushError(f"--max-shard-size {value!r} is not a size such as 5GB, 500MB or 1000000") from error
    if size <= 0:
        raise PushError(f"--max-shard-size must be positive, got {value!r}")
    return size


def _format_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _few(items, count: int = 8) -> str:
    items = list(items)
    shown = ", ".join(str(item) for item in items[:count])
    return shown + (f" and {len(items) - count} more" if len(items) > count else "")


if __name__ == "__main__":
    sys.exit(main())
