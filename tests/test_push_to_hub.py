"""push_to_hub.py: tiny checkpoints in every source layout -> a dry run into a folder -> loaded by folder and by repo id
(offline HF cache) in a fresh process, with the source model's outputs; the allow-list; the model card; the upload
up to the operations it would send; bad inputs rejected before anything is written."""

from __future__ import annotations

import contextlib
import io
import os
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

import push_to_hub
from configuration_videonsa import NSA_KEYS
from videonsa.hub import cli
from videonsa.hub.checks import card_problems
from videonsa.hub.convert import initial_gate_tensor, plan_conversion
from videonsa.hub.layout import PushError, hub_files
from videonsa.hub.upload import commit_operations
from hub_utils import COMMIT, REPO_ID, REPO_ROOT, fresh_process_env, load_many_in_fresh_process, populate_hub_cache
from modeling_videonsa import VideoNSAForConditionalGeneration
from test_model import qwen_twin
from videonsa.testing import build_tiny_checkpoint, make_tokenizer, video_prompt, write_video

LAYOUTS = ("videonsa", "release-4x", "release-5x", "qwen")
PUSH_OPTIONS = {  # every verification mode once; loading and tensors of all layouts are checked by the tests too
    "videonsa": ["--verify", "skip"],
    "release-4x": ["--max-shard-size", "1MB"],  # auto: full for a small model
    "release-5x": ["--verify", "load"],
    "qwen": ["--seed", "7"],
}
STRAYS = ("secret.env", "notes.txt", "training_args.bin", "modeling_qwen2_5_vl.py", ".cache/huggingface/x.lock",
          "__pycache__/modeling.cpython-311.pyc", "nsa_kernels/__pycache__/reference.cpython-311.pyc",
          "nsa_kernels/notes.txt")
# A Qwen2.5-VL preprocessor_config.json, as the Hub repos of Qwen2.5-VL and of the release carry it.
QWEN_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def run_push(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = push_to_hub.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def legacy_config(config_path: Path) -> dict:
    """A transformers 4.x Qwen2.5-VL config.json (text keys flat, rope_scaling, torch_dtype), as in the release."""
    config = json.loads(config_path.read_text())
    text = config.pop("text_config")
    for key in ("model_type", "layer_types", "dtype"):
        text.pop(key, None)
    rope = text.pop("rope_parameters")
    text.update(rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]}, rope_theta=rope["rope_theta"])
    config.update(text, torch_dtype=config.pop("dtype"), transformers_version="4.51.3")
    config["vision_config"].pop("rope_parameters", None)
    return config


def copy_processor_files(source: Path, target: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(source / name, target / name)
    (target / "preprocessor_config.json").write_text(json.dumps(QWEN_PREPROCESSOR))
    (target / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))  # replaced by ours


def plant_strays(folder: Path) -> None:
    for name in STRAYS:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("HF_TOKEN=hf_not_a_real_token\n" if "secret" in name else "stray\n")


def reference_keys(folder: Path) -> dict:
    """The tensors of a checkpoint folder, single file or sharded."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(folder / "model.safetensors")
    tensors = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(folder / name))
    return tensors


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One tiny checkpoint in every source layout, with the source models' outputs."""
    root = tmp_path_factory.mktemp("sources")
    videonsa = Path(build_tiny_checkpoint(root / "videonsa"))
    model = VideoNSAForConditionalGeneration.from_pretrained(videonsa).eval()
    twin = qwen_twin(model)
    plant_strays(videonsa)

    release_4x = root / "release-4x"  # save_pretrained already writes the 4.x key layout of the release
    release_4x.mkdir()
    shutil.copyfile(videonsa / "model.safetensors", release_4x / "model.safetensors")
    twin.config.save_pretrained(root / "qwen-config")
    (release_4x / "config.json").write_text(json.dumps(legacy_config(root / "qwen-config" / "config.json")))
    copy_processor_files(videonsa, release_4x)
    plant_strays(release_4x)

    release_5x = root / "release-5x"  # transformers 5 key names, two shards with an index, nested config
    release_5x.mkdir()
    shutil.copyfile(root / "qwen-config" / "config.json", release_5x / "config.json")
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    assert {"model.language_model.layers.0.self_attn.g_proj_1.weight", "model.visual.merger.mlp.0.weight"} <= set(state)
    names = sorted(state)
    weight_map = {}
    for part, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        filename = f"model-{part:05d}-of-00002.safetensors"
        save_file({name: state[name] for name in chunk}, release_5x / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, filename))
    (release_5x / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    copy_processor_files(videonsa, release_5x)

    qwen = root / "qwen"  # plain Qwen2.5-VL, no gate MLPs, in bfloat16
    twin.to(torch.bfloat16).save_pretrained(qwen)
    copy_processor_files(videonsa, qwen)
    qwen_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen).eval()

    video, text = video_prompt([5, (4, 4, 6), 7]), video_prompt([12])
    with torch.no_grad():
        expected = {"video": model(**video).logits, "text": model(**text).logits}
        qwen_text = qwen_model(**text).logits
    return dict(root=root, folders={"videonsa": videonsa, "release-4x": release_4x, "release-5x": release_5x,
                                    "qwen": qwen},
                model=model, expected=expected, qwen_text=qwen_text, inputs=[video, text])


