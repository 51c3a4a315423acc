"""config.prefill_chunk_tokens: the model's own chunked pass equals the unchunked one (logits, cache, generate)."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from test_long_context import assert_same_cache

from configuration_videonsa import VideoNSAConfig, VideoNSATextConfig
from videonsa.testing import left_pad_batch, tiny_model, video_prompt

PROMPT = [5, (6, 4, 8), 9]  # 5 text | 48 video tokens (+ start/end) | 9 text: 64 tokens, 4 blocks of 16
LENGTH = 64


def forward(model, inputs, chunk):
    model.config.prefill_chunk_tokens = chunk
    model.model.rope_deltas = None
    with torch.no_grad():
        return model(**inputs, use_cache=True, output_hidden_states=True)


def mlp_rows(model):
    """Rows each MLP call of the text layers sees, recorded while the returned list is alive in the test."""
    rows = []
    for layer in model.model.language_model.layers:
        layer.mlp.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[1]))
    return rows


def assert_same_pass(output, expected):
    torch.testing.assert_close(output.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(output.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert_same_cache(output.past_key_values, expected.past_key_values)


@pytest.mark.parametrize("chunk", [1, 7, 16, LENGTH - 1, LENGTH, 100])
def test_chunked_forward_equals_the_unchunked_one(chunk):
    """Three layers; chunks smaller than the prompt (dividing it or not), equal to it and larger."""
    model = tiny_model(num_layers=3)
    inputs = video_prompt(PROMPT)
    expected = forward(model, inputs, None)
    rows = mlp_rows(model)
    output = forward(model, inputs, chunk)
    assert_same_pass(output, expected)
    assert all(layer.self_attn.last_path.startswith("hybrid") for layer in model.model.language_model.layers)
    pieces = -(-LENGTH // chunk) if chunk < LENGTH else 1  # a pass not longer than the chunk runs as one
    assert len(rows) == 3 * pieces and max(rows) == min(chunk, LENGTH) and sum(rows) == 3 * LENGTH


def test_chunked_forward_of_a_left_padded_batch_with_real_selection_and_dense_mode():
    model = tiny_model(num_layers=2, nsa_block_count=2)
    inputs = left_pad_batch([video_prompt(PROMPT, seed=1), video_prompt([3, (2, 4, 4), 20], seed=2),
                             video_prompt([9], seed=3)])
    for enabled in (True, False):
        model.config.nsa_enabled = enabled
        expected = forward(model, inputs, None)
        output = forward(model, inputs, 5)
        assert_same_pass(output, expected)
        path = model.model.language_model.layers[0].self_attn.last_path
        assert path.startswith("hybrid") if enabled else path == "dense"


def test_inputs_embeds_are_not_modified():
    model = tiny_model(num_layers=2)
    embeds = torch.randn(1, 30, model.config.text_config.hidden_size)
    kept = embeds.clone()
    expected = forward(model, {"inputs_embeds": embeds}, None)
    output = forward(model, {"inputs_embeds": embeds}, 4)
    assert torch.equal(embeds, kept)
    torch.testing.assert_close(output.logits, expected.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 10])
def test_generate_gives_the_same_tokens(chunk):
    model = tiny_model(num_layers=2)
    inputs = left_pad_batch([video_prompt(PROMPT, seed=4), video_prompt([2, (2, 4, 4), 11], seed=5)])
    results = []
    for key in (None, chunk):
        model.config.prefill_chunk_tokens = key
        rows = mlp_rows(model)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        results.append(out)
        if key is not None:  # the prefill ran in chunks, the one-token decode steps whole
            assert max(rows) == chunk and rows.count(1) >= 2 * 5
    assert torch.equal(results[0].sequences, results[1].sequences)
    for mine, theirs in zip(results[1].logits, results[0].logits, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_passes_with_gradients_run_unchunked_and_give_the_same_gradients():
    """With gradients every activation is kept for the backward pass whatever the chunking, so the key is ignored:
    the MLP sees whole sequences, and loss and gradients are those of the unchunked model."""
    inputs = video_prompt(PROMPT)
    inputs["labels"] = inputs["input_ids"].clone()
    grads = []
    for chunk in (None, 8):
        model = tiny_model(num_layers=2).train()
        model.config.prefill_chunk_tokens = chunk
        rows = mlp_rows(model)
        loss = model(**inputs).loss
        loss.backward()
        assert rows == [LENGTH, LENGTH]
        grads.append((loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    assert grads[1][1].keys() == grads[0][1].keys()
    for name, grad in grads[1][1].items():
        torch.testing.assert_close(grad, grads[0][1][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "64", True])
def test_bad_values_raise_naming_the_key(bad):
    """Wrong types are refused by the strict dataclass's type check, wrong ints by validate_nsa_settings."""
    with pytest.raises((ValueError, StrictDataclassError), match="prefill_chunk_tokens"):
        VideoNSATextConfig(prefill_chunk_tokens=bad)
    config = VideoNSAConfig()
    config.prefill_chunk_tokens = 32
    with pytest.raises((ValueError, StrictDataclassError), match="prefill_chunk_tokens"):
        config.prefill_chunk_tokens = bad
    assert config.text_config.prefill_chunk_tokens == 32  # the rejected value is not kept


