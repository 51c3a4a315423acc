"""The reference against the authors' own outputs (``../shared/conformance``): the released function, quirks included."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nsa_kernels import reference

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
CASES = sorted(CONFORMANCE.glob("case_*.safetensors"))
needs_vectors = pytest.mark.skipif(not CASES, reason=f"conformance vectors not found in {CONFORMANCE}")


def _run(path):
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    hidden = tensors["hidden_states"]
    gate_hidden = torch.nn.functional.gelu(hidden @ tensors["g_proj_1.weight"].T + tensors["g_proj_1.bias"])
    logits = gate_hidden @ tensors["g_proj_2.weight"].T + tensors["g_proj_2.bias"]
    logits = logits.view(1, hidden.shape[1], 28, 3) / float(meta["gate_temperature"])
    is_vision = reference.token_is_vision(tensors["position_ids"])
    out, (inter,) = reference.hybrid_attention(
        tensors["query"], tensors["key"], tensors["value"], logits, is_vision,
        block_size=int(meta["block_size"]), block_count=int(meta["block_counts"]),
        window_size=int(meta["window_size"]), return_intermediates=True,
    )
    return tensors, meta, out, inter, is_vision


@needs_vectors
@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_reference_matches_authors_code(path):
    expected, meta, out, inter, is_vision = _run(path)
    T = int(meta["T"])
    assert torch.equal(is_vision, expected["is_vision"].bool())
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inter["gates64"], expected["gates"], **tol)
    torch.testing.assert_close(inter["k_cmp"], expected["k_cmp"], **tol)
    torch.testing.assert_close(inter["v_cmp"], expected["v_cmp"], **tol)
    torch.testing.assert_close(inter["lse_cmp"], expected["lse_cmp"], **tol)
    assert torch.equal(inter["block_indices"], expected["block_indices"]), "selected blocks differ (order or ties)"
    for name in ("o_cmp", "o_slc", "o_swd", "dense_output"):
        stored = "o_swd" if name == "o_swd" else name
        if stored in expected:
            torch.testing.assert_close(inter[name], expected[stored], **tol)
    torch.testing.assert_close(out.reshape(1, T, -1), expected["output"], **tol)


def _inputs(T=70, Hq=28, Hkv=4, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(
        query=torch.randn(1, Hq, T, D, generator=g, dtype=dtype),
        key=torch.randn(1, Hkv, T, D, generator=g, dtype=dtype),
        value=torch.randn(1, Hkv, T, D, generator=g, dtype=dtype),
        gate_logits=torch.randn(1, T, Hq, 3, generator=g, dtype=dtype),
        token_is_vision=torch.ones(1, T, dtype=torch.bool),
    )


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda x: x.update(query=x["query"][0]), ValueError, "4-D"),
        (lambda x: x.update(key=x["key"][..., :4]), ValueError, "must both be"),
        (lambda x: x.update(value=x["value"].double()), TypeError, "one floating dtype"),
        (lambda x: x.update(query=x["query"][:, :27]), ValueError, "gate_logits|multiple"),
        (lambda x: x.update(gate_logits=x["gate_logits"][..., :2]), ValueError, "gate_logits"),
        (lambda x: x.update(token_is_vision=x["token_is_vision"].long()), ValueError, "bool"),
        (lambda x: x.update(token_is_vision=x["token_is_vision"][:, 1:]), ValueError, "one flag per key"),
        (lambda x: x.update(query=x["query"].long(), key=x["key"].long(), value=x["value"].long()), TypeError,
         "floating"),
    ],
)
def test_bad_attention_inputs_are_rejected_with_a_clear_message(change, error, message):
    inputs = _inputs()
    change(inputs)
    with pytest.raises(error, match=message):
        reference.hybrid_attention(**inputs, block_size=16, block_count=2, window_size=32)


def test_position_ids_must_be_mrope_rows():
    with pytest.raises(ValueError, match=r"\[3, batch, seq_len\]"):
        reference.token_is_vision(torch.zeros(2, 5, dtype=torch.long))
