"""The vision tower's batched attention (VideoNSAVisionAttention) against Qwen2.5-VL's per-segment loop, and its
padded MLP (VideoNSAVisionMLP) against Qwen2.5-VL's."""

import copy
from pathlib import Path

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLMLP

import modeling_videonsa
from videonsa.testing import PATCH_DIM, tiny_config

# (t, h, w) grids in patches. The window is 56 px = 4 x 4 patches (2 x 2 merged tokens), so grids whose merged
# height or width is odd have partial windows at their edges: segments of 16, 8 and 4 patches in the windowed
# layers, and of 24, 48, 4 and 32 patches (one per temporal patch) in the full-attention layer.
GRIDS = [(3, 4, 6), (1, 6, 8), (1, 2, 2), (2, 8, 4), (2, 4, 6)]
FULL_ATTENTION_LAYER = 1
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="no CUDA device")])]


def tiny_vision_model(implementation: str, seed: int = 0):
    """A tiny VideoNSA model with a 3-block vision tower: windowed, full, windowed attention."""
    config = tiny_config(num_layers=1)
    config.vision_config.depth = 3
    config.vision_config.fullatt_block_indexes = [FULL_ATTENTION_LAYER]
    torch.manual_seed(seed)
    model = modeling_videonsa.VideoNSAForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    return model


def stock_twin(visual):
    """transformers' Qwen2.5-VL vision tower with the same weights and attention implementation."""
    stock = Qwen2_5_VisionTransformerPretrainedModel._from_config(
        copy.deepcopy(visual.config), attn_implementation=visual.config._attn_implementation
    ).eval()
    stock.load_state_dict(visual.state_dict(), strict=True)
    return stock.to(visual.device)


def pixels_and_grid(seed: int = 0, grids=GRIDS):
    generator = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(dim=1).sum()), PATCH_DIM, generator=generator)
    return pixels, grid


def test_vision_tower_uses_the_batched_attention_with_unchanged_keys():
    model = tiny_vision_model("sdpa")
    visual = model.model.visual
    assert isinstance(visual, modeling_videonsa.VideoNSAVisionTransformer)
    assert all(isinstance(block.attn, modeling_videonsa.VideoNSAVisionAttention) for block in visual.blocks)
    assert all(isinstance(block.mlp, modeling_videonsa.VideoNSAVisionMLP) for block in visual.blocks)
    assert visual.config.intermediate_size % modeling_videonsa._ROW_ALIGNMENT != 0  # the padded path is the one tested
    assert set(visual.state_dict()) == set(stock_twin(visual).state_dict())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("grids", [GRIDS, [(2, 8, 4), (1, 4, 8)]], ids=["edge windows", "whole windows"])
def test_vision_tower_equals_qwen25vl_per_segment_attention(implementation, device, grids, monkeypatch):
    """Every segment as its own call (transformers) against the batches: gathered where windows are cut at the
    frames' edges, views where every segment lies end to end (whole windows: one call per layer)."""
    # transformers' patch embedding is a convolution, which cuDNN runs in TF32 unless told not to; ours is a float32
    # matrix product
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    visual = tiny_vision_model(implementation).model.visual.to(device)
    stock = stock_twin(visual)
    assert visual.config._attn_implementation == stock.config._attn_implementation == implementation
    pixels, grid = (tensor.to(device) for tensor in pixels_and_grid(grids=grids))
    with torch.no_grad():
        ours, theirs = visual(pixels, grid_thw=grid), stock(pixels, grid_thw=grid)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-4}  # other kernels
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, **tolerance)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, **tolerance)


def test_one_attention_call_per_segment_length(monkeypatch):
    """The windowed layers have segments of 16, 8 and 4 patches, the full one of 24, 48, 4, 32: 3 + 4 + 3 calls
    (the per-segment loop makes one call per window and per temporal patch)."""
    visual = tiny_vision_model("sdpa").model.visual
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(query, *args, **kwargs):
        calls.append(tuple(query.shape))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    pixels, grid = pixels_and_grid()
    with torch.no_grad():
        visual(pixels, grid_thw=grid)
    assert len(calls) == 10
    full_lengths = sorted(shape[2] for shape in calls[3:7])
    assert full_lengths == [4, 24, 32, 48] and sorted(shape[2] for shape in calls[:3]) == [4, 8, 16]
    segments = sum(shape[0] for shape in calls[3:7])
    assert segments == int(grid[:, 0].sum())  # one segment per temporal patch in the full-attention layer


def test_segments_end_to_end_are_slices_others_indices(monkeypatch):
    """A call's segments are a slice of the packed rows where they lie end to end, else ``[segments, length]``
    indices; groups come shortest first, split by the bound on scores per call."""
    def calls(bounds):
        return [(rows if isinstance(rows, slice) else rows.tolist(), length) for rows, length in
                modeling_videonsa._equal_length_segments(torch.tensor(bounds), 2, torch.device("cpu"))]

    assert calls([0, 4, 8, 12]) == [(slice(0, 12), 4)]
    assert calls([0, 4, 8, 10, 14, 14]) == [(slice(8, 10), 2), ([[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13]], 4)]
    monkeypatch.setattr(modeling_videonsa, "_VISION_SCORES_PER_CALL", 2 * 2 * 4 * 4)  # two segments of 4 per call
    assert calls([0, 4, 8, 12, 16, 18]) == [(slice(16, 18), 2), (slice(0, 8), 4), (slice(8, 16), 4)]


