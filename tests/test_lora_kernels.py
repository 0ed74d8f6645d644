"""Batched LoRA linear: Triton kernels (perk_fast/kernels/lora.py) against the PyTorch twin (perk_fast/kernels/lora_ref.py).

Each case compares the output, every first-order gradient (random upstream gradient) and
second-order products (random adjoints pushed through grad-of-grad, w.r.t. every input and the
upstream gradient) of the Triton path with the twin. On CPU the kernels run under the Triton
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) in fp32/fp64 and fp16 (the interpreter
cannot do bf16 dots); with CUDA the same grid runs on the GPU, and the ``requires_cuda`` tests add
bf16, real layer sizes and > 2^31-element inputs. Fresh kernel outputs are NaN-filled under the
interpreter, so an unwritten element fails every comparison.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from perk_fast.kernels import use_backend
from perk_fast.kernels.backend import interpreter_enabled
from perk_fast.kernels.lora import lora_down_forward, lora_forward, lora_linear
from perk_fast.kernels.lora_ref import lora_linear_ref

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not interpreter_enabled() else "cpu"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreter_enabled(), reason="Triton needs CUDA or TRITON_INTERPRET=1"
)
needs_native_cuda = pytest.mark.skipif(
    interpreter_enabled(), reason="TRITON_INTERPRET is set: CUDA tests must run the compiled kernels"
)

@pytest.fixture(autouse=True)
def kernels_at_every_m(monkeypatch):
    """The kernels are checked at every M here, small ones included; lora_linear's routing of
    decoding-sized M to a batched matmul has its own test (test_small_m_goes_to_a_batched_matmul)."""
    import perk_fast.kernels.lora as lora_module

    monkeypatch.setattr(lora_module, "SMALL_M", 0)


SCALE = 0.7  # not a power of two, so a mishandled scale shows in fp64
LAYOUTS = ("linear", "conv1d")
# (B contexts, M tokens, K in, N out, R rank): odd sizes that cross 16-wide tiles in every dim
SHAPES = [
    (1, 1, 19, 13, 1),
    (2, 37, 50, 33, 7),
    (3, 17, 33, 20, 16),
    (5, 5, 23, 29, 33),
    (2, 23, 19, 31, 64),
]


def shape_id(shape) -> str:
    return "B{}-M{}-K{}-N{}-R{}".format(*shape)


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_x: torch.Tensor | None
    layout: str

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.x, self.lora_a, self.lora_b, self.lora_x) if t is not None and t.requires_grad]


def make_inputs(
    shape,
    *,
    dtype=torch.float32,
    adapter_dtype=None,
    layout="linear",
    bias=True,
    separate_lx=False,
    x_kind="contiguous",
    x_grad=True,
    device=DEVICE,
    seed=0,
) -> Inputs:
    """Random inputs scaled so the base and low-rank terms are both O(1) (LoRA B is not zero)."""
    n_ctx, m, k, n, r = shape
    adapter_dtype = adapter_dtype or dtype
    gen = torch.Generator().manual_seed(seed)

    def rnd(*size, std=1.0, dt=dtype):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * std).to(device=device, dtype=dt)

    def activation():
        if x_kind == "transposed":  # storage (B, K, M): stride along K is M
            t = rnd(n_ctx, k, m).transpose(1, 2)
        elif x_kind == "sliced":  # every other token, inner columns: no unit strides in M
            t = rnd(n_ctx, 2 * m, k + 3)[:, ::2, 1 : k + 1]
        else:
            t = rnd(n_ctx, m, k)
        return t.detach().requires_grad_(x_grad)

    x = activation()
    weight = rnd(n, k, std=k**-0.5) if layout == "linear" else rnd(k, n, std=k**-0.5)
    b = None
    if bias:
        b = rnd(n) if x_kind == "contiguous" else rnd(2 * n)[::2]  # strided inputs: a strided bias too
    lora_a = rnd(n_ctx, r, k, std=k**-0.5, dt=adapter_dtype).requires_grad_()
    lora_b = rnd(n_ctx, n, r, std=r**-0.5, dt=adapter_dtype).requires_grad_()
    lora_x = activation() if separate_lx else None
    return Inputs(x, weight, b, lora_a, lora_b, lora_x, layout)


def run(inp: Inputs, backend: str, precision=None) -> torch.Tensor:
    with use_backend(backend):
        y = lora_linear(
            inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b,
            scale=SCALE, weight_layout=inp.layout, lora_x=inp.lora_x, precision=precision,
        )
    if backend == "triton" and inp.leaves():
        assert type(y.grad_fn).__name__ == "LoRALinearFunctionBackward", "the Triton path did not run"
    return y


TOL = {torch.float64: 1e-10, torch.float32: 5e-5}


def assert_close(actual, expected, what: str) -> None:
    tol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    atol = tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def grads(y, leaves, dy, create_graph=False):
    return torch.autograd.grad(y, leaves, dy, create_graph=create_graph)


# ------------------------------------------------------------------ values and first-order grads


@needs_triton
@pytest.mark.parametrize("separate_lx", [False, True], ids=["lx=x", "lx=separate"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_and_grads(shape, layout, bias, separate_lx):
    inp = make_inputs(shape, layout=layout, bias=bias, separate_lx=separate_lx)
    y, y_ref = run(inp, "triton"), run(inp, "torch")
    assert y.shape == (shape[0], shape[1], shape[3])
    assert_close(y, y_ref, "y")
    dy = torch.randn_like(y_ref)
    leaves = inp.leaves()
    for name, g, g_ref in zip(["dx", "dA", "dB", "dlora_x"], grads(y, leaves, dy), grads(y_ref, leaves, dy)):
        assert_close(g, g_ref, name)


@needs_triton
@pytest.mark.parametrize("separate_lx", [False, True], ids=["lx=x", "lx=separate"])
@pytest.mark.parametrize("x_kind", ["transposed", "sliced"])
def test_strided_inputs(x_kind, separate_lx):
    inp = make_inputs((2, 21, 35, 18, 5), x_kind=x_kind, separate_lx=separate_lx, layout="conv1d")
    assert not inp.x.is_contiguous()
    y, y_ref = run(inp, "triton"), run(inp, "torch")
    assert_close(y, y_ref, "y")
    dy = torch.randn_like(y_ref).transpose(1, 2).contiguous().transpose(1, 2)  # strided upstream grad
    for g, g_ref in zip(grads(y, inp.leaves(), dy), grads(y_ref, inp.leaves(), dy)):
        assert_close(g, g_ref, "grad")


@needs_triton
def test_broadcast_adapters_and_expanded_upstream_grad():
    """A meta-initialisation shared by all contexts (stride-0 batch) and a stride-0 dY (from .sum())."""
    inp = make_inputs((3, 9, 20, 17, 4))
    a0 = inp.lora_a[:1].detach().requires_grad_()
    b0 = inp.lora_b[:1].detach().requires_grad_()
    outs = {}
    for backend in ("triton", "torch"):
        with use_backend(backend):
            y = lora_linear(inp.x, inp.weight, inp.bias, a0.expand(3, -1, -1), b0.expand(3, -1, -1), scale=SCALE)
        outs[backend] = (y, *torch.autograd.grad(y.sum(), [inp.x, a0, b0]))
    for name, got, ref in zip(["y", "dx", "dA0", "dB0"], outs["triton"], outs["torch"]):
        assert_close(got, ref, name)


# ------------------------------------------------------------------ second order


@needs_triton
@pytest.mark.parametrize("wrt", ["all", "adapters"])
@pytest.mark.parametrize("separate_lx", [False, True], ids=["lx=x", "lx=separate"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_second_order(shape, layout, separate_lx, wrt):
    """grad of <first-order grads, random v> w.r.t. every input and dY, fp64, vs the twin."""
    inp = make_inputs(shape, dtype=torch.float64, layout=layout, separate_lx=separate_lx, x_grad=wrt == "all")
    leaves = inp.leaves()
    dy = torch.randn(shape[0], shape[1], shape[3], dtype=torch.float64, device=DEVICE, requires_grad=True)
    results = {}
    for backend in ("triton", "torch"):
        y = run(inp, backend)
        first = grads(y, leaves, dy, create_graph=True)
        torch.manual_seed(1)  # the same adjoints for both backends (randn_like would follow g's strides)
        inner = sum((g * torch.randn(g.shape, dtype=g.dtype, device=g.device)).sum() for g in first)
        second = torch.autograd.grad(inner, leaves + [dy], allow_unused=True, materialize_grads=True)
        results[backend] = (y, *first, *second)
    for i, (got, ref) in enumerate(zip(results["triton"], results["torch"])):
        assert_close(got, ref, f"output {i} (y, first-order grads, then second-order grads)")


@needs_triton
def test_third_order_runs():
    """create_graph through the double backward: the backward nests to any order."""
    inp = make_inputs((2, 5, 18, 17, 3), dtype=torch.float64)
    dy = torch.randn(2, 5, 17, dtype=torch.float64, device=DEVICE)
    outs = {}
    for backend in ("triton", "torch"):
        y = run(inp, backend)
        ga = grads(y, [inp.x, inp.lora_a], dy, create_graph=True)
        gg = torch.autograd.grad((ga[0] ** 2).sum() + (ga[1] ** 2).sum(), [inp.lora_b], create_graph=True)[0]
        outs[backend] = torch.autograd.grad((gg**2).sum(), [inp.x, inp.lora_a, inp.lora_b])
    for got, ref in zip(outs["triton"], outs["torch"]):
        assert_close(got, ref, "third order")


# ------------------------------------------------------------------ precisions and dtypes

# Unit roundoff of each precision mode's operands (x fp16/bf16, adapters fp32): (XA and dY B, fused).
# Under the interpreter tf32 dots are exact fp32, so these bounds are loose there.
_U = {
    "tf32": (2.0**-11, 2.0**-11),
    "split": (2.0**-17, 2.0**-11),
    "ieee": (2.0**-24, 2.0**-24),
}
_U_INPUT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _relerr(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def check_half_precision(shape, dtype, adapter_dtype, precision, layout, device):
    """Triton and twin against an fp64 reference of the same (rounded) inputs.

    Bound: relative Frobenius error <= 2 x the twin's (PyTorch's own low-precision error) plus
    4 units of the mode's operand roundoff; y and dX see the fused low-rank operands, dA and dB
    the XA / dY B projections.
    """
    inp = make_inputs(shape, dtype=dtype, adapter_dtype=adapter_dtype, layout=layout, device=device)
    ref = make_inputs(shape, dtype=torch.float64, layout=layout, device=device)
    for name in ("x", "weight", "bias", "lora_a", "lora_b"):  # same values as the low-precision inputs
        getattr(ref, name).data.copy_(getattr(inp, name).data)
    dy64 = torch.randn(shape[0], shape[1], shape[3], dtype=torch.float64, device=device).to(dtype).double()
    y64 = run(ref, "torch")
    want = [y64, *grads(y64, ref.leaves(), dy64)]
    errs = {}
    for backend in ("triton", "torch"):
        y = run(inp, backend, precision)
        got = [y, *grads(y, inp.leaves(), dy64.to(dtype))]
        assert [g.dtype for g in got] == [dtype, dtype, adapter_dtype, adapter_dtype]
        errs[backend] = [_relerr(g, w) for g, w in zip(got, want)]
    mode = precision or ("split" if dtype == torch.bfloat16 else "tf32")
    if adapter_dtype == dtype or mode == "input":
        u_down = u_fused = _U_INPUT[dtype]
    else:
        u_down, u_fused = _U[mode]
    bounds = [u_fused + u_down, u_fused + u_down, u_down, u_down]
    for name, e, e_twin, u in zip(["y", "dx", "dA", "dB"], errs["triton"], errs["torch"], bounds):
        assert e <= 2 * e_twin + 4 * u, f"{name}: rel. error {e:.3g} vs twin {e_twin:.3g} (mode {mode}, u {u:.3g})"


@needs_triton
@pytest.mark.parametrize(
    "precision,adapter_dtype",
    [(None, torch.float32), ("split", torch.float32), ("ieee", torch.float32), ("input", torch.float32),
     (None, torch.float16)],
    ids=["default", "split", "ieee", "input", "fp16-adapters"],
)
def test_fp16_precision_modes(precision, adapter_dtype):
    check_half_precision((2, 37, 50, 33, 7), torch.float16, adapter_dtype, precision, "linear", DEVICE)


@needs_triton
def test_fp32_tf32_mode_is_accepted():
    inp = make_inputs((2, 7, 20, 17, 3))
    y = run(inp, "triton", precision="tf32")
    torch.testing.assert_close(y, run(inp, "torch"), rtol=3e-3, atol=3e-3)


# ------------------------------------------------------------------ gradcheck (fp64)


@needs_triton
@pytest.mark.parametrize(
    "separate_lx,layout", [(False, "linear"), (True, "conv1d")], ids=["lx=x-linear", "lx=sep-conv1d"]
)
def test_gradcheck_and_gradgradcheck(separate_lx, layout):
    inp = make_inputs((2, 2, 3, 3, 2), dtype=torch.float64, layout=layout, separate_lx=separate_lx)
    leaves = inp.leaves()

    def f(*tensors):
        x, a, b = tensors[:3]
        lx = tensors[3] if separate_lx else None
        with use_backend("triton"):
            return lora_linear(x, inp.weight, inp.bias, a, b, scale=SCALE, weight_layout=layout, lora_x=lx)

    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves, fast_mode=True)


def test_gradcheck_twin():
    inp = make_inputs((2, 3, 5, 4, 2), dtype=torch.float64, separate_lx=True, device="cpu")
    w = inp.weight.requires_grad_()  # the twin also differentiates the weight

    def f(x, a, b, lx, w):
        return lora_linear_ref(x, w, inp.bias, a, b, scale=SCALE, lora_x=lx)

    assert torch.autograd.gradcheck(f, [*inp.leaves(), w])
    assert torch.autograd.gradgradcheck(f, [*inp.leaves(), w])


# ------------------------------------------------------------------ launchers


@needs_triton
@pytest.mark.parametrize("a_kind", ["contiguous", "transposed-view"])
def test_down_projection(a_kind):
    x = torch.randn(3, 29, 41, device=DEVICE)
    if a_kind == "contiguous":
        a = torch.randn(3, 18, 41, device=DEVICE)
    else:  # how the backward calls it: B_b^T, a view of (B, N, R)
        a = torch.randn(3, 41, 18, device=DEVICE).mT
    with use_backend("triton"):
        xa = lora_down_forward(x, a)
    assert_close(xa, torch.bmm(x, a.mT), "XA")


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
def test_plain_gemm_with_bias(layout):
    x = torch.randn(2, 19, 33, device=DEVICE)
    w = torch.randn(21, 33, device=DEVICE)
    bias = torch.randn(21, device=DEVICE)
    weight = w if layout == "linear" else w.t().contiguous()
    y = lora_forward(x, weight, bias, None, None, scale=0.0, weight_layout=layout)
    assert_close(y, x @ w.t() + bias, "x W^T + b")


# ------------------------------------------------------------------ backend switch and routing


def test_torch_backend_runs_twin():
    inp = make_inputs((2, 5, 9, 7, 3), device="cpu")
    y = run(inp, "torch")
    assert type(y.grad_fn).__name__ != "LoRALinearFunctionBackward"
    assert torch.equal(y, lora_linear_ref(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, scale=SCALE))


def test_auto_backend_on_cpu_runs_twin():
    inp = make_inputs((2, 5, 9, 7, 3), device="cpu")
    y = run(inp, "auto")
    assert type(y.grad_fn).__name__ != "LoRALinearFunctionBackward"


@needs_triton
def test_trainable_weight_routes_to_twin():
    inp = make_inputs((2, 5, 9, 7, 3))
    inp.weight.requires_grad_()
    inp.bias.requires_grad_()
    with use_backend("triton"):
        y = lora_linear(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, scale=SCALE)
    assert type(y.grad_fn).__name__ != "LoRALinearFunctionBackward"
    y_ref = lora_linear_ref(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, scale=SCALE)
    dw, db = torch.autograd.grad(y.sum(), [inp.weight, inp.bias])
    dw_ref, db_ref = torch.autograd.grad(y_ref.sum(), [inp.weight, inp.bias])
    assert torch.equal(dw, dw_ref) and torch.equal(db, db_ref)


def test_forced_triton_on_cpu_without_interpreter_raises():
    code = textwrap.dedent(
        """
        import torch
        from perk_fast.kernels.lora import lora_linear
        x = torch.randn(1, 3, 4)
        try:
            lora_linear(x, torch.randn(5, 4), None, torch.randn(1, 2, 4), torch.randn(1, 5, 2), scale=1.0)
        except RuntimeError as e:
            print("RAISED:", e)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PERK_FAST_BACKEND="triton", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RAISED:" in out.stdout and "TRITON_INTERPRET" in out.stdout, out.stdout + out.stderr


