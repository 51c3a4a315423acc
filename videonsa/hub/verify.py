"""Verification of a written folder: every tensor against the source, then loading as a Hub user does, in a
fresh interpreter that cannot see this checkout (:mod:`videonsa.hub.verify_child`)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .convert import Plan, initial_gate_tensor, list_source_tensors
from .layout import ROOT, PushError, few

CHILD_SCRIPT = Path(__file__).with_name("verify_child.py")


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
            problems.append(f"dropped: {few(dropped)}")
        if extra:
            problems.append(f"unexpected: {few(extra)}")
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


def verify_in_fresh_process(folder: Path, mode: str) -> dict:
    """Load ``folder`` as a user would, with remote code, in a new interpreter that cannot see this checkout."""
    with tempfile.TemporaryDirectory(prefix="videonsa-verify-") as workdir:
        modules = Path(workdir) / "modules"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_MODULES_CACHE=str(modules), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
        # -I: isolated mode, so neither the script's folder, the working directory nor PYTHON* variables put the
        # checkout on sys.path
        result = subprocess.run(
            [sys.executable, "-I", str(CHILD_SCRIPT), str(folder), mode, str(ROOT)],
            cwd=workdir, env=env, capture_output=True, text=True,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("VERIFY-REPORT ")]
        if result.returncode != 0 or not lines:
            raise PushError(f"{folder} does not load in a fresh process (verify {mode}):\n{result.stderr[-4000:]}")
        report = json.loads(lines[-1][len("VERIFY-REPORT "):])
        problems = [f"{key}: {few(value)}" for key, value in report["loading_info"].items() if value]
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