def test_segments_planned_once_per_pass_and_kind(monkeypatch):
    """The windowed blocks share one plan, the full-attention block has its own: two plans per pass, each made anew
    in the next pass (a new video, new boundaries), also under ``torch.inference_mode`` (lmms-eval's, whose tensors
    have no version counter)."""
    visual = tiny_vision_model("sdpa").model.visual
    plans = []
    planner = modeling_videonsa._equal_length_segments
    monkeypatch.setattr(modeling_videonsa, "_equal_length_segments", lambda *args: plans.append(args) or planner(*args))
    stock = stock_twin(visual)
    for mode, seed, grids in ((torch.no_grad, 0, GRIDS), (torch.no_grad, 1, [(2, 8, 4)]),
                              (torch.inference_mode, 2, GRIDS)):
        pixels, grid = pixels_and_grid(seed, grids)
        plans.clear()
        with mode():
            ours, theirs = visual(pixels, grid_thw=grid).pooler_output, stock(pixels, grid_thw=grid).pooler_output
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert len(plans) == 2 and len({id(args[0]) for args in plans}) == 2, mode


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_bounded_batches_give_the_same_output(monkeypatch, implementation):
    """Groups split into several calls (the bound on scores per call) compute the same function."""
    visual = tiny_vision_model(implementation).model.visual
    pixels, grid = pixels_and_grid(seed=1)
    with torch.no_grad():
        whole = visual(pixels, grid_thw=grid).pooler_output
        monkeypatch.setattr(modeling_videonsa, "_VISION_SCORES_PER_CALL", 2 * 16 * 16 * 2)  # 2 windows per call
        split = visual(pixels, grid_thw=grid).pooler_output
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_gradients_match_qwen25vl():
    visual = tiny_vision_model("sdpa").model.visual.train()
    stock = stock_twin(visual).train()
    pixels, grid = pixels_and_grid(seed=2)
    weights = torch.randn(int(grid.prod(dim=1).sum()) // 4, visual.config.out_hidden_size)
    grads = []
    for tower in (visual, stock):
        inputs = pixels.clone().requires_grad_(True)
        (tower(inputs, grid_thw=grid).pooler_output * weights).sum().backward()
        qkv = tower.blocks[0].attn.qkv.weight.grad
        grads.append((inputs.grad, qkv, tower.blocks[FULL_ATTENTION_LAYER].attn.qkv.weight.grad))
    for ours, theirs in zip(*grads):
        assert ours is not None and torch.isfinite(ours).all() and ours.abs().sum() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_video_features_of_the_model_equal_qwen25vl():
    """Through the model's own entry point (``get_video_features``), as the prefill uses it."""
    model = tiny_vision_model("sdpa")
    stock = stock_twin(model.model.visual)
    pixels, grid = pixels_and_grid(seed=3)
    with torch.no_grad():
        features = model.model.get_video_features(pixels, grid, return_dict=True).pooler_output
        expected = stock(pixels, grid_thw=grid).pooler_output
    torch.testing.assert_close(torch.cat(features), expected, rtol=1e-5, atol=1e-5)


def test_video_features_in_pieces_of_temporal_patches_equal_one_call():
    """videonsa.long_context.video_features cuts videos between temporal patches: exact with windowed layers too
    (windows, rotary positions and full-attention segments are all per temporal patch)."""
    from videonsa.long_context import video_features

    model = tiny_vision_model("sdpa")
    pixels, grid = pixels_and_grid(seed=4)
    with torch.no_grad():
        whole = video_features(model, pixels, grid, max_tokens=None)
        pieces = video_features(model, pixels, grid, max_tokens=6)  # one temporal patch per piece
    assert whole.shape == (int(grid.prod(dim=1).sum()) // 4, model.config.vision_config.out_hidden_size)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [36, 3420 // 10, 40])  # padded by 4, by 6; already aligned
@pytest.mark.parametrize("bias", [True, False])
def test_padded_vision_mlp_equals_qwen25vl_mlp(width, bias, device):
    """Same outputs and same parameter gradients as Qwen2.5-VL's MLP with the same weights, over random inputs."""
    config = tiny_config().vision_config
    config.intermediate_size = width
    torch.manual_seed(width)
    ours = modeling_videonsa.VideoNSAVisionMLP(config, bias=bias).to(device)
    theirs = Qwen2_5_VLMLP(config, bias=bias).to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    inputs = torch.randn(5, 7, config.hidden_size, device=device)
    weights = torch.randn(5, 7, config.hidden_size, device=device)
    outputs = []
    for mlp in (ours, theirs):
        out = mlp(inputs)
        (out * weights).sum().backward()
        outputs.append((out, *(p.grad for p in mlp.parameters())))
    assert outputs[0][0].shape == inputs.shape
    for mine, expected in zip(*outputs):
        assert mine.shape == expected.shape and expected.abs().sum() > 0
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-5)


class _DoubledLinear(torch.nn.Linear):
    """A wrapped projection (as a PEFT adapter or a quantized Linear is): it computes more than its weight."""

    def forward(self, inputs):
        return 2 * super().forward(inputs)


def test_padded_vision_mlp_calls_wrapped_projections():
    config = tiny_config().vision_config
    torch.manual_seed(0)
    ours = modeling_videonsa.VideoNSAVisionMLP(config, bias=True)
    theirs = Qwen2_5_VLMLP(config, bias=True)
    theirs.load_state_dict(ours.state_dict())
    for mlp in (ours, theirs):
        doubled = _DoubledLinear(config.hidden_size, config.intermediate_size)
        doubled.load_state_dict(mlp.up_proj.state_dict())
        mlp.up_proj = doubled
    inputs = torch.randn(3, config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs), theirs(inputs))
        plain = Qwen2_5_VLMLP(config, bias=True)
        plain.load_state_dict(theirs.state_dict())  # same weights, plain up_proj: a different function
        assert not torch.allclose(ours(inputs), plain(inputs))