# ------------------------------------------------------------------ argument checks


def test_argument_errors():
    inp = make_inputs((2, 5, 9, 7, 3), device="cpu")
    call = dict(scale=1.0)
    with pytest.raises(ValueError, match="weight_layout"):
        lora_linear(inp.x, inp.weight, None, inp.lora_a, inp.lora_b, weight_layout="conv2d", **call)
    with pytest.raises(ValueError, match="weight of shape"):
        lora_linear(inp.x, inp.weight, None, inp.lora_a, inp.lora_b, weight_layout="conv1d", **call)
    with pytest.raises(ValueError, match="lora_b"):
        lora_linear(inp.x, inp.weight, None, inp.lora_a, inp.lora_b[:, :, :2], **call)
    with pytest.raises(ValueError, match="lora_a"):
        lora_linear(inp.x, inp.weight, None, inp.lora_a[:1], inp.lora_b, **call)
    with pytest.raises(ValueError, match="bias"):
        lora_linear(inp.x, inp.weight, inp.bias[:3], inp.lora_a, inp.lora_b, **call)
    with pytest.raises(ValueError, match="lora_x"):
        lora_linear(inp.x, inp.weight, None, inp.lora_a, inp.lora_b, lora_x=inp.x[:, :2], **call)
    with pytest.raises(ValueError, match="precision"):
        lora_linear(inp.x, inp.weight, None, inp.lora_a, inp.lora_b, precision="fp8", **call)
    with pytest.raises(TypeError, match="scale"):
        lora_linear(inp.x, inp.weight, None, inp.lora_a, inp.lora_b, scale=torch.tensor(1.0))


