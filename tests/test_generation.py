"""Generation and caching on video prompts, the same on every supported transformers release (5.17 to the newest).

transformers' own generic model and generation tests never reach VideoNSA's hybrid path (their inputs hold no video
with 3-D positions), so the video-bearing versions of them live here: each prompt carries a real video, and every
test asserts that its prefill ran the hybrid attention. ``scripts/test.sh`` runs this file under the pinned newest
transformers and again under the oldest supported one.
"""

import pytest
import torch
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache, StaticCache

from modeling_videonsa import CACHE_ARG, VideoNSAForConditionalGeneration, _key_padding_mask, check_transformers_version
from nsa_kernels import reference
from test_model import TEXT_VIDEO_TEXT, _embeds_and_positions, qwen_twin
from videonsa.testing import IMAGE_TOKEN, VIDEO_TOKEN, left_pad_batch, tiny_model, video_prompt

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def inputs():
    return video_prompt(TEXT_VIDEO_TEXT)


@pytest.fixture(scope="module")
def greedy(model, inputs):
    """Greedy generation with generate's default (dynamic) cache: what every other way of generating must return."""
    with record_paths(model) as paths:
        sequence = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert paths[0].startswith("hybrid")
    return sequence


class record_paths:
    """Collect the attention path (``last_path``) of layer 0 for every forward pass run inside the block."""

    def __init__(self, model):
        self.attention = model.model.language_model.layers[0].self_attn

    def __enter__(self):
        self.paths = []
        self.handle = self.attention.register_forward_hook(lambda module, args, output: self.paths.append(
            module.last_path))
        return self.paths

    def __exit__(self, *exc):
        self.handle.remove()


def cache_of(output):
    """The KV cache of a model output, under the installed release's field name."""
    return output[CACHE_ARG]


# ----------------------------------------------------------------------------------------------------------
# Supported releases and the cache's two names
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["5.17.0", "5.23.0", "5.25.0", "5.26.0.dev0", "5.99.1"])
def test_supported_transformers_releases_pass_the_import_check(version):
    check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.16.1", "4.57.1", "6.0.0", "6.0.0.dev0", "6.1.0"])
def test_unsupported_transformers_releases_are_a_clear_import_error(version):
    with pytest.raises(ImportError, match=rf"supports transformers >=5\.17\.0,<6\.0\.0, but transformers {version}"):
        check_transformers_version(version)


def test_generation_mixin_is_a_direct_base():
    assert GenerationMixin in VideoNSAForConditionalGeneration.__bases__
    assert VideoNSAForConditionalGeneration.can_generate()


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_cache_is_accepted_under_either_name_and_holds_the_video_prompt(model, inputs, name):
    """After a video prefill every layer's cache holds the prompt, its keys are the layer's own (k_proj + RoPE of
    the layer's input, captured independently), and the cache remembers the token types of the positions."""
    captured = {}
    attention = model.model.language_model.layers[0].self_attn
    handle = attention.register_forward_hook(
        lambda module, args, kwargs, output: captured.update(hidden=kwargs["hidden_states"],
                                                             emb=kwargs["position_embeddings"]),
        with_kwargs=True,
    )
    cache = DynamicCache(config=model.config.text_config)
    try:
        with torch.no_grad():
            output = model(**inputs, **{name: cache})
    finally:
        handle.remove()
    length = inputs["input_ids"].shape[1]
    assert attention.last_path.startswith("hybrid")
    assert cache_of(output) is cache and cache.get_seq_length() == length
    assert all(layer.keys.shape[2] == length and layer.values.shape[2] == length for layer in cache.layers)
    _, key, value = attention.project_qkv(captured["hidden"], captured["emb"])
    torch.testing.assert_close(cache.layers[0].keys, key)
    torch.testing.assert_close(cache.layers[0].values, value)
    positions, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                              video_grid_thw=inputs["video_grid_thw"])
    assert torch.equal(cache.videonsa_token_is_vision, reference.token_is_vision(positions))