@pytest.fixture(scope="module")
def pushed(sources):
    """`push_to_hub.py SOURCE --dry-run` for every layout; {layout: (folder, stdout)}."""
    results = {}
    for layout in LAYOUTS:
        out = sources["root"] / f"out-{layout}"
        code, stdout, stderr = run_push(sources["folders"][layout], "--output", out, "--dry-run",
                                        "--repo-id", f"{REPO_ID}-{layout}", *PUSH_OPTIONS[layout])
        assert code == 0, stderr
        results[layout] = (out, stdout)
    return results


# --------------------------------------------------------------------------------------------------------------
# The written folder
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dry_run_writes_exactly_the_hub_files(pushed, layout):
    out, stdout = pushed[layout]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    kernels = sorted(f"nsa_kernels/{p.name}" for p in (REPO_ROOT / "nsa_kernels").glob("*.py"))
    shards = [f for f in files if f.endswith(".safetensors")]
    fixed = {"README.md", "benchmarks.png", "config.json", "generation_config.json", "configuration_videonsa.py", "modeling_videonsa.py",
             "processing_videonsa.py", "video_processing_videonsa.py", "processor_config.json", "chat_template.jinja", "tokenizer.json",
             "tokenizer_config.json"}
    index = ["model.safetensors.index.json"] if len(shards) > 1 else []
    assert shards == ["model.safetensors"] or all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) for f in shards)
    assert set(files) == fixed | set(kernels) | set(shards) | set(index), "exactly the Hub repo's files"
    assert not any(name in files for name in STRAYS) and "__pycache__" not in str(files)
    for name in ("configuration_videonsa.py", "modeling_videonsa.py", "processing_videonsa.py", *kernels):
        assert (out / name).read_bytes() == (REPO_ROOT / name).read_bytes(), name
    assert (out / "README.md").read_text() == (REPO_ROOT / "model_card.md").read_text()
    assert (out / "benchmarks.png").read_bytes() == (REPO_ROOT / "docs" / "benchmarks.png").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "videonsa" and config["architectures"] == ["VideoNSAForConditionalGeneration"]
    assert config["auto_map"]["AutoModel"] == "modeling_videonsa.VideoNSAForConditionalGeneration"
    assert config["text_config"]["nsa_block_size"] == 64 and config["text_config"]["nsa_gate_temperature"] == 0.3
    processor_config = json.loads((out / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_videonsa.VideoNSAProcessor"
    assert processor_config["nsa_block_size"] == 64 and processor_config["video_processor"]["fps"] == 4.0
    assert "<|video_pad|>" in (out / "chat_template.jinja").read_text()
    # the dry run lists every file with its size and the commit it would make, and uploads nothing
    for name in files:
        assert re.search(rf"\d+(\.\d)? [KMG]?B  {re.escape(name)}$", stdout, re.M), name
    assert f"{REPO_ID}-{layout}" in stdout and f"{len(files)} CommitOperationAdd" in stdout
    assert "Nothing was uploaded." in stdout
    if layout == "videonsa":
        assert "Verification skipped" in stdout
    else:
        mode = {"release-5x": "load"}.get(layout, "full")
        assert f"Verified in a fresh process ({mode})" in stdout and "Checked " in stdout


def test_sharding_follows_max_shard_size(pushed):
    out, _ = pushed["release-4x"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    sizes = [(out / name).stat().st_size for name in shards]
    assert max(sizes) <= 1_000_000 + 10_000  # 1MB of tensors plus the header
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference_keys(out).values())
    assert set(index["weight_map"]) == set(reference_keys(out))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_source_tensor_lands_unchanged(sources, pushed, layout):
    """The written keys are the ones save_pretrained writes (the release's 4.x layout); every tensor has the source's
    values and dtype; a plain Qwen2.5-VL source gets the authors' gate initialisation."""
    out, _ = pushed[layout]
    written = reference_keys(out)
    saved_by_package = load_file(sources["folders"]["videonsa"] / "model.safetensors")
    assert set(written) == set(saved_by_package)
    if layout != "qwen":
        for name, tensor in saved_by_package.items():
            assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
        return
    qwen = load_file(sources["folders"]["qwen"] / "model.safetensors")
    gates = {name for name in written if ".g_proj_" in name}
    assert set(written) - gates == set(qwen) and len(gates) == 4 * 2  # 2 layers x (g_proj_1, g_proj_2) x (w, b)
    for name, tensor in qwen.items():
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], tensor), name
    for name in gates:
        gate = written[name]
        assert gate.dtype == torch.bfloat16 and gate.shape == saved_by_package[name].shape
        if name.endswith("bias"):  # first bias 0, output bias logit(0.5) = 0
            assert torch.count_nonzero(gate) == 0, name
        else:
            assert abs(gate.float().std().item() - 0.02) < 0.002 and abs(gate.float().mean().item()) < 0.002, name
    spec = next(s for s in plan_conversion(sources["folders"]["qwen"], seed=7).tensors
                if s.target == "model.layers.1.self_attn.g_proj_1.weight")
    assert torch.equal(initial_gate_tensor(spec, 7), written[spec.target])  # reproducible from the seed
    assert not torch.equal(initial_gate_tensor(spec, 8), written[spec.target])


