"""How a checkpoint's ``nsa_kernels/`` reaches transformers' module cache and a saved folder (issue 17, items 1 and 2).

Only regular files are read: links (to ``/etc/passwd`` or anywhere) and non-files are refused with an error that
names them, except the links of a huggingface_hub cache snapshot into its own blobs. The kernels are installed in a
folder keyed by their content that holds exactly them, so two checkpoints with the same folder name and code files
(``run1/checkpoint-500``, ``run2/checkpoint-500``) never share kernels, in one process or across processes, and a
saved folder carries exactly the kernels its model ran.
"""

import shutil
from pathlib import Path

import pytest
import torch

from hub_utils import (
    COMMIT,
    REPO_ID,
    REPO_ROOT,
    kernel_files,
    populate_hub_cache_with_blobs,
    run_in_fresh_process,
)
from modeling_videonsa import VideoNSAForConditionalGeneration
from videonsa.testing import build_tiny_checkpoint, video_prompt

# Every source of the job is loaded with AutoModel and remote code; a failure is reported, not raised. A loaded model
# reports its kernels (file, the VARIANT its __init__ may define), its logits and, when asked, saves itself.
SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoModel
job = json.loads(Path(sys.argv[1]).read_text())
assert not any(Path(p).resolve() == Path(job["repo"]) for p in sys.path if p), "the repo leaked onto sys.path"
inputs = torch.load(job["inputs"]) if job.get("inputs") else None
report = []
for source, resave in job["sources"]:
    try:
        model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    except Exception as error:
        report.append(dict(source=source, error=f"{type(error).__name__}: {error}"))
        continue
    kernels = sys.modules[type(model).__module__].load_nsa_kernels(model.config)
    entry = dict(source=source, kernels=kernels.__file__, variant=getattr(kernels, "VARIANT", None),
                 module=type(model).__module__)
    if inputs is not None and resave:
        with torch.no_grad():
            torch.save(model(**inputs).logits, Path(resave).with_suffix(".pt"))
    if resave:
        model.save_pretrained(resave)
    report.append(entry)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "checkpoint-500"
    build_tiny_checkpoint(folder)
    inputs = video_prompt([5, (4, 4, 6), 7])
    model = VideoNSAForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    return folder, inputs, logits


