"""Writing the Hub repository's folder: weights streamed shard by shard, config, generation config, processor
files, the code files and ``nsa_kernels/`` of this checkout, the model card and its images; nothing else."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from modeling_videonsa import read_checkpoint_file, read_kernel_files, write_kernel_files

from .convert import Plan, initial_gate_tensor
from .layout import (
    CARD_IMAGES,
    CODE_FILES,
    KERNELS_DIR,
    REQUIRED_FILES,
    ROOT,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    PushError,
    hub_files,
    is_shipped,
    regular_file,
)


def check_output(output: Path, source: Path, overwrite: bool) -> None:
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
        write_code_files(ROOT, staging)
        (staging / "README.md").write_text(card_text, encoding="utf-8")
        for name, path in CARD_IMAGES.items():
            shutil.copyfile(regular_file(path), staging / name)
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


def write_code_files(checkout: Path, target: Path) -> None:
    """The code files and ``nsa_kernels/`` of ``checkout`` into ``target``, read and written as save_pretrained does
    (``modeling_videonsa``'s readers): regular files only, a link or non-file refused by name, no link in ``target``
    written through."""
    try:
        code = {name: read_checkpoint_file(checkout / name, checkout) for name in CODE_FILES}
        kernels = read_kernel_files(checkout / KERNELS_DIR, checkout)
    except (ValueError, ImportError) as error:
        raise PushError(f"this checkout's code cannot ship: {error}") from error
    for name, data in code.items():
        (target / name).unlink(missing_ok=True)  # the processor's save may have put one there
        (target / name).write_bytes(data)
    write_kernel_files(kernels, target / KERNELS_DIR)


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


def _drop_unlisted(folder: Path) -> list[str]:
    dropped = []
    for path in sorted(folder.rglob("*"), reverse=True):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink() or path.is_file():
            if path.is_symlink() or not is_shipped(relative):  # a link is never shipped
                path.unlink()
                dropped.append(relative)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return sorted(dropped)


def missing_required(folder: Path, files: list[str]) -> list[str]:
    names = set(files)
    missing = sorted(REQUIRED_FILES - names)
    if WEIGHTS_INDEX_NAME in names:
        shards = set(json.loads((folder / WEIGHTS_INDEX_NAME).read_text())["weight_map"].values())
        missing += sorted(shards - names)
    elif WEIGHTS_NAME not in names:
        missing.append(f"{WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
    return missing

