"""The VideoNSA model on tiny random checkpoints: wiring, training, generation, the dense switch, batching."""

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import DynamicCache

import modeling_videonsa
from configuration_videonsa import NSA_KEYS, VideoNSAConfig
from nsa_kernels import reference
from videonsa.testing import VIDEO_TOKEN, left_pad_batch, tiny_config, tiny_model, video_prompt

TEXT_VIDEO_TEXT = [5, (4, 4, 6), 7]  # 5 text | video of 24 tokens (+ start/end) | 7 text; block 16 -> 3 blocks


def qwen_twin(model):
    """Plain Qwen2.5-VL with the same weights (the gate MLPs dropped)."""
    config = model.config.to_dict()
    for key in NSA_KEYS:
        config["text_config"].pop(key)
    config["text_config"].pop("model_type")
    config.pop("auto_map", None)
    config.pop("model_type")
    twin = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).eval()
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("g_proj" in key for key in unexpected)
    return twin


def test_state_dict_keys_follow_released_layout():
    model = tiny_model()
    keys = set(model.state_dict())
    config = model.config.text_config
    for layer in range(config.num_hidden_layers):
        prefix = f"model.language_model.layers.{layer}.self_attn."
        assert model.state_dict()[prefix + "g_proj_1.weight"].shape == (config.hidden_size, config.hidden_size)
        assert model.state_dict()[prefix + "g_proj_2.weight"].shape == (3 * 28, config.hidden_size)
        assert {prefix + "g_proj_1.bias", prefix + "g_proj_2.bias"} <= keys
    assert "lm_head.weight" in keys and any(k.startswith("model.visual.") for k in keys)


def test_attention_layer_computes_the_reference_function():
    """Layer 0's output equals o_proj(reference hybrid attention) on the same q/k/v, gates and token typing."""
    model = tiny_model()
    inputs = video_prompt(TEXT_VIDEO_TEXT)
    attention = model.model.language_model.layers[0].self_attn
    captured = {}

    def capture(module, args, kwargs, output):
        captured.update(hidden=kwargs["hidden_states"], emb=kwargs["position_embeddings"], out=output[0])

    handle = attention.register_forward_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    position_ids, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"]
    )
    is_vision = reference.token_is_vision(position_ids)
    # 24 video tokens; the first one has equal (t, h, w) ids and is typed text, as in the authors' code
    assert not is_vision[0, 6] and is_vision[0, 7:30].all() and is_vision.sum() == 23
    hidden = captured["hidden"]
    shape = (1, hidden.shape[1], -1, attention.head_dim)
    q = attention.q_proj(hidden).view(shape).transpose(1, 2)
    k = attention.k_proj(hidden).view(shape).transpose(1, 2)
    v = attention.v_proj(hidden).view(shape).transpose(1, 2)
    q, k = modeling_videonsa.apply_rotary_pos_emb(q, k, *captured["emb"])
    gates = attention.g_proj_2(torch.nn.functional.gelu(attention.g_proj_1(hidden))).view(1, -1, 28, 3) / 0.3
    expected = reference.hybrid_attention(q, k, v, gates, is_vision, block_size=16, block_count=2, window_size=32)
    torch.testing.assert_close(captured["out"], attention.o_proj(expected.reshape(1, hidden.shape[1], -1)))


def test_one_plan_per_pass_reaches_every_layer(monkeypatch):
    """The pass's token types are planned once (plan_hybrid: the host reads the GPU's answers there, once) and every
    layer's hybrid attention gets that plan instead of planning, and waiting on the GPU, again."""
    model = tiny_model()
    kernels = modeling_videonsa.load_nsa_kernels(model.config)
    plans, seen = [], []
    plan_hybrid, hybrid_attention = kernels.plan_hybrid, kernels.reference.hybrid_attention

    def planning(*args):
        plans.append(plan_hybrid(*args))
        return plans[-1]

    def attending(*args, plan=None, **kwargs):
        seen.append(plan)
        return hybrid_attention(*args, plan=plan, **kwargs)

    monkeypatch.setattr(kernels, "plan_hybrid", planning)
    monkeypatch.setattr(kernels.reference, "hybrid_attention", attending)
    with torch.no_grad():
        model(**video_prompt(TEXT_VIDEO_TEXT))
    assert len(plans) == 1 and plans[0].mixed_samples == (True,)
    assert len(seen) == model.config.text_config.num_hidden_layers and all(p is plans[0] for p in seen)


def test_vision_tokens_only_under_padding_make_a_dense_pass(monkeypatch):
    """New vision tokens that are all padding leave the pass dense (no hybrid plan handed to the layers); one real
    vision token makes it hybrid, with a plan that runs that sample's NSA part."""
    text_model = tiny_model().model.language_model
    kernels = modeling_videonsa.load_nsa_kernels(text_model.config)
    flags = torch.tensor([[True, True, False, False], [False, False, False, False]])
    monkeypatch.setattr(kernels, "token_is_vision", lambda rows: flags)
    position_ids = torch.zeros(3, 2, 4, dtype=torch.long)  # M-RoPE rows; the types come from the patched function
    padded_vision = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # sample 0's vision tokens are its left padding
    assert text_model._type_tokens(position_ids, padded_vision, None, 2, 4) is None
    tokens = text_model._type_tokens(position_ids, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), None, 2, 4)
    assert tokens is not None and tokens.plan.nsa_samples == (True, False)


