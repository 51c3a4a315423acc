"""videonsa.analysis on tiny models: hand-computed gates, budgets, sinks and frames; the plots; the CLI."""

import json
import math

import pytest
import torch

from nsa_kernels import reference
from videonsa.testing import build_tiny_checkpoint, tiny_model, video_prompt, write_video
from videonsa.analysis import (
    analyze,
    block_to_frames,
    budget_from_block_indices,
    nominal_budget,
    plot_budget,
    video_spans,
    write_report,
)
from videonsa.analysis.cli import main

# 3 text | vision start | video of 3 temporal patches x 16 tokens (positions 4..51) | vision end | 3 text: 56 tokens,
# 4 NSA blocks of 16 <= 4 slots, so selection keeps every candidate block.
CRAFTED = [3, (3, 8, 8), 3]
BLOCK, SLOTS, WINDOW, TEMPERATURE = 16, 4, 32, 0.3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def crafted_model(num_layers=2):
    """Keys are all zero (so every branch attends uniformly over what it sees) and the gates are constants."""
    model = tiny_model(num_layers=num_layers, nsa_block_count=SLOTS, nsa_window_size=WINDOW)
    biases = []
    with torch.no_grad():
        for index, layer in enumerate(model.model.language_model.layers):
            attention = layer.self_attn
            attention.k_proj.weight.zero_()
            attention.k_proj.bias.zero_()
            attention.g_proj_2.weight.zero_()
            bias = torch.linspace(-1.0, 1.0, 3 * 28).roll(17 * index).view(28, 3) * (index + 1) * 0.5
            attention.g_proj_2.bias.copy_(bias.flatten())
            biases.append(bias)
    return model, biases


def crafted_inputs(model):
    inputs = video_prompt(CRAFTED)
    inputs["second_per_grid_ts"] = torch.tensor([1.0])  # 1 s per temporal patch: frames every 0.5 s
    position_ids, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"]
    )
    vision = torch.nonzero(reference.token_is_vision(position_ids)[0]).flatten().tolist()
    return inputs, vision