def test_tower_arithmetic_of_the_benchmark_counts_every_product(monkeypatch):
    """``bench/bench_vision.py``'s ``tower_flops`` (the floor it states) equals torch's own count of the tower's
    matrix products, convolution and attention (FlopCounterMode on transformers' tower, eager attention so that
    every score and weighted sum is a counted product): windowed and full-attention blocks, a video of square
    frames whose windows tile them."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_vision

    config = tiny_config(num_layers=1).vision_config
    config.depth, config.fullatt_block_indexes = 3, [FULL_ATTENTION_LAYER]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).eval()
    for steps, side in ((2, 8), (1, 4)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            tower(torch.randn(steps * side * side, PATCH_DIM), grid_thw=torch.tensor([[steps, side, side]]))
        assert bench_vision.tower_flops(config, steps, side) == counter.get_total_flops(), (steps, side)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_kernels_are_transformers_on_cuda(dtype, monkeypatch):
    """On CUDA, ``nsa_kernels.vision`` at the 7B tower's sizes against transformers' operations:

    * the rotary embedding (16 heads of 80, q and k the strided views of the qkv product) and ``silu(gate) * up``
      (the padded MLP's 2 x 3,424 product) bit for bit;
    * RMSNorm over 1,280: in bfloat16 within one unit of the last place (its sum of squares in another order),
      nearly all equal; in float32 within four;
    * the tiny tower without gradients, which takes all three, against the same tower on transformers' operations
      (``set_fast_path(False)``), each kernel called."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm, apply_rotary_pos_emb_vision

    from nsa_kernels import vision

    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, _ = (torch.randn(5000, 3, 16, 80, device="cuda", generator=generator) * 4).to(dtype).unbind(1)
    angles = torch.rand(5000, 40, device="cuda", generator=generator) * 60
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    for ours, theirs in zip(vision.apply_rotary_pos_emb_vision(q, k, cos, sin),
                            apply_rotary_pos_emb_vision(q, k, cos, sin)):
        assert torch.equal(ours, theirs)
    gate_up = (torch.randn(3000, 2 * 3424, device="cuda", generator=generator) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(vision.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up)
    norm = Qwen2_5_VLRMSNorm(1280).to("cuda", dtype)
    norm.weight.data = torch.rand(1280, device="cuda", generator=generator).to(dtype) + 0.5
    x = (torch.randn(3000, 1280, device="cuda", generator=generator) * 3).to(dtype)
    with torch.no_grad():
        ours, theirs = vision.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x)
    ulps = (ours.float() - theirs.float()).abs() / (theirs.float().abs() * torch.finfo(dtype).eps)
    assert ours.dtype == theirs.dtype
    if dtype == torch.float32:  # the sum's order and the approximate rsqrt (torch's too) in float32's last bits
        assert ulps.max() <= 4
    else:  # rounded to bfloat16, nearly always to the same value
        assert ulps.max() <= 1 and (ours == theirs).float().mean() > 0.99

    calls = []
    for name in ("apply_rotary_pos_emb_vision", "rms_norm", "silu_and_mul"):
        def counted(*args, _fn=getattr(vision, name), _name=name):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setattr(vision, name, counted)
    visual = tiny_vision_model("sdpa").model.visual.to("cuda", dtype)
    pixels, grid = pixels_and_grid()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # transformers' patch embedding, a convolution
    with torch.no_grad():
        outputs = []
        for fast in (True, False):
            visual.set_fast_path(fast)
            outputs.append(visual(pixels.to("cuda", dtype), grid_thw=grid.to("cuda")).pooler_output)
    assert set(calls) == {"apply_rotary_pos_emb_vision", "rms_norm", "silu_and_mul"}
    assert calls.count("rms_norm") == 2 * len(visual.blocks) + 1  # each block's two norms and the merger's
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(*outputs, **tolerance)
