"""Quantized loading: bitsandbytes 4-bit (NF4) and 8-bit (LLM.int8) on CPU, which layers stay unquantized, the
hybrid attention on quantized projections, and clear errors for what cannot run (FP8 without an FP8 GPU, ...).

The equality tests put the weights of the layers that get quantized on the quantization grid first (NF4 blocks of
64, int8 rows), so quantizing loses nothing and what remains is the backend's arithmetic (NF4: bf16 products in
bitsandbytes' AVX512 kernel; int8: int8 activations). The logits must then match the unquantized model within
``PREFILL_ATOL`` at every position of the video prompt and within ``ANSWER_ATOL`` at every generated step, and the
prompt is one whose greedy margins (top-1 minus top-2 logit, at every generated step) exceed twice that, so that
equal greedy answers are implied by, and test, the closeness rather than luck.
"""

import pytest
import torch
from torch import nn

import modeling_videonsa
from modeling_videonsa import UNQUANTIZED_MODULES, VideoNSAForConditionalGeneration, with_unquantized_defaults
from videonsa import loading
from videonsa.testing import on_quantization_grid, tiny_config, tiny_model, video_prompt

# bitsandbytes' CPU kernel for 4-bit weights packs out_features in groups of 32 and in_features in blocks of 64:
# the text decoder's widths here are multiples of both (448 = 28 heads x 16), as the 7B's are.
TEXT = dict(hidden_size=448, intermediate_size=128,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0})
# max |logit| is ~1.6. Measured errors (6 prompts): NF4 <= 0.011 everywhere; int8 <= 0.021 at text positions and
# steps, up to 0.14 at video positions, whose wide-ranging features coarsen LLM.int8's per-token activation scale.
PREFILL_ATOL = {"nf4": 0.02, "int8": 0.1}
ANSWER_ATOL = {"nf4": 0.02, "int8": 0.03}
PROMPT = [5, (2, 8, 8), 5]  # 5 text, a video of 32 merged tokens (2 NSA blocks of 16), 5 text
PROMPT_SEED = 4  # greedy margins >= 0.076 over the 6 generated tokens (checked below, not assumed)
NEW_TOKENS = 6
QUANTIZED_CLASS = {"nf4": "Linear4bit", "int8": "Linear8bitLt", "fp8": "FP8Linear"}


def _bnb_config(mode, **overrides):
    from transformers import BitsAndBytesConfig

    if mode == "nf4":  # computing in float32, the model's dtype here
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.float32, **overrides)
    return BitsAndBytesConfig(load_in_8bit=True, **overrides)


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (requirements-dev.txt pins it)")


def _require_cpu_path(bnb, mode):
    """Skip, with bitsandbytes' own reason, where the installed release has no CPU kernel for ``mode``."""
    layer = nn.Linear(64, 64)
    config = _bnb_config(mode)
    try:
        if mode == "nf4":
            quantized = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
            quantized.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4")
        else:
            quantized = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=config.llm_int8_threshold)
            quantized.weight = bnb.nn.Int8Params(layer.weight.data, requires_grad=False, has_fp16_weights=False)
        quantized.bias = layer.bias
        quantized.to("cpu")(torch.randn(2, 64))
    except (NotImplementedError, RuntimeError) as error:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU path for {mode}: {error}")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, bnb):
    """``{mode: (folder, unquantized model)}``: tiny checkpoints whose quantized layers' weights are on the grid."""
    root = tmp_path_factory.mktemp("quant")
    folders = {}
    for mode in ("nf4", "int8"):
        model = on_quantization_grid(tiny_model(**TEXT), mode)
        model.save_pretrained(root / mode)
        folders[mode] = (str(root / mode), model)
    return folders


def _module_types(model):
    return {name: type(module).__name__ for name, module in model.named_modules()}


def assert_default_split(model, mode):
    """Text decoder projections quantized (``mode``'s class); vision tower, lm_head and gate MLPs plain nn.Linear."""
    types = _module_types(model)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    decoder = {n for n in types if ".language_model.layers." in n and n.rsplit(".", 1)[-1] in projections}
    assert {n for n, t in types.items() if t == QUANTIZED_CLASS[mode]} == decoder and len(decoder) == 2 * 7
    kept = [n for n in types if n == "lm_head" or n.endswith((".g_proj_1", ".g_proj_2"))]
    assert len(kept) == 1 + 2 * 2 and {types[n] for n in kept} == {"Linear"}
    vision = {t for n, t in types.items() if n.startswith("model.visual.")}
    assert "Linear" in vision and not vision & set(QUANTIZED_CLASS.values())


