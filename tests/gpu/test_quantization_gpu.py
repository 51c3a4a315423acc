"""Quantized VideoNSA on CUDA: FP8 (``FineGrainedFP8Config``, transformers' Triton kernels) and bitsandbytes NF4,
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


def _config(mode):
    from transformers import BitsAndBytesConfig, FineGrainedFP8Config

    if mode == "fp8":
        return FineGrainedFP8Config()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def _require(mode):
    if mode == "fp8" and not HAS_FP8:
        pytest.skip(f"{torch.cuda.get_device_name()} has no FP8 (compute capability < 8.9)")
    if mode == "nf4":
        pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_gpu")
    result = {}
    for mode in ("fp8", "nf4"):
        if (mode == "fp8" and not HAS_FP8) or (mode == "nf4" and not _bnb_importable()):
            continue
        on_quantization_grid(tiny_model(**TEXT), mode).save_pretrained(root / mode)
        result[mode] = str(root / mode)
    return result


def _bnb_importable():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _load(folder, mode=None):
    kwargs = {} if mode is None else {"quantization_config": _config(mode)}
    return VideoNSAForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda",
                                                            **kwargs).eval()


def _assert_default_split(model, mode):
    quantized_type = "FP8Linear" if mode == "fp8" else "Linear4bit"
    types = {name: type(module).__name__ for name, module in model.named_modules()}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    decoder = {n for n in types if ".language_model.layers." in n and n.rsplit(".", 1)[-1] in projections}
    assert {n for n, t in types.items() if t == quantized_type} == decoder
    kept = [n for n in types if n == "lm_head" or n.endswith((".g_proj_1", ".g_proj_2"))]
    assert {types[n] for n in kept} == {"Linear"}
    assert not any(t == quantized_type for n, t in types.items() if n.startswith("model.visual."))
    assert list(UNQUANTIZED_MODULES) in (getattr(model.config.quantization_config, "modules_to_not_convert", None),
                                         getattr(model.config.quantization_config, "llm_int8_skip_modules", None))


@pytest.mark.parametrize("mode", ["fp8", "nf4"])
def test_quantized_model_on_cuda_matches_bf16(folders, mode):
    _require(mode)
    reference, model = _load(folders[mode]), _load(folders[mode], mode)
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
