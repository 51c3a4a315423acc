"""The vision tower's elementwise work on Triton: one pass each for Qwen2.5-VL's rotary embedding, RMSNorm and the
MLP's ``silu(gate) * up``.

transformers computes each as a chain of float32 passes over tensors as large as the tower's packed sequence (casts
up, squares, a mean, products, casts back), which took more GPU time than the tower's matrix products
(``docs/benchmarks.md``). Here each row is read once and written once, with transformers' float32 operations in its
order and without fused multiply-adds: the rotary embedding and ``silu(gate) * up`` give its bits; the norm differs
only in the order of its 1,280-term sum of squares (a float32 rounding, rarely one bf16 unit). No autograd: the
tower calls these in passes without gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._triton_utils import interpreting
from .reference import next_pow2

_ROWS = 16  # (token, head) rows per program of the rotary kernel
# silu tiles of 4 x 512: 16 elements per thread (16 x 1024 spilled registers and ran at a quarter of the bandwidth)
_SILU_ROWS, _SILU_COLUMNS = 4, 512


@triton.jit
def _rotary_kernel(x, cos, sin, out, n_rows, sxn, sxh, sxd, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                   BR: tl.constexpr, BH: tl.constexpr):
    # x: [N, H, D] (any strides); out: contiguous [N * H, D]; cos, sin: contiguous [N, D]
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # offsets pass 2**31 at 1M patches
    token = rows // H
    dd = tl.arange(0, BH)
    mask = (rows < n_rows)[:, None] & (dd < HALF)[None, :]
    src = x + (token * sxn + (rows % H) * sxh)[:, None] + dd[None, :] * sxd
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
    angle = token[:, None] * D + dd[None, :]
    c1 = tl.load(cos + angle, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos + angle + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin + angle, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin + angle + HALF, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1): as transformers writes it
    first = x1 * c1 + (-x2) * s1
    second = x2 * c2 + x1 * s2
    dst = out + rows[:, None] * D + dd[None, :]
    tl.store(dst, first.to(out.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, second.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x, weight, out, n_rows, sxn, inv_width, eps, W: tl.constexpr, BR: tl.constexpr,
                     BW: tl.constexpr):
    # x: [N, W] (row stride sxn, unit column stride); weight: [W]; out: contiguous [N, W]
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BW)
    mask = (rows < n_rows)[:, None] & (cols < W)[None, :]
    values = tl.load(x + rows[:, None] * sxn + cols[None, :], mask=mask, other=0.0)
    wide = values.to(tl.float32)
    # mean as torch reduces it: the sum times the float32 factor 1 / W
    variance = tl.sum(wide * wide, axis=1) * inv_width
    normed = (wide * tl.math.rsqrt(variance + eps)[:, None]).to(values.dtype)
    scale = tl.load(weight + cols, mask=cols < W, other=0.0)
    result = scale.to(tl.float32)[None, :] * normed.to(tl.float32)
    tl.store(out + rows[:, None] * W + cols[None, :], result.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(gate_up, out, n_rows, sgn, P: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
                         LIBDEVICE: tl.constexpr):
    # gate_up: [N, 2 * P] (row stride sgn): gate | up; out: contiguous [N, P]
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BP + tl.arange(0, BP)
    mask = (rows < n_rows)[:, None] & (cols < P)[None, :]
    src = gate_up + rows[:, None] * sgn + cols[None, :]
    gate = tl.load(src, mask=mask, other=0.0)
    up = tl.load(src + P, mask=mask, other=0.0)
    wide = gate.to(tl.float32)
    # torch's silu: x / (1 + exp(-x)) in float32 with CUDA's expf and an IEEE division, rounded to the input's dtype
    # (Triton's interpreter has no libdevice: its exp there is NumPy's)
    if LIBDEVICE:
        exp = libdevice.exp(-wide)
    else:
        exp = tl.exp(-wide)
    activated = tl.math.div_rn(wide, 1.0 + exp).to(gate.dtype)
    result = activated.to(tl.float32) * up.to(tl.float32)
    tl.store(out + rows[:, None] * P + cols[None, :], result.to(out.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    N, H, D = x.shape
    out = torch.empty(N, H, D, device=x.device, dtype=x.dtype)
    if out.numel():
        # no fused multiply-adds: each product and the sum rounded to float32 as torch's separate passes round them
        _rotary_kernel[(triton.cdiv(N * H, _ROWS),)](x, cos, sin, out, N * H, *x.stride(), H=H, D=D, HALF=D // 2,
                                                     BR=_ROWS, BH=max(16, next_pow2(D // 2)), num_warps=4,
                                                     enable_fp_fusion=False)
    return out


def apply_rotary_pos_emb_vision(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Qwen2.5-VL's vision rotary embedding: ``q``, ``k`` ``[tokens, heads, head_dim]`` (any strides, e.g. views of
    the fused qkv product), ``cos``, ``sin`` ``[tokens, head_dim]`` -> the rotated ``(q, k)``, contiguous, in their
    dtypes, equal to ``transformers``' function of the same name."""
    if q.dim() != 3 or k.shape != q.shape or cos.shape != (q.shape[0], q.shape[2]) or sin.shape != cos.shape:
        raise ValueError(f"q and k must be [tokens, heads, head_dim] and cos, sin [tokens, head_dim]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if q.shape[2] % 2:
        raise ValueError(f"head_dim must be even to rotate its halves, got {q.shape[2]}")
    cos, sin = cos.contiguous(), sin.contiguous()
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2.5-VL's ``Qwen2_5_VLRMSNorm``: ``x`` ``[..., width]`` normalised in float32, cast back to its dtype and
    scaled by ``weight`` ``[width]``; the result ``[..., width]`` in the dtype torch promotes the two to."""
    width = x.shape[-1]
    if weight.shape != (width,):
        raise ValueError(f"weight must be [{width}] for inputs [..., {width}], got {tuple(weight.shape)}")
    rows = x.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=torch.result_type(weight, x))
    if out.numel():
        block_width = next_pow2(width)
        block_rows = max(1, min(16, 4096 // block_width))
        _rms_norm_kernel[(triton.cdiv(rows.shape[0], block_rows),)](
            rows, weight, out, rows.shape[0], rows.stride(0), 1.0 / width, eps, W=width, BR=block_rows,
            BW=block_width, num_warps=4 if block_width <= 2048 else 8, enable_fp_fusion=False)
    return out.view(*x.shape[:-1], width)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` ``[rows, 2 * width]`` (gate then up, as ``chunk(2, -1)`` splits it) ->
    ``[rows, width]``, torch's result bit for bit."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be [rows, 2 * width] with unit column stride, got shape "
                         f"{tuple(gate_up.shape)}, strides {gate_up.stride()}")
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, device=gate_up.device, dtype=gate_up.dtype)
    if out.numel():
        block = min(_SILU_COLUMNS, next_pow2(width))
        _silu_and_mul_kernel[(triton.cdiv(rows, _SILU_ROWS), triton.cdiv(width, block))](
            gate_up, out, rows, gate_up.stride(0), P=width, BR=_SILU_ROWS, BP=block, LIBDEVICE=not interpreting(),
            num_warps=4, enable_fp_fusion=False)
    return out


__all__ = ["apply_rotary_pos_emb_vision", "rms_norm", "silu_and_mul"]
