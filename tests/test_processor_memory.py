"""The processor's memory planner: the estimate's terms against the model's own modules, the inverse, the knobs.

The references are independent of the planner's arithmetic: parameter counts and shapes come from the model built
on the meta device by transformers' and VideoNSA's classes (Qwen2.5-VL-7B: 8,292,166,656 parameters, plus the gate
MLPs), the KV cache from a real forward of the tiny model. The calibration constants (working set, fixed overhead)
are read from the module, so these tests hold whatever values docs/benchmarks.md gives them.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.video_utils import VideoMetadata

import processing_videonsa as pv
from configuration_videonsa import VideoNSAConfig
from modeling_videonsa import VideoNSAForConditionalGeneration
from processing_videonsa import (
    ContextBudgetExceededError,
    FpsReducedWarning,
    MemoryBudgetError,
    VideoNSAProcessor,
    estimate_prefill_memory,
    max_prompt_tokens,
)
from videonsa.testing import make_tokenizer, tiny_config, tiny_model, write_video
from videonsa.training.presets import PRESET_7B

GB, GIB = 10**9, 2**30
DEFAULT_ANSWER = pv.DEFAULT_ANSWER_TOKENS
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def meta_model(config):
    with torch.device("meta"):
        return VideoNSAForConditionalGeneration(config)


@pytest.fixture(scope="module")
def model_7b():
    return meta_model(VideoNSAConfig(**copy.deepcopy(PRESET_7B)))


def is_quantized(name: str) -> bool:
    """A text decoder q/k/v/o or MLP projection weight (not its bias, not the gate MLP, not the vision tower)."""
    parts = name.split(".")
    return "language_model" in parts and parts[-2] in QUANTIZED and parts[-1] == "weight"


def groups_of(model) -> dict[str, int]:
    groups = dict.fromkeys(("embeddings", "lm_head", "decoder_projections", "decoder_other", "nsa_gates", "vision"), 0)
    for name, parameter in model.named_parameters():  # tied weights are listed once
        if name.startswith("model.visual."):
            group = "vision"
        elif "embed_tokens" in name:
            group = "embeddings"
        elif name.startswith("lm_head"):
            group = "lm_head"
        elif ".g_proj_" in name:
            group = "nsa_gates"
        elif is_quantized(name):
            group = "decoder_projections"
        else:
            group = "decoder_other"
        groups[group] += parameter.numel()
    return groups


# ---------------------------------------------------------------------------------------------------- the terms


def test_parameter_counts_match_the_7b_modules(model_7b):
    counts = pv.parameter_counts(PRESET_7B)
    assert counts == groups_of(model_7b)
    # without the gate MLPs: Qwen2.5-VL-7B itself, as transformers builds it
    with torch.device("meta"):
        qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(PRESET_7B)))
    assert sum(counts.values()) - counts["nsa_gates"] == sum(p.numel() for p in qwen.parameters()) == 8_292_166_656


def test_every_config_layout_gives_the_same_counts(model_7b):
    nested = VideoNSAConfig(**copy.deepcopy(PRESET_7B))
    # the Hub's Qwen2.5-VL config.json: text keys at the top level, the vision tower's channels as `in_chans`
    flat = {key: value for key, value in copy.deepcopy(PRESET_7B).items() if key != "text_config"}
    flat.update(copy.deepcopy(PRESET_7B["text_config"]), model_type="qwen2_5_vl")
    flat["vision_config"]["in_chans"] = flat["vision_config"].pop("in_channels")
    expected = groups_of(model_7b)
    for config in (nested, nested.to_dict(), json.loads(nested.to_json_string()), flat):
        assert pv.parameter_counts(config) == expected


def test_tied_embeddings_have_no_separate_lm_head():
    config = tiny_config()
    config.tie_word_embeddings = True
    counts = pv.parameter_counts(config)
    assert counts["lm_head"] == 0 and counts == groups_of(meta_model(config))
    # configs saved before transformers 5 kept the flag in text_config
    old = config.to_dict()
    old["tie_word_embeddings"], old["text_config"]["tie_word_embeddings"] = False, True
    assert pv.parameter_counts(old)["lm_head"] == 0


def reference_weight_bytes(model, weights: str) -> int:
    """Bytes per module, from the modules' shapes: quantized projections as each library stores them."""
    total = 0
    for name, parameter in model.named_parameters():
        if weights == "bf16" or not is_quantized(name):
            total += 2 * parameter.numel()
            continue
        out_features, in_features = parameter.shape
        if weights == "fp8":  # one byte per weight, a float32 scale per 128 x 128 block
            total += parameter.numel() + 4 * math.ceil(out_features / 128) * math.ceil(in_features / 128)
        elif weights == "int8":  # one byte per weight, a float32 scale per output row
            total += parameter.numel() + 4 * out_features
        else:  # nf4: half a byte per weight, a float32 absmax per 64 weights
            total += math.ceil(parameter.numel() / 2) + 4 * math.ceil(parameter.numel() / 64)
    return total


