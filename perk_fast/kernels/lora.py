"""Batched LoRA linear as fused Triton kernels, differentiable to any order.

For B contexts, each with its own adapter (A_b, B_b)::

    y[b] = x[b] W^T + bias + s * (lora_x[b] A_b^T) B_b^T
    x, lora_x: (B, M, K)   W: (N, K) "linear" or (K, N) "conv1d"   bias: (N,)
    A: (B, R, K)   B: (B, N, R)   y: (B, M, N)

Two kernels do the work:

* ``_lora_down_kernel``: ``XA = lora_x A_b^T`` (B, M, R), kept for the backward.
* ``_lora_fused_fwd_kernel``: ``x W^T + bias + s * XA B_b^T``; the rank-R product is accumulated
  into the same fp32 output tile as the base GEMM, so the output is written once and rounded once.

The backward has the same shape as the forward, so it is written with the same autograd
Function and ``torch.bmm`` -- differentiable ops only, which makes ``create_graph=True`` work and
makes the second-order pass run the same kernels (see :class:`LoRALinearFunction`).

Design limits
-------------
* The weight and bias are frozen here: if either requires grad, :func:`lora_linear` routes the
  call to the PyTorch twin (:func:`perk_fast.kernels.lora_ref.lora_linear_ref`, same maths).
* Output tiles never straddle two contexts, so contexts with very few tokens under-fill tiles.
* Dtypes: x, lora_x and W share one dtype (fp16, bf16, fp32; fp64 for tests); adapters have x's
  dtype, or fp32 when x is 16-bit. Accumulation is fp32 (fp64 for fp64 inputs).
  ``precision`` decides how the low-rank operands are multiplied (table in :func:`lora_linear`):
  for bf16 inputs the default keeps the projections that feed the adapter gradients near fp32
  (hi/lo split into two bf16 dots) and rounds the fused low-rank operands to tf32, whose 10-bit
  mantissa is at least that of the 16-bit output on which the result is rounded anyway.
* dA and dB reduce over all tokens of a context; they run as ``torch.bmm`` in the adapter dtype
  (cuBLAS splits that long reduction), with transient casts of lora_x / dY to the adapter dtype.
* Strides are honoured (non-contiguous and broadcast inputs are never copied); offsets are int64.
* Contexts run on grid axis 1, so B <= 65535 (a larger B is an error that says to batch).
* At most ``SMALL_M`` (16) tokens per context -- decoding, one new token per context -- the call goes
  to the batched-matmul twin: a tile of BLOCK_M >= 16 rows per context would be mostly padding.
* fp64 runs everywhere (``tl.dot`` takes fp64 on GPUs and in the interpreter): the gradchecks use it.
* No autocast handling: pass tensors in the dtypes you want.
* Under ``TRITON_INTERPRET=1`` (CPU tests) bf16 ``tl.dot`` is not supported by the interpreter;
  fresh outputs are filled with NaN there so that unwritten elements show in tests.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import struct

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by the no-triton test in a subprocess
    triton = tl = None

from .backend import interpreter_enabled, use_triton
from .lora_ref import check_lora_inputs, lora_linear_ref

__all__ = ["lora_linear", "lora_forward", "lora_down_forward", "LoRALinearFunction"]

_FLIPPED_LAYOUT = {"linear": "conv1d", "conv1d": "linear"}
_TL_DTYPES = {} if tl is None else {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}
_HALF = (torch.float16, torch.bfloat16)
MAX_CONTEXTS = 65535  # CUDA's limit on grid axis 1, where the contexts run
SMALL_M = 16  # at most this many tokens per context: a batched matmul instead of the tiled kernels


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


if triton is not None:  # the kernels exist only where triton is installed (the twin runs elsewhere)

    @triton.jit
    def _lora_down_kernel(
        X_ptr, A_ptr, XA_ptr,
        M, K, R,
        stride_xb, stride_xm, stride_xk,
        stride_ab, stride_ar, stride_ak,
        stride_ob, stride_om, stride_or,
        M_KEY,  # autotuning key only (bucketed M)
        LR_DTYPE: tl.constexpr, LR_PRECISION: tl.constexpr, SPLIT: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """XA[b] = X[b] @ A[b]^T: one (BLOCK_M, BLOCK_R) tile of context b = program_id(1).

        SPLIT (16-bit X, fp32 A): A = A_hi + A_lo with both halves in X's dtype, and two 16-bit dots
        X A_hi + X A_lo. X is exact in its own dtype, so for bf16 the products keep ~16 mantissa
        bits of A (error <= 2^-17 relative) at tensor-core speed; fp32 FMA dots would be ~15x slower.
        """
        pid = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        num_r = tl.cdiv(R, BLOCK_R)
        pid_m = pid // num_r
        pid_r = pid % num_r

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        # wrap rows/cols instead of masking them in the loop: loads stay in bounds, stores are masked
        rows = offs_m % M
        cols = offs_r % R
        x_ptrs = X_ptr + pid_b * stride_xb + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        a_ptrs = A_ptr + pid_b * stride_ab + offs_k[:, None] * stride_ak + cols[None, :] * stride_ar
        step_x = tl.cast(stride_xk, tl.int64) * BLOCK_K
        step_a = tl.cast(stride_ak, tl.int64) * BLOCK_K

        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            k_in = offs_k < K - k0
            x = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=k_in[:, None], other=0.0)
            if SPLIT:
                a_hi = a.to(LR_DTYPE)
                a_lo = (a - a_hi.to(a.dtype)).to(LR_DTYPE)
                acc = tl.dot(x, a_hi, acc)
                acc = tl.dot(x, a_lo, acc)
            else:
                acc = tl.dot(x.to(LR_DTYPE), a.to(LR_DTYPE), acc, input_precision=LR_PRECISION)
            x_ptrs += step_x
            a_ptrs += step_a

        o_ptrs = XA_ptr + pid_b * stride_ob + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
        tl.store(o_ptrs, acc.to(XA_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


    @triton.jit
    def _lora_fused_fwd_kernel(
        X_ptr, W_ptr, Bias_ptr, XA_ptr, LB_ptr, Y_ptr,
        M, N, K, R,
        scale_hi, scale_lo,
        stride_xb, stride_xm, stride_xk,
        stride_wn, stride_wk,
        stride_xab, stride_xam, stride_xar,
        stride_lbb, stride_lbn, stride_lbr,
        stride_yb, stride_ym, stride_yn,
        M_KEY,  # autotuning key only (bucketed M)
        HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
        BASE_PRECISION: tl.constexpr, LR_DTYPE: tl.constexpr, LR_PRECISION: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """Y[b] = X[b] W^T + bias + s * XA[b] LB[b]^T for one (BLOCK_M, BLOCK_N) tile of context b.

        W is addressed through (stride_wn, stride_wk), so one kernel serves both weight layouts and
        the backward (W read transposed) without copies. The scale arrives as an fp32 pair
        ``scale_hi + scale_lo`` so that fp64 runs see it in full precision (float args are fp32).
        """
        pid = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # grouped order: GROUP_M row-tiles sweep the N tiles together, so W tiles are reused from L2
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rows = offs_m % M
        cols = offs_n % N

        # base GEMM: acc = X[b] W^T
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        x_ptrs = X_ptr + pid_b * stride_xb + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = W_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
        step_x = tl.cast(stride_xk, tl.int64) * BLOCK_K
        step_w = tl.cast(stride_wk, tl.int64) * BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            k_in = offs_k < K - k0
            x = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=BASE_PRECISION)
            x_ptrs += step_x
            w_ptrs += step_w

        # low-rank part into the same tile: acc += (s * XA[b]) LB[b]^T
        if HAS_LORA:
            scale = tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)
            offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
            xa_ptrs = XA_ptr + pid_b * stride_xab + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar
            lb_ptrs = LB_ptr + pid_b * stride_lbb + offs_r[:, None] * stride_lbr + cols[None, :] * stride_lbn
            step_xa = tl.cast(stride_xar, tl.int64) * BLOCK_R
            step_lb = tl.cast(stride_lbr, tl.int64) * BLOCK_R
            for r0 in tl.range(0, R, BLOCK_R, num_stages=1):  # short loop: do not spend shared memory on pipelining it
                r_in = offs_r < R - r0
                xa = tl.load(xa_ptrs, mask=r_in[None, :], other=0.0)
                lb = tl.load(lb_ptrs, mask=r_in[:, None], other=0.0)
                xa = (xa.to(ACC_DTYPE) * scale).to(LR_DTYPE)
                acc = tl.dot(xa, lb.to(LR_DTYPE), acc, input_precision=LR_PRECISION)
                xa_ptrs += step_xa
                lb_ptrs += step_lb

        if HAS_BIAS:
            bias = tl.load(Bias_ptr + cols)
            acc += bias.to(ACC_DTYPE)[None, :]

        y_ptrs = Y_ptr + pid_b * stride_yb + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


    # --------------------------------------------------------------------------------------------
    # Launchers
    # --------------------------------------------------------------------------------------------


# Hopper (H100/H200) tiles for 16-bit inputs: 128x128 / 128x256 output tiles with 64-deep K slices
# keep the wgmma pipes fed, 3-4 stages fit in 228 KB of shared memory. Checked by compiling
# offline for sm_90 (bf16/fp16 x, fp32 adapters, R = 16 and 256, default and "input" precision):
# every config below fits, and none spills registers but 128x256 in "input" mode at R = 256
# (8 bytes); "ieee" at R = 256 spills in any tiling: it is the slow exact mode. The first config
# is used alone when autotuning is off (PERK_FAST_AUTOTUNE=0), so it is the safe all-rounder.
# The down-projection reads x once per BLOCK_R columns of XA (BLOCK_R up to 128), so 8 warps
# share its fp32 accumulator.
def _fused_configs(wide: bool) -> list:
    if wide:  # fp32 / fp64 inputs: FMA or tf32 dots, keep tiles small
        shapes = [(64, 64, 32, 4, 3), (64, 128, 32, 8, 3)]
    else:
        shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _down_configs(wide: bool) -> list:
    if wide:
        shapes = [(64, 32, 4, 3), (32, 32, 4, 3)]
    else:
        shapes = [(128, 64, 8, 3), (64, 64, 8, 4), (128, 32, 8, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bm, bk, w, s in shapes]


# Under the interpreter one small config; 16 is the smallest tile tl.dot accepts on GPUs, and
# small tiles make the odd test shapes span several tiles in every dimension.
_INTERPRETER_FUSED = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
_INTERPRETER_DOWN = {"BLOCK_M": 16, "BLOCK_K": 16}


def _autotune_enabled() -> bool:
    return os.environ.get("PERK_FAST_AUTOTUNE", "1") not in ("", "0")


@functools.cache
def _tuned(kernel_name: str, wide: bool):
    """Autotuned wrapper of a kernel, built on first GPU use (nothing is probed at import)."""
    if kernel_name == "fused":
        key = ["M_KEY", "N", "K", "R", "HAS_LORA", "LR_DTYPE", "LR_PRECISION"]
        return triton.autotune(configs=_fused_configs(wide), key=key)(_lora_fused_fwd_kernel)
    key = ["M_KEY", "K", "R", "LR_DTYPE", "LR_PRECISION", "SPLIT"]
    return triton.autotune(configs=_down_configs(wide), key=key)(_lora_down_kernel)


def _launch(kernel_name: str, grid, args: list, meta: dict, wide: bool) -> None:
    kernel = _lora_fused_fwd_kernel if kernel_name == "fused" else _lora_down_kernel
    if interpreter_enabled():
        tiles = _INTERPRETER_FUSED if kernel_name == "fused" else _INTERPRETER_DOWN
        kernel[grid](*args, **meta, **tiles, num_warps=1)
    elif _autotune_enabled():
        _tuned(kernel_name, wide)[grid](*args, **meta)
    else:
        config = (_fused_configs if kernel_name == "fused" else _down_configs)(wide)[0]
        kernel[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _m_key(m: int) -> int:
    # autotune once per power of two of the tokens, up to 4096 (larger M all tune alike)
    return min(triton.next_power_of_2(m), 4096)


def _new_output(shape, dtype, device) -> torch.Tensor:
    if interpreter_enabled():  # test runs: unwritten elements must show
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclasses.dataclass(frozen=True)
class _DotModes:
    """How each kernel multiplies, resolved from (x dtype, adapter dtype, precision)."""

    base: str  # input_precision of the base GEMM
    down_dtype: object  # operand dtype of XA = X A^T
    down_precision: str
    down_split: bool  # hi/lo split of A into two 16-bit dots
    lr_dtype: object  # operand dtype of the fused low-rank product (s XA) B^T
    lr_precision: str
    acc: object  # accumulator dtype


def _dot_modes(x_dtype: torch.dtype, lr_dtype: torch.dtype, precision: str | None) -> _DotModes:
    if x_dtype == torch.float64:
        return _DotModes("ieee", tl.float64, "ieee", False, tl.float64, "ieee", tl.float64)
    if x_dtype == torch.float32:
        p = "tf32" if precision == "tf32" else "ieee"
        return _DotModes(p, tl.float32, p, False, tl.float32, p, tl.float32)
    half = _TL_DTYPES[x_dtype]
    mode = precision or ("split" if x_dtype == torch.bfloat16 else "tf32")
    if lr_dtype == x_dtype or mode == "input":  # 16-bit operands, fp32 accumulation
        return _DotModes("ieee", half, "ieee", False, half, "ieee", tl.float32)
    if mode == "split":
        return _DotModes("ieee", half, "ieee", True, tl.float32, "tf32", tl.float32)
    return _DotModes("ieee", tl.float32, mode, False, tl.float32, mode, tl.float32)


def lora_down_forward(x: torch.Tensor, lora_a: torch.Tensor, *, precision: str | None = None) -> torch.Tensor:
    """XA = x A_b^T per context. x: (B, M, K), lora_a: (B, R, K) -> (B, M, R) in lora_a's dtype.

    Any strides (a transposed view of another adapter is fine: the backward passes B_b^T here).
    """
    n_ctx, m, k = x.shape
    r = lora_a.shape[1]
    xa = _new_output((n_ctx, m, r), lora_a.dtype, x.device)
    if xa.numel() == 0:
        return xa
    if k == 0:
        return xa.zero_()
    modes = _dot_modes(x.dtype, lora_a.dtype, precision)
    block_r = min(max(triton.next_power_of_2(r), 16), 128)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(r, block_r), n_ctx)  # noqa: E731
    args = [
        x, lora_a, xa, m, k, r,
        x.stride(0), x.stride(1), x.stride(2),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        xa.stride(0), xa.stride(1), xa.stride(2),
        _m_key(m),
    ]
    meta = dict(
        LR_DTYPE=modes.down_dtype, LR_PRECISION=modes.down_precision, SPLIT=modes.down_split, ACC_DTYPE=modes.acc,
        BLOCK_R=block_r,
    )
    _launch("down", grid, args, meta, wide=x.dtype not in _HALF)
    return xa


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    xa: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    *,
    scale: float,
    weight_layout: str,
    precision: str | None = None,
) -> torch.Tensor:
    """Fused ``x W^T + bias + scale * XA B_b^T`` -> (B, M, N) in x.dtype (one rounding).

    x: (B, M, K); weight: (N, K) "linear" / (K, N) "conv1d"; xa: (B, M, R); lora_b: (B, N, R).
    With ``xa = lora_b = None`` it is the plain batched GEMM ``x W^T (+ bias)``.
    """
    n_ctx, m, k = x.shape
    if weight_layout == "linear":
        n = weight.shape[0]
        stride_wn, stride_wk = weight.stride(0), weight.stride(1)
    else:
        n = weight.shape[1]
        stride_wk, stride_wn = weight.stride(0), weight.stride(1)
    y = _new_output((n_ctx, m, n), x.dtype, x.device)
    if y.numel() == 0:
        return y
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads it with unit stride; N elements, usually a no-op
    has_lora = xa is not None and xa.shape[2] > 0
    r = xa.shape[2] if has_lora else 0
    lr_dtype = lora_b.dtype if has_lora else x.dtype
    modes = _dot_modes(x.dtype, lr_dtype, precision)
    scale = float(scale)
    scale_hi = struct.unpack("f", struct.pack("f", scale))[0]  # fp32 part; the rest goes in scale_lo
    xa_strides = xa.stride() if has_lora else (0, 0, 0)
    lb_strides = lora_b.stride() if has_lora else (0, 0, 0)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), n_ctx)  # noqa: E731
    args = [
        x, weight, bias, xa if has_lora else None, lora_b if has_lora else None, y,
        m, n, k, r,
        scale_hi, scale - scale_hi,
        x.stride(0), x.stride(1), x.stride(2),
        stride_wn, stride_wk,
        *xa_strides,
        *lb_strides,
        y.stride(0), y.stride(1), y.stride(2),
        _m_key(m),
    ]
    meta = dict(
        HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        BASE_PRECISION=modes.base, LR_DTYPE=modes.lr_dtype, LR_PRECISION=modes.lr_precision, ACC_DTYPE=modes.acc,
        BLOCK_R=min(max(triton.next_power_of_2(r), 16), 64),
    )
    _launch("fused", grid, args, meta, wide=x.dtype not in _HALF)
    return y


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LoRASpec:
    """The non-tensor arguments, packed so that ``apply`` stays short."""

    scale: float
    weight_layout: str
    precision: str | None

    def flipped(self) -> "_LoRASpec":
        """The same op with the weight read transposed (dX = dY W)."""
        return dataclasses.replace(self, weight_layout=_FLIPPED_LAYOUT[self.weight_layout])


class LoRALinearFunction(torch.autograd.Function):
    """(y, XA) = (x W^T + bias + s XA B_b^T,  XA = lx A_b^T), lx = lora_x or x.

    Chain rule, with G = dL/dXA = s dY B_b + dXA_out (dXA_out is non-zero only in the
    double backward, where XA itself receives a gradient)::

        dx      = dY W + G A_b            (if lx is x; one fused call: the op on (dY, W^T, B^T, A^T))
        dx      = dY W                    (if lora_x is separate; the op without low-rank part)
        dlora_x = G A_b
        dA_b    = G^T lx                  (torch.bmm, adapter dtype)
        dB_b    = s dY^T XA               (torch.bmm, adapter dtype)

    ``dY B_b`` is the XA output of the fused call computing dx, so it costs no extra pass. Every
    line is a differentiable op (this Function, :class:`_LoRADownFunction`, :class:`_FrozenLinearFunction`,
    ``bmm``), so the backward can itself be differentiated. The weight and bias are frozen.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, lora_x, spec: _LoRASpec):
        ctx.set_materialize_grads(False)
        lx = x if lora_x is None else lora_x
        xa = lora_down_forward(lx, lora_a, precision=spec.precision)
        y = lora_forward(
            x, weight, bias, xa, lora_b, scale=spec.scale, weight_layout=spec.weight_layout, precision=spec.precision
        )
        ctx.save_for_backward(x, weight, lora_a, lora_b, lora_x, xa)
        ctx.spec = spec
        return y, xa

    @staticmethod
    def backward(ctx, dy, dxa_out):
        x, weight, lora_a, lora_b, lora_x, xa = ctx.saved_tensors
        spec = ctx.spec
        need_x, _, _, need_a, need_b, need_lx, _ = ctx.needs_input_grad
        shared = lora_x is None
        lx = x if shared else lora_x
        lr_dtype = lora_a.dtype
        dx = da = db = dlx = None
        g = None  # dL/dXA, (B, M, R) in the adapter dtype
        if dy is not None:
            dyb = None  # dY B_b, (B, M, R)
            if shared and need_x:
                dx, dyb = LoRALinearFunction.apply(dy, weight, None, lora_b.mT, lora_a.mT, None, spec.flipped())
            else:
                if need_x:
                    dx = _FrozenLinearFunction.apply(dy, weight, spec.flipped())
                if need_a or need_lx:
                    dyb = _LoRADownFunction.apply(dy, lora_b.mT, spec.precision)
            if dyb is not None:
                g = dyb * spec.scale
            if need_b:
                db = torch.bmm(dy.mT.to(lr_dtype), xa) * spec.scale
        if dxa_out is not None:
            g = dxa_out if g is None else g + dxa_out
            if shared and need_x:
                dx_xa = torch.bmm(dxa_out, lora_a).to(x.dtype)
                dx = dx_xa if dx is None else dx + dx_xa
        if g is not None:
            if need_a:
                da = torch.bmm(g.mT, lx.to(lr_dtype))
            if need_lx:
                dlx = torch.bmm(g, lora_a).to(lora_x.dtype)
        # weight: frozen, bias: frozen, spec: not a tensor
        return dx, None, None, da, db, dlx, None