def test_two_different_caches_under_both_names_are_rejected(model, inputs):
    """In VideoNSA's own forwards (transformers >= 5.24's top-level forward keeps `cache` and warns itself)."""
    embeds, positions = _embeds_and_positions(model, inputs)
    config = model.config.text_config
    with pytest.raises(ValueError, match="Two different KV caches"):
        model.model.language_model(inputs_embeds=embeds, position_ids=positions, cache=DynamicCache(config=config),
                                   past_key_values=DynamicCache(config=config))
    hidden = torch.zeros(1, 3, config.hidden_size)
    with pytest.raises(ValueError, match="Two different KV caches"):
        model.model.language_model.layers[0].self_attn(hidden, cache=DynamicCache(config=config),
                                                       past_key_values=DynamicCache(config=config))


def test_a_cached_decode_step_is_dense_attention_over_the_video_prompt(model, inputs):
    """A decode step after a video prefill attends densely over the whole cached prompt (the released function):
    its logits equal plain Qwen2.5-VL's (same weights) stepping on a copy of the same cache."""
    twin = qwen_twin(model)
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        cache = cache_of(prefill)
        twin_cache = DynamicCache(config=model.config.text_config)
        for layer, source in enumerate(cache.layers):
            twin_cache.update(source.keys.clone(), source.values.clone(), layer)
        token = prefill.logits[:, -1:].argmax(-1)
        step = {"input_ids": token}  # positions: the cache's length + the prompt's rope delta
        with record_paths(model) as paths:
            mine = model(**step, **{CACHE_ARG: cache}).logits
        twin.model.rope_deltas = model.model.rope_deltas
        theirs = twin(**step, **{CACHE_ARG: twin_cache}).logits
    assert paths == ["dense"]
    torch.testing.assert_close(mine, theirs)


def test_cached_and_uncached_greedy_agree_on_the_first_token_only_by_construction(model, inputs, greedy):
    """The first new token comes from the same hybrid prefill in both modes. Later ones differ by design: cached
    decode steps are dense, while without a cache every step is one hybrid pass over prompt + generated tokens,
    in which the new tokens take part in the NSA branches (as in the authors' code). With this seed they differ."""
    uncached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(uncached[:, : prompt + 1], greedy[:, : prompt + 1])
    assert not torch.equal(uncached, greedy)


# ----------------------------------------------------------------------------------------------------------
# Ways of generating that must give plain greedy's tokens
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("assistant", ["itself", "another tiny model", "prompt lookup"])
def test_assisted_decoding_matches_greedy(model, inputs, greedy, assistant):
    extra = {"prompt_lookup_num_tokens": 2} if assistant == "prompt lookup" else {
        "assistant_model": model if assistant == "itself" else tiny_model(seed=1)}
    with record_paths(model) as paths:
        assisted = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **extra)
    assert paths[0].startswith("hybrid")
    assert torch.equal(assisted, greedy)