@pytest.mark.parametrize("weights", pv.WEIGHT_FORMATS)
def test_weight_bytes_per_format(model_7b, weights):
    assert pv.weight_bytes(PRESET_7B, weights) == reference_weight_bytes(model_7b, weights)


def test_quantized_formats_are_smaller_in_order():
    sizes = [pv.weight_bytes(PRESET_7B, weights) for weights in pv.WEIGHT_FORMATS]
    assert sizes[0] > sizes[1] and sizes[0] > sizes[2] > sizes[3]
    assert 16 * GIB < sizes[0] < 16.2 * GIB and 7 * GIB < sizes[3] < 7.5 * GIB  # 8.66B parameters


def test_kv_cache_per_token_7b_by_hand():
    text = PRESET_7B["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    by_hand = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 2  # keys and values, bf16
    assert pv.kv_cache_bytes_per_token(PRESET_7B) == by_hand == 57_344


def test_kv_cache_per_token_matches_a_real_cache():
    model = tiny_model(num_layers=3).to(torch.bfloat16)
    tokens = 37
    with torch.no_grad():
        out = model(input_ids=torch.randint(3, 200, (1, tokens)), use_cache=True)
    cache = out.past_key_values
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert stored == tokens * pv.kv_cache_bytes_per_token(model.config)


def test_estimate_is_the_sum_of_its_terms():
    terms = pv.prefill_memory_terms(50_000, PRESET_7B, "nf4", answer_tokens=512, batch_size=2)
    hidden = PRESET_7B["text_config"]["hidden_size"]
    assert terms == {
        "weights": pv.weight_bytes(PRESET_7B, "nf4"),
        "kv_cache": 2 * (50_000 + 512) * 57_344,
        "working_set": 2 * 50_000 * pv.WORK_HIDDEN_VECTORS_PER_TOKEN * hidden * 2,
        "fixed_overhead": pv.FIXED_OVERHEAD_BYTES,
    }
    assert estimate_prefill_memory(50_000, PRESET_7B, "nf4", answer_tokens=512, batch_size=2) == sum(terms.values())


def test_estimate_grows_with_tokens_answer_and_batch():
    values = [estimate_prefill_memory(n, PRESET_7B) for n in (0, 1, 1000, 64_000, 128_000)]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert estimate_prefill_memory(1000, PRESET_7B, answer_tokens=2000) > estimate_prefill_memory(1000, PRESET_7B)
    assert estimate_prefill_memory(1000, PRESET_7B, batch_size=2) > estimate_prefill_memory(1000, PRESET_7B)


@pytest.mark.parametrize("weights", pv.WEIGHT_FORMATS)
@pytest.mark.parametrize("memory", [24 * GB, 40 * GIB, 80 * GIB, 141 * GB, 18 * GIB + 12345])
@pytest.mark.parametrize("answer_tokens, batch_size", [(1024, 1), (0, 1), (4096, 3)])
def test_max_prompt_tokens_inverts_the_estimate(weights, memory, answer_tokens, batch_size):
    args = dict(model_config=PRESET_7B, weights=weights, answer_tokens=answer_tokens, batch_size=batch_size)
    tokens = max_prompt_tokens(memory, **args)
    assert estimate_prefill_memory(tokens + 1, **args) > memory
    if tokens > 0:
        assert estimate_prefill_memory(tokens, **args) <= memory
    else:  # not even an empty prompt fits
        assert estimate_prefill_memory(0, **args) > memory


def test_max_prompt_tokens_reads_memory_strings():
    assert max_prompt_tokens("80GiB", PRESET_7B) == max_prompt_tokens(80 * GIB, PRESET_7B)
    assert max_prompt_tokens("24GB", PRESET_7B, "nf4") == max_prompt_tokens(24 * GB, PRESET_7B, "nf4")
    assert max_prompt_tokens(4 * GIB, PRESET_7B) == 0  # the bf16 weights alone are 16 GiB


# ---------------------------------------------------------------------------------------------------- bad inputs


def test_memory_strings():
    assert pv.parse_max_memory("24GB") == 24 * 10**9
    assert pv.parse_max_memory("24GiB") == 24 * 2**30
    assert pv.parse_max_memory(" 512MiB ") == 512 * 2**20
    assert pv.parse_max_memory(123456789) == 123456789


@pytest.mark.parametrize(
    "value, pattern",
    [
        ("24TB", r"max_memory='24TB' is not a memory size.*'24GB'.*'80GiB'"),
        ("lots", r"max_memory='lots' is not a memory size"),
        ("1.5GB", r"max_memory='1.5GB' is not a memory size.*whole number"),
        ("24gb", r"lowercase 'b' means bits.*write '24GB' for bytes"),
        ("-5GB", r"max_memory must be positive, got '-5GB'"),
        (-1, r"max_memory must be positive, got -1"),
        (0, r"max_memory must be positive, got 0"),
        (True, r"max_memory must be .*got bool True"),
        (2.5e10, r"max_memory must be .*got float"),
        ({0: "20GiB"}, r"max_memory must be .*got dict"),
    ],
)
def test_bad_memory_values_raise(value, pattern):
    with pytest.raises(MemoryBudgetError, match=pattern):
        pv.parse_max_memory(value)
    with pytest.raises(MemoryBudgetError, match=pattern):
        VideoNSAProcessor(tokenizer=make_tokenizer(), max_memory=value)


def test_auto_memory_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MemoryBudgetError, match="'auto' reads the total memory of the current CUDA device.*not avail"):
        pv.parse_max_memory("auto")

    class Properties:
        total_memory = 150_000_000_000

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties)
    assert pv.parse_max_memory("auto") == 150_000_000_000


