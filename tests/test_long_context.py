"""videonsa.long_context: the prefill in pieces equals the one-pass forward; generation continues from it."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from videonsa.testing import left_pad_batch, tiny_model, video_prompt
from videonsa.long_context import chunked_generate, chunked_prefill, video_features

PROMPT = [5, (6, 4, 8), 9]  # 5 text | 48 video tokens (+ start/end) | 9 text: 64 tokens, 4 blocks of 16


def one_pass(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=True)


def assert_same_cache(cache, expected):
    assert len(cache.layers) == len(expected.layers)
    for mine, theirs in zip(cache.layers, expected.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-6)
    assert torch.equal(cache.videonsa_token_is_vision, expected.videonsa_token_is_vision)
    assert cache.get_seq_length() == expected.get_seq_length()


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_chunked_prefill_equals_the_one_pass_forward(chunk_size):
    """Three layers (so later layers see keys built from earlier layers' NSA outputs), every piece size."""
    model = tiny_model(num_layers=3)
    inputs = video_prompt(PROMPT)
    expected = one_pass(model, inputs)
    deltas = model.model.rope_deltas.clone()
    model.model.rope_deltas = None
    logits, cache = chunked_prefill(model, chunk_size=chunk_size, vision_chunk_size=chunk_size, **inputs)
    torch.testing.assert_close(logits, expected.logits[:, -1], rtol=1e-5, atol=1e-5)
    assert_same_cache(cache, expected.past_key_values)
    assert torch.equal(model.model.rope_deltas, deltas)
    assert model.model.language_model.layers[0].self_attn.last_path.startswith("hybrid")


def test_chunked_prefill_with_padding_real_selection_and_dense_mode():
    """A left-padded batch (video, video, text-only), 2 selection slots (a real top-k), and nsa_enabled=False."""
    model = tiny_model(num_layers=2, nsa_block_count=2)
    inputs = left_pad_batch([video_prompt(PROMPT, seed=1), video_prompt([3, (2, 4, 4), 20], seed=2),
                             video_prompt([9], seed=3)])
    for enabled in (True, False):
        model.config.nsa_enabled = enabled
        expected = one_pass(model, inputs)
        logits, cache = chunked_prefill(model, chunk_size=5, **inputs)
        torch.testing.assert_close(logits, expected.logits[:, -1], rtol=1e-5, atol=1e-5)
        assert_same_cache(cache, expected.past_key_values)


def test_the_mlp_only_ever_sees_one_piece():
    model = tiny_model(num_layers=2)
    rows = []
    handles = [layer.mlp.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[1]))
               for layer in model.model.language_model.layers]
    chunked_prefill(model, chunk_size=10, **video_prompt(PROMPT))
    for handle in handles:
        handle.remove()
    assert max(rows) == 10 and sum(rows) == 2 * 64


def test_vision_tower_in_pieces_equals_one_call():
    model = tiny_model(num_layers=1)
    inputs = video_prompt([3, (6, 4, 8), 2, (3, 4, 4), 1])  # two videos: 8 and 4 tokens per temporal patch
    pixels, grid = inputs["pixel_values_videos"], inputs["video_grid_thw"]
    with torch.no_grad():
        whole = video_features(model, pixels, grid, max_tokens=None)
        pieces = video_features(model, pixels, grid, max_tokens=9)  # 1 temporal patch of video 0, 2 of video 1
        reference = torch.cat(model.model.get_video_features(pixels, grid, return_dict=True).pooler_output)
    assert whole.shape == (6 * 8 + 3 * 4, 224)
    torch.testing.assert_close(whole, reference)
    torch.testing.assert_close(pieces, reference, rtol=1e-5, atol=1e-6)


def test_chunked_generate_equals_generate_greedy_and_sampled():
    model = tiny_model(num_layers=2)
    inputs = video_prompt(PROMPT)
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(chunked_generate(model, chunk_size=7, **inputs, max_new_tokens=6, do_sample=False), expected)
    torch.manual_seed(3)
    sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=20)
    torch.manual_seed(3)
    assert torch.equal(chunked_generate(model, chunk_size=7, **inputs, max_new_tokens=6, do_sample=True, top_k=20),
                       sampled)
    assert "_prefill" not in model.__dict__  # the patch is undone


def test_generate_continues_the_returned_cache():
    model = tiny_model(num_layers=2)
    inputs = video_prompt(PROMPT)
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    logits, cache = chunked_prefill(model, chunk_size=9, **inputs)
    first = logits.argmax(dim=-1, keepdim=True)
    assert torch.equal(first, expected[:, 64:65])
    sequence = torch.cat([inputs["input_ids"], first], dim=1)
    continued = model.generate(input_ids=sequence, attention_mask=torch.ones_like(sequence), past_key_values=cache,
                               max_new_tokens=5, do_sample=False)
    assert torch.equal(continued, expected)


def test_bad_calls_are_rejected():
    model = tiny_model(num_layers=1)
    inputs = video_prompt(PROMPT)
    with pytest.raises(TypeError, match="unexpected inputs"):
        chunked_prefill(model, **inputs, labels=inputs["input_ids"])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_prefill(model, chunk_size=0, **inputs)
    _, cache = chunked_prefill(model, **inputs)
    with pytest.raises(ValueError, match="does not continue one"):
        chunked_prefill(model, past_key_values=cache, **inputs)
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        chunked_prefill(model, attention_mask=inputs["attention_mask"])
    empty = DynamicCache(config=model.config.text_config)
    logits, filled = chunked_prefill(model, past_key_values=empty, **inputs)
    assert filled is empty and filled.get_seq_length() == 64
