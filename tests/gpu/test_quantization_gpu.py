"""Quantized VideoNSA on CUDA: FP8 (``FineGrainedFP8Config``, the Hub kernel transformers loads) and bitsandbytes NF4,
with the Triton NSA backend on the quantized projections, against the bf16 model.

Run on a CUDA machine from the repository root: ``python -m pytest tests/gpu -q -s``. Skips without CUDA; the FP8
tests skip below compute capability 8.9 and the NF4 one without bitsandbytes. The weights that get quantized are put
on the quantization grid first (FP8: 128 x 128 tiles with a power-of-two scale, exact in bf16; NF4: blocks of 64),
so the remaining error is the backend's arithmetic (FP8 also quantizes the activations, per 128 values of a token).
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from modeling_videonsa import UNQUANTIZED_MODULES, VideoNSAForConditionalGeneration  # noqa: E402
from test_quantization import assert_default_split  # noqa: E402 (tests/ is on sys.path: tests/conftest.py)
from videonsa.loading import quantization_config  # noqa: E402
from videonsa.testing import on_quantization_grid, tiny_model, video_prompt  # noqa: E402

HEAD_DIM = 64  # the NSA kernels take head dim 64 or 128; 28 heads as in the 7B; widths are multiples of 128
TEXT = dict(hidden_size=28 * HEAD_DIM, intermediate_size=256, nsa_block_size=64, nsa_block_count=4,
            nsa_window_size=128, rope_parameters={"rope_type": "default", "mrope_section": [16, 8, 8],
                                                  "rope_theta": 10000.0})
PROMPT = [20, (4, 16, 16), 10]  # 256 video tokens: 4 NSA blocks
NEW_TOKENS = 4
# Of the largest |logit| (~3). A CPU emulation of the FP8 scheme measured ~8% with off-grid weights.
RELATIVE_TOL = {"fp8": 0.12, "nf4": 0.05}
HAS_FP8 = torch.cuda.get_device_capability() >= (8, 9)


def _require(mode):
    if mode == "fp8" and not HAS_FP8:
        pytest.skip(f"{torch.cuda.get_device_name()} has no FP8 (compute capability < 8.9)")
    if mode == "fp8":
        from transformers.utils.import_utils import is_kernels_available

        if not is_kernels_available():
            pytest.skip("transformers' FP8 matmul is the Hub kernel kernels-community/finegrained-fp8, loaded through "
                        "the `kernels` package, which this machine lacks (and it cannot reach the Hub)")
    if mode == "nf4":
        pytest.importorskip("bitsandbytes")


def _load(folder, mode=None):
    kwargs = {} if mode is None else {"quantization_config": quantization_config(mode, torch.bfloat16)}
    return VideoNSAForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda",
                                                            **kwargs).eval()


def _assert_default_split(model, mode):
    assert_default_split(model, mode)
    config = model.config.quantization_config
    assert getattr(config, "modules_to_not_convert" if mode == "fp8" else "llm_int8_skip_modules") == \
        list(UNQUANTIZED_MODULES)


@pytest.mark.parametrize("mode", ["fp8", "nf4"])
def test_quantized_model_on_cuda_matches_bf16(tmp_path, mode):
    _require(mode)
    on_quantization_grid(tiny_model(**TEXT), mode).save_pretrained(tmp_path)
    reference, model = _load(tmp_path), _load(tmp_path, mode)
    _assert_default_split(model, mode)
    inputs = {k: v.cuda() for k, v in video_prompt(PROMPT, seed=0).items()}
    with torch.no_grad():
        expected, got = reference(**inputs).logits.float(), model(**inputs).logits.float()
    assert {layer.self_attn.last_path.split(" +")[0] for layer in model.model.language_model.layers} == \
        {"hybrid (triton NSA"}
    error = (got - expected).abs().max() / expected.abs().max()
    print(f"\n{mode}: prefill logits off by {error:.4f} of the largest logit")
    assert torch.isfinite(got).all() and error < RELATIVE_TOL[mode]

    # Greedy: both models generate; while their answers agree, every step's logits must be within the tolerance,
    # and they may part only at a step where the reference's margin (top-1 minus top-2) is within twice the
    # tolerance, where the tolerance allows either token. Prompts are taken until enough steps were compared.
    compared = 0
    for seed in range(8):
        inputs = {k: v.cuda() for k, v in video_prompt(PROMPT, seed=seed).items()}
        answers = [m.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True) for m in (reference, model)]
        (tokens, logits), (got_tokens, got_logits) = [
            (a.sequences[0, -NEW_TOKENS:], torch.stack(a.logits)[:, 0].float()) for a in answers]
        tolerance = RELATIVE_TOL[mode] * logits.abs().max()
        for step in range(NEW_TOKENS):
            assert (got_logits[step] - logits[step]).abs().max() <= tolerance, f"prompt {seed}, step {step}"
            compared += 1
            if got_tokens[step] != tokens[step]:
                top2 = logits[step].topk(2).values
                assert top2[0] - top2[1] <= 2 * tolerance, f"prompt {seed}, step {step}: a confident token changed"
                break
        if compared >= 2 * NEW_TOKENS:
            break
    print(f"{mode}: {compared} generated steps compared")
    assert compared >= 2 * NEW_TOKENS