def _greedy(model, inputs):
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits).float()


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_checkpoint_generates_as_unquantized(checkpoints, bnb, mode):
    """A Hub user's plain BitsAndBytesConfig through AutoModel with the checkpoint's code: the documented layers stay
    unquantized, the video prefill runs the hybrid attention on quantized q/k/v, and the answer is the same."""
    from transformers import AutoModel

    _require_cpu_path(bnb, mode)
    folder, reference = checkpoints[mode]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, quantization_config=_bnb_config(mode)).eval()
    assert type(model).__module__.startswith("transformers_modules")
    assert model.config.quantization_config.llm_int8_skip_modules == list(UNQUANTIZED_MODULES)
    assert_default_split(model, mode)

    inputs = video_prompt(PROMPT, seed=PROMPT_SEED)
    with torch.no_grad():
        expected, got = reference(**inputs).logits, model(**inputs).logits
    paths = {layer.self_attn.last_path for layer in model.model.language_model.layers}
    assert paths == {"hybrid (torch NSA + sdpa dense)"}
    assert got.dtype == expected.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=PREFILL_ATOL[mode], rtol=0)

    expected_tokens, expected_logits = _greedy(reference, inputs)
    tokens, logits = _greedy(model, inputs)
    top2 = expected_logits.topk(2, dim=-1).values
    margins = top2[..., 0] - top2[..., 1]
    assert margins.min() > 2 * ANSWER_ATOL[mode], \
        f"the prompt's greedy margins {margins} no longer make the test meaningful"
    torch.testing.assert_close(logits, expected_logits, atol=ANSWER_ATOL[mode], rtol=0)
    assert tokens.tolist() == expected_tokens.tolist()


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bf16_model_runs_the_hybrid_path_in_bf16(checkpoints, bnb, mode):
    """bf16 model with bitsandbytes' default compute dtypes (NF4: float32; int8: float16): activations come back in
    bf16, the gate logits and the NSA reference take them, nothing is promoted to float32 on the way."""
    from transformers import BitsAndBytesConfig

    _require_cpu_path(bnb, mode)
    folder, reference = checkpoints[mode]
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if mode == "nf4" \
        else BitsAndBytesConfig(load_in_8bit=True)
    model = VideoNSAForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=config)
    seen = []
    model.model.language_model.layers[0].self_attn.register_forward_hook(lambda m, args, out: seen.append(out[0].dtype))
    inputs = video_prompt(PROMPT, seed=PROMPT_SEED)
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = reference(**inputs).logits
    assert seen == [torch.bfloat16] and logits.dtype == torch.bfloat16
    assert model.model.language_model.layers[0].self_attn.last_path.startswith("hybrid (torch NSA")
    error = (logits.float() - expected).abs().max() / expected.abs().max()
    assert error < 0.1, f"bf16 {mode} logits off by {error:.3f} of the largest logit"


def test_user_list_of_unquantized_modules_wins(checkpoints, bnb):
    """An explicit llm_int8_skip_modules replaces the default: here the gates and lm_head are quantized too, and the
    hybrid path still runs (8-bit has no shape constraints on CPU)."""
    _require_cpu_path(bnb, "int8")
    folder, reference = checkpoints["int8"]
    model = VideoNSAForConditionalGeneration.from_pretrained(
        folder, quantization_config=_bnb_config("int8", llm_int8_skip_modules=["model.visual"]))
    types = _module_types(model)
    assert types["lm_head"] == types["model.language_model.layers.1.self_attn.g_proj_2"] == "Linear8bitLt"
    assert not any(t == "Linear8bitLt" for n, t in types.items() if n.startswith("model.visual."))
    inputs = video_prompt(PROMPT, seed=PROMPT_SEED)
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = reference(**inputs).logits
    assert model.model.language_model.layers[1].self_attn.last_path.startswith("hybrid (torch NSA")
    assert torch.isfinite(logits).all() and (logits - expected).abs().max() < 1.0


def test_triton_backend_on_cpu_with_quantized_weights_is_an_error(checkpoints, bnb):
    _require_cpu_path(bnb, "int8")
    folder, _ = checkpoints["int8"]
    model = VideoNSAForConditionalGeneration.from_pretrained(folder, quantization_config=_bnb_config("int8"))
    model.config.text_config.nsa_backend = "triton"
    with pytest.raises(RuntimeError, match="nsa_backend='triton' was requested but tensors are on cpu"):
        with torch.no_grad():
            model(**video_prompt(PROMPT, seed=PROMPT_SEED))


