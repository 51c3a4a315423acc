"""The authors' release layout (issue 17, item 13): a Qwen2.5-VL checkpoint (``model_type`` "qwen2_5_vl", no
``auto_map``, no code files) with the gate MLPs in its 4.x-layout weights and two NSA settings in its text config.

Where this package's code is in charge (``VideoNSAForConditionalGeneration.from_pretrained``, ``videonsa.loading``),
it loads as VideoNSA with its gates and settings; ``AutoModel`` builds plain Qwen2.5-VL from it (transformers' own
classes, not this code), which the README documents. Served by folder and from an offline HF cache as
``Enxin/VideoNSA``.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub_utils import REPO_ID, REPO_ROOT, populate_hub_cache, run_in_fresh_process, write_authors_checkpoint
from modeling_videonsa import VideoNSAForConditionalGeneration, checkpoint_layout, model_key, released_key
from videonsa.loading import load_videonsa
from videonsa.testing import build_tiny_checkpoint, video_prompt

# Release settings other than the defaults (32 blocks, window 256), so that reading them is visible in the logits.
BLOCK_COUNTS, WINDOW_SIZE = 2, 32
# 128 video tokens in a 142-token prompt: two 64-token blocks, and a window shorter than the prompt
SEGMENTS = [5, (8, 8, 8), 7]

SCRIPT = r"""
import json, sys, torch
from pathlib import Path
job = json.loads(Path(sys.argv[1]).read_text())
from transformers import AutoModel
from videonsa.loading import load_videonsa
inputs = torch.load(job["inputs"])
model, processor = load_videonsa(job["source"])
with torch.no_grad():
    torch.save(model.eval()(**inputs).logits, job["logits"])
auto = AutoModel.from_pretrained(job["source"])
print(json.dumps(dict(model=type(model).__name__, processor=type(processor).__name__,
                      block_count=model.config.nsa_block_count, window=model.config.nsa_window_size,
                      auto=type(auto).__name__, auto_gates=any("g_proj" in k for k in auto.state_dict()))))
