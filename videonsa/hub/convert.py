"""The conversion plan: which tensors a source checkpoint holds, under which names they are written, and which
gate MLP tensors are initialised (for a plain Qwen2.5-VL source).

A source is one of three layouts: the authors' release (Qwen2.5-VL with VideoNSA's gate MLPs ``g_proj_1`` /
``g_proj_2``, in the transformers 4.x or 5.x key layout), a plain Qwen2.5-VL checkpoint (gates initialised as the
authors initialised them before training), or a checkpoint this package saved (``model_type: videonsa``).
"""

from __future__ import annotations

import copy
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from modeling_videonsa import checkpoint_layout, is_gate_key, model_key, released_key

from .layout import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    PushError,
    check_regular_files,
    few,
    format_size,
    natural_key,
)

# Gate MLP initialisation of the authors (for a plain Qwen2.5-VL source): weights normal(0, 0.02), g_proj_1's
# bias 0, g_proj_2's (output) bias logit(0.5) = log(0.5 / 0.5) = 0, so that every gate starts at sigmoid(0) = 0.5
# (the temperature divides a zero logit, which stays zero).
GATE_WEIGHT_STD = 0.02
GATE_OUTPUT_BIAS = math.log(0.5 / (1 - 0.5))
LAYER_RE = re.compile(r"^model\.language_model\.layers\.(\d+)\.")

# safetensors dtypes a gate MLP can be initialised in (that of a neighbouring attention weight): torch name, bytes.
GATE_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8)}


def resolve_source(source: str, revision: str | None, patterns: list[str]) -> Path:
    """A local folder as it is, or the files of a Hub repo id (through the HF cache, so offline works too).

    Every file matching ``patterns`` must be a regular file: a link (``chat_template.jinja -> secret.txt``) would put
    whatever it points to into the repository. In the HF cache of a repo id, links into the cache's blobs are how
    huggingface_hub stores files and are accepted."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path.resolve()
        check_regular_files(path, patterns)
        return path
    if path.exists():
        raise PushError(f"{source} is a file; give the folder that holds config.json and the weights")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source) or source.startswith((".", "/")):
        raise PushError(f"{source} is neither an existing folder nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(source, revision=revision, allow_patterns=patterns))
    except Exception as error:  # noqa: BLE001 - every hub failure becomes one message
        raise PushError(f"could not fetch {source} from the Hub: {error}") from error
    check_regular_files(snapshot, patterns, link_root=snapshot.parents[1])  # <cache>/models--o--n/snapshots/<sha>
    return snapshot


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
                f"layout, {format_size(self.total_bytes)} to write")
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
            raise PushError(f"{WEIGHTS_INDEX_NAME} in {folder} lists tensors its files lack: {few(absent)}")
    return tensors


def load_source_config(folder: Path) -> tuple[dict, object]:
    """``(config.json as read, VideoNSAConfig)``. A Qwen2.5-VL config (the authors' release or plain Qwen2.5-VL, flat
    4.x or nested 5.x) is read as VideoNSA's by ``VideoNSAConfig.from_pretrained``, the release's NSA settings
    (``block_counts``, ``window_size``) included; whether the gates are there is told by the weights."""
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
        checkpoint_layout(raw, ())  # raises for a model type VideoNSA cannot load
    except ValueError:
        architectures = ", ".join(raw.get("architectures") or []) or "no architectures"
        raise PushError(
            f"{folder} holds a {model_type!r} checkpoint ({architectures}), not Qwen2.5-VL: push_to_hub.py "
            "converts Qwen2.5-VL checkpoints (model_type 'qwen2_5_vl', with or without VideoNSA's gate MLPs) "
            "and VideoNSA checkpoints (model_type 'videonsa')"
        ) from None
    try:
        config = VideoNSAConfig.from_pretrained(folder)
    except (ValueError, TypeError) as error:
        raise PushError(f"{path} is not a valid {model_type} configuration: {error}") from error
    config.architectures = ["VideoNSAForConditionalGeneration"]
    # the code files shipped beside the config, never a reference to another repository's code ("repo--module.X",
    # as save_pretrained writes after loading a model by repo id)
    config.auto_map = dict(AUTO_MAP)
    return raw, config


def expected_state(config) -> dict[str, tuple]:
    """Every state-dict key of VideoNSA with this config and its shape (the model is built on the meta device)."""
    import torch

    from modeling_videonsa import VideoNSAForConditionalGeneration

    with torch.device("meta"):
        model = VideoNSAForConditionalGeneration(copy.deepcopy(config))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def plan_conversion(source: Path, seed: int = 0) -> Plan:
    """Map every source tensor onto VideoNSA's state dict and decide what to initialise; raise on any mismatch."""
    raw_config, config = load_source_config(source)
    tensors = list_source_tensors(source)
    expected = expected_state(config)
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings",
                                                                         False))
    optional = {"lm_head.weight"} if tied else set()

    by_canonical, layouts = {}, set()
    for name in tensors:
        canonical = model_key(name)
        if name.startswith(("model.language_model.", "model.visual.")):
            layouts.add("5.x")
        elif canonical != name:
            layouts.add("4.x")
        if canonical in by_canonical:
            raise PushError(f"the checkpoint holds {by_canonical[canonical]} and {name}, which are the same tensor "
                            "in two key layouts")
        by_canonical[canonical] = name

    kind = checkpoint_layout(raw_config, tensors)
    gates = {key for key in expected if is_gate_key(key)}
    present_gates = gates & set(by_canonical)
    to_initialise = set()
    if kind == "qwen2_5_vl":
        to_initialise = gates
    elif present_gates != gates:
        layers = sorted({int(LAYER_RE.match(k).group(1)) for k in gates - present_gates})
        what = "the VideoNSA checkpoint" if kind == "videonsa" else "the checkpoint has gate MLPs in some layers but"
        raise PushError(f"{what} lacks gate MLP tensors (g_proj_1 / g_proj_2) of text layers {layers}: "
                        f"{few(sorted(gates - present_gates))}")

    unexpected = sorted(by_canonical[c] for c in set(by_canonical) - set(expected))
    missing = sorted(set(expected) - set(by_canonical) - to_initialise - optional)
    mismatched = [f"{by_canonical[c]}: checkpoint {list(tensors[by_canonical[c]][2])} vs config {list(expected[c])}"
                  for c in sorted(set(by_canonical) & set(expected))
                  if tensors[by_canonical[c]][2] != expected[c]]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensors do not have the shape config.json gives them: {few(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} tensors of the model are missing from the checkpoint: {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of the checkpoint are not part of VideoNSA with this config: "
                        f"{few(unexpected)}")
    if problems:
        raise PushError(f"{source} does not match its config.json: " + "; ".join(problems))

    specs = []
    for canonical, name in by_canonical.items():
        path, dtype, shape, nbytes = tensors[name]
        specs.append(TensorSpec(released_key(canonical), canonical, shape, dtype, nbytes, path, name))
    for canonical in sorted(to_initialise):
        layer = LAYER_RE.match(canonical).group(1)
        neighbour = by_canonical[f"model.language_model.layers.{layer}.self_attn.q_proj.weight"]
        dtype = tensors[neighbour][1]
        if dtype not in GATE_DTYPES:
            raise PushError(f"cannot initialise gate MLPs next to {neighbour}, whose dtype is {dtype}")
        shape = expected[canonical]
        specs.append(TensorSpec(released_key(canonical), canonical, shape, dtype,
                                math.prod(shape) * GATE_DTYPES[dtype][1]))
    specs.sort(key=lambda spec: natural_key(spec.target))
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

