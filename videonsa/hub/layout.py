"""What a VideoNSA Hub repository holds, in one place: the code files beside the weights, ``nsa_kernels/``, the
model card, the weight and processor file names, and the key layout of the written weights.

The code that ships is the root of this checkout (the modules ``modeling_videonsa`` and its siblings); the list of
code files is the modeling module's own, the one ``save_pretrained`` writes. The key layout of the weights is the
modeling module's too (``model_key`` / ``released_key``).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import modeling_videonsa

ROOT = Path(modeling_videonsa.__file__).resolve().parent  # the checkout whose root is the Hub repository
CODE_FILES = tuple(modeling_videonsa._CODE_FILES)
KERNELS_DIR = "nsa_kernels"
MODEL_CARD = ROOT / "model_card.md"
# Images the card shows, shipped at the repository's top level under their own names (the card links them so).
CARD_IMAGES = {"benchmarks.png": ROOT / "docs" / "benchmarks.png"}
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
# Files read from a source (weights, configs, tokenizer and processor files); a repo id fetches only these.
SOURCE_PATTERNS = ["config.json", "generation_config.json", "model*.safetensors", WEIGHTS_INDEX_NAME, "tokenizer*",
                   "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template*"]
PROCESSOR_PATTERNS = [p for p in SOURCE_PATTERNS if "safetensors" not in p]


class PushError(Exception):
    """A problem the user can fix; reported as one clear message, before anything is written where possible."""


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
    return sorted(files, key=natural_key)


def natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def few(items, count: int = 8) -> str:
    items = list(items)
    shown = ", ".join(str(item) for item in items[:count])
    return shown + (f" and {len(items) - count} more" if len(items) > count else "")


def format_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def parse_size(value) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        size = int(value) if str(value).isdigit() else parse_size_to_int(str(value))
    except ValueError as error:
        raise PushError(f"--max-shard-size {value!r} is not a size such as 5GB, 500MB or 1000000") from error
    if size <= 0:
        raise PushError(f"--max-shard-size must be positive, got {value!r}")
    return size



def regular_file(path: Path, link_root: Path | None = None) -> Path:
    """``path`` when it is a regular file; a :class:`PushError` naming it when it is a symbolic link, a folder, a
    pipe or a device, or is missing. A link is accepted only when ``link_root`` is given and the link resolves to a
    regular file inside it (the blobs of huggingface_hub's cache, which serves a repo id's files as links)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise PushError(f"{path} is missing") from None
    if stat.S_ISLNK(mode):
        target = path.resolve()
        if link_root is not None and target.is_relative_to(link_root.resolve()) and target.is_file() and \
                not target.is_symlink():
            return path
        raise PushError(f"{path} is a symbolic link (to {os.readlink(path)}); only regular files are read or "
                        "shipped: replace it by a copy of the file it points to")
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise PushError(f"{path} is {kind}; only regular files are read or shipped")
    return path


def check_regular_files(folder: Path, patterns, link_root: Path | None = None) -> None:
    """Every top-level entry of ``folder`` that matches one of ``patterns`` is a regular file (see
    :func:`regular_file`): nothing a link points to is read into, or shipped with, the repository."""
    import fnmatch

    for path in sorted(folder.iterdir()):
        if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in patterns):
            regular_file(path, link_root)