@needs_triton
def test_unsupported_dtype_mix_raises():
    inp = make_inputs((2, 5, 9, 7, 3))
    with use_backend("triton"), pytest.raises(TypeError, match="adapters"):
        lora_linear(inp.x, inp.weight, None, inp.lora_a.double(), inp.lora_b.double(), scale=1.0)


# ------------------------------------------------------------------ CUDA only


@pytest.mark.requires_cuda
@needs_native_cuda
@pytest.mark.parametrize(
    "dtype,precision",
    [(torch.bfloat16, None), (torch.bfloat16, "input"), (torch.bfloat16, "ieee"), (torch.float16, None)],
    ids=["bf16-default", "bf16-input", "bf16-ieee", "fp16-default"],
)
@pytest.mark.parametrize(
    "shape,layout",
    [((2, 512, 768, 2304, 16), "conv1d"), ((1, 384, 896, 4864, 256), "linear"), ((3, 77, 4864, 896, 256), "linear")],
    ids=["gpt2-c_attn-r16", "qwen-up-r256", "qwen-down-r256"],
)
def test_cuda_half_precision(shape, layout, dtype, precision):
    check_half_precision(shape, dtype, torch.float32, precision, layout, "cuda")


@pytest.mark.requires_cuda
@needs_native_cuda
def test_cuda_bf16_second_order():
    inp = make_inputs((2, 200, 768, 768, 16), dtype=torch.bfloat16, adapter_dtype=torch.float32, device="cuda")
    ref = make_inputs((2, 200, 768, 768, 16), dtype=torch.float64, device="cuda")
    for name in ("x", "weight", "bias", "lora_a", "lora_b"):
        getattr(ref, name).data.copy_(getattr(inp, name).data)
    dy = torch.randn(2, 200, 768, device="cuda").bfloat16()
    v = [torch.randn(t.shape, dtype=torch.float64, device="cuda") for t in ref.leaves()]
    out = {}
    for name, case, backend in [("triton", inp, "triton"), ("twin", inp, "torch"), ("fp64", ref, "torch")]:
        y = run(case, backend)
        first = grads(y, case.leaves(), dy.to(y.dtype), create_graph=True)
        inner = sum((g * vi.to(g.dtype)).sum() for g, vi in zip(first, v))
        out[name] = torch.autograd.grad(inner, case.leaves())
    for i, (got, twin, want) in enumerate(zip(out["triton"], out["twin"], out["fp64"])):
        e, e_twin = _relerr(got, want), _relerr(twin, want)
        assert e <= 2 * e_twin + 4 * (2.0**-11 + 2.0**-17), f"second-order {i}: {e:.3g} vs twin {e_twin:.3g}"