def test_dense_switch_and_text_only_prompts_are_qwen25vl():
    model = tiny_model()
    twin = qwen_twin(model)
    video, text = video_prompt(TEXT_VIDEO_TEXT), video_prompt([12])
    with torch.no_grad():
        nsa_logits = model(**video).logits
        torch.testing.assert_close(model(**text).logits, twin(**text).logits)  # text-only: plain dense
        model.config.nsa_enabled = False
        torch.testing.assert_close(model(**video).logits, twin(**video).logits)
    assert not torch.allclose(nsa_logits, twin(**video).logits, atol=1e-3)  # NSA really changes video passes


def test_loss_and_gradients_reach_gates_and_projections():
    model = tiny_model().train()
    inputs = video_prompt(TEXT_VIDEO_TEXT)
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    attention = model.model.language_model.layers[0].self_attn
    for name in ("g_proj_1", "g_proj_2", "q_proj", "k_proj", "v_proj", "o_proj"):
        grad = getattr(attention, name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = video_prompt(TEXT_VIDEO_TEXT)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append(model.model.language_model.layers[0].self_attn.g_proj_1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_generate_greedy_with_and_without_cache_and_sampling():
    """With a cache, decode steps are dense (the released function); with use_cache=False every step is one full
    pass over prompt + generated tokens, so the new tokens take part in the mixed pass, as in the authors' code.
    Both modes share the first token (the same prefill); the uncached one equals a loop of full forwards."""
    model = tiny_model()
    inputs = video_prompt(TEXT_VIDEO_TEXT)
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    prompt = inputs["input_ids"].shape[1]
    assert cached.shape == uncached.shape == (1, prompt + 6)
    assert torch.equal(cached[:, : prompt + 1], uncached[:, : prompt + 1])
    sequence = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            step = dict(inputs, input_ids=sequence, attention_mask=torch.ones_like(sequence),
                        mm_token_type_ids=torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, sequence.shape[1] - prompt)))
            next_token = model(**step, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(uncached, sequence)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=50, temperature=1.0)
    assert sampled.shape == cached.shape and torch.equal(sampled[:, :-6], inputs["input_ids"])


def test_batched_generate_with_left_padding_matches_single_samples():
    model = tiny_model()
    samples = [video_prompt(TEXT_VIDEO_TEXT, seed=1), video_prompt([3, (2, 4, 4), 20], seed=2), video_prompt([9])]
    batch = left_pad_batch(samples)
    batched = model.generate(**batch, max_new_tokens=5, do_sample=False)
    for row, sample in enumerate(samples):
        single = model.generate(**sample, max_new_tokens=5, do_sample=False)
        assert torch.equal(batched[row, -5:], single[0, -5:]), f"sample {row}"


def _embeds_and_positions(model, inputs):
    position_ids, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"]
    )
    embeds = model.model.get_input_embeddings()(inputs["input_ids"])
    video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
    mask = (inputs["input_ids"] == VIDEO_TOKEN)[..., None].expand_as(embeds)
    return embeds.masked_scatter(mask, torch.cat(video.pooler_output)), position_ids


@pytest.mark.parametrize("split", [20, 30])  # the second chunk holds video tokens
def test_chunked_prefill_equals_unsplit_prefill_where_the_function_allows(split):
    """A video chunk arriving on a non-empty cache sees the cached keys with their remembered token types.

    With one layer and every candidate block kept (T <= block size x slots), the spec's function of the last
    chunk's rows does not depend on how the prompt was split, so the logits must agree exactly. Deeper models
    differ by design: compression looks at later blocks, so earlier rows' outputs (and the next layers' keys)
    depend on tokens a chunk has not seen yet; and a continuation with no vision token is dense, like a decode
    step (README, "Chunked prefill").
    """
    model = tiny_model(num_layers=1, nsa_block_count=4)
    inputs = video_prompt([5, (4, 4, 8), 7])  # 46 tokens, 3 blocks of 16 <= 4 slots
    embeds, position_ids = _embeds_and_positions(model, inputs)
    with torch.no_grad():
        whole = model(inputs_embeds=embeds, position_ids=position_ids).logits
        cache = DynamicCache(config=model.config.text_config)
        model(inputs_embeds=embeds[:, :split], position_ids=position_ids[..., :split], past_key_values=cache)
        rest = model(inputs_embeds=embeds[:, split:], position_ids=position_ids[..., split:], past_key_values=cache)
    torch.testing.assert_close(rest.logits, whole[:, split:])


