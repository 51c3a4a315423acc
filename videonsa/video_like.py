"""Inputs for the data-dependent kernels: i.i.d. random, or video-like.

Video-like: every token of one frame step (``tokens_per_step`` merged tokens, one NSA block at the released
resolution) is a mix of a latent shared by the frame step, which drifts slowly from step to step, a spatial code
shared by the same position in every frame step, and noise; each head sees the token through its own random
projection. Neighbouring queries then score blocks alike, as real video queries do, so the selected sets overlap.
"""

from __future__ import annotations

import torch


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def token_features(T: int, D: int, *, prefix: int = 128, tokens_per_step: int = 64, drift: float = 0.05,
                   latent: float = 0.8, spatial: float = 0.5, noise: float = 0.35, generator=None,
                   device="cuda") -> torch.Tensor:
    """``[T, D]`` float32 features of norm about ``sqrt(D)``: text tokens (the first ``prefix`` and anything after
    the video) are noise; video tokens follow the model above."""
    g = generator
    feats = torch.randn(T, D, device=device, generator=g)
    steps = max(1, (T - prefix) // tokens_per_step)
    walk = torch.randn(steps, D, device=device, generator=g) * drift
    walk[0] = torch.randn(D, device=device, generator=g)
    latents = _unit_rows(torch.cumsum(walk, dim=0))  # a slowly drifting direction per frame step
    codes = _unit_rows(torch.randn(tokens_per_step, D, device=device, generator=g))
    video = torch.arange(prefix, prefix + steps * tokens_per_step, device=device)
    step, place = (video - prefix) // tokens_per_step, (video - prefix) % tokens_per_step
    mix = latent * latents[step] + spatial * codes[place] + noise * _unit_rows(feats[video])
    feats[video] = _unit_rows(mix) * D**0.5
    return feats


def video_like_qkv(T: int, heads: int, kv_heads: int, D: int, *, dtype=torch.bfloat16, seed: int = 0,
                   device="cuda", **kwargs):
    """query ``[1, heads, T, D]``, key and value ``[1, kv_heads, T, D]`` from one :func:`token_features` sequence
    seen through random per-head projections (scores of order one, like i.i.d. N(0, 1) inputs)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = token_features(T, D, generator=g, device=device, **kwargs)

    def project(n):
        w = torch.randn(n, D, D, device=device, generator=g) / D**0.5
        return torch.einsum("td,hde->hte", x, w)[None]

    q, k = project(heads), project(kv_heads)
    v = torch.randn(1, kv_heads, T, D, device=device, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def random_qkv(T: int, heads: int, kv_heads: int, D: int, *, dtype=torch.bfloat16, seed: int = 0, device="cuda"):
    """i.i.d. N(0, 1) query ``[1, heads, T, D]``, key and value ``[1, kv_heads, T, D]``."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, heads, T, D, device=device, generator=g)
    k = torch.randn(1, kv_heads, T, D, device=device, generator=g)
    v = torch.randn(1, kv_heads, T, D, device=device, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)