@pytest.mark.requires_cuda
@needs_native_cuda
@pytest.mark.parametrize("separate_lx", [False, True], ids=["lx=x", "lx=separate"])
def test_cuda_fp32_large(separate_lx):
    inp = make_inputs((2, 1000, 896, 4864, 64), layout="linear", separate_lx=separate_lx, device="cuda")
    y, y_ref = run(inp, "triton"), run(inp, "torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y)
    for g, g_ref in zip(grads(y, inp.leaves(), dy), grads(y_ref, inp.leaves(), dy)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4 * g_ref.abs().max().item())


@pytest.mark.requires_cuda
@needs_native_cuda
def test_cuda_int64_offsets():
    """x with more than 2^31 elements: the last rows must be addressed correctly."""
    m, k, n, r = (1 << 20) + 7, 2048, 64, 16
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    a = torch.randn(1, r, k, device="cuda") / k**0.5
    b = torch.randn(1, n, r, device="cuda") / r**0.5
    with use_backend("triton"):
        y = lora_linear(x, w, None, a, b, scale=SCALE)
    tail = slice(m - 1000, m)
    y_tail = lora_linear_ref(x[:, tail], w, None, a, b, scale=SCALE)
    torch.testing.assert_close(y[:, tail], y_tail, rtol=2e-2, atol=2e-2)
    del x, y
    torch.cuda.empty_cache()


@needs_triton
@pytest.mark.parametrize("m, launched", [(1, False), (16, False), (17, True)])
def test_small_m_goes_to_a_batched_matmul(monkeypatch, m, launched):
    """Decoding (one new token per context) must not spend a BLOCK_M-row tile per context."""
    import perk_fast.kernels.lora as lora_module

    monkeypatch.setattr(lora_module, "SMALL_M", 16)
    calls = []
    original = lora_module._launch
    monkeypatch.setattr(lora_module, "_launch", lambda *a, **k: (calls.append(a[0]), original(*a, **k))[1])
    inp = make_inputs((3, m, 19, 13, 4), dtype=torch.float32)
    with use_backend("triton"):
        y = lora_linear(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, scale=SCALE, weight_layout=inp.layout)
    want = lora_linear_ref(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, scale=SCALE,
                           weight_layout=inp.layout)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert bool(calls) == launched


@needs_triton
def test_more_contexts_than_the_grid_allows_is_a_clear_error():
    from perk_fast.kernels.lora import MAX_CONTEXTS

    b = MAX_CONTEXTS + 1
    x = torch.zeros(b, 17, 2, device=DEVICE)
    w = torch.zeros(3, 2, device=DEVICE)
    a, bb = torch.zeros(b, 1, 2, device=DEVICE), torch.zeros(b, 3, 1, device=DEVICE)
    with use_backend("triton"), pytest.raises(ValueError, match="65536 contexts exceed the 65535"):
        lora_linear(x, w, None, a, bb, scale=1.0)