def test_bad_estimate_inputs_raise():
    with pytest.raises(MemoryBudgetError, match=r"`weights` must be one of 'bf16', 'fp8', 'int8', 'nf4', got 'fp4'"):
        estimate_prefill_memory(10, PRESET_7B, weights="fp4")
    with pytest.raises(MemoryBudgetError, match=r"`num_tokens` must be a non-negative integer, got -1"):
        estimate_prefill_memory(-1, PRESET_7B)
    with pytest.raises(MemoryBudgetError, match=r"`answer_tokens` must be a non-negative integer, got 1.5"):
        estimate_prefill_memory(10, PRESET_7B, answer_tokens=1.5)
    with pytest.raises(MemoryBudgetError, match=r"`batch_size` must be at least 1"):
        max_prompt_tokens("24GB", PRESET_7B, batch_size=0)
    no_layers = copy.deepcopy(PRESET_7B)
    del no_layers["text_config"]["num_hidden_layers"]
    with pytest.raises(MemoryBudgetError, match=r"no `num_hidden_layers` \(looked in text_config and at the top"):
        estimate_prefill_memory(10, no_layers)
    with pytest.raises(MemoryBudgetError, match=r"no `vision_config`"):
        estimate_prefill_memory(10, PRESET_7B["text_config"])
    with pytest.raises(MemoryBudgetError, match=r"`model_config` must be the model's config .* got str"):
        estimate_prefill_memory(10, "Enxin/VideoNSA")
    with pytest.raises(MemoryBudgetError, match=r"`weights` must be one of"):
        VideoNSAProcessor(tokenizer=make_tokenizer(), weights="int4")


