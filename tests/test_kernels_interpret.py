"""The Triton kernels of ``nsa_kernels`` in Triton's CPU interpreter (float32, tiny shapes).

``TRITON_INTERPRET=1`` has to be set before triton is imported and must not leak into the other test
modules, so the checks run in two subprocesses (``tests/_interpret_worker.py``) and each check is reported
here as its own test. They compare against the conformance vectors (``../shared/conformance``; skipped
when absent) and against ``nsa_kernels.reference``, forward and gradients.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_interpret_worker.py")

# two shards of about equal interpreter time (checks by name, see the worker)
SHARDS = [
    ["conf_branches_T200", "small_branches_T70", "topk_multichunk", "dense_text_only_and_padding",
     "conf_topk_T320_bc3", "small_branches_T1", "conf_dense_T200", "conf_topk_T200",
     "selected_dkv_skips_inactive_heads", "band_key_splits"],
    ["small_nsa_with_gates_T100", "small_hybrid_mixed_padded", "small_branches_chunk", "conf_topk_T320_bc3_q0",
     "selected_union_tiles", "tile_unions_against_sets", "hybrid_in_query_chunks", "attention_delta_layouts",
     "selected_dkv_row_lists_in_items", "int64_offsets", "gate_mix_folded", "nsa_on_model_heads",
     "running_means_against_cumsum", "vision_kernels_equal_transformers"],
]
ALL = [name for shard in SHARDS for name in shard]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def results():
    root = os.path.dirname(HERE)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=path)
    procs = [subprocess.Popen([sys.executable, WORKER, "0", "1", ",".join(shard)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for shard in SHARDS]
    out = {}
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        line = [ln for ln in stdout.splitlines() if ln.startswith("@@RESULTS@@")]
        if not line:
            raise RuntimeError(f"interpreter worker failed (rc {p.returncode}):\n{stderr[-4000:]}")
        out.update(json.loads(line[-1][len("@@RESULTS@@"):]))
    return out


def test_every_check_runs_in_a_shard():
    """Each check the worker defines (a function decorated ``@check``) is in exactly one shard: a check left out
    would never run. Read from the worker's source: importing it would switch this process to the interpreter."""
    with open(WORKER) as file:
        tree = ast.parse(file.read())
    defined = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
               and any(isinstance(d, ast.Name) and d.id == "check" for d in node.decorator_list)]
    assert sorted(ALL) == sorted(defined) and len(set(ALL)) == len(ALL), set(defined) ^ set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_kernel_interpret(results, name):
    r = results.get(name)
    assert r is not None, f"check {name} did not run"
    if r["ok"] is None:
        pytest.skip(r["detail"])
    assert r["ok"], r["detail"]
    print(f"{name}: {r['detail']}")


def test_mix_branches_rejects_mismatched_inputs():
    """The gate mixing checks shapes before launching anything, so this runs without a GPU."""
    import torch

    from nsa_kernels.gate_mix import mix_branches

    o = torch.zeros(1, 5, 4, 8)
    with pytest.raises(ValueError, match="expected gates of shape"):
        mix_branches(o, o, o, torch.zeros(1, 5, 4, 2))
    with pytest.raises(ValueError, match="do not match"):
        mix_branches(o, o[:, :4], o, torch.zeros(1, 5, 4, 3))


def test_head_layout_passes_reject_what_they_cannot_lay_out():
    """pad_query, fold_query_grads and the NSA on the model's heads check their inputs before launching anything
    (so this runs without a GPU) and say what was expected."""
    import torch

    from nsa_kernels import triton_nsa as TN
    from nsa_kernels.head_layout import fold_query_grads, pad_query

    q = torch.zeros(1, 6, 5, 8)
    with pytest.raises(ValueError, match="8 padded heads cannot hold two copies of 5 heads"):
        pad_query(q, 8)
    with pytest.raises(ValueError, match=r"rows_on must be \[B, T\] = \(1, 6\)"):
        pad_query(q, 16, torch.ones(1, 5, dtype=torch.bool))
    g = torch.zeros(1, 6, 16, 8)
    with pytest.raises(ValueError, match="one to three gradients of one shape"):
        fold_query_grads([g, g[:, :5]], 5)
    with pytest.raises(ValueError, match="one to three gradients"):
        fold_query_grads([g] * 4, 5)
    with pytest.raises(ValueError, match="16 padded heads cannot hold two copies of 9 heads"):
        fold_query_grads([g], 9)
    with pytest.raises(ValueError, match=r"gates must be \[B, Tq, 16, 3\]"):
        TN.nsa_attention_on_model_heads(q, torch.zeros(1, 6, 1, 8), torch.zeros(1, 6, 1, 8),
                                        torch.zeros(1, 6, 10, 3), block_count=2, block_size=16, window_size=4,
                                        scale=1.0)


