"""The reference against the authors' own outputs (``../shared/conformance``): the released function, quirks included."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nsa_kernels import reference

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
CASES = sorted(CONFORMANCE.glob("case_*.safetensors"))
pytestmark = pytest.mark.skipif(not CASES, reason=f"conformance vectors not found in {CONFORMANCE}")


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