# ----------------------------------------------------------------------------------------------------------------
# Configs and errors (no bitsandbytes needed)
# ----------------------------------------------------------------------------------------------------------------
def test_default_unquantized_modules_fill_only_an_unset_list():
    from transformers import BitsAndBytesConfig, FineGrainedFP8Config

    plain = BitsAndBytesConfig(load_in_4bit=True)
    filled = with_unquantized_defaults(plain)
    assert filled.llm_int8_skip_modules == ["model.visual", "lm_head", "g_proj_1", "g_proj_2"]
    assert plain.llm_int8_skip_modules is None  # the caller's object is left as it was
    for given in ([], ["lm_head"]):
        assert with_unquantized_defaults(BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=given)) \
            .llm_int8_skip_modules == given
    as_dict = with_unquantized_defaults({"quant_method": "bitsandbytes", "load_in_8bit": True})
    assert isinstance(as_dict, BitsAndBytesConfig) and as_dict.llm_int8_skip_modules == list(UNQUANTIZED_MODULES)
    fp8 = with_unquantized_defaults(FineGrainedFP8Config(dequantize=True))  # dequantize: no GPU needed
    assert fp8.modules_to_not_convert == list(UNQUANTIZED_MODULES)
    assert with_unquantized_defaults(FineGrainedFP8Config(dequantize=True, modules_to_not_convert=["lm_head"])) \
        .modules_to_not_convert == ["lm_head"]
    # other methods match module names their own way: their configs pass unchanged
    from transformers import QuantoConfig

    assert with_unquantized_defaults(QuantoConfig()).modules_to_not_convert is None