class _FrozenLinearFunction(torch.autograd.Function):
    """y = x W^T with a frozen W (the fused kernel without bias or low-rank part).

    dx = dY W, the same op with the layout flipped; linear in dY, so it nests to any order.
    """

    @staticmethod
    def forward(ctx, x, weight, spec: _LoRASpec):
        ctx.save_for_backward(weight)
        ctx.spec = spec
        return lora_forward(
            x, weight, None, None, None, scale=0.0, weight_layout=spec.weight_layout, precision=spec.precision
        )

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        dx = _FrozenLinearFunction.apply(dy, weight, ctx.spec.flipped()) if ctx.needs_input_grad[0] else None
        # weight: frozen, spec: not a tensor
        return dx, None, None


class _LoRADownFunction(torch.autograd.Function):
    """XA = x A^T per context (x: (B, M, K), A: (B, R, K)); used for dY B_b = dY (B_b^T)^T.

    dx = dXA A (cast to x.dtype), dA = dXA^T x (adapter dtype), both ``torch.bmm``.
    """

    @staticmethod
    def forward(ctx, x, lora_a, precision):
        ctx.save_for_backward(x, lora_a)
        return lora_down_forward(x, lora_a, precision=precision)

    @staticmethod
    def backward(ctx, dxa):
        x, lora_a = ctx.saved_tensors
        dx = torch.bmm(dxa, lora_a).to(x.dtype) if ctx.needs_input_grad[0] else None
        da = torch.bmm(dxa.mT, x.to(lora_a.dtype)) if ctx.needs_input_grad[1] else None
        # precision: not a tensor
        return dx, da, None