def test_assisted_sampling_runs_on_a_video_prompt(model, inputs):
    torch.manual_seed(0)
    with record_paths(model) as paths:
        sampled = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20,
                                 assistant_model=tiny_model(seed=1))
    assert paths[0].startswith("hybrid")
    assert sampled.shape == (1, inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert torch.equal(sampled[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_generation_from_inputs_embeds_matches_generation_from_pixels(model, inputs, greedy):
    """Embeddings with the video features scattered in, plus their 3-D positions: the prefill is hybrid and the
    new tokens are those of generating from input_ids and pixels."""
    embeds, positions = _embeds_and_positions(model, inputs)
    text_positions = torch.arange(embeds.shape[1])[None, None]
    with record_paths(model) as paths:
        generated = model.generate(inputs_embeds=embeds, position_ids=torch.cat([text_positions, positions]),
                                   attention_mask=inputs["attention_mask"], max_new_tokens=NEW_TOKENS,
                                   do_sample=False)
    assert paths[0].startswith("hybrid")
    assert torch.equal(generated[:, -NEW_TOKENS:], greedy[:, -NEW_TOKENS:])


def test_static_cache_generation_matches_the_dynamic_cache_batched_and_single(model):
    """cache_implementation="static": generate sizes the masks to the cache's capacity; the hybrid prefill runs on
    the filled part of the static buffers. A left-padded batch (two videos, one text-only prompt) gives each
    sample's own greedy tokens, with either cache."""
    samples = [video_prompt(TEXT_VIDEO_TEXT, seed=1), video_prompt([3, (2, 4, 4), 20], seed=2), video_prompt([9])]
    batch = left_pad_batch(samples)
    with record_paths(model) as paths:
        static = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    assert paths[0].startswith("hybrid") and set(paths[1:]) == {"dense"}
    dynamic = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(static, dynamic)
    for row, sample in enumerate(samples):
        single = model.generate(**sample, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
        assert torch.equal(static[row, -NEW_TOKENS:], single[0, -NEW_TOKENS:]), f"sample {row}"


def test_static_cache_forward_with_a_mask_sized_to_the_capacity(model, inputs):
    """A forward on a StaticCache takes a 2-D mask over the sequence or over the cache's whole capacity (positions
    given, as generate gives them) and computes the dynamic cache's hybrid pass; the cache remembers the types."""
    length = inputs["input_ids"].shape[1]
    embeds, positions = _embeds_and_positions(model, inputs)
    with torch.no_grad():
        expected = model(**inputs).logits
        for width in (length, length + 8):
            cache = StaticCache(config=model.config.text_config, max_cache_len=length + 8)
            mask = torch.ones(1, width, dtype=torch.long)
            got = model(**dict(inputs, attention_mask=mask), position_ids=positions, **{CACHE_ARG: cache}).logits
            assert model.model.language_model.layers[0].self_attn.last_path.startswith("hybrid")
            torch.testing.assert_close(got, expected)
            flags = cache.videonsa_token_is_vision
            assert torch.equal(flags[:, :length], reference.token_is_vision(positions)) and not flags[:, length:].any()


def test_compiled_decode_steps_trace_in_one_graph_and_match_eager(model, inputs):
    """torch.compile(fullgraph=True) of the forward traces a decode step on a static cache (no host sync in token
    typing or path choice) and gives the eager dense steps' logits; a compiled pass with video tokens fails loudly
    (its hybrid attention cannot be traced) instead of running dense."""
    length = inputs["input_ids"].shape[1]
    embeds, positions = _embeds_and_positions(model, inputs)

    def run(forward, cache, steps=3):
        with torch.no_grad():
            output = model(**inputs, position_ids=positions, **{CACHE_ARG: cache})
            logits, token, position = [output.logits[:, -1]], output.logits[:, -1:].argmax(-1), positions[..., -1:]
            for _ in range(steps):
                position = position + 1
                output = forward(input_ids=token, position_ids=position, **{CACHE_ARG: cache})
                logits.append(output.logits[:, -1])
                token = output.logits[:, -1:].argmax(-1)
        return torch.stack(logits)

    torch._dynamo.reset()
    eager = run(model, DynamicCache(config=model.config.text_config))
    static = StaticCache(config=model.config.text_config, max_cache_len=length + 8)
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    torch.testing.assert_close(run(compiled, static), eager)
    assert static.videonsa_token_is_vision[0, :length].sum() == 23 and not static.videonsa_token_is_vision[0, length:].any()
    with pytest.raises(RuntimeError, match="compiled VideoNSA pass got vision tokens"), torch.no_grad():
        compiled(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    text = video_prompt([12])  # a text-only prefill is dense, so it compiles too
    text_positions = torch.arange(12)[None, None].expand(3, 1, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=text["input_ids"], position_ids=text_positions).logits,
                                   model(input_ids=text["input_ids"], position_ids=text_positions).logits)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# Save/load, attention implementations, attention weights
# ----------------------------------------------------------------------------------------------------------
def test_save_and_reload_generates_the_same_tokens(model, inputs, greedy, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = VideoNSAForConditionalGeneration.from_pretrained(tmp_path).eval()
    with record_paths(reloaded) as paths:
        again = reloaded.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert paths[0].startswith("hybrid")
    assert torch.equal(again, greedy)


def test_eager_and_sdpa_generate_the_same_tokens(inputs, greedy):
    model = tiny_model()
    model.set_attn_implementation("eager")
    with record_paths(model) as paths:
        eager = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert paths[0] == "hybrid (torch NSA + eager dense)"
    assert torch.equal(eager, greedy)


def test_output_attentions_of_a_hybrid_pass_are_the_dense_parts_weights(inputs):
    """eager, a video pass: one ``[B, heads, T, T]`` tensor per layer, the weights of the hybrid attention's dense
    part: softmax of the text queries over their causal keys, the zeroed vision queries spread evenly."""
    model = tiny_model()
    model.set_attn_implementation("eager")
    attention = model.model.language_model.layers[0].self_attn
    captured = {}
    handle = attention.register_forward_hook(
        lambda module, args, kwargs, output: captured.update(hidden=kwargs["hidden_states"],
                                                             emb=kwargs["position_embeddings"]),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            output = model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    length = inputs["input_ids"].shape[1]
    assert attention.last_path.startswith("hybrid")
    assert len(output.attentions) == model.config.text_config.num_hidden_layers
    assert all(weights.shape == (1, 28, length, length) for weights in output.attentions)
    query, key, _ = attention.project_qkv(captured["hidden"], captured["emb"])
    positions, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                              video_grid_thw=inputs["video_grid_thw"])
    vision = reference.token_is_vision(positions)[0]
    query = query * ~vision[None, None, :, None]
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = (query @ key.transpose(-1, -2)) * attention.scaling
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    expected = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(output.attentions[0], expected)
    assert torch.allclose(output.attentions[0][0, :, vision][..., :1], 1 / (torch.nonzero(vision)[:, 0] + 1.0)[:, None])


# ----------------------------------------------------------------------------------------------------------
# Placeholders without pixels (issue 17)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["video", "image"])
def test_placeholders_without_pixels_are_a_clear_error(model, kind):
    token = VIDEO_TOKEN if kind == "video" else IMAGE_TOKEN
    sample = video_prompt([5, 7])
    sample["input_ids"][0, 5:9] = token
    with pytest.raises(ValueError, match=rf"input_ids hold 4 {kind} placeholder tokens \(id {token}\) but no {kind} "
                                         rf"was passed.*pixel_values"):
        model(**sample)
    with pytest.raises(ValueError, match=f"4 {kind} placeholder tokens"):
        model.generate(**sample, max_new_tokens=2)


def test_a_sampled_placeholder_id_in_a_decode_step_is_text(model, inputs):
    """Decode steps are not checked: a generated token may carry a placeholder id, and it is typed text."""
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        step = model(input_ids=torch.tensor([[VIDEO_TOKEN]]), **{CACHE_ARG: cache_of(prefill)})
    assert step.logits.shape == (1, 1, 1000) and torch.isfinite(step.logits).all()


def test_padding_masks_of_other_widths_are_rejected_naming_both_sizes():
    padded = torch.ones(2, 46, dtype=torch.long)
    padded[1, :3] = 0
    assert torch.equal(_key_padding_mask(padded, 2, 38, capacity=46), padded[:, :38].bool())
    with pytest.raises(ValueError, match=r"covers \(1, 41\) positions .* 38 \(or the static cache's 46\) key"):
        _key_padding_mask(torch.ones(1, 41), 1, 38, capacity=46)
    with pytest.raises(ValueError, match=r"covers \(1, 46\) positions .* 38 key"):
        _key_padding_mask(torch.ones(1, 46), 1, 38)
