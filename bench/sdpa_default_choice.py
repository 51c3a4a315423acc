"""Which backend PyTorch's SDPA picks, left alone, for the dense model's attention on this GPU.

The baseline of every comparison is what ``nsa_enabled=False`` runs: Qwen2.5-VL's attention (28 query / 4 kv heads,
head dim 128, causal, bf16) through ``torch.nn.functional.scaled_dot_product_attention`` with no backend forced.
This times that default against each backend forced alone, forward and forward+backward, and prints PyTorch's
priority order, so that a benchmark's "dense" row can name the backend a user actually gets.

    python bench/sdpa_default_choice.py --lengths 36864,131072
"""

from __future__ import annotations

import argparse

import bench_attention  # the sibling script (this folder is on sys.path when a script here runs)
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, HKV, D = 28, 4, 128
BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def attention(q, k, v, backend):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="36864,131072")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for T in (int(x) for x in args.lengths.split(",") if x):
        q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        row = {}
        for name, backend in BACKENDS.items():
            try:
                with torch.no_grad():
                    row[f"{name} fwd ms"] = round(bench_attention.timed(lambda: attention(q, k, v, backend),
                                                                        args.reps)[0], 2)
                row[f"{name} fwd+bwd ms"] = round(bench_attention.timed(
                    lambda: attention(*leaves, backend).sum().backward(), args.reps)[0], 2)
            except RuntimeError as error:  # a backend that cannot run this shape is a cell, not a crash
                row[name] = f"not available ({str(error)[:60]})"
        print(f"T={T}: {row}", flush=True)
    # read after the first CUDA attention call: PyTorch settles the order for the device then (before it, this
    # torch printed flash first on the H200 and then ran cuDNN)
    order = [SDPBackend(i).name for i in torch._C._get_sdp_priority_order()]
    print(f"PyTorch's SDPA priority order: {order}")


if __name__ == "__main__":
    main()
