"""Chunked LM-head cross-entropy with per-token weights, differentiable twice.

    loss_i = w_i * CE_i,   CE_i = logsumexp(z_i) - z_{i, y_i},   z_i = H_i W^T,   0 at ignored labels

H (N, d) hidden states, W (V, d) a frozen LM head, y (N,) labels, w (N,) optional token weights that are
themselves differentiable (PERK's weighting model). The (N, V) logits are never materialised: tokens
are processed ``chunk_size`` rows at a time and each chunk's logits are recomputed when needed.

Maths (P_i = softmax(z_i), r_i = P_i - e_{y_i}, g_i the upstream gradient of loss_i, a_i = g_i w_i):

    forward          lse_i, CE_i and (when H needs a gradient) grad_ce_i = r_i W = dCE_i/dH_i
    backward         dH_i = a_i grad_ce_i,   dw_i = g_i CE_i                     (a row scaling)
    double backward  for adjoints U (N, d) of dH and u (N,) of dw, with q_i = U_i W^T and
                     t_i = r_i . q_i = P_i . q_i - q_{i, y_i}:
                       Hbar_i = [a_i (P_i * q_i - P_i (P_i . q_i)) + u_i g_i r_i] W
                       wbar_i = g_i t_i
                       gbar_i = w_i t_i + u_i CE_i
                     (d(P.q)/dz = P * q - P (P.q); dCE/dz = r; ignored tokens contribute nothing.)

The backward is a second autograd Function (``LinearCrossEntropyGradFunction``) whose own backward
implements the double-backward formulas chunk by chunk, so ``create_graph=True`` works and
Hessian-vector products never hold more than one or two chunks of logits. Third derivatives are not
supported (``once_differentiable``).

Design (Triton path, CUDA): the GEMMs (H_c W^T, R_c W, U_c W^T) go to cuBLAS through ``torch.mm``;
they hold all the FLOPs and cuBLAS reaches the Hopper tensor-core ceiling. The Triton kernels fuse
everything vocabulary-wide that sits between them: one program per token row streams the row of the
chunk's logits in BLOCK_V blocks with an online max / sum-exp (log-sum-exp), gathers the target
logit, and rewrites the row *in place* with the softmax gradient (forward) or with the
double-backward row (P * (q - P.q) scaled, plus the r term), so the logits buffer is read twice and
written once per pass and no extra vocabulary-wide tensor is allocated. The GEMMs run in the input
dtype (bf16 logits, as HF models produce them); every softmax quantity is computed in fp32 (fp64
for fp64 inputs). fp32 GEMMs follow ``torch.backends.cuda.matmul.allow_tf32`` (off by default, i.e.
IEEE fp32), so fp32 results match the fp32 reference.

Design limits: W is frozen (no dW); labels must lie in [0, V) or equal ``ignore_index``; no logit
soft-capping; row offsets into the logits chunk are int64 (a chunk may exceed 2^31 elements).
"""
from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from .backend import interpreter_enabled, use_triton
from .linear_ce_ref import (
    REDUCTIONS,
    acc_dtype,
    linear_ce_double_backward_torch,
    linear_ce_forward_torch,
)

try:  # Triton is an optional dependency: without it the PyTorch twin serves every call
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

__all__ = ["linear_cross_entropy", "default_chunk_size"]


# Triton kernels ----------------------------------------------------------------------------------

def _row_kernel_configs() -> list:
    if interpreter_enabled():
        # the interpreter runs programs one by one in numpy: one small block keeps tests fast
        # while still covering several blocks and a ragged last block for the odd test vocabularies
        return [triton.Config({"BLOCK_V": 64}, num_warps=1)]
    # Hopper: a row of 50k-152k logits is streamed twice; wide blocks with many warps keep enough
    # loads in flight per SM, and the in-place store makes the pass bandwidth-bound
    return [
        triton.Config({"BLOCK_V": bv}, num_warps=nw, num_stages=ns)
        for bv, nw, ns in ((1024, 4, 2), (2048, 8, 2), (4096, 8, 2), (4096, 16, 3), (8192, 16, 2))
    ]


