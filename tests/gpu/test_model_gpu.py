"""The whole VideoNSA model on CUDA: the Triton backend against the PyTorch path, forward, gradients, generate.

Run on a CUDA machine from the repository root: ``python -m pytest tests/gpu -q -s``. Skips without CUDA.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from videonsa.testing import tiny_config, video_prompt  # noqa: E402

HEAD_DIM = 64  # the kernels take head dim 64 or 128; 28 heads as in the 7B


def _model(backend, dtype):
    from modeling_videonsa import VideoNSAForConditionalGeneration

    config = tiny_config(
        num_layers=2, hidden_size=28 * HEAD_DIM, intermediate_size=256, nsa_block_size=64, nsa_block_count=4,
        nsa_window_size=128, nsa_backend=backend,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 8, 8], "rope_theta": 10000.0},
    )
    config.vision_config.out_hidden_size = 28 * HEAD_DIM
    torch.manual_seed(0)
    model = VideoNSAForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.g_proj_2.bias.normal_(0.0, 1.0)
    return model.to("cuda", dtype)


def _inputs():
    # 20 text | video of 8 x 16 x 16 patches = 512 tokens (8 blocks > 4 slots: selection has to choose) | 30 text
    return {k: v.cuda() for k, v in video_prompt([20, (8, 16, 16), 30]).items()}


@pytest.fixture(autouse=True)
def _no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def test_model_forward_triton_equals_torch_path_fp32():
    inputs = _inputs()
    logits = {}
    for backend in ("triton", "torch"):
        model = _model(backend, torch.float32)
        with torch.no_grad():
            logits[backend] = model(**inputs).logits
        assert model.model.language_model.layers[0].self_attn.last_path.startswith(
            "hybrid (triton NSA" if backend == "triton" else "hybrid (torch NSA"
        )
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)


def test_model_bf16_close_to_fp32_and_generates():
    inputs = _inputs()
    with torch.no_grad():
        reference = _model("torch", torch.float32)(**inputs).logits
        model = _model("triton", torch.bfloat16)
        logits = model(**inputs).logits.float()
        error = (logits - reference).abs().max() / reference.abs().max()
        print(f"\nwhole model bf16 triton vs fp32 torch: max error {error:.2e} of the largest logit")
        assert error < 5e-2
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8


def test_model_gradients_triton_equal_torch_path():
    inputs = _inputs()
    grads = {}
    for backend in ("triton", "torch"):
        model = _model(backend, torch.float32).train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        attention = model.model.language_model.layers[0].self_attn
        grads[backend] = [getattr(attention, n).weight.grad for n in ("q_proj", "k_proj", "v_proj", "g_proj_2")]
    for got, want in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-5)