def test_vision_tokens_on_a_foreign_cache_are_rejected():
    model = tiny_model(num_layers=1)
    inputs = video_prompt([5, (4, 4, 8), 7])
    embeds, position_ids = _embeds_and_positions(model, inputs)
    cache = DynamicCache(config=model.config.text_config)
    twin = qwen_twin(model)
    with torch.no_grad():
        twin(inputs_embeds=embeds[:, :30], position_ids=position_ids[..., :30], past_key_values=cache)
        with pytest.raises(ValueError, match="did not type"):
            model(inputs_embeds=embeds[:, 30:], position_ids=position_ids[..., 30:], past_key_values=cache)


def test_mismatched_video_grid_is_a_clear_error():
    model = tiny_model()
    inputs = video_prompt(TEXT_VIDEO_TEXT)
    inputs["video_grid_thw"] = torch.tensor([[4, 4, 8]])
    inputs["pixel_values_videos"] = torch.randn(4 * 4 * 8, inputs["pixel_values_videos"].shape[1])
    with pytest.raises(ValueError, match="Video features and video tokens do not match"):
        model(**inputs)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(nsa_block_size=48), "power of two"),
        (dict(nsa_block_size=8), "power of two"),
        (dict(nsa_block_count=0), "positive integer"),
        (dict(nsa_block_count=65), "<= nsa_block_size"),
        (dict(nsa_window_size=0), "positive integer"),
        (dict(nsa_gate_temperature=0.0), "> 0"),
        (dict(nsa_backend="cuda"), "nsa_backend"),
    ],
)
def test_invalid_nsa_config_is_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)
    config = VideoNSAConfig()
    key, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=message):
        setattr(config, key, value)
    assert getattr(config, key) == getattr(VideoNSAConfig(), key)  # a rejected value is not kept


def test_config_defaults_and_round_trip(tmp_path):
    config = VideoNSAConfig()
    assert (config.nsa_block_size, config.nsa_block_count, config.nsa_window_size) == (64, 32, 256)
    assert config.nsa_gate_temperature == 0.3 and config.nsa_enabled and config.nsa_backend == "auto"
    assert config.auto_map["AutoModel"] == "modeling_videonsa.VideoNSAForConditionalGeneration"
    custom = tiny_config(nsa_window_size=64, nsa_backend="torch", nsa_enabled=False)
    custom.save_pretrained(tmp_path)
    assert VideoNSAConfig.from_pretrained(tmp_path).to_dict() == custom.to_dict()
    flat = VideoNSAConfig(nsa_block_count=16, hidden_size=256, num_attention_heads=8)
    assert flat.text_config.nsa_block_count == 16 and flat.text_config.hidden_size == 256


def test_dense_part_follows_the_attn_implementation():
    """The dense part of the hybrid goes through transformers' attention interface: eager and sdpa agree."""
    inputs = left_pad_batch([video_prompt(TEXT_VIDEO_TEXT, seed=3), video_prompt([4, (2, 4, 4), 11], seed=4)])
    logits = []
    for implementation in ("sdpa", "eager"):
        model = tiny_model()
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits.append(model(**inputs).logits)
        assert model.model.language_model.layers[0].self_attn.last_path.endswith(f"{implementation} dense)")
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[0][real], logits[1][real], rtol=1e-4, atol=1e-5)


def test_grids_that_do_not_match_the_pixels_or_the_prompt_are_clear_errors():
    """Issue 17 item 12: a video_grid_thw that disagrees with the pixel rows or with the placeholders in input_ids, and
    a sample whose attention mask is all zeros, are errors that name the grid, the counts, the sample."""
    model = tiny_model()
    inputs = video_prompt(TEXT_VIDEO_TEXT)
    grid = inputs["video_grid_thw"]
    wrong_rows = dict(inputs, video_grid_thw=grid + torch.tensor([[2, 0, 0]]))
    with pytest.raises(ValueError, match=r"video_grid_thw \[\(\d+, \d+, \d+\)\] describes \d+ patches but "
                                         r"pixel_values_videos holds \d+ rows"):
        model(**wrong_rows)
    # the pixels fit the grid, but one placeholder of the prompt is missing
    t, h, w = grid[0].tolist()
    input_ids = inputs["input_ids"].clone()
    input_ids[0, int(torch.nonzero(input_ids[0] == VIDEO_TOKEN)[0])] = 5
    fewer_tokens = dict(inputs, input_ids=input_ids)
    with pytest.raises(ValueError, match=rf"gives {t * h * w // 4} video tokens .* input_ids hold {t * h * w // 4 - 1} "
                                         r"video placeholder tokens"):
        model(**fewer_tokens)
    no_real_token = dict(inputs, attention_mask=torch.zeros_like(inputs["attention_mask"]))
    with pytest.raises(ValueError, match=r"attention_mask marks no real token in sample\(s\) \[0\]"):
        model(**no_real_token)