def test_default_patterns_name_exactly_the_documented_modules():
    """transformers' own matcher, on the model's module names: the vision tower, lm_head and both gate MLPs of every
    layer are kept; no other Linear is."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = tiny_model(**TEXT)
    linears = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    kept = {name for name in linears if not should_convert_module(name, list(UNQUANTIZED_MODULES))}
    expected = {name for name in linears if name == "lm_head" or name.startswith("model.visual.")
                or name.endswith((".g_proj_1", ".g_proj_2"))}
    assert kept == expected and len(linears) - len(kept) == 2 * 7


def test_quantization_config_helper():
    from transformers import BitsAndBytesConfig, FineGrainedFP8Config

    nf4 = loading.quantization_config("nf4", dtype="bfloat16")
    assert isinstance(nf4, BitsAndBytesConfig) and nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16 and nf4.llm_int8_skip_modules is None
    int8 = loading.quantization_config("int8")
    assert isinstance(int8, BitsAndBytesConfig) and int8.load_in_8bit
    assert isinstance(loading.quantization_config("fp8"), FineGrainedFP8Config)
    with pytest.raises(ValueError, match="quantization must be one of 'fp8', 'int8', 'nf4'"):
        loading.quantization_config("int4")
    with pytest.raises(ValueError, match="either quantization=... or quantization_config=..."):
        loading.load_videonsa("unused", quantization="nf4", quantization_config=int8)


def _has_fp8_gpu():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    tiny_model(**TEXT).save_pretrained(folder)
    return str(folder)


@pytest.mark.skipif(_has_fp8_gpu(), reason="this machine has an FP8-capable GPU")
def test_fp8_without_an_fp8_gpu_is_a_clear_error(plain_checkpoint, monkeypatch):
    from transformers import FineGrainedFP8Config

    wanted = r"compute capability 8\.9 or newer .* Use bitsandbytes instead"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=wanted + r".*") as raised:
            VideoNSAForConditionalGeneration.from_pretrained(plain_checkpoint,
                                                             quantization_config=FineGrainedFP8Config())
        assert "this machine has no CUDA GPU" in str(raised.value)
        with pytest.raises(ValueError, match=wanted):
            loading.load_videonsa(plain_checkpoint, quantization="fp8")
    # a GPU without FP8 (an A100): transformers would quietly load bf16 weights instead
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=wanted) as raised:
        modeling_videonsa.check_quantization(FineGrainedFP8Config())
    assert "NVIDIA A100-SXM4-80GB has compute capability 8.0" in str(raised.value)


def test_fp8_on_an_fp8_gpu_without_the_hub_kernel_is_a_clear_error(monkeypatch):
    """transformers' FP8 matrix products come from the Hub kernel kernels-community/finegrained-fp8 through the
    `kernels` package: without it the load stops and says what to install (instead of failing in the first forward)."""
    from transformers import FineGrainedFP8Config
    from transformers.utils import import_utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(import_utils, "is_kernels_available", lambda *args, **kwargs: False)
    with pytest.raises(ValueError, match=r"kernels-community/finegrained-fp8.*`kernels`.*BitsAndBytesConfig"):
        modeling_videonsa.check_quantization(FineGrainedFP8Config())
    monkeypatch.setattr(import_utils, "is_kernels_available", lambda *args, **kwargs: True)
    modeling_videonsa.check_quantization(FineGrainedFP8Config())  # an H100 / H200 with the kernel: accepted


def test_4bit_layers_the_cpu_kernel_cannot_run_are_named_at_load(checkpoints, bnb):
    """Quantizing the gates in 4-bit on CPU: bitsandbytes' AVX512-BF16 kernel would fail on the first call with a
    bare assertion (g_proj_2 has 3 x 28 = 84 outputs, not a multiple of 32); loading says which layers and why."""
    _require_cpu_path(bnb, "nf4")
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes runs 4-bit layers of any shape through its other path")
    folder, _ = checkpoints["nf4"]
    with pytest.raises(ValueError,
                       match=r"cannot run 2 layers of this model: model\.language_model\.layers\.0\.self_attn"
                             r"\.g_proj_2 \(84 x 448\), .*llm_int8_skip_modules"):
        VideoNSAForConditionalGeneration.from_pretrained(
            folder, quantization_config=_bnb_config("nf4", llm_int8_skip_modules=["model.visual", "lm_head"]))


def test_training_the_quantized_weights_without_adapters_is_an_error(checkpoints, bnb, tmp_path):
    """The Trainer refuses a purely quantized VideoNSA (train LoRA adapters on top instead: peft)."""
    from transformers import TrainingArguments

    from videonsa.training import VideoNSATrainer

    _require_cpu_path(bnb, "int8")
    folder, _ = checkpoints["int8"]
    model = VideoNSAForConditionalGeneration.from_pretrained(folder, quantization_config=_bnb_config("int8"))
    with pytest.raises(ValueError, match="purely quantized models. Please attach trainable adapters"):
        VideoNSATrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))


def test_fp8_converts_the_same_layers():
    """transformers' FP8 quantizer (its module replacement, which needs no GPU) on the model skeleton, with the
    config from_pretrained builds: FP8Linear exactly where bitsandbytes quantizes, everything else plain."""
    from transformers import FineGrainedFP8Config
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    config = with_unquantized_defaults(FineGrainedFP8Config(dequantize=True))
    config.dequantize = False  # (dequantize only skips the GPU check above; loading would convert the same)
    with torch.device("meta"):
        model = VideoNSAForConditionalGeneration(tiny_config(**TEXT))
    FineGrainedFP8HfQuantizer(config, pre_quantized=False).preprocess_model(model, device_map=None)
    assert_default_split(model, "fp8")


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_model_saves_and_loads_back(checkpoints, bnb, mode, tmp_path):
    """save_pretrained of a quantized model writes its quantized weights and config (the default list included);
    from_pretrained loads them back without a quantization_config: same layers, same logits."""
    _require_cpu_path(bnb, mode)
    folder, _ = checkpoints[mode]
    model = VideoNSAForConditionalGeneration.from_pretrained(folder, quantization_config=_bnb_config(mode))
    model.save_pretrained(tmp_path)
    again = VideoNSAForConditionalGeneration.from_pretrained(tmp_path)
    assert again.config.quantization_config.llm_int8_skip_modules == list(UNQUANTIZED_MODULES)
    assert_default_split(again, mode)
    inputs = video_prompt(PROMPT, seed=PROMPT_SEED)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)
    if mode == "nf4" and bnb.functional.has_avx512bf16():
        # the run above repacked the 4-bit weights for the CPU kernel: saving them now is refused
        with pytest.raises(ValueError,
                           match=r"repacked for bitsandbytes' CPU kernel .* Save the quantized model before"):
            model.save_pretrained(tmp_path / "after-a-run")
        assert not (tmp_path / "after-a-run" / "model.safetensors").exists()


def test_loaders_take_a_quantization_name(bnb, tmp_path):
    """videonsa.loading's quantization= on a Hub-layout folder (AutoModel with its code, and its processor)."""
    from videonsa.testing import build_tiny_checkpoint

    _require_cpu_path(bnb, "int8")
    folder = build_tiny_checkpoint(tmp_path / "tiny")
    model, processor = loading.load_checkpoint(folder, quantization="int8", dtype=torch.float32)
    assert type(model).__module__.startswith("transformers_modules") and type(processor).__name__ == "VideoNSAProcessor"
    assert_default_split(model, "int8")
    model, _ = loading.load_videonsa(folder, quantization="int8")
    assert type(model) is VideoNSAForConditionalGeneration
    assert_default_split(model, "int8")