def run(workdir: Path, sources, inputs=None, env=None) -> list[dict]:
    """Load ``[(source, resave folder or None)]`` in one fresh process whose module cache is ``workdir/modules``
    (shared by the calls with the same ``workdir``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = dict(repo=str(REPO_ROOT), sources=[[str(s), str(r) if r else None] for s, r in sources])
    if inputs is not None:
        torch.save(inputs, workdir / "inputs.pt")
        job["inputs"] = str(workdir / "inputs.pt")
    return run_in_fresh_process(workdir, SCRIPT, job, env_extra=env)


def variant(base: Path, target: Path, init_suffix: str = "", extra: dict | None = None, drop=()) -> Path:
    """A copy of the checkpoint ``base`` whose kernels differ: text appended to ``__init__.py``, files added or
    removed."""
    shutil.copytree(base, target, ignore=shutil.ignore_patterns("__pycache__"))
    kernels = target / "nsa_kernels"
    if init_suffix:
        (kernels / "__init__.py").write_text((kernels / "__init__.py").read_text() + init_suffix)
    for name, text in (extra or {}).items():
        (kernels / name).write_text(text)
    for name in drop:
        (kernels / name).unlink()
    return target


def test_links_and_non_files_in_nsa_kernels_are_refused(checkpoint, tmp_path):
    base, _, _ = checkpoint
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN = 'hf_not_a_real_token'\n")
    to_secret = variant(base, tmp_path / "to-secret" / "checkpoint-500")
    (to_secret / "nsa_kernels" / "x.py").symlink_to(secret)
    to_passwd = variant(base, tmp_path / "to-passwd" / "checkpoint-500")
    (to_passwd / "nsa_kernels" / "x.py").symlink_to("/etc/passwd")
    directory = variant(base, tmp_path / "directory" / "checkpoint-500")
    (directory / "nsa_kernels" / "x.py").mkdir()
    linked_dir = variant(base, tmp_path / "linked-dir" / "checkpoint-500")
    shutil.rmtree(linked_dir / "nsa_kernels")
    (linked_dir / "nsa_kernels").symlink_to(base / "nsa_kernels", target_is_directory=True)
    report = run(tmp_path / "work", [(to_secret, None), (to_passwd, None), (directory, None), (linked_dir, None)])
    cache = tmp_path / "work" / "modules"
    errors = [entry.get("error", "") for entry in report]
    for error, path in zip(errors[:2], (to_secret, to_passwd)):
        assert error.startswith("ValueError") and f"{path / 'nsa_kernels' / 'x.py'} is a symbolic link" in error
        assert "Replace the link with a copy" in error
    assert errors[2].startswith("ValueError") and f"{directory / 'nsa_kernels' / 'x.py'} is a directory" in errors[2]
    assert errors[3].startswith("ValueError") and f"{linked_dir / 'nsa_kernels'} is a symbolic link" in errors[3]
    # nothing of the linked files reached transformers' module cache
    cached = [path for path in cache.rglob("*") if path.is_file()]
    assert cached and not any("hf_not_a_real_token" in path.read_text(errors="replace") for path in cached)
    assert not any(path.read_bytes() == Path("/etc/passwd").read_bytes() for path in cached)
    assert not [path for path in cache.rglob("x.py")]


def test_same_named_checkpoints_get_their_own_kernels(checkpoint, tmp_path):
    """run1/checkpoint-500 and run2/checkpoint-500 share their code files (so transformers gives them one module
    folder) but not their kernels: run1 has a module run2 lacks, run2 a different __init__.py."""
    base, inputs, expected = checkpoint
    first = variant(base, tmp_path / "run1" / "checkpoint-500", extra={"only_in_run1.py": "RUN = 1\n"})
    second = variant(base, tmp_path / "run2" / "checkpoint-500", init_suffix='\nVARIANT = "run2"\n')
    saved = {name: tmp_path / "saved" / name for name in ("first", "second", "second-alone")}
    (tmp_path / "saved").mkdir()
    a, b = run(tmp_path / "work", [(first, saved["first"]), (second, saved["second"])], inputs)
    assert "error" not in a and "error" not in b
    assert a["module"] == b["module"]  # one dynamic module for both (same basename, same code files) ...
    assert Path(a["kernels"]).parent != Path(b["kernels"]).parent  # ... but two kernels packages
    assert (a["variant"], b["variant"]) == (None, "run2")
    for entry, folder, name in ((a, first, "first"), (b, second, "second")):
        # the installed package and the saved folder hold exactly this checkpoint's kernels
        assert kernel_files(Path(entry["kernels"]).parent) == kernel_files(folder / "nsa_kernels")
        assert kernel_files(saved[name] / "nsa_kernels") == kernel_files(folder / "nsa_kernels")
        torch.testing.assert_close(torch.load(saved[name].with_suffix(".pt")), expected)
    # a fresh process with the same module cache: the second checkpoint alone, saved without run1's extra module
    [alone] = run(tmp_path / "work", [(second, saved["second-alone"])])
    assert alone["variant"] == "run2" and alone["kernels"] == b["kernels"]
    assert kernel_files(saved["second-alone"] / "nsa_kernels") == kernel_files(second / "nsa_kernels")
    assert not (saved["second-alone"] / "nsa_kernels" / "only_in_run1.py").exists()


def test_hub_cache_links_to_blobs_are_accepted(checkpoint, tmp_path):
    """huggingface_hub's cache stores snapshot files as links to its blobs: those load (by repo id and by the
    snapshot's path), and the resaved folder holds regular files."""
    base, inputs, expected = checkpoint
    snapshot = populate_hub_cache_with_blobs(tmp_path / "hub", base)
    assert (snapshot / "nsa_kernels" / "__init__.py").is_symlink()
    by_id, resaved = tmp_path / "by-id", tmp_path / "resaved"
    report = run(tmp_path / "work", [(REPO_ID, by_id), (snapshot, resaved)], inputs,
                 env=dict(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1"))
    assert [entry.get("error") for entry in report] == [None, None]
    assert Path(report[0]["kernels"]).parent.parent.name == COMMIT
    assert kernel_files(Path(report[0]["kernels"]).parent) == kernel_files(base / "nsa_kernels")
    for folder in (by_id, resaved):
        torch.testing.assert_close(torch.load(folder.with_suffix(".pt")), expected)
    saved = [path for path in resaved.rglob("*.py") if "__pycache__" not in path.parts]
    assert saved and not any(path.is_symlink() for path in saved)
    assert kernel_files(resaved / "nsa_kernels") == kernel_files(base / "nsa_kernels")


def test_save_pretrained_writes_exactly_the_kernels_and_never_through_links(checkpoint, tmp_path):
    base, _, _ = checkpoint
    model = VideoNSAForConditionalGeneration.from_pretrained(base)
    outside = tmp_path / "outside.py"
    outside.write_text("KEEP = True\n")
    target = tmp_path / "saved"
    (target / "nsa_kernels").mkdir(parents=True)
    (target / "nsa_kernels" / "stale.py").write_text("STALE = True\n")  # from an earlier save into this folder
    (target / "nsa_kernels" / "reference.py").symlink_to(outside)
    (target / "modeling_videonsa.py").symlink_to(outside)
    model.save_pretrained(target)
    assert outside.read_text() == "KEEP = True\n"  # no link was written through
    assert kernel_files(target / "nsa_kernels") == kernel_files(REPO_ROOT / "nsa_kernels")
    assert not any(path.is_symlink() for path in target.rglob("*"))
    assert (target / "modeling_videonsa.py").read_bytes() == (REPO_ROOT / "modeling_videonsa.py").read_bytes()
    # a kernels folder that is a link becomes a real folder; what the link pointed to is left alone
    linked, elsewhere = tmp_path / "linked", tmp_path / "elsewhere"
    linked.mkdir()
    shutil.copytree(REPO_ROOT / "nsa_kernels", elsewhere, ignore=shutil.ignore_patterns("__pycache__"))
    (elsewhere / "old.py").write_text("OLD = True\n")
    (linked / "nsa_kernels").symlink_to(elsewhere, target_is_directory=True)
    model.save_pretrained(linked)
    assert not (linked / "nsa_kernels").is_symlink() and (elsewhere / "old.py").is_file()
    assert kernel_files(linked / "nsa_kernels") == kernel_files(REPO_ROOT / "nsa_kernels")


def test_save_pretrained_refuses_a_linked_code_file_of_the_origin(checkpoint, tmp_path, monkeypatch):
    """A code file that save_pretrained takes from the model's origin folder is read only if it is a regular file."""
    import modeling_videonsa

    base, _, _ = checkpoint
    origin = variant(base, tmp_path / "origin")
    (origin / "processing_videonsa.py").unlink()
    (origin / "processing_videonsa.py").symlink_to("/etc/passwd")
    model = VideoNSAForConditionalGeneration.from_pretrained(origin)
    # as in a dynamic-module folder, which holds only the modeling and configuration files: the processing file
    # comes from the origin
    module = tmp_path / "module"
    module.mkdir()
    for name in ("modeling_videonsa.py", "configuration_videonsa.py"):
        shutil.copyfile(REPO_ROOT / name, module / name)
    monkeypatch.setattr(modeling_videonsa, "__file__", str(module / "modeling_videonsa.py"))
    with pytest.raises(ValueError, match=r"processing_videonsa\.py is a symbolic link \(to /etc/passwd\)"):
        model.save_pretrained(tmp_path / "saved")