# ---------------------------------------------------------------------------------------------------- the processor


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    # 20 s at 10 fps, 64 x 64: at 4 fps, 80 frames -> 40 temporal patches x 4 tokens = 160 video tokens
    return write_video(tmp_path_factory.mktemp("videos") / "long_20s_10fps.mp4", 200, 10, 64, 64)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


PROMPT = "Describe <|video_pad|>"  # 9 text tokens with the byte-level tokenizer


def memory_for(tokens: int, **kwargs) -> int:
    """The smallest memory in which a prompt of `tokens` tokens fits, by the estimate."""
    return estimate_prefill_memory(tokens, PRESET_7B, **kwargs)


def test_memory_cap_lowers_fps_to_fit_and_says_so(tokenizer, clip):
    processor = VideoNSAProcessor(tokenizer=tokenizer, model_config=PRESET_7B, max_memory=memory_for(100))
    with pytest.warns(FpsReducedWarning) as record:
        out = processor(text=PROMPT, videos=clip, reduce_fps_to_fit=True, return_tensors="pt")
    tokens = out["input_ids"].shape[1]
    grid_t = out["video_grid_thw"][0, 0].item()
    assert tokens == grid_t * 4 + 9 and tokens <= 100 < (grid_t + 1) * 4 + 9  # the most frames that fit
    assert estimate_prefill_memory(tokens, PRESET_7B) <= processor.max_memory
    message = str(record[0].message)
    assert "169 tokens at 4 fps" in message and "the 100 prompt tokens that fit in max_memory=" in message
    assert "with bf16 weights" in message and f"{2 * grid_t} frames" in message
    assert f"By the estimate, {tokens} tokens need" in message
    # the same cap per call, on a processor without one
    plain = VideoNSAProcessor(tokenizer=tokenizer, model_config=PRESET_7B)
    with pytest.warns(FpsReducedWarning):
        again = plain(text=PROMPT, videos=clip, max_memory=memory_for(100), reduce_fps_to_fit=True, return_tensors="pt")
    assert torch.equal(again["input_ids"], out["input_ids"])


def test_memory_error_names_the_memory_the_estimate_and_the_knobs(tokenizer, clip):
    memory = memory_for(100)
    processor = VideoNSAProcessor(tokenizer=tokenizer, model_config=PRESET_7B, max_memory=memory)
    with pytest.raises(ContextBudgetExceededError) as error:
        processor(text=PROMPT, videos=clip)
    message = str(error.value)
    estimate = estimate_prefill_memory(169, PRESET_7B)
    assert f"The prompt would be 169 tokens, above the 100 prompt tokens that fit in max_memory={memory}" in message
    assert f"By the estimate, 169 tokens need {estimate / GIB:,.2f} GiB: weights 16.13 GiB, KV cache" in message
    assert "(prompt and 1,024 answer tokens)" in message
    assert "max_context_tokens=131,072 is not the limit here" in message
    assert "Frames that fit, at fps=" in message
    for knob in ("`fps`", "`max_pixels`", "weights='nf4'", "a larger `max_memory`", "reduce_fps_to_fit"):
        assert knob in message
    assert "raise `max_context_tokens`" not in message
    nf4_tokens = max_prompt_tokens(memory, PRESET_7B, "nf4")
    assert f"`weights='nf4'` fits {nf4_tokens:,} tokens" in message
    # a quantized format per call makes it fit
    processor(text=PROMPT, videos=clip, weights="nf4")