def test_pushed_folders_load_by_directory_and_by_repo_id(sources, pushed, tmp_path):
    """One fresh process (this checkout off sys.path) loads each folder, and each as a repo id from an offline HF
    cache, with AutoModel / AutoProcessor and remote code; the outputs are the source model's."""
    cache = tmp_path / "hub"
    for layout in LAYOUTS:
        populate_hub_cache(cache, pushed[layout][0], repo_id=f"{REPO_ID}-{layout}")
    targets = [pushed[layout][0] for layout in LAYOUTS] + [f"{REPO_ID}-{layout}" for layout in LAYOUTS]
    results = load_many_in_fresh_process(tmp_path, targets, sources["inputs"],
                                         env_extra=dict(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1"))
    modules = str(tmp_path / "modules")
    for position, layout in enumerate(LAYOUTS):
        info, (video, text) = results[position]
        repo_info, (repo_video, repo_text) = results[len(LAYOUTS) + position]
        for record in (info, repo_info):
            assert record["model"] == record["other"] == "VideoNSAForConditionalGeneration", layout
            assert record["processor"] == "VideoNSAProcessor" and record["block_size"] == 64, layout
            assert record["module"].startswith("transformers_modules") and record["kernels"].startswith(modules)
        assert f"{COMMIT}/nsa_kernels_" in repo_info["kernels"]  # the kernels of the very commit (keyed by content)
        torch.testing.assert_close(repo_video, video, rtol=0, atol=0)
        torch.testing.assert_close(repo_text, text, rtol=0, atol=0)
        if layout == "qwen":  # text-only prompts are Qwen2.5-VL's dense attention; video runs the initial gates
            torch.testing.assert_close(text, sources["qwen_text"])
            reference = VideoNSAForConditionalGeneration.from_pretrained(pushed["qwen"][0]).eval()
            with torch.no_grad():
                torch.testing.assert_close(video, reference(**sources["inputs"][0]).logits)
        else:
            torch.testing.assert_close(video, sources["expected"]["video"])
            torch.testing.assert_close(text, sources["expected"]["text"])


# --------------------------------------------------------------------------------------------------------------
# Allow-list and upload
# --------------------------------------------------------------------------------------------------------------
def test_commit_operations_follow_the_allow_list(pushed, tmp_path):
    folder = tmp_path / "repo"
    shutil.copytree(pushed["videonsa"][0], folder)
    shipped = hub_files(folder)
    plant_strays(folder)
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[credential]\n")
    (folder / ".huggingface").mkdir()
    (folder / "nsa_kernels" / "sub").mkdir()
    (folder / "nsa_kernels" / "sub" / "extra.py").write_text("")
    (folder / "link.json").symlink_to(folder / "config.json")
    operations = commit_operations(folder)
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    assert [op.path_in_repo for op in operations] == shipped
    remote = ["README.md", ".gitattributes", "model-00001-of-00009.safetensors", "pytorch_model.bin",
              "chat_template.json", "nsa_kernels/old_kernel.py", "assets/teaser.png", "notes.md"]
    deletes = [op for op in commit_operations(folder, remote) if isinstance(op, CommitOperationDelete)]
    assert [op.path_in_repo for op in deletes] == [
        "chat_template.json", "model-00001-of-00009.safetensors", "nsa_kernels/old_kernel.py", "pytorch_model.bin"]


class FakeHub:
    """Records what push_to_hub.py sends to the Hub instead of sending it."""

    def __init__(self, monkeypatch, remote=()):
        self.calls, self.remote = [], list(remote)
        for name in ("create_repo", "create_branch", "list_repo_files", "create_commit"):
            monkeypatch.setattr(HfApi, name, self._record(name))

    def _record(self, name):
        def method(api, *args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == "create_repo":
                return f"https://huggingface.co/{args[0]}"
            if name == "list_repo_files":
                return self.remote
            if name == "create_commit":
                return type("Info", (), {"commit_url": "https://huggingface.co/x/commit/1", "pr_url": None})()
            return None

        return method

    def names(self):
        return [name for name, _, _ in self.calls]


def test_upload_makes_one_commit_after_verification(sources, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, remote=[".gitattributes", "model-00001-of-00004.safetensors"])
    order = []

    def verify(folder, mode):
        order.append(("verify", mode, hub.names()[:]))
        return dict(model="VideoNSAForConditionalGeneration", processor="VideoNSAProcessor", kernels="k",
                    attention_paths=["hybrid"])

    monkeypatch.setattr(cli, "verify_in_fresh_process", verify)
    out = tmp_path / "out"
    code, stdout, stderr = run_push(sources["folders"]["release-4x"], "--output", out, "--repo-id", "me/VideoNSA",
                                    "--revision", "dev", "--private", "--commit-message", "First upload")
    assert code == 0, stderr
    assert order == [("verify", "full", [])]  # verified before any Hub call
    assert hub.names() == ["create_repo", "create_branch", "list_repo_files", "create_commit"]
    _, args, kwargs = hub.calls[0]
    assert args == ("me/VideoNSA",) and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert hub.calls[1][2]["branch"] == "dev"
    _, args, commit = hub.calls[3]
    assert args == ("me/VideoNSA",) and commit["revision"] == "dev" and not commit["create_pr"]
    assert commit["commit_message"] == "First upload" and "release" in commit["commit_description"]
    adds = [op for op in commit["operations"] if isinstance(op, CommitOperationAdd)]
    deletes = [op for op in commit["operations"] if isinstance(op, CommitOperationDelete)]
    assert [op.path_in_repo for op in adds] == hub_files(out)
    assert all(Path(op.path_or_fileobj) == out / op.path_in_repo for op in adds)
    assert [op.path_in_repo for op in deletes] == ["model-00001-of-00004.safetensors"]
    assert (out / "README.md").read_text() == (REPO_ROOT / "model_card.md").read_text()
    assert "https://huggingface.co/x/commit/1" in stdout

    # a pull request against main: no branch is created; a failing verification stops before any Hub call
    hub = FakeHub(monkeypatch)
    code, _, stderr = run_push(sources["folders"]["release-4x"], "--output", tmp_path / "pr", "--repo-id",
                               "me/VideoNSA", "--create-pr", "--verify", "skip")
    assert code == 0, stderr
    assert hub.names() == ["create_repo", "list_repo_files", "create_commit"]
    assert hub.calls[0][2]["private"] is None and hub.calls[2][2]["create_pr"] is True
    assert hub.calls[2][2]["revision"] == "main"

    def broken(folder, mode):
        raise PushError("the model does not load")

    monkeypatch.setattr(cli, "verify_in_fresh_process", broken)
    hub = FakeHub(monkeypatch)
    code, _, stderr = run_push(sources["folders"]["release-4x"], "--output", tmp_path / "broken", "--repo-id",
                               "me/VideoNSA")
    assert code == 2 and "does not load" in stderr and hub.calls == []


def test_upload_refuses_an_unfinished_card_before_writing(sources, tmp_path, monkeypatch):
    card = tmp_path / "card.md"
    card.write_text((REPO_ROOT / "model_card.md").read_text().rstrip() + "\n\n<!-- TODO: results -->\n")
    monkeypatch.setattr(cli, "MODEL_CARD", card)
    hub = FakeHub(monkeypatch)
    code, _, stderr = run_push(sources["folders"]["videonsa"], "--output", tmp_path / "out", "--repo-id", "me/x")
    assert code == 2 and "TODO" in stderr and not (tmp_path / "out").exists() and hub.calls == []


def test_card_images_must_be_shipped():
    text = (REPO_ROOT / "model_card.md").read_text()
    assert "](benchmarks.png)" in text and card_problems(text) == []
    problems = card_problems(text + "\n![plot](docs/other.png)\n![remote](https://example.org/a.png)\n")
    assert len(problems) == 1 and "docs/other.png" in problems[0] and "not shipped" in problems[0]

# --------------------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------------------
def test_model_card_metadata_and_sections():
    text = (REPO_ROOT / "model_card.md").read_text()
    card = ModelCard.load(REPO_ROOT / "model_card.md")
    data = card.data.to_dict()
    assert data["license"] and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "video-text-to-text"
    assert data["base_model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and data["datasets"] and data["tags"]
    body = card.text
    for key in NSA_KEYS:
        assert f"| `{key}` |" in body, key
    for needle in ("AutoModel.from_pretrained", "AutoProcessor.from_pretrained", "model.generate(", "Trainer(",
                   "trust_remote_code=True", "## Limitations", "@misc{song2025videonsanativesparseattention",
                   "LongVideoBench", "## Efficiency"):
        assert needle in body, needle
    limitations = body.split("## Limitations")[1].split("\n## ")[0]
    assert "Reference compatibility" in limitations and "h // 16" in limitations and "later" in limitations
    efficiency = body.split("## Efficiency")[1].split("\n## ")[0]
    assert "H100" in efficiency and re.search(r"20\d\d-\d\d-\d\d", efficiency)  # device and date
    assert card_problems(text) == []  # ready to publish
    assert any("license" in p for p in card_problems(text.replace("license: apache-2.0\n", "")))
    assert any("TODO" in p for p in card_problems(text + "\n<!-- TODO: numbers -->\n"))


def test_model_card_code_runs(pushed, tmp_path):
    """The card's usage example and fine-tuning snippet, run as written against the tiny repo (served as
    Enxin/VideoNSA from an offline HF cache) in a fresh process. Two edits for a CPU test: bf16 training off (the
    Trainer has no CPU bf16) and 8 new tokens instead of 128."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "model_card.md").read_text(), flags=re.S)
    assert len(blocks) == 2 and "bf16=True" in blocks[1] and "max_new_tokens=128" in blocks[0]
    cache = tmp_path / "hub"
    populate_hub_cache(cache, pushed["videonsa"][0])
    (tmp_path / "clips").mkdir()
    for name in ("clip.mp4", "clips/0001.mp4", "clips/0002.mp4"):
        write_video(tmp_path / name, num_frames=12, fps=6, width=64, height=64)
    script = "\n".join([blocks[0].replace("max_new_tokens=128", "max_new_tokens=8"),
                        "print('ANSWER', repr(processor.batch_decode(output)[0][-40:]))",
                        blocks[1].replace("bf16=True", "bf16=False"),
                        "print('TRAINED', trainer.state.global_step)"])
    (tmp_path / "card.py").write_text(script)
    env = fresh_process_env(tmp_path, dict(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1"))
    result = subprocess.run([sys.executable, "card.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ANSWER" in result.stdout and "TRAINED 1" in result.stdout
    saved = tmp_path / "videonsa-finetuned"
    assert (saved / "modeling_videonsa.py").is_file() and (saved / "nsa_kernels" / "reference.py").is_file()


# --------------------------------------------------------------------------------------------------------------
# Command line and bad input
# --------------------------------------------------------------------------------------------------------------
def test_help_explains_every_option():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        push_to_hub.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(out.getvalue().split())
    parser_options = ["--output", "--repo-id", "--revision", "--private", "--create-pr", "--commit-message",
                      "--dry-run", "--max-shard-size", "--verify", "--overwrite", "--processor-source",
                      "--source-revision", "--seed"]
    for option in parser_options:
        assert re.search(rf"{option}\b[^\n]*?\s+\S+", text), option
    for words in ("full:", "load:", "skip:", "HF_TOKEN", "allow-list", "logit(0.5)", "one commit"):
        assert words in text, words


def _variant(sources, tmp_path, base="release-4x", drop=(), config=None, tensors=None):
    """A copy of a source folder, with files dropped, the config edited or the tensors replaced."""
    folder = tmp_path / "bad-source"
    shutil.copytree(sources["folders"][base], folder)
    for name in drop:
        (folder / name).unlink()
    if config is not None:
        values = json.loads((folder / "config.json").read_text())
        config(values)
        (folder / "config.json").write_text(json.dumps(values))
    if tensors is not None:
        state = load_file(folder / "model.safetensors")
        tensors(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _gate_slice(state):
    state["model.layers.0.self_attn.g_proj_2.weight"] = state["model.layers.0.self_attn.g_proj_2.weight"][:12]


def _rename_and_drop(state):
    state.pop("lm_head.weight")
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)


def _drop_layer_1_gates(state):
    for key in [k for k in state if k.startswith("model.layers.1.self_attn.g_proj")]:
        state.pop(key)


def _wrong_tokenizer(folder):
    make_tokenizer().save_pretrained(folder)  # Qwen's special tokens at ids 256.., the config says 990..


BAD_INPUTS = {
    "missing weights": (dict(drop=["model.safetensors"]), ["no safetensors weights", "model.safetensors"]),
    "another architecture": (
        dict(config=lambda c: c.update(model_type="llava", architectures=["LlavaForConditionalGeneration"])),
        ["'llava'", "LlavaForConditionalGeneration", "not Qwen2.5-VL"]),
    "shape mismatch": (dict(tensors=_gate_slice),
                       ["model.layers.0.self_attn.g_proj_2.weight: checkpoint [12, 224] vs config [84, 224]"]),
    "missing and unexpected tensors": (
        dict(tensors=_rename_and_drop),
        ["missing from the checkpoint: lm_head.weight",
         "not part of VideoNSA with this config: model.layers.0.self_attn.extra.weight"]),
    "gates in some layers only": (dict(tensors=_drop_layer_1_gates), ["gate MLP", "text layers [1]"]),
    "no tokenizer": (dict(drop=["tokenizer.json", "tokenizer_config.json"]),
                     ["no tokenizer files", "--processor-source"]),
    "no config": (dict(drop=["config.json"]), ["has no config.json"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_rejected_before_anything_is_written(sources, tmp_path, case):
    options, messages = BAD_INPUTS[case]
    source = _variant(sources, tmp_path, **options)
    out = tmp_path / "out"
    code, _, stderr = run_push(source, "--output", out, "--dry-run")
    assert code == 2
    for message in messages:
        assert message in stderr, (message, stderr)
    assert not out.exists() and not list(tmp_path.glob(".out.staging-*"))


def test_more_bad_input(sources, tmp_path):
    out = tmp_path / "out"
    source = sources["folders"]["release-4x"]
    cases = [
        ([tmp_path / "does-not-exist", "--output", out, "--dry-run"], "neither an existing folder nor a Hub repo id"),
        ([source, "--output", out, "--dry-run", "--max-shard-size", "lots"], "--max-shard-size 'lots'"),
        ([source, "--output", out], "--repo-id is required"),
        ([source, "--output", REPO_ROOT, "--dry-run", "--overwrite"], "would replace this checkout"),
        ([source, "--output", source.parent, "--dry-run", "--overwrite"], "would replace the source"),
    ]
    for argv, message in cases:
        code, _, stderr = run_push(*argv)
        assert code == 2 and message in stderr, (argv, stderr)
    assert not out.exists()
    tokenizer_source = _variant(sources, tmp_path)
    _wrong_tokenizer(tokenizer_source)
    code, _, stderr = run_push(tokenizer_source, "--output", out, "--dry-run")
    assert code == 2 and "does not belong to this model" in stderr and "<|video_pad|>" in stderr
    assert not out.exists()


def test_existing_output_needs_overwrite(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-shard.safetensors").write_text("stale")
    source = sources["folders"]["videonsa"]
    code, _, stderr = run_push(source, "--output", out, "--dry-run", "--verify", "skip")
    assert code == 2 and "--overwrite" in stderr and (out / "old-shard.safetensors").is_file()
    (out / ".git").mkdir()
    code, _, stderr = run_push(source, "--output", out, "--dry-run", "--verify", "skip", "--overwrite")
    assert code == 2 and ".git" in stderr
    (out / ".git").rmdir()
    code, stdout, stderr = run_push(source, "--output", out, "--dry-run", "--verify", "skip", "--overwrite")
    assert code == 0, stderr
    assert not (out / "old-shard.safetensors").exists() and (out / "model.safetensors").is_file()
    assert "Verification skipped" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_repo_id_source_and_processor_source(sources, tmp_path, monkeypatch):
    """SOURCE as a repo id (served offline from the HF cache) and tokenizer files from --processor-source."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    populate_hub_cache(cache, sources["folders"]["release-5x"], repo_id="authors/VideoNSA-release")
    processor_only = tmp_path / "processor-only"
    processor_only.mkdir()
    copy_processor_files(sources["folders"]["videonsa"], processor_only)
    populate_hub_cache(cache, processor_only, repo_id="Qwen/Qwen2.5-VL-tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (cache / "models--authors--VideoNSA-release" / "snapshots" / COMMIT / name).unlink()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    code, _, stderr = run_push("authors/VideoNSA-release", "--output", out, "--dry-run", "--verify", "skip")
    assert code == 2 and "--processor-source" in stderr and not out.exists()
    code, stdout, stderr = run_push("authors/VideoNSA-release", "--output", out, "--dry-run", "--verify", "skip",
                                    "--processor-source", "Qwen/Qwen2.5-VL-tiny", "--source-revision", "main")
    assert code == 0, stderr
    assert "the authors' released layout" in stdout and "5.x key layout" in stdout
    assert (out / "tokenizer.json").is_file() and (out / "processor_config.json").is_file()
    assert load_file(out / "model.safetensors").keys() == load_file(sources["folders"]["videonsa"] /
                                                                      "model.safetensors").keys()


# --------------------------------------------------------------------------------------------------------------
# Links and non-files: nothing a link points to is read into, or shipped with, the repository
# --------------------------------------------------------------------------------------------------------------
SECRET = "HF_TOKEN=hf_not_a_real_token_but_secret\n"


def _source_with(sources, tmp_path, case, make):
    folder = _variant(sources, tmp_path / case)
    make(folder)
    return folder


LINKS_AND_NON_FILES = {
    "chat template linked to a secret": (lambda f, s: (f / "chat_template.jinja").symlink_to(s),
                                         ["chat_template.jinja", "symbolic link", "secret.txt"]),
    "tokenizer linked": (lambda f, s: ((f / "tokenizer.json").rename(f.parent / "tok.json"),
                                       (f / "tokenizer.json").symlink_to(f.parent / "tok.json")),
                         ["tokenizer.json", "symbolic link"]),
    "weights linked": (lambda f, s: ((f / "model.safetensors").rename(f.parent / "w.safetensors"),
                                     (f / "model.safetensors").symlink_to(f.parent / "w.safetensors")),
                       ["model.safetensors", "symbolic link"]),
    "a pipe as chat template": (lambda f, s: os.mkfifo(f / "chat_template.jinja"),
                                ["chat_template.jinja", "not a regular file"]),
    "a folder as config": (lambda f, s: ((f / "generation_config.json").unlink(),
                                         (f / "generation_config.json").mkdir()),
                           ["generation_config.json", "is a folder"]),
}


@pytest.mark.parametrize("case", LINKS_AND_NON_FILES)
def test_links_and_non_files_in_the_source_are_refused(sources, tmp_path, case):
    make, messages = LINKS_AND_NON_FILES[case]
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    (tmp_path / case).mkdir()
    source = _source_with(sources, tmp_path, case, lambda folder: make(folder, secret))
    out = tmp_path / "out"
    code, stdout, stderr = run_push(source, "--output", out, "--dry-run", "--verify", "skip")
    assert code == 2, stdout
    for message in messages:
        assert message in stderr, (message, stderr)
    assert not out.exists() and not list(tmp_path.glob(".out.staging-*"))
    if case != "chat template linked to a secret":
        return
    # a link beside the read files, never read, is no reason to refuse (and is never shipped)
    (tmp_path / "clean").mkdir()
    clean = _variant(sources, tmp_path / "clean")
    (clean / "readme-link.txt").symlink_to(secret)
    code, _, stderr = run_push(clean, "--output", out, "--dry-run", "--verify", "skip")
    assert code == 0, stderr
    assert SECRET not in "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())


def test_hub_cache_links_are_read_and_links_out_of_the_cache_refused(sources, tmp_path, monkeypatch):
    """huggingface_hub's cache serves a repo id's files as links into its blobs: those are read (and the written
    folder holds copies). A snapshot link that leaves the cache is refused like any other link."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    populate_hub_cache(cache, sources["folders"]["release-4x"], repo_id="authors/linked")
    repo = cache / "models--authors--linked"
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / COMMIT
    for path in sorted(snapshot.iterdir()):
        if path.is_file():
            blob = repo / "blobs" / f"blob-{path.name}"
            path.rename(blob)
            path.symlink_to(Path("../..") / "blobs" / blob.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    code, _, stderr = run_push("authors/linked", "--output", out, "--dry-run", "--verify", "skip")
    assert code == 0, stderr
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert load_file(out / "model.safetensors").keys() == load_file(sources["folders"]["videonsa"] /
                                                                      "model.safetensors").keys()
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    (snapshot / "chat_template.jinja").symlink_to(secret)
    code, _, stderr = run_push("authors/linked", "--output", tmp_path / "out2", "--dry-run", "--verify", "skip")
    assert code == 2 and "chat_template.jinja" in stderr and "symbolic link" in stderr
    assert not (tmp_path / "out2").exists()


def test_links_in_the_checkout_are_refused(sources, tmp_path, monkeypatch):
    """The code files and nsa_kernels/ come from this checkout: a link there is refused too, naming it."""
    from videonsa.hub import write

    checkout = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT / "nsa_kernels", checkout / "nsa_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    for name in write.CODE_FILES:
        shutil.copyfile(REPO_ROOT / name, checkout / name)
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    (checkout / "nsa_kernels" / "leak.py").symlink_to(secret)
    monkeypatch.setattr(write, "ROOT", checkout)
    out = tmp_path / "out"
    code, _, stderr = run_push(sources["folders"]["videonsa"], "--output", out, "--dry-run", "--verify", "skip")
    assert code == 2 and "leak.py" in stderr and "symbolic link" in stderr
    assert not out.exists() and not list(tmp_path.glob(".out.staging-*"))


def test_the_shipped_code_files_are_the_layouts():
    """The code files beside the weights are the Hub modules at the root of this checkout: one list
    (``modeling_videonsa._CODE_FILES``, which save_pretrained writes too) that the layout confirms."""
    from videonsa.hub.layout import CODE_FILES

    assert sorted(CODE_FILES) == sorted(p.name for p in REPO_ROOT.glob("*_videonsa.py"))
    assert sorted(p.name for p in REPO_ROOT.glob("*.py")) == sorted([*CODE_FILES, "push_to_hub.py"])


@pytest.mark.parametrize("base", ["release-4x", "release-5x"])
def test_the_release_nsa_settings_are_carried_over(sources, tmp_path, base):
    """The authors' config names two NSA settings in their code's words (block_counts, window_size), flat in 4.x or in
    text_config in 5.x: the conversion keeps them, under VideoNSA's names, in the written config."""
    def release_settings(config):
        (config.get("text_config") or config).update(block_counts=2, window_size=32)

    folder = tmp_path / "settings"
    shutil.copytree(sources["folders"][base], folder)
    values = json.loads((folder / "config.json").read_text())
    release_settings(values)
    (folder / "config.json").write_text(json.dumps(values))
    plan = plan_conversion(folder)
    assert plan.kind == "release"
    assert (plan.config.nsa_block_count, plan.config.nsa_window_size) == (2, 32)
    out = tmp_path / "out"
    code, _, stderr = run_push(folder, "--output", out, "--dry-run", "--verify", "skip")
    assert code == 0, stderr
    written = json.loads((out / "config.json").read_text())
    assert (written["text_config"]["nsa_block_count"], written["text_config"]["nsa_window_size"]) == (2, 32)
    assert "block_counts" not in json.dumps(written) and written["model_type"] == "videonsa"
