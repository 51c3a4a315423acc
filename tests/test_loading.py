"""Loading paths a Hub user hits: local folder, repo id from an (offline) HF cache, old key layout, save/reload.

The remote-code cases run in fresh processes whose ``sys.path`` does not hold this repository, so the model, its
config and its ``nsa_kernels/`` can only come from the checkpoint folder or the cache.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub_utils import COMMIT, REPO_ID, kernel_files, load_in_fresh_process, populate_hub_cache
from modeling_videonsa import VideoNSAForConditionalGeneration
from videonsa.testing import build_tiny_checkpoint, tiny_model, video_prompt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    build_tiny_checkpoint(folder)
    model = VideoNSAForConditionalGeneration.from_pretrained(folder).eval()
    inputs = video_prompt([5, (4, 4, 6), 7])
    with torch.no_grad():
        logits = model(**inputs).logits
    return folder, inputs, logits


def test_save_pretrained_writes_a_self_contained_folder(saved):
    folder, _, _ = saved
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {"config.json", "configuration_videonsa.py", "modeling_videonsa.py", "nsa_kernels/__init__.py",
            "nsa_kernels/reference.py", "nsa_kernels/dispatch.py"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "videonsa" and config["text_config"]["nsa_block_size"] == 64
    assert "processing_videonsa.py" in names and "processor_config.json" in names
    assert config["auto_map"]["AutoModel"] == "modeling_videonsa.VideoNSAForConditionalGeneration"
    # transformers writes Qwen2.5-VL checkpoints in the 4.x key layout (as it does for Qwen2.5-VL itself);
    # mapped back, the file holds exactly the model's state dict, gate MLPs included.
    saved_keys = {
        re.sub(r"^visual\.", "model.visual.", re.sub(r"^model\.(?!language_model\.|visual\.)", "model.language_model.", key))
        for key in load_file(folder / "model.safetensors")
    }
    assert saved_keys == set(tiny_model(nsa_block_size=64).state_dict())
    assert "model.language_model.layers.1.self_attn.g_proj_2.bias" in saved_keys


def test_local_folder_loads_with_remote_code_and_resaves(saved, tmp_path):
    folder, inputs, expected = saved
    info, logits = load_in_fresh_process(tmp_path, folder, inputs, resave=tmp_path / "resaved")
    assert info["config"] == "VideoNSAConfig"
    assert info["model"] == info["other"] == "VideoNSAForConditionalGeneration"
    assert info["processor"] == "VideoNSAProcessor" and info["block_size"] == 64
    assert info["module"].startswith("transformers_modules")
    assert info["kernels"].startswith(str(tmp_path / "modules"))  # the bundled copy, not this checkout
    torch.testing.assert_close(logits, expected)
    again = tmp_path / "again"
    again.mkdir()
    assert (tmp_path / "resaved" / "processing_videonsa.py").is_file()  # named by auto_map, so it ships too
    _, relogits = load_in_fresh_process(again, tmp_path / "resaved", inputs)
    torch.testing.assert_close(relogits, expected)


def test_repo_id_loads_from_an_offline_hub_cache(saved, tmp_path):
    folder, inputs, expected = saved
    cache = tmp_path / "hub"
    populate_hub_cache(cache, folder)
    info, logits = load_in_fresh_process(
        tmp_path, REPO_ID, inputs, env_extra=dict(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    )
    assert info["model"] == "VideoNSAForConditionalGeneration" and info["processor"] == "VideoNSAProcessor"
    # the snapshot's kernels, in a folder of the commit's module keyed by their content and holding exactly them
    kernels_dir = Path(info["kernels"]).parent
    assert kernels_dir.parent.name == COMMIT and kernels_dir.name.startswith("nsa_kernels_")
    assert kernel_files(kernels_dir) == kernel_files(folder / "nsa_kernels")
    torch.testing.assert_close(logits, expected)


def test_old_key_layout_loads(saved, tmp_path):
    """transformers 4.x / the authors' release: `model.layers.N...`, `visual.*`, `lm_head` at the top."""
    folder, inputs, expected = saved
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    tensors = load_file(folder / "model.safetensors")
    renamed = {}
    for key, value in tensors.items():
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        renamed[key] = value
    assert "model.layers.0.self_attn.g_proj_1.weight" in renamed and "visual.merger.mlp.0.weight" in renamed
    save_file(renamed, old / "model.safetensors", metadata={"format": "pt"})
    model = VideoNSAForConditionalGeneration.from_pretrained(old).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected)