def test_effective_budget_is_the_smaller_limit(tokenizer, clip):
    memory = memory_for(170)  # 169 tokens fit in memory
    processor = VideoNSAProcessor(tokenizer=tokenizer, model_config=PRESET_7B, max_memory=memory)
    processor(text=PROMPT, videos=clip)
    with pytest.raises(ContextBudgetExceededError, match="above max_context_tokens=168") as error:
        processor(text=PROMPT, videos=clip, max_context_tokens=168)
    assert "max_memory" not in str(error.value) and "raise `max_context_tokens`" in str(error.value)
    with pytest.raises(ContextBudgetExceededError, match="fit in max_memory="):
        processor(text=PROMPT, videos=clip, max_memory=memory_for(168))
    # the answer's KV cache counts: the fewest answer tokens whose cache pays for one more prompt token make it fit
    per_prompt_token = memory_for(1) - memory_for(0)
    fewer = -(-per_prompt_token // pv.kv_cache_bytes_per_token(PRESET_7B))
    with pytest.raises(ContextBudgetExceededError, match="169 tokens, above the 168 prompt tokens"):
        processor(text=PROMPT, videos=clip, max_memory=memory_for(168), answer_tokens=DEFAULT_ANSWER - fewer + 1)
    processor(text=PROMPT, videos=clip, max_memory=memory_for(168), answer_tokens=DEFAULT_ANSWER - fewer)


def test_weights_that_do_not_fit_name_only_the_memory_knobs(tokenizer, clip):
    processor = VideoNSAProcessor(tokenizer=tokenizer, model_config=PRESET_7B, max_memory="16GiB")
    with pytest.raises(ContextBudgetExceededError) as error:
        processor(text=PROMPT, videos=clip, reduce_fps_to_fit=True)
    message = str(error.value)
    assert "the 0 prompt tokens that fit in max_memory='16GiB' (16.00 GiB)" in message
    assert "Not even an empty prompt fits: the bf16 weights" in message
    assert "`weights='nf4'` fits" in message and "a larger `max_memory` (now '16GiB'" in message
    assert "`fps`" not in message and "`max_pixels`" not in message


def test_memory_is_for_the_whole_batch(tokenizer, clip):
    texts = [PROMPT, PROMPT]
    processor = VideoNSAProcessor(tokenizer=tokenizer, model_config=PRESET_7B)
    both = memory_for(169, batch_size=2)
    processor(text=texts, videos=[clip, clip], max_memory=both, padding=True)
    with pytest.raises(ContextBudgetExceededError, match="for a batch of 2 prompts"):
        processor(text=texts, videos=[clip, clip], max_memory=both - 1, padding=True)
    processor(text=PROMPT, videos=clip, max_memory=both - 1)  # one such prompt fits easily


def test_memory_plan_says_how_many_frames_fit(tokenizer, clip):
    memory = memory_for(100)
    processor = VideoNSAProcessor(tokenizer=tokenizer, model_config=PRESET_7B)
    plan = processor.memory_plan(clip, text=PROMPT, max_memory=memory)
    assert (plan.num_tokens, plan.frames, plan.requested_fps, plan.fits) == (169, [80], 4.0, False)
    assert plan.max_memory == memory and plan.max_prompt_tokens == 100 and plan.weights == "bf16"
    assert plan.terms == pv.prefill_memory_terms(169, PRESET_7B)
    assert plan.estimated_bytes == estimate_prefill_memory(169, PRESET_7B) > memory
    frames = plan.frames_at_fitting_fps[0]
    assert frames // 2 * 4 + 9 <= 100 < (frames // 2 + 1) * 4 + 9
    assert processor.plan_videos(clip, fps=plan.fitting_fps)[0].num_frames == frames
    # at a rate that fits, the requested fps is the fitting one
    fitting = processor.memory_plan(clip, text=PROMPT, max_memory=memory, fps=1.0)
    assert fitting.fits and fitting.fitting_fps == 1.0 and fitting.frames == fitting.frames_at_fitting_fps == [20]
    # without a memory: the estimate, and the context as the only limit
    unbounded = processor.memory_plan(clip, text=PROMPT)
    assert unbounded.max_memory is None and unbounded.fits and unbounded.max_prompt_tokens == 131072
    assert unbounded.estimated_bytes == plan.estimated_bytes


def test_memory_plan_from_metadata_alone(tokenizer, clip):
    processor = VideoNSAProcessor(tokenizer=tokenizer, model_config=PRESET_7B, max_memory="40GB", weights="nf4")
    described = VideoMetadata(total_num_frames=200, fps=10.0, height=64, width=64)
    from_metadata = processor.memory_plan([described], text=PROMPT, max_context_tokens=100)
    from_file = processor.memory_plan([clip], text=PROMPT, max_context_tokens=100)
    assert from_metadata == from_file
    # an hour of 1080p at 30 fps is planned without any pixels: 3,600 s at 4 fps
    hour = VideoMetadata(total_num_frames=108_000, fps=30.0, height=1080, width=1920)
    plan = processor.memory_plan(hour, text=PROMPT)
    assert plan.frames == [14_400] and not plan.fits and plan.weights == "nf4"
    assert plan.max_prompt_tokens == min(131072, max_prompt_tokens("40GB", PRESET_7B, "nf4"))
    assert 0 < plan.fitting_fps < 4 and plan.frames_at_fitting_fps[0] < 14_400
    with pytest.raises(MemoryBudgetError, match=r"videos\[0\] is a VideoMetadata without fps, height"):
        processor.memory_plan(VideoMetadata(total_num_frames=10), text=PROMPT)


def test_memory_planning_without_a_model_config_says_what_to_do(tokenizer, clip):
    processor = VideoNSAProcessor(tokenizer=tokenizer, max_memory="24GB")
    with pytest.raises(MemoryBudgetError, match=r"pass `model_config=`.* or load the processor with `from_pretrained`"):
        processor(text=PROMPT, videos=clip)
    with pytest.raises(MemoryBudgetError, match=r"pass `model_config=`"):
        VideoNSAProcessor(tokenizer=tokenizer).memory_plan(clip, text=PROMPT)
    # without max_memory nothing changes
    VideoNSAProcessor(tokenizer=tokenizer)(text=PROMPT, videos=clip)


def test_auto_memory_is_read_at_call_time(tokenizer, clip, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    processor = VideoNSAProcessor(tokenizer=tokenizer, model_config=PRESET_7B, max_memory="auto")  # no error yet
    with pytest.raises(MemoryBudgetError, match="CUDA is not available"):
        processor(text=PROMPT, videos=clip)


def test_from_pretrained_reads_the_model_config_and_saves_the_knobs(tokenizer, clip, tmp_path):
    processor = VideoNSAProcessor(tokenizer=tokenizer, max_memory="24GB", weights="int8", answer_tokens=256)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert (saved["max_memory"], saved["weights"], saved["answer_tokens"]) == ("24GB", "int8", 256)
    assert "model_config" not in saved and "_model_config" not in saved
    # no model config beside it: planning asks for one
    with pytest.raises(MemoryBudgetError, match="model_config="):
        VideoNSAProcessor.from_pretrained(tmp_path)(text=PROMPT, videos=clip)
    # the authors' release layout: a Qwen2.5-VL config.json, text keys at the top level
    flat = {key: value for key, value in copy.deepcopy(PRESET_7B).items() if key != "text_config"}
    flat.update(copy.deepcopy(PRESET_7B["text_config"]), model_type="qwen2_5_vl")
    (tmp_path / "config.json").write_text(json.dumps(flat))
    memory = memory_for(100, weights="int8", answer_tokens=256)
    loaded = VideoNSAProcessor.from_pretrained(tmp_path, max_memory=memory, max_context_tokens=5000)
    assert loaded.weights == "int8" and loaded.answer_tokens == 256 and loaded.nsa_block_size == 64
    assert (loaded.max_memory, loaded.max_context_tokens) == (memory, 5000)
    assert pv.parameter_counts(loaded.model_config) == pv.parameter_counts(PRESET_7B)
    # the processor's own settings stay out of the tokenizer's (which would save them in tokenizer_config.json)
    assert not {"max_memory", "max_context_tokens"} & set(loaded.tokenizer.init_kwargs)
    given = VideoNSAProcessor.from_pretrained(tmp_path, model_config=tiny_config())  # a given config wins
    assert given.model_config == tiny_config().to_dict() and "model_config" not in given.tokenizer.init_kwargs
    with pytest.raises(ContextBudgetExceededError, match="the 100 prompt tokens that fit in max_memory=.* int8 weight"):
        loaded(text=PROMPT, videos=clip)
    loaded.save_pretrained(tmp_path / "again")
    assert "model_config" not in json.loads((tmp_path / "again" / "processor_config.json").read_text())
