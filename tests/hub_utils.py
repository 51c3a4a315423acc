"""Helpers shared by the tests that load checkpoints the way a Hub user does: in a fresh process whose ``sys.path``
does not hold this repository (so the model, its config and ``nsa_kernels/`` can only come from the checkpoint
folder or the HF cache), by folder or by repo id from an offline-populated HF cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "Enxin/VideoNSA"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# argv[1]: a JSON job {"repo", "sources", "inputs", "out", "resave"}. Every source (folder or repo id) is loaded with
# AutoConfig / AutoModel / AutoModelForImageTextToText / AutoProcessor and remote code; the logits of every input
# set go to `out` as {source: [logits, ...]}; one JSON line per source describes what was loaded.
LOAD_SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
job = json.loads(Path(sys.argv[1]).read_text())
assert not any(Path(p).resolve() == Path(job["repo"]) for p in sys.path if p), "the repo leaked onto sys.path"
inputs = torch.load(job["inputs"])
logits, infos = {}, []
for source in job["sources"]:
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    other = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True)
    has_processor = not Path(source).is_dir() or (Path(source) / "processor_config.json").is_file()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True) if has_processor else None
    kernels = sys.modules[type(model).__module__].load_nsa_kernels(model.config)
    with torch.no_grad():
        logits[source] = [model(**sample).logits for sample in inputs]
    if job["resave"]:
        model.save_pretrained(job["resave"])
    infos.append(dict(source=source, config=type(config).__name__, model=type(model).__name__,
                      other=type(other).__name__, processor=type(processor).__name__,
                      block_size=getattr(processor, "nsa_block_size", None),
                      module=type(model).__module__, kernels=kernels.__file__))
torch.save(logits, job["out"])
print(json.dumps(infos))
"""


def fresh_process_env(workdir: Path, env_extra: dict | None = None) -> dict:
    """The environment of a fresh process: no PYTHONPATH, a dynamic-module cache of its own under ``workdir``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_MODULES_CACHE=str(Path(workdir) / "modules"), HF_HUB_DISABLE_TELEMETRY="1", **(env_extra or {}))
    return env


def load_many_in_fresh_process(workdir, sources, inputs: list[dict], resave=None, env_extra=None):
    """Load every source in one fresh process; returns ``[(info, [logits per input set]) per source]``."""
    workdir = Path(workdir)
    sources = [str(source) for source in sources]
    torch.save(inputs, workdir / "inputs.pt")
    job = dict(repo=str(REPO_ROOT), sources=sources, inputs=str(workdir / "inputs.pt"),
               out=str(workdir / "logits.pt"), resave=str(resave) if resave else None)
    (workdir / "job.json").write_text(json.dumps(job))
    script = workdir / "load.py"
    script.write_text(LOAD_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(workdir / "job.json")],
        cwd=workdir, env=fresh_process_env(workdir, env_extra), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    infos = json.loads(result.stdout.strip().splitlines()[-1])
    logits = torch.load(workdir / "logits.pt")
    return [(info, logits[info["source"]]) for info in infos]


def load_in_fresh_process(workdir, source, inputs: dict, resave=None, env_extra=None):
    """Load one source in a fresh process; returns ``(info, logits)`` of one input set."""
    [(info, logits)] = load_many_in_fresh_process(workdir, [source], [inputs], resave, env_extra)
    return info, logits[0]


def populate_hub_cache(cache: Path, folder: Path, repo_id: str = REPO_ID, commit: str = COMMIT) -> None:
    """Lay the folder out as huggingface_hub's cache does after a download of ``repo_id`` at ``commit``."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def kernel_files(folder: Path) -> dict[str, bytes]:
    """``{name: bytes}`` of the ``.py`` files of a kernels folder (what a kernels package consists of)."""
    return {path.name: path.read_bytes() for path in sorted(Path(folder).glob("*.py"))}


# The authors' release of VideoNSA: a transformers 4.x Qwen2.5-VL checkpoint (flat text keys, `rope_scaling`,
# `torch_dtype`, no `auto_map`, no code files) whose text config carries `block_counts` and `window_size` and whose
# weights, in the 4.x key layout, hold the gate MLPs; with Qwen2.5-VL's tokenizer and preprocessor files.
AUTHORS_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def write_authors_checkpoint(videonsa: Path, target: Path, block_counts: int, window_size: int) -> Path:
    """Rewrite the VideoNSA folder ``videonsa`` (saved by save_pretrained) in the authors' release layout."""
    videonsa, target = Path(videonsa), Path(target)
    target.mkdir(parents=True)
    config = json.loads((videonsa / "config.json").read_text())
    text = config.pop("text_config")
    for key in ("model_type", "layer_types", "dtype", "nsa_block_size", "nsa_block_count", "nsa_window_size",
                "nsa_gate_temperature", "nsa_enabled", "nsa_backend"):
        text.pop(key, None)
    rope = text.pop("rope_parameters")
    text.update(rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]}, rope_theta=rope["rope_theta"],
                block_counts=block_counts, window_size=window_size)
    config.pop("auto_map")
    config["vision_config"].pop("rope_parameters", None)
    config["vision_config"]["model_type"] = "qwen2_5_vl"  # as old Qwen2.5-VL configs have it
    config.update(text, model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
                  torch_dtype=config.pop("dtype"), transformers_version="4.51.3")
    (target / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(videonsa / "model.safetensors", target / "model.safetensors")  # already the 4.x key layout
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(videonsa / name, target / name)
    (target / "preprocessor_config.json").write_text(json.dumps(AUTHORS_PREPROCESSOR))
    return target


def populate_hub_cache_with_blobs(cache: Path, folder: Path, repo_id: str = REPO_ID, commit: str = COMMIT) -> Path:
    """As :func:`populate_hub_cache`, with the real cache's storage: every file is a blob named by its hash and the
    snapshot holds relative symbolic links to the blobs. Returns the snapshot folder."""
    import hashlib

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def run_in_fresh_process(workdir, script: str, job: dict, env_extra: dict | None = None) -> dict:
    """Run ``script`` (Python source that reads the JSON file ``sys.argv[1]`` and prints one JSON line last) in a
    fresh process (see :func:`fresh_process_env`); returns that line, parsed."""
    workdir = Path(workdir)
    (workdir / "job.json").write_text(json.dumps(job))
    (workdir / "script.py").write_text(script)
    result = subprocess.run(
        [sys.executable, str(workdir / "script.py"), str(workdir / "job.json")],
        cwd=workdir, env=fresh_process_env(workdir, env_extra), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