def test_key_passes_reject_flags_and_splits_they_cannot_use():
    """The keys' pooling and its gradient, the running means of the values and band attention's key splits check
    their arguments before launching anything and say what was expected."""
    import torch

    from nsa_kernels.compression import pool_blocks, unpool_grads
    from nsa_kernels.running_mean import running_means
    from nsa_kernels.window_attention import band_attention

    k = torch.zeros(1, 40, 2, 8)
    with pytest.raises(ValueError, match=r"rows_on must be \[B, T\] = \(1, 40\)"):
        pool_blocks(k, 16, torch.ones(1, 39, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"rows_on must be \[B, T\] = \(1, 40\)"):
        unpool_grads(torch.zeros(1, 3, 2, 8), 16, 40, rows_on=torch.ones(2, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_valid must be \[B, Tk\] = \(1, 40\)"):
        running_means(k, torch.ones(1, 41, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="key_splits must be at least 1, got 0"):
        band_attention(torch.zeros(1, 3, 4, 8), k, k, key_splits=0)


def test_tile_unions_rejects_bad_tile_rows():
    import torch

    from nsa_kernels.selected_attention import tile_unions

    with pytest.raises(ValueError, match="rows_per_tile must be 1, 2, 4 or 8"):
        tile_unions(torch.zeros(1, 4, 1, 2, dtype=torch.int32), 3)  # checked before any launch


def test_select_blocks_rejects_lse_without_room_for_the_rows():
    """Both selections name the log-sum-exp's expected shape (checked before any launch, so no GPU is needed):
    wrong heads, too few pass rows for the chunk's offset, and (Triton) a dtype other than float32."""
    import torch

    from nsa_kernels import reference as R
    from nsa_kernels.selection import select_blocks

    q, k_cmp = torch.zeros(1, 8, 16, 16), torch.zeros(1, 2, 1, 16)
    for lse, offset in ((torch.zeros(1, 8, 8), 0), (torch.zeros(1, 16, 12), 6), (torch.zeros(1, 16, 8), -1)):
        for select in (R.select_blocks, select_blocks):
            with pytest.raises(ValueError, match=r"lse must be \[1, 16, T\] with T >= lse_row_offset \+ Tq"):
                select(q, k_cmp, lse, 2, 64, 0.25, 8, lse_row_offset=offset)
    with pytest.raises(ValueError, match="lse must be float32"):
        select_blocks(q, k_cmp, torch.zeros(1, 16, 8, dtype=torch.float64), 2, 64, 0.25, 8)


def test_tma_is_used_only_where_the_copy_engine_can_fetch_the_blocks(monkeypatch):
    """The tensor-memory-accelerator loads are chosen only on a Hopper-or-newer GPU (or in the interpreter) for
    key/value tensors whose feature axis is contiguous, as wide as the tile and 16-byte aligned; else pointer loads."""
    import torch

    from nsa_kernels import selected_attention as S

    k = torch.zeros(1, 64, 2, 16)
    monkeypatch.setattr(S, "interpreting", lambda: False)
    assert not S.tma_usable(k, k, 16)  # CPU tensors, no interpreter
    monkeypatch.setattr(S, "interpreting", lambda: True)
    assert S.tma_usable(k, k, 16)
    assert S.tma_usable(k.transpose(1, 2).contiguous().transpose(1, 2), k, 16)  # head-major strides
    assert not S.tma_usable(k, k, 32)  # feature axis narrower than the tile
    assert not S.tma_usable(k[..., ::2], k[..., ::2], 8)  # feature axis not contiguous
    assert not S.tma_usable(torch.zeros(1, 64, 3, 2), torch.zeros(1, 64, 3, 2), 2)  # 8-byte rows


def test_float32_dots_follow_allow_tf32_and_warn_once_when_exact(monkeypatch):
    """float32 kernels use exact dots unless PyTorch's TF32 switch is on, and say once that exact is slow."""
    import warnings

    import torch

    from nsa_kernels import _triton_utils as U

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    U._warn_exact_float32.cache_clear()
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32  # (a cuBLAS settings object: monkeypatch cannot set it, so it is restored by hand)
    try:
        matmul.allow_tf32 = True
        assert U.dot_precision(torch.float32) == "tf32"
        assert U.dot_precision(torch.bfloat16) == "tf32"
        matmul.allow_tf32 = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert U.dot_precision(torch.float32) == "ieee"
            assert U.dot_precision(torch.float32) == "ieee"
    finally:
        matmul.allow_tf32 = before
    messages = [str(w.message) for w in caught if "exact float32" in str(w.message)]
    assert len(messages) == 1 and "allow_tf32" in messages[0]


def test_backend_objects_say_their_name():
    import torch

    from nsa_kernels import reference, resolve_backend

    backend = resolve_backend("torch", torch.device("cpu"))
    assert backend.name == "torch" and backend.takes_dense_fn and backend.hybrid_attention is reference.hybrid_attention
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"  # Triton runs on CUDA only
    with pytest.raises(RuntimeError, match="nsa_backend='triton' was requested"):
        resolve_backend("triton", torch.device("cpu"))