def expected_sink_weights(t, length, sink):
    """Uniform attention in every branch (zero keys), by hand: (compression, selection, window, dense)."""
    num_blocks = math.ceil(length / BLOCK)
    sink_tokens = 1 if sink == "token" else BLOCK
    # compression: blocks c >= t // 16 seen uniformly; block 0 holds the sink tokens, a share sink_tokens / 16
    compression = (sink_tokens / BLOCK) / (num_blocks - t // BLOCK) if t // BLOCK == 0 else 0.0
    selection = min(t + 1, sink_tokens) / (t + 1)  # every block kept: uniform over keys 0..t
    seen = range(max(0, t - WINDOW + 1), t + 1)
    window = sum(1 for key in seen if key < sink_tokens) / len(seen)
    return compression, selection, window, min(t + 1, sink_tokens) / (t + 1)


@pytest.mark.parametrize("sink, threshold", [("token", 0.0537), ("block", 0.43)])
def test_gates_budget_and_sinks_match_hand_computed_values(sink, threshold):
    model, biases = crafted_model()
    inputs, vision = crafted_inputs(model)
    length = inputs["input_ids"].shape[1]
    result = analyze(model, inputs, sink=sink, sink_threshold=threshold, compare_dense=True, keep_per_query=True)
    assert result.layers == [0, 1] and result.vision_positions.tolist() == vision

    # gates: the same constant at every vision query
    expected_gates = torch.stack([torch.sigmoid(b / TEMPERATURE) for b in biases])
    torch.testing.assert_close(result.gate_means(), expected_gates)

    # budget: compression 4 - t//16 blocks, selection every token 0..t (all blocks kept), window min(32, t + 1)
    budget = result.budget()
    for i, t in enumerate(vision):
        assert budget["compression"][i] == math.ceil(length / BLOCK) - t // BLOCK
        assert budget["selection"][i] == t + 1
        assert budget["window"][i] == min(WINDOW, t + 1)
        assert budget["dense"][i] == t + 1
    totals = [(math.ceil(length / BLOCK) - t // BLOCK) + (t + 1) + min(WINDOW, t + 1) for t in vision]
    summary = result.budget_summary()
    assert summary["total_ratio"] == pytest.approx(sum(totals) / sum(t + 1 for t in vision))
    assert summary["mean_ratio"] == pytest.approx(sum(b / (t + 1) for b, t in zip(totals, vision)) / len(vision))
    assert summary["last_query_ratio"] == pytest.approx(totals[-1] / (vision[-1] + 1))

    # sinks: per query and head, then the ratio at the threshold
    expected = torch.zeros(2, len(vision), 28, 4)
    dense = torch.zeros(2, len(vision), 28)
    for layer, bias in enumerate(biases):
        gates = torch.sigmoid(bias / TEMPERATURE).double()  # [28, 3]
        for i, t in enumerate(vision):
            cmp, slc, win, dns = expected_sink_weights(t, length, sink)
            branch = torch.tensor([cmp, slc, win], dtype=torch.float64)
            expected[layer, i, :, :3] = branch.float()
            expected[layer, i, :, 3] = ((gates * branch).sum(-1) / gates.sum(-1)).float()
            dense[layer, i] = dns
    torch.testing.assert_close(result.sink_weights, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.dense_sink_weights, dense, rtol=1e-5, atol=1e-6)
    pairs = len(vision) * 28 * 2
    for column, branch in enumerate(["compression", "selection", "window", "gated"]):
        assert result.sink_ratio(branch) == pytest.approx(float((expected[..., column] > threshold).sum()) / pairs)
    assert result.sink_ratio("dense") == pytest.approx(float((dense > threshold).sum()) / pairs)
    per_layer = result.sink_ratio("gated", per_layer=True)
    expected_per_layer = [float((expected[layer, ..., 3] > threshold).sum()) / (pairs / 2) for layer in (0, 1)]
    assert per_layer == pytest.approx(expected_per_layer)
    assert 0 < result.sink_ratio("gated") < 1  # the threshold splits the crafted pairs


def test_selected_frames_are_the_kept_blocks_as_frames_and_seconds():
    model, _ = crafted_model(num_layers=1)
    inputs, vision = crafted_inputs(model)
    result = analyze(model, inputs, queries=[-5], query_times=[1.2])  # last video token; the patch at 1.0-2.0 s
    assert result.query_positions == [35, 51]  # 1.2 s -> temporal patch 1 -> its last token 4 + 2 * 16 - 1
    frames = result.selected_frames(51)
    assert frames["query"] == dict(position=51, video=0, temporal_patch=2, time=2.0)
    heads = frames["layers"][0]["kv_heads"]
    assert len(heads) == 4
    # block 3 (the query's own) scores 16 and leads; every earlier block is kept too (4 candidates, 4 slots)
    for head in heads:
        assert head[0]["block"] == 3 and sorted(entry["block"] for entry in head) == [0, 1, 2, 3]
    by_block = {entry["block"]: entry["frames"] for entry in heads[0]}

    def patch(step):
        return dict(video=0, temporal_patch=step, frames=[2 * step, 2 * step + 1], source_frames=None,
                    timestamps=[float(step), step + 0.5])

    assert by_block[0] == [patch(0)]  # tokens 0..15: video tokens 4..15
    assert by_block[1] == [patch(0), patch(1)]  # tokens 16..31: patch 0 ends at 19
    assert by_block[2] == [patch(1), patch(2)]  # tokens 32..47: patch 1 ends at 35
    assert by_block[3] == [patch(2)]  # tokens 48..63: patch 2 ends at 51
    steps, share = result.step_selection(51)
    assert steps == [(0, 0), (0, 1), (0, 2)] and torch.equal(share, torch.ones(1, 3))
    earlier = result.selected_frames(35)["layers"][0]["kv_heads"][0]
    assert sorted(entry["block"] for entry in earlier) == [0, 1, 2]  # block 3 starts after position 35


def test_analysis_blocks_and_gates_are_the_models_own():
    """On a random model, the selection recorded for every vision query is the one the layer's hybrid attention
    computes (reference.hybrid_attention's intermediates on the layer's own q/k/v/gates)."""
    model = tiny_model(num_layers=1, nsa_block_count=2)
    inputs = video_prompt([4, (6, 4, 8), 5])  # 59 tokens, 4 blocks of 16 > 2 slots: a real top-k
    captured = {}
    attention = model.model.language_model.layers[0].self_attn

    def capture(module, args, kwargs, output):
        captured.update(hidden=kwargs["hidden_states"], emb=kwargs["position_embeddings"],
                        vision=kwargs["videonsa_tokens"].is_vision)

    handle = attention.register_forward_hook(capture, with_kwargs=True)
    positions = list(range(inputs["input_ids"].shape[1]))
    try:
        result = analyze(model, inputs, queries=positions)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    with torch.no_grad():
        q, k, v = attention.project_qkv(hidden, captured["emb"])
        _, inter = reference.hybrid_attention(q, k, v, attention.gate_logits(hidden), captured["vision"],
                                              block_size=16, block_count=2, window_size=32, return_intermediates=True)
    blocks = inter[0]["block_indices"][0]
    for p in positions:
        assert torch.equal(result.query_blocks[p][0], blocks[p]), p
    rows = result.vision_positions
    torch.testing.assert_close(result.gates[0], inter[0]["gates64"][0, rows, :28].mean(dim=0))
    expected_budget = budget_from_block_indices(blocks[rows], rows, len(positions), 16, 32)
    torch.testing.assert_close(result.budget()["selection"], expected_budget["selection"])


def test_budget_from_block_indices_counts_the_keys_each_branch_reads():
    positions = torch.tensor([5, 20, 40])
    blocks = torch.tensor([
        [[0, -1], [0, -1]],  # t=5: its own block, 6 tokens
        [[1, 0], [0, 1]],  # t=20: 5 tokens of block 1 + 16 of block 0
        [[2, 0], [1, 0]],  # t=40: kv head 0: 9 + 16, kv head 1: 16 + 16
    ])
    budget = budget_from_block_indices(blocks, positions, num_keys=64, block_size=16, window_size=8)
    assert budget["compression"].tolist() == [4, 3, 2]  # ceil(64 / 16) - t // 16
    assert budget["selection"].tolist() == [6, 21, 28.5]
    assert budget["window"].tolist() == [6, 8, 8]
    assert budget["dense"].tolist() == [6, 21, 41]
    assert budget["total"].tolist() == [16, 32, 38.5]


def test_nominal_budget_by_hand():
    # 8 tokens, blocks of 2, 2 slots, window 3
    reads = []
    for t in range(8):
        compression = 4 - t // 2
        selection = t + 1 if t // 2 < 2 else 2 + t % 2 + 1  # one earlier full block + the own block so far
        reads.append(compression + selection + min(3, t + 1))
    nominal = nominal_budget(8, block_size=2, block_count=2, window_size=3)
    assert nominal["total_ratio"] == pytest.approx(sum(reads) / sum(range(1, 9)))
    assert nominal["mean_ratio"] == pytest.approx(sum(r / (t + 1) for t, r in enumerate(reads)) / 8)
    assert nominal["last_query_ratio"] == pytest.approx(reads[-1] / 8)
    assert nominal["last_query"] == dict(compression=1, selection=4, window=3)
    released = nominal_budget(131072)
    assert released["last_query_keys"] == 1 + 32 * 64 + 256
    assert released["paper_prose_last_query_ratio"] == pytest.approx((2048 + 2048 + 256) / 131072)


def test_video_spans_and_block_frames_with_plans_and_two_videos():
    ids = torch.tensor([7, 992] + [991] * 8 + [993, 992] + [991] * 4 + [993])
    grid = torch.tensor([[2, 4, 4], [1, 4, 4]])

    class Plan:  # what processor.plan_videos returns, reduced to what is read
        def __init__(self, frames, fps):
            self.frame_indices, self.timestamps = frames, [f / fps for f in frames]

    plans = [Plan([0, 10, 20], 10.0), Plan([3, 9], 6.0)]  # the first video has 3 frames: its last patch is padded
    spans = video_spans(ids, grid, video_token_id=991, plans=plans)
    assert [(s.start, s.num_tokens, s.tokens_per_step) for s in spans] == [(2, 8, 4), (12, 4, 4)]
    found = block_to_frames(0, spans, block_size=8)  # tokens 0..7: video 0, patches 0 and 1
    assert found == [
        dict(video=0, temporal_patch=0, frames=[0, 1], source_frames=[0, 10], timestamps=[0.0, 1.0]),
        dict(video=0, temporal_patch=1, frames=[2], source_frames=[20], timestamps=[2.0]),
    ]
    assert block_to_frames(1, spans, block_size=8)[-1] == dict(
        video=1, temporal_patch=0, frames=[0, 1], source_frames=[3, 9], timestamps=[0.5, 1.5]
    )
    with pytest.raises(ValueError, match="runs of video tokens"):
        video_spans(ids, grid[:1], video_token_id=991)


def _assert_png(path):
    from PIL import Image

    with open(path, "rb") as file:
        assert file.read(8) == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_report_writes_valid_pngs_and_a_summary(tmp_path):
    model = tiny_model(num_layers=2)
    inputs = video_prompt([4, (6, 4, 8), 5])
    inputs["second_per_grid_ts"] = torch.tensor([0.5])
    result = analyze(model, inputs, compare_dense=True)
    paths = write_report(result, tmp_path / "report", extra={"video": "synthetic"})
    for name in ("gates", "budget", "sinks", "selected_frames"):
        _assert_png(paths[name])
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["video"] == "synthetic" and summary["num_tokens"] == inputs["input_ids"].shape[1]
    assert set(summary["sinks"]["ratio"]) == {"compression", "selection", "window", "gated", "dense"}
    assert len(summary["gates"]["per_layer_head"]) == 2 and summary["budget"]["total_ratio"] > 0
    assert list(summary["selection"]) == [str(result.query_positions[0])]
    _assert_png(plot_budget(None, tmp_path / "nominal.png"))  # the nominal curve alone, released settings


def test_text_only_prompt_has_nothing_to_analyse():
    with pytest.raises(ValueError, match="nothing to analyse"):
        analyze(tiny_model(num_layers=1), video_prompt([12]))


def test_cli_on_a_video_file(tmp_path, capsys):
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny")
    video = write_video(tmp_path / "clip.mp4", num_frames=20, fps=8, width=224, height=224)
    out = tmp_path / "analysis"
    paths = main(["--model", checkpoint, "--video", video, "--out", str(out), "--query-time", "1.0",
                  "--compare-dense", "--device", "cpu"])
    for name in ("gates", "budget", "sinks", "selected_frames"):
        _assert_png(paths[name])
    summary = json.loads((out / "summary.json").read_text())
    # 20 frames at 8 fps sampled at 4 fps: 10 frames, 5 temporal patches of 64 tokens (one block each)
    assert summary["videos"][0]["grid_thw"] == [5, 16, 16] and summary["videos"][0]["num_tokens"] == 320
    assert summary["nsa"] == dict(block_size=64, block_count=32, window_size=256)
    queries = list(summary["selection"].values())
    assert [q["query"]["time"] for q in queries] == [1.0, 2.0]  # --query-time 1.0, and the last video token
    first = queries[0]["layers"][0]["kv_heads"][0]
    assert first[0]["frames"][0]["source_frames"] is not None  # source frames from the processor's plan
    printed = capsys.readouterr().out
    assert "attention budget vs dense" in printed and "sink ratio" in printed