"""


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    videonsa = root / "videonsa"
    build_tiny_checkpoint(videonsa)
    authors = write_authors_checkpoint(videonsa, root / "authors", block_counts=BLOCK_COUNTS, window_size=WINDOW_SIZE)
    reference = VideoNSAForConditionalGeneration.from_pretrained(videonsa).eval()
    inputs = video_prompt(SEGMENTS)
    with torch.no_grad():
        default = reference(**inputs).logits
        reference.config.nsa_block_count, reference.config.nsa_window_size = BLOCK_COUNTS, WINDOW_SIZE
        expected = reference(**inputs).logits
    assert not torch.allclose(default, expected)  # the settings matter for this prompt
    return dict(videonsa=videonsa, authors=authors, reference=reference, inputs=inputs, expected=expected)


def test_from_pretrained_reads_the_release_as_videonsa(release, caplog):
    model, info = VideoNSAForConditionalGeneration.from_pretrained(release["authors"], output_loading_info=True)
    assert not any(info.values()), info  # nothing missing (the gates load), unexpected or mismatched
    assert (model.config.nsa_block_count, model.config.nsa_window_size) == (BLOCK_COUNTS, WINDOW_SIZE)
    assert model.config.model_type == "videonsa" and not caplog.records  # no model-type or gate warning
    reference = release["reference"].state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**release["inputs"]).logits, release["expected"])
        generated = model.generate(**release["inputs"], max_new_tokens=2, do_sample=False)
    prompt = release["inputs"]["input_ids"].shape[1]
    assert generated.shape[1] > prompt and generated.shape[0] == 1
    assert generated[0, prompt].item() == release["expected"][0, -1].argmax().item()  # greedy: the prefill's argmax


def test_release_resaves_as_a_videonsa_checkpoint(release, tmp_path):
    model, processor = load_videonsa(str(release["authors"]))
    assert type(processor).__name__ == "VideoNSAProcessor" and processor.nsa_block_size == 64
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "videonsa" and "AutoModel" in config["auto_map"]
    assert (config["text_config"]["nsa_block_count"], config["text_config"]["nsa_window_size"]) == (2, 32)
    assert "block_counts" not in json.dumps(config)
    assert (tmp_path / "nsa_kernels" / "__init__.py").is_file() and (tmp_path / "modeling_videonsa.py").is_file()
    again = VideoNSAForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**release["inputs"]).logits, release["expected"])


def test_release_from_an_offline_hub_cache_as_enxin_videonsa(release, tmp_path):
    """What the entry points do with `--model Enxin/VideoNSA` while the Hub repo holds the authors' files; and what
    AutoModel does with it (plain Qwen2.5-VL, gates dropped), as the README says."""
    cache = tmp_path / "hub"
    populate_hub_cache(cache, release["authors"])
    torch.save(release["inputs"], tmp_path / "inputs.pt")
    job = dict(source=REPO_ID, inputs=str(tmp_path / "inputs.pt"), logits=str(tmp_path / "logits.pt"))
    env = dict(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    report = run_in_fresh_process(tmp_path, SCRIPT, job, env_extra=env)
    assert report["model"] == "VideoNSAForConditionalGeneration" and report["processor"] == "VideoNSAProcessor"
    assert (report["block_count"], report["window"]) == (BLOCK_COUNTS, WINDOW_SIZE)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), release["expected"])
    assert report["auto"] == "Qwen2_5_VLModel" and not report["auto_gates"]


def test_plain_qwen_checkpoint_warns_that_the_gates_are_untrained(release, tmp_path, caplog):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text((release["authors"] / "config.json").read_text())
    tensors = load_file(release["authors"] / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "g_proj" not in k}, plain / "model.safetensors",
              metadata={"format": "pt"})
    model = VideoNSAForConditionalGeneration.from_pretrained(plain)
    assert "no NSA gate MLPs for 8 tensors" in caplog.text and "untrained" in caplog.text
    attention = model.model.language_model.layers[0].self_attn
    # initialised as the authors started training: zero biases, so every gate is sigmoid(0) = 0.5 at a zero input
    assert not attention.g_proj_1.bias.any() and not attention.g_proj_2.bias.any()
    assert 0.01 < attention.g_proj_1.weight.std().item() < 0.03


def test_key_renaming_both_ways():
    pairs = {
        "model.layers.3.self_attn.g_proj_1.weight": "model.language_model.layers.3.self_attn.g_proj_1.weight",
        "model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
        "visual.merger.mlp.0.weight": "model.visual.merger.mlp.0.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for released, model in pairs.items():
        assert model_key(released) == model and released_key(model) == released
        assert model_key(model) == model  # the 5.x layout is the model's already


def test_checkpoint_layout(release):
    authors = json.loads((release["authors"] / "config.json").read_text())
    ours = json.loads((release["videonsa"] / "config.json").read_text())
    names = list(load_file(release["authors"] / "model.safetensors"))
    assert checkpoint_layout(authors, names) == "release"
    assert checkpoint_layout(authors, [n for n in names if "g_proj" not in n]) == "qwen2_5_vl"
    assert checkpoint_layout(ours, names) == "videonsa"
    with pytest.raises(ValueError, match="model_type 'llava': not a VideoNSA or Qwen2.5-VL checkpoint"):
        checkpoint_layout({"model_type": "llava"}, names)


def test_key_names_are_the_ones_loading_and_saving_use(release):
    """model_key / released_key against what transformers does: the keys save_pretrained wrote for the tiny model,
    and transformers' own Qwen2.5-VL renamings (an independent copy of the rule) on names at the edges of it."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import apply_renamings

    state = release["reference"].state_dict()
    written = set(load_file(release["videonsa"] / "model.safetensors"))
    assert {released_key(name) for name in state} == written
    assert {model_key(name) for name in written} == set(state)
    qwen = get_checkpoint_conversion_mapping("Qwen2VLForConditionalGeneration")
    saving = [renaming.reverse_transform() for renaming in reversed(qwen)]
    # a name that merely starts like a prefix is not under it ("visualizer" is not the vision tower); hub_name and
    # canonical_name of videonsa/hub, which these replace, got some of these wrong
    edges = ["visualizer.weight", "visual", "model_extra.weight", "model.visual_proj.weight",
             "model.language_model_x.weight", "model.norm.weight", "lm_head.weight"]
    for key in edges:
        assert model_key(key) == apply_renamings(key, qwen), key
        assert released_key(key) == apply_renamings(key, saving), key
    assert model_key("visualizer.weight") == "visualizer.weight"
    assert released_key("model.visual_proj.weight") == "model.visual_proj.weight"