def test_the_key_round_trips_and_is_shared_by_the_top_level_config(tmp_path):
    config = VideoNSAConfig(text_config={"prefill_chunk_tokens": 4096})
    assert config.prefill_chunk_tokens == config.text_config.prefill_chunk_tokens == 4096
    config.save_pretrained(tmp_path)
    assert VideoNSAConfig.from_pretrained(tmp_path).prefill_chunk_tokens == 4096
    config.prefill_chunk_tokens = None
    assert config.text_config.prefill_chunk_tokens is None


LONG_PROMPT = [5, (12, 8, 8), 9]  # 5 text | 192 video tokens (+ start/end) | 9 text: 208 tokens, 13 blocks of 16


def counting_branches(monkeypatch):
    """Count the reference's compression-attention calls (one per NSA query chunk and pass) while the test runs."""
    import dataclasses

    from nsa_kernels import reference

    calls = []
    original = reference.REFERENCE_BRANCHES.compression_attention

    def counted(q, *args, **kwargs):
        calls.append(q.shape[1])
        return original(q, *args, **kwargs)

    monkeypatch.setattr(reference, "REFERENCE_BRANCHES",
                        dataclasses.replace(reference.REFERENCE_BRANCHES, compression_attention=counted))
    return calls


def test_long_pass_runs_its_nsa_part_and_vision_tower_in_pieces_with_the_same_result(monkeypatch):
    """208 tokens in pieces of 64: the NSA part of each layer runs its two passes over 4 query chunks (the padded
    64-head query and branch outputs exist for 64 rows at a time), the vision tower over pieces of at most 64
    tokens; logits, hidden states and cache equal the unchunked pass's."""
    model = tiny_model(num_layers=2, nsa_block_count=2)
    inputs = left_pad_batch([video_prompt(LONG_PROMPT, seed=6), video_prompt([30, (8, 8, 8), 3], seed=7)])
    expected = forward(model, inputs, None)
    calls = counting_branches(monkeypatch)
    output = forward(model, inputs, 64)
    assert_same_pass(output, expected)
    first, second = [64, 64, 64, 16], [64, 64, 35]  # 208 and 163 real rows
    assert calls == (first * 2 + second * 2) * 2  # per layer: sample 0's lse pass and branch pass, then sample 1's
    # the tower's own hidden states (output_hidden_states) exist only for a whole pass: without them, pieces
    tower_calls = []
    model.model.visual.register_forward_hook(lambda module, args, output: tower_calls.append(args[0].shape[0]))
    model.model.rope_deltas = None
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert tower_calls == [4 * 64] * 5  # 12 + 8 temporal patches of 64 patches (16 merged tokens): 4 per piece
    assert all(layer.self_attn.last_path.startswith("hybrid") for layer in model.model.language_model.layers)


def test_final_norm_runs_in_pieces_with_the_same_result(monkeypatch):
    """The text model's final RMS norm of a pass in pieces: float32 temporaries for one piece at a time."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    model = tiny_model(num_layers=1)
    norm = model.model.language_model.norm
    hidden = torch.randn(2, 150, model.config.text_config.hidden_size)
    with torch.no_grad():
        whole = norm(hidden)
        rows, original = [], modeling_qwen2_5_vl.Qwen2_5_VLRMSNorm.forward
        monkeypatch.setattr(modeling_qwen2_5_vl.Qwen2_5_VLRMSNorm, "forward",
                            lambda self, x: rows.append(x.shape[1]) or original(self, x))
        model.config.prefill_chunk_tokens = 64
        pieces = norm(hidden)
    assert rows == [64, 64, 22]
    torch.testing.assert_close(pieces, whole, rtol=0, atol=0)


def test_reference_nsa_part_in_query_chunks_equals_one_piece():
    """reference.hybrid_attention with query_chunk on a batch holding a mixed, an all-vision, a dense and a padded
    sample, for a whole pass and for a pass continuing a cache (Tq < Tk); float64, so any difference is a bug."""
    from nsa_kernels import reference

    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 4, 2, 1, 300, 8
    key, value = torch.randn(2, batch, kv_heads, length, dim, dtype=torch.float64)
    vision = torch.zeros(batch, length, dtype=torch.bool)
    vision[0, 10:280] = True  # mixed
    vision[1] = True  # all vision
    vision[3, 40:] = True  # mixed, left padded
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[3, :40] = False
    settings = dict(block_size=16, block_count=4, window_size=32)
    for num_q in (length, 170):
        query = torch.randn(batch, heads, num_q, dim, dtype=torch.float64)
        logits = torch.randn(batch, num_q, heads, 3, dtype=torch.float64)
        whole = reference.hybrid_attention(query, key, value, logits, vision, mask, **settings)
        for chunk in (64, 100):
            pieces = reference.hybrid_attention(query, key, value, logits, vision, mask, query_chunk=chunk, **settings)
            torch.testing.assert_close(pieces, whole, rtol=1e-12, atol=1e-12)
