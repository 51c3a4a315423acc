"""The entry points (demo, analysis, the lmms-eval model through ``load_checkpoint``) on a checkpoint in the authors'
release layout: it loads as VideoNSA, with its gate MLPs and NSA settings, and the video prefill runs the hybrid
attention. A checkpoint in this package's layout still loads through AutoModel with its own code."""

import json
import re

import pytest
from safetensors.torch import load_file

import modeling_videonsa
from hub_utils import write_authors_checkpoint
from videonsa import demo, loading
from videonsa.analysis import cli as analysis_cli
from videonsa.testing import build_tiny_checkpoint, write_video

BLOCK_COUNTS, WINDOW_SIZE = 2, 32  # not the defaults (32, 256): reading them from the release's config is visible


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("entry")
    videonsa = build_tiny_checkpoint(root / "videonsa")
    authors = write_authors_checkpoint(videonsa, root / "authors", block_counts=BLOCK_COUNTS, window_size=WINDOW_SIZE)
    video = write_video(root / "clip.mp4", num_frames=20, fps=8, width=224, height=224)
    return dict(videonsa=videonsa, authors=authors, video=str(video))


def assert_is_the_release(model, authors):
    """VideoNSA (this package's class), with the release's settings and every tensor of its file, gates included."""
    assert type(model) is modeling_videonsa.VideoNSAForConditionalGeneration
    assert (model.config.nsa_block_count, model.config.nsa_window_size) == (BLOCK_COUNTS, WINDOW_SIZE)
    written = load_file(authors / "model.safetensors")
    state = model.state_dict()
    gates = [name for name in written if modeling_videonsa.is_gate_key(name)]
    assert gates and len(written) == len(state)
    for name, tensor in written.items():
        assert (state[modeling_videonsa.model_key(name)].cpu() == tensor).all(), name


@pytest.fixture
def loaded(monkeypatch):
    """Records what the entry points' loader returned."""
    models, load = [], loading.load_checkpoint

    def recording(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        models.append(model)
        return model, processor

    monkeypatch.setattr(loading, "load_checkpoint", recording)
    monkeypatch.setattr(demo, "load_checkpoint", recording)
    return models


def test_load_checkpoint_by_layout(folders, caplog):
    model, processor = loading.load_checkpoint(str(folders["authors"]))
    assert_is_the_release(model, folders["authors"])
    assert type(processor).__name__ == "VideoNSAProcessor" and processor.nsa_block_size == 64
    assert "no NSA gate MLPs" not in caplog.text
    # this package's layout: AutoModel with the checkpoint's own code, as from the Hub
    ours, processor = loading.load_checkpoint(str(folders["videonsa"]))
    assert type(ours).__name__ == "VideoNSAForConditionalGeneration"
    assert type(ours).__module__.startswith("transformers_modules") and type(processor).__name__ == "VideoNSAProcessor"


def test_demo_runs_the_release_as_videonsa(folders, loaded, capsys):
    demo.main(["--model", str(folders["authors"]), "--video", folders["video"], "--max-new-tokens", "2",
               "--device", "cpu", "--dtype", "float32"])
    (model,) = loaded
    assert_is_the_release(model, folders["authors"])
    printed = capsys.readouterr().out
    assert "Loaded VideoNSAForConditionalGeneration" in printed
    num_layers = model.config.text_config.num_hidden_layers
    # the video prefill: every layer hybrid (NSA for the video tokens); the answer then decodes densely
    assert re.search(rf"pass 0 \(\d+ tokens\): {num_layers} layers hybrid \(", printed), printed


def test_analysis_runs_the_release_as_videonsa(folders, loaded, tmp_path):
    out = tmp_path / "analysis"
    analysis_cli.main(["--model", str(folders["authors"]), "--video", folders["video"], "--out", str(out),
                       "--device", "cpu"])
    (model,) = loaded
    assert_is_the_release(model, folders["authors"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nsa"] == dict(block_size=64, block_count=BLOCK_COUNTS, window_size=WINDOW_SIZE)
    assert summary["videos"][0]["num_tokens"] == 320


def test_training_loads_the_release_as_videonsa(folders, tmp_path):
    """videonsa-train's loader (VideoNSAConfig / VideoNSAForConditionalGeneration.from_pretrained) reads the release
    as VideoNSA already; this keeps it so."""
    from transformers import TrainingArguments

    from videonsa.training.arguments import ModelArguments
    from videonsa.training.model import load_model_and_processor

    model, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(folders["authors"])),
                                                TrainingArguments(output_dir=str(tmp_path)), init_device="cpu")
    assert_is_the_release(model, folders["authors"])
    assert type(processor).__name__ == "VideoNSAProcessor"