# --------------------------------------------------------------------------------------------
# Functional entry point
# --------------------------------------------------------------------------------------------


def _check_triton_dtypes(x, weight, lora_a, lora_b, lora_x) -> None:
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"x.dtype={x.dtype} is not supported by the Triton kernels (fp16, bf16, fp32, fp64)")
    if weight.dtype != x.dtype or (lora_x is not None and lora_x.dtype != x.dtype):
        raise TypeError(f"weight and lora_x must have x's dtype {x.dtype}, got {weight.dtype}"
                        f"{'' if lora_x is None else ' / ' + str(lora_x.dtype)}")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"lora_a and lora_b must share a dtype, got {lora_a.dtype} and {lora_b.dtype}")
    if not (lora_a.dtype == x.dtype or (x.dtype in _HALF and lora_a.dtype == torch.float32)):
        raise TypeError(
            f"adapters of dtype {lora_a.dtype} with x of dtype {x.dtype}: adapters must have x's dtype, "
            "or float32 when x is float16/bfloat16"
        )


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scale: float,
    weight_layout: str = "linear",
    lora_x: torch.Tensor | None = None,
    precision: str | None = None,
) -> torch.Tensor:
    """Batched LoRA linear ``x W^T + bias + scale * (lora_x A_b^T) B_b^T`` -> (B, M, N), x.dtype.

    Args:
        x: (B, M, K), B contexts of M tokens.
        weight: frozen, (N, K) for ``weight_layout="linear"`` (nn.Linear) or (K, N) for
            ``"conv1d"`` (HF GPT-2 Conv1D); read in place through its strides.
        bias: (N,) or None.
        lora_a: (B, R, K); lora_b: (B, N, R); one adapter per context, typically fp32.
        scale: the LoRA scale (a Python number, e.g. alpha / sqrt(R)).
        lora_x: input of the low-rank path only (e.g. dropout(x)); defaults to x.
        precision: how the Triton kernels multiply when x is 16-bit and the adapters fp32
            (accumulation is fp32 in every mode; the twin ignores this argument):

            ========  =========================================  ============================
            mode      XA = lx A^T and dY B (feed dA, dB)          fused (s XA) B^T into y, dX
            ========  =========================================  ============================
            "split"   A split into 16-bit hi + lo, 2 dots         tf32 tensor cores
            "tf32"    tf32 tensor cores                           tf32 tensor cores
            "ieee"    exact fp32 (FMA units, slow)                exact fp32 (FMA units, slow)
            "input"   A rounded to x's dtype, 1 dot               operands rounded to x's dtype
            ========  =========================================  ============================

            ``None`` (default) is "split" for bf16 and "tf32" for fp16 (an fp16 lo half would
            underflow). Rationale: XA and dY B_b feed the fp32 adapter gradients, so they are kept
            near fp32 (bf16 split: <= 2^-17 relative per product); the fused low-rank product is
            rounded into a 16-bit output anyway, and tf32 carries at least that output's mantissa.
            For fp32 inputs every dot is "ieee" unless precision="tf32" (base GEMM too); fp64 is
            always exact.

    Differentiable w.r.t. x, lora_x, lora_a and lora_b to any order. Runs the Triton kernels when
    ``use_triton(...)`` says so (CUDA tensors under backend ``auto``), else the PyTorch twin; the
    twin also handles a weight or bias that requires grad.
    """
    check_lora_inputs(
        x, weight, bias, lora_a, lora_b, lora_x, scale=scale, weight_layout=weight_layout, precision=precision
    )
    frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
    # decoding (a few tokens per context) would fill a BLOCK_M-row tile per context with padding: a
    # batched matmul (cuBLAS) does it without waste
    small_m = x.shape[1] <= SMALL_M
    if not (use_triton(x, weight, bias, lora_a, lora_b, lora_x) and frozen and not small_m):
        return lora_linear_ref(
            x, weight, bias, lora_a, lora_b,
            scale=scale, weight_layout=weight_layout, lora_x=lora_x, precision=precision,
        )
    if triton is None:
        raise RuntimeError("lora_linear: the Triton path was selected but triton is not installed "
                           "(pip install triton, or use backend 'torch')")
    if x.shape[0] > MAX_CONTEXTS:
        raise ValueError(f"lora_linear: {x.shape[0]} contexts exceed the {MAX_CONTEXTS} the kernel grid allows "
                         "(contexts run on grid axis 1); adapt them in batches, e.g. encode(..., batch_size=4096)")
    if lora_x is x:
        lora_x = None
    _check_triton_dtypes(x, weight, lora_a, lora_b, lora_x)
    y, _ = LoRALinearFunction.apply(
        x, weight, bias, lora_a, lora_b, lora_x, _LoRASpec(float(scale), weight_layout, precision)
    )
    return y