if triton is not None:

    @triton.autotune(configs=_row_kernel_configs(), key=["V", "COMPUTE_GRAD"], restore_value=["Z_ptr"])
    @triton.jit
    def _linear_ce_fwd_kernel(
        Z_ptr, stride_zm,  # (rows, V) logits chunk, rewritten in place with r when COMPUTE_GRAD
        Y_ptr,  # (rows,) labels
        LSE_ptr, CE_ptr,  # (rows,) outputs, in the accumulation dtype
        V, ignore_index,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 for big chunks
        z_row = Z_ptr + row * stride_zm
        acc_ty = LSE_ptr.dtype.element_ty
        y = tl.load(Y_ptr + row)
        valid = y != ignore_index
        target = tl.where(valid, y, 0)
        offs = tl.arange(0, BLOCK_V)

        # online log-sum-exp over vocabulary blocks: one exp per logit
        row_max = tl.max(tl.full([BLOCK_V], float("-inf"), acc_ty), axis=0)
        sum_exp = tl.sum(tl.zeros([BLOCK_V], acc_ty), axis=0)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(acc_ty)
            new_max = tl.maximum(row_max, tl.max(z, axis=0))
            sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            row_max = new_max
        lse = row_max + tl.log(sum_exp)
        z_target = tl.load(z_row + target).to(acc_ty)
        tl.store(LSE_ptr + row, lse)
        tl.store(CE_ptr + row, tl.where(valid, lse - z_target, 0.0))

        if COMPUTE_GRAD:  # second pass: z <- P - e_y (0 on ignored rows), in place
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(acc_ty)
                p = tl.exp(z - lse)
                r = tl.where(cols == target, p - 1.0, p)
                r = tl.where(valid, r, 0.0)
                tl.store(z_row + cols, r.to(Z_ptr.dtype.element_ty), mask=cols < V)

    @triton.autotune(
        configs=_row_kernel_configs(), key=["V", "HAS_ADJ", "HAS_SCALE_R"], restore_value=["Z_ptr"]
    )
    @triton.jit
    def _linear_ce_double_bwd_kernel(
        Z_ptr, stride_zm,  # (rows, V) logits chunk, rewritten in place with the output row
        Q_ptr, stride_qm,  # (rows, V) adjoint logits q = U W^T (read only)
        Y_ptr, LSE_ptr,  # (rows,) labels, saved log-sum-exp
        SP_ptr, SR_ptr,  # (rows,) scale_p (with q) and scale_r (of r), 0 at ignored rows
        T_ptr,  # (rows,) output t = P.q - q_y
        V, ignore_index,
        HAS_ADJ: tl.constexpr,
        HAS_SCALE_R: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = Z_ptr + row * stride_zm
        q_row = Q_ptr + row * stride_qm
        acc_ty = LSE_ptr.dtype.element_ty
        y = tl.load(Y_ptr + row)
        valid = y != ignore_index
        target = tl.where(valid, y, 0)
        lse = tl.load(LSE_ptr + row)
        offs = tl.arange(0, BLOCK_V)

        if HAS_ADJ:  # first pass: P . q
            p_dot_q = tl.sum(tl.zeros([BLOCK_V], acc_ty), axis=0)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(acc_ty)
                q = tl.load(q_row + cols, mask=cols < V, other=0.0).to(acc_ty)
                p_dot_q += tl.sum(tl.exp(z - lse) * q, axis=0)
            q_target = tl.load(q_row + target).to(acc_ty)
            tl.store(T_ptr + row, tl.where(valid, p_dot_q - q_target, 0.0))
            scale_p = tl.load(SP_ptr + row)
        if HAS_SCALE_R:
            scale_r = tl.load(SR_ptr + row)

        # second pass: z <- scale_p * P * (q - P.q) + scale_r * (P - e_y), in place
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(acc_ty)
            p = tl.exp(z - lse)
            out = tl.zeros([BLOCK_V], acc_ty)
            if HAS_ADJ:
                q = tl.load(q_row + cols, mask=cols < V, other=0.0).to(acc_ty)
                out += scale_p * p * (q - p_dot_q)
            if HAS_SCALE_R:
                out += scale_r * tl.where(cols == target, p - 1.0, p)
            out = tl.where(valid, out, 0.0)
            tl.store(z_row + cols, out.to(Z_ptr.dtype.element_ty), mask=cols < V)


# launchers ---------------------------------------------------------------------------------------

def linear_ce_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton twin of :func:`linear_ce_forward_torch`: (lse, ce, grad_ce or None)."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    # per-row results start as NaN so a row a kernel failed to write cannot pass for a value
    lse = hidden.new_full((n,), float("nan"), dtype=acc)
    ce = hidden.new_full((n,), float("nan"), dtype=acc)
    grad_ce = hidden.new_empty(n, d) if compute_grad else None
    labels = labels.contiguous()
    logits = hidden.new_empty(min(chunk_size, n), vocab)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        z = torch.mm(hidden[start:end], weight.t(), out=logits[: end - start])
        _linear_ce_fwd_kernel[(end - start,)](
            z, z.stride(0), labels[start:end], lse[start:end], ce[start:end], vocab, ignore_index,
            COMPUTE_GRAD=compute_grad,
        )
        if compute_grad:
            torch.mm(z, weight, out=grad_ce[start:end])
    return lse, ce, grad_ce


def linear_ce_double_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    adj_hidden: torch.Tensor | None,
    scale_p: torch.Tensor | None,
    scale_r: torch.Tensor | None,
    ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of :func:`linear_ce_double_backward_torch`: (hbar, t or None)."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    has_adj = adj_hidden is not None
    hbar = hidden.new_empty(n, d)
    t = lse.new_full((n,), float("nan")) if has_adj else None
    labels = labels.contiguous()
    rows = min(chunk_size, n)
    logits = hidden.new_empty(rows, vocab)
    adj_logits = hidden.new_empty(rows, vocab) if has_adj else logits  # dummy pointer without U
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        z = torch.mm(hidden[start:end], weight.t(), out=logits[: end - start])
        q = adj_logits[: end - start]
        if has_adj:
            torch.mm(adj_hidden[start:end], weight.t(), out=q)
        dummy = lse[start:end]  # stands in for absent per-row vectors; never read
        _linear_ce_double_bwd_kernel[(end - start,)](
            z, z.stride(0), q, q.stride(0), labels[start:end], lse[start:end],
            scale_p[start:end] if has_adj else dummy,
            scale_r[start:end] if scale_r is not None else dummy,
            t[start:end] if has_adj else dummy,
            vocab, ignore_index,
            HAS_ADJ=has_adj, HAS_SCALE_R=scale_r is not None,
        )
        torch.mm(z, weight, out=hbar[start:end])
    return hbar, t


# autograd ----------------------------------------------------------------------------------------

# Chunk size: bound the logits chunk, not the token count. A chunk holds chunk_size x V logits in the
# input dtype (the double backward holds two). 256 MiB per buffer gives >= 512-row GEMMs at
# V = 151,936 in bf16 (512 x 151,936 x 896 is 140 GFLOP: enough tiles to fill every SM of an H200,
# so chunking costs no GEMM efficiency) while staying far below one full logits tensor at the
# token counts PERK trains on (8k tokens x 151,936 is 2.3 GiB in bf16, 4.6 GiB in fp32; the full
# backward + HVP holds several of those). Powers of two keep the GEMM shapes regular.
_CHUNK_LOGITS_BYTES = 256 * 2**20


def default_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that one chunk of logits stays within 256 MiB (see the comment above)."""
    rows = max(1, _CHUNK_LOGITS_BYTES // (vocab * dtype.itemsize))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, n_tokens))


@dataclasses.dataclass(frozen=True)
class _LinearCEConfig:
    ignore_index: int
    chunk_size: int
    triton: bool  # Triton kernels (else the PyTorch twin), fixed at forward time for all passes
    precompute_grad: bool  # compute grad_ce in the forward: H will be differentiated


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token loss l_i = w_i CE_i (N,). Backward: dH_i = g_i w_i r_i W, dw_i = g_i CE_i, computed by
    :class:`LinearCrossEntropyGradFunction` so that the backward is itself differentiable."""

    @staticmethod
    def forward(ctx, hidden, token_weights, weight, labels, cfg: _LinearCEConfig):
        forward_op = linear_ce_forward if cfg.triton else linear_ce_forward_torch
        lse, ce, grad_ce = forward_op(
            hidden, weight, labels, cfg.ignore_index, cfg.chunk_size, cfg.precompute_grad
        )
        ctx.save_for_backward(hidden, token_weights, weight, labels, lse, ce, grad_ce)
        ctx.cfg = cfg
        # a copy, not the saved ce itself: in-place edits of the returned loss must not corrupt it
        return ce.clone() if token_weights is None else ce * token_weights

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, token_weights, weight, labels, lse, ce, grad_ce = ctx.saved_tensors
        grad_hidden = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_hidden, grad_weights = LinearCrossEntropyGradFunction.apply(
                hidden, token_weights, grad_loss, weight, labels, lse, ce, grad_ce, ctx.cfg
            )
        elif ctx.needs_input_grad[1]:
            grad_weights = grad_loss * ce  # H is constant here, so CE is too
        if not ctx.needs_input_grad[1]:
            grad_weights = None
        # hidden, token_weights, weight (frozen), labels, cfg
        return grad_hidden, grad_weights, None, None, None


class LinearCrossEntropyGradFunction(torch.autograd.Function):
    """(dH, dw) = (a_i grad_ce_i, g_i CE_i) as a function of (H, w, g), with a_i = g_i w_i.

    ``lse``, ``ce`` and ``grad_ce`` are the forward's results, passed in so the first backward costs
    no GEMM; their dependence on H is accounted for analytically in ``backward`` (module docstring).
    """

    @staticmethod
    def forward(ctx, hidden, token_weights, grad_loss, weight, labels, lse, ce, grad_ce, cfg):
        if grad_ce is None:
            raise RuntimeError(
                "linear_cross_entropy: the forward ran without building the gradient of H "
                "(grad mode was off or hidden did not require grad); rerun it with grad enabled"
            )
        scale = grad_loss if token_weights is None else grad_loss * token_weights
        grad_hidden = (scale.unsqueeze(1) * grad_ce).to(hidden.dtype)
        grad_weights = None if token_weights is None else grad_loss * ce
        ctx.save_for_backward(hidden, token_weights, grad_loss, weight, labels, lse, ce)
        ctx.cfg = cfg
        return grad_hidden, grad_weights

    @staticmethod
    @once_differentiable
    def backward(ctx, adj_hidden, adj_weights):
        hidden, token_weights, grad_loss, weight, labels, lse, ce = ctx.saved_tensors
        cfg = ctx.cfg
        if token_weights is None:
            adj_weights = None  # dw was not an output
        if adj_hidden is None and adj_weights is None:
            return (None,) * 9
        valid = labels != cfg.ignore_index
        scale_p = scale_r = None
        if adj_hidden is not None:
            a = grad_loss if token_weights is None else grad_loss * token_weights
            scale_p = torch.where(valid, a, 0.0)
        if adj_weights is not None:
            scale_r = torch.where(valid, adj_weights * grad_loss, 0.0)
        double_backward_op = linear_ce_double_backward if cfg.triton else linear_ce_double_backward_torch
        hbar, t = double_backward_op(
            hidden, weight, labels, lse, adj_hidden, scale_p, scale_r, cfg.ignore_index, cfg.chunk_size
        )
        grad_weights_in = grad_loss_in = None
        if t is not None:
            grad_weights_in = grad_loss * t if token_weights is not None else None
            grad_loss_in = t if token_weights is None else token_weights * t
        if adj_weights is not None:
            extra = adj_weights * ce
            grad_loss_in = extra if grad_loss_in is None else grad_loss_in + extra
        # hidden, token_weights, grad_loss, weight, labels, lse, ce, grad_ce, cfg
        return hbar, grad_weights_in, grad_loss_in, None, None, None, None, None, None


# functional entry --------------------------------------------------------------------------------

def _validate(hidden, weight, labels, token_weights, reduction, chunk_size) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; choose one of {REDUCTIONS}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, d), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be (V, d) with d = hidden.shape[1] = {hidden.shape[1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(
            f"labels must have shape (N,) = ({hidden.shape[0]},), got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if token_weights is not None and token_weights.shape != (hidden.shape[0],):
        raise ValueError(
            f"token_weights must have shape (N,) = ({hidden.shape[0]},), "
            f"got {tuple(token_weights.shape)}"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int or None")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "weight requires grad, but linear_cross_entropy treats the LM head as frozen and "
            "returns no gradient for it; pass weight.detach()"
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Token-weighted cross-entropy of the logits ``hidden @ weight.T`` without materialising them.

    Args:
        hidden: (N, d) hidden states.
        weight: (V, d) frozen LM head (tied or not); must not require grad.
        labels: (N,) integer targets in [0, V), or ``ignore_index``.
        token_weights: optional (N,) weights w, differentiable.
        reduction: ``"none"`` (N,) per-token w_i CE_i; ``"sum"``; ``"mean"`` (sum over the number of
            non-ignored tokens, 0 if there are none); ``"mean_all"`` (sum / N).
        chunk_size: tokens per chunk; default bounds a logits chunk to 256 MiB.
        softcap: not supported (GPT-2, Qwen2 and Llama do not soft-cap logits).

    Returns the loss in fp32 for half/bf16 inputs, else in the input dtype. Twice differentiable in
    ``hidden`` and ``token_weights``. Runs the Triton kernels when ``use_triton(hidden)`` says so,
    else the chunked PyTorch twin.
    """
    _validate(hidden, weight, labels, token_weights, reduction, chunk_size)
    if softcap is not None:
        raise NotImplementedError(
            f"softcap={softcap!r}: logit soft-capping is not implemented (GPT-2, Qwen2 and Llama "
            "do not use it); pass softcap=None"
        )
    n, vocab = hidden.shape[0], weight.shape[0]
    on_triton = use_triton(hidden, weight, labels)
    if on_triton and triton is None:
        raise RuntimeError("linear_cross_entropy: the Triton path was selected but triton is not installed")
    labels = labels.long()
    if token_weights is not None:
        token_weights = token_weights.to(acc_dtype(hidden.dtype))
    cfg = _LinearCEConfig(
        ignore_index=int(ignore_index),
        chunk_size=chunk_size or default_chunk_size(n, vocab, hidden.dtype),
        triton=on_triton,
        precompute_grad=torch.is_grad_enabled() and hidden.requires_grad,
    )
    loss = LinearCrossEntropyFunction.apply(hidden, token_weights, weight.detach(), labels, cfg)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (labels != ignore_index).sum().clamp(min=1)
    return total / max(n, 1)
