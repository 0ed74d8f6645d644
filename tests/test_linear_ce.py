"""Chunked linear cross-entropy: values, first and second derivatives, errors and memory.

Every case compares loss, dH, dw and the second-order products (grad of (dH, dw) against random
adjoints, with respect to H, w and the upstream gradient) with a full-logits fp64 reference. The
PyTorch twin runs in fp64 (tight tolerance); the Triton kernels run under the interpreter in fp32
on CPU, and natively on CUDA in the ``requires_cuda`` tests.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():  # before triton is imported; tests/conftest.py may already do it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from perk_fast.profiling import DeviceMemTracker  # noqa: E402

from perk_fast.kernels import use_backend  # noqa: E402
from perk_fast.kernels import linear_ce  # noqa: E402
from perk_fast.kernels.linear_ce import default_chunk_size, linear_cross_entropy  # noqa: E402
from perk_fast.kernels.linear_ce_ref import linear_cross_entropy_full  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# forced Triton runs on CUDA tensors where there is a GPU (no interpreter there), else on CPU ones
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
REDUCTIONS = ("none", "sum", "mean", "mean_all")


def _triton_runs_here() -> bool:
    if linear_ce.triton is None:
        return False
    if HAS_CUDA:
        return True
    # the interpreter is chosen when @triton.jit runs, i.e. when linear_ce was first imported
    return type(linear_ce._linear_ce_fwd_kernel.fn).__name__ == "InterpretedFunction"


needs_triton = pytest.mark.skipif(
    not _triton_runs_here(), reason="Triton kernels need CUDA or TRITON_INTERPRET=1 before import"
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")  # tests/conftest.py may skip too
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def _labels(n: int, vocab: int, mask: str, chunk: int, gen: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if mask == "some":
        labels[::3] = -100
    elif mask == "first_chunk":  # a whole chunk without a single target, then a few holes
        labels[:chunk] = -100
        labels[chunk::4] = -100
    elif mask == "all":
        labels[:] = -100
    return labels


def _make_case(n, d, vocab, chunk, mask, weighted, reduction, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    case = dict(
        hidden=torch.randn(n, d, generator=gen, **f64),
        weight=torch.randn(vocab, d, generator=gen, **f64) * (2.0 / d**0.5),
        labels=_labels(n, vocab, mask, chunk, gen),
        token_weights=(torch.rand(n, generator=gen, **f64) + 0.25) if weighted else None,
        upstream=torch.randn(n if reduction == "none" else (), generator=gen, **f64),
        adj_hidden=torch.randn(n, d, generator=gen, **f64),
        adj_weights=torch.randn(n, generator=gen, **f64),
    )
    return case


def _device(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _all_derivatives(fn, case, dtype, device="cpu"):
    """loss, (dH, dw), second-order (Hbar, wbar, gbar) in fp64 on the CPU for comparison."""
    hidden = case["hidden"].to(device, dtype).requires_grad_()
    weight = case["weight"].to(device, dtype)
    weights = case["token_weights"]
    weights = None if weights is None else weights.to(device, dtype).requires_grad_()
    loss = fn(hidden, weight, case["labels"].to(device), weights)
    upstream = case["upstream"].to(device, loss.dtype).requires_grad_()
    inputs = (hidden,) if weights is None else (hidden, weights)
    first = torch.autograd.grad(loss, inputs, upstream, create_graph=True)
    adjoints = (case["adj_hidden"].to(device, dtype), case["adj_weights"].to(device, loss.dtype))[: len(first)]
    second = torch.autograd.grad(first, inputs + (upstream,), adjoints, allow_unused=True)
    second = [torch.zeros_like(x) if s is None else s for s, x in zip(second, inputs + (upstream,))]
    return [t.detach().cpu().double() for t in (loss, *first, *second)], loss.dtype


def _check(case, reduction, backend, chunk):
    def ours(h, w, y, tw):
        return linear_cross_entropy(h, w, y, token_weights=tw, reduction=reduction, chunk_size=chunk)

    def ref(h, w, y, tw):
        return linear_cross_entropy_full(h, w, y, token_weights=tw, reduction=reduction)

    dtype = torch.float64 if backend == "torch" else torch.float32
    with use_backend(backend):
        got, loss_dtype = _all_derivatives(ours, case, dtype, _device(backend))
    want, _ = _all_derivatives(ref, case, torch.float64)
    assert loss_dtype == dtype
    names = ["loss", "dH", "dw", "Hbar", "wbar", "gbar"] if case["token_weights"] is not None \
        else ["loss", "dH", "Hbar", "gbar"]
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        scale = max(b.abs().max().item(), 1.0)
        err = (a - b).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"


# (N, d, V, chunk_size): odd sizes; chunks smaller than N so several chunks and a ragged last one
SHAPES = [(1, 19, 37, None), (23, 25, 101, 6), (67, 40, 301, 16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-d{}-V{}-c{}".format(*s))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [True, False], ids=["w", "no_w"])
def test_matches_full_reference(backend, shape, reduction, weighted):
    n, d, vocab, chunk = shape
    case = _make_case(n, d, vocab, chunk or n, "some", weighted, reduction)
    _check(case, reduction, backend, chunk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["none", "first_chunk", "all"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ignore_patterns(backend, mask, reduction):
    n, d, vocab, chunk = 29, 21, 53, 8
    case = _make_case(n, d, vocab, chunk, mask, True, reduction, seed=1)
    _check(case, reduction, backend, chunk)


def test_custom_ignore_index_and_int32_labels():
    case = _make_case(17, 11, 29, 5, "none", True, "sum", seed=2)
    labels = case["labels"].clone()
    labels[::2] = 7  # ignore_index=7 is a real class id here: it must still be ignored
    h, w, tw = case["hidden"], case["weight"], case["token_weights"]
    got = linear_cross_entropy(h, w, labels.int(), token_weights=tw, ignore_index=7, chunk_size=4)
    want = linear_cross_entropy_full(h, w, labels, token_weights=tw, ignore_index=7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(8)
    dev = _device(backend)
    hidden = torch.randn(13, 2 * 9, generator=gen).to(dev)[:, ::2].requires_grad_()  # stride (18, 2)
    weight = torch.randn(31, 2 * 9, generator=gen).to(dev)[:, 1::2]
    labels = torch.randint(0, 31, (26,), generator=gen).to(dev)[::2]
    with use_backend(backend):
        got = linear_cross_entropy(hidden, weight, labels, reduction="sum", chunk_size=4)
        (dh,) = torch.autograd.grad(got, hidden)
    got, dh, hidden, weight, labels = got.cpu(), dh.cpu(), hidden.cpu(), weight.cpu(), labels.cpu()
    h64 = hidden.detach().double().requires_grad_()
    want = linear_cross_entropy_full(h64, weight.double(), labels, reduction="sum")
    (dh_want,) = torch.autograd.grad(want, h64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.double(), dh_want, rtol=1e-5, atol=1e-5)


def test_bf16_twin_returns_fp32_loss():
    case = _make_case(31, 24, 67, 8, "some", True, "mean", seed=3)
    h, w = case["hidden"].bfloat16(), case["weight"].bfloat16()
    got = linear_cross_entropy(h, w, case["labels"], token_weights=case["token_weights"], chunk_size=8)
    want = linear_cross_entropy_full(h.double(), w.double(), case["labels"], token_weights=case["token_weights"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_grad_of_token_weights_only_and_no_grad():
    case = _make_case(19, 13, 41, 5, "some", True, "none", seed=4)
    h, w, y = case["hidden"], case["weight"], case["labels"]
    tw = case["token_weights"].clone().requires_grad_()
    loss = linear_cross_entropy(h, w, y, token_weights=tw, reduction="sum", chunk_size=5)
    (dw,) = torch.autograd.grad(loss, tw)
    ce = linear_cross_entropy_full(h, w, y, reduction="none")
    torch.testing.assert_close(dw, ce, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        plain = linear_cross_entropy(h.requires_grad_(), w, y, token_weights=tw, chunk_size=5)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, linear_cross_entropy_full(h, w, y, token_weights=tw.detach()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [True, False], ids=["w", "no_w"])
def test_gradcheck_gradgradcheck_fp64(backend, weighted):
    gen = torch.Generator().manual_seed(5)
    n, d, vocab = (7, 5, 11) if backend == "torch" else (5, 4, 9)
    dev = _device(backend)
    hidden = torch.randn(n, d, dtype=torch.float64, generator=gen).to(dev).requires_grad_()
    weight = torch.randn(vocab, d, dtype=torch.float64, generator=gen).to(dev)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[1] = -100
    labels = labels.to(dev)
    tw = torch.rand(n, dtype=torch.float64, generator=gen).add_(0.5).to(dev).requires_grad_()
    inputs = (hidden, tw) if weighted else (hidden,)

    def fn(h, w=None):
        return linear_cross_entropy(h, weight, labels, token_weights=w, reduction="none", chunk_size=3)

    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


# errors ------------------------------------------------------------------------------------------

def _small():
    return torch.randn(6, 5, requires_grad=True), torch.randn(9, 5), torch.randint(0, 9, (6,))


def test_bad_reduction_names_value():
    h, w, y = _small()
    with pytest.raises(ValueError, match="'avg'"):
        linear_cross_entropy(h, w, y, reduction="avg")


def test_shape_mismatches_name_shapes():
    h, w, y = _small()
    with pytest.raises(ValueError, match=r"\(9, 4\)"):
        linear_cross_entropy(h, w[:, :4], y)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        linear_cross_entropy(h, w, y[:5])
    with pytest.raises(ValueError, match=r"\(7,\)"):
        linear_cross_entropy(h, w, y, token_weights=torch.rand(7))
    with pytest.raises(ValueError, match=r"\(6, 5, 1\)"):
        linear_cross_entropy(h[..., None], w, y)
    with pytest.raises(ValueError, match="chunk_size=0"):
        linear_cross_entropy(h, w, y, chunk_size=0)


def test_weight_requiring_grad_is_refused():
    h, w, y = _small()
    w.requires_grad_()
    with pytest.raises(ValueError, match=r"weight requires grad.*\.detach\(\)"):
        linear_cross_entropy(h, w, y)
    with torch.no_grad():  # nothing is differentiated: allowed
        linear_cross_entropy(h, w, y)


def test_softcap_not_implemented():
    h, w, y = _small()
    with pytest.raises(NotImplementedError, match="softcap=30.0"):
        linear_cross_entropy(h, w, y, softcap=30.0)


# memory ------------------------------------------------------------------------------------------


def _peak_loss_backward_hvp(fn, n, d, vocab, fake):
    """Peak live bytes of loss + create_graph backward + Hessian-vector product."""
    with FakeTensorMode() if fake else contextlib.nullcontext():
        hidden = torch.randn(n, d, requires_grad=True)
        weight = torch.randn(vocab, d)
        labels = torch.randint(0, vocab, (n,))
        tw = torch.rand(n, requires_grad=True)
        adj = torch.randn(n, d)
        tracker = DeviceMemTracker()
        tracker.track_external(hidden, weight, labels, tw, adj)
        with tracker:
            loss = fn(hidden, weight, labels, tw)
            dh, dw = torch.autograd.grad(loss, (hidden, tw), create_graph=True)
            hvp = torch.autograd.grad((dh, dw), (hidden, tw), (adj, torch.ones_like(dw)))
            del loss, dh, dw, hvp
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_twin_peak_memory_well_below_full_logits():
    n, d, vocab = 1024, 64, 8192  # full logits: 32 MiB fp32 per copy

    def twin(h, w, y, tw):
        with use_backend("torch"):
            return linear_cross_entropy(h, w, y, token_weights=tw, chunk_size=64)

    def full(h, w, y, tw):
        return linear_cross_entropy_full(h, w, y, token_weights=tw)

    twin_peak = _peak_loss_backward_hvp(twin, n, d, vocab, fake=False)
    full_peak = _peak_loss_backward_hvp(full, n, d, vocab, fake=False)
    logits_bytes = n * vocab * 4
    assert twin_peak < full_peak / 8, (twin_peak, full_peak)
    assert twin_peak < logits_bytes / 2, (twin_peak, logits_bytes)
    # the benchmark measures its biggest sizes on fake tensors: the accounting must be identical
    assert _peak_loss_backward_hvp(twin, n, d, vocab, fake=True) == twin_peak


def test_default_chunk_size_bounds_the_logits_chunk():
    assert default_chunk_size(8192, 151_936, torch.float32) == 256
    assert default_chunk_size(32768, 50_257, torch.bfloat16) == 2048
    assert default_chunk_size(10, 50_257, torch.bfloat16) == 10
    for vocab, dtype in ((151_936, torch.bfloat16), (50_257, torch.float32), (10**9, torch.float32)):
        rows = default_chunk_size(1 << 20, vocab, dtype)
        assert rows == 1 or rows * vocab * dtype.itemsize <= 256 * 2**20


# GPU ---------------------------------------------------------------------------------------------

@pytest.mark.requires_cuda
@needs_cuda
@pytest.mark.parametrize("vocab,d", [(50_257, 768), (151_936, 896)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_bf16_within_twice_torch_error(vocab, d, reduction):
    gen = torch.Generator(device="cuda").manual_seed(6)
    n = 2048 + 37
    kw = dict(device="cuda", generator=gen)
    hidden = torch.randn(n, d, **kw)
    weight = torch.randn(vocab, d, **kw) / d**0.5 * 2
    labels = torch.randint(0, vocab, (n,), **kw)
    labels[::5] = -100
    tw = torch.rand(n, **kw) + 0.25
    upstream = torch.randn(n if reduction == "none" else (), **kw)

    def first_order(fn, dtype):
        h = hidden.to(dtype).requires_grad_()
        w = tw.clone().requires_grad_()
        loss = fn(h, weight.to(dtype), labels, w)
        dh, dw = torch.autograd.grad(loss, (h, w), upstream)
        return [t.float() for t in (loss, dh, dw)]

    ours = first_order(
        lambda h, wt, y, w: linear_cross_entropy(h, wt, y, token_weights=w, reduction=reduction), torch.bfloat16
    )
    plain = first_order(
        lambda h, wt, y, w: linear_cross_entropy_full(h, wt, y, token_weights=w, reduction=reduction),
        torch.bfloat16,
    )
    exact = first_order(
        lambda h, wt, y, w: linear_cross_entropy_full(h, wt, y, token_weights=w, reduction=reduction),
        torch.float32,
    )
    assert ours[0].dtype == torch.float32
    for name, a, p, e in zip(("loss", "dH", "dw"), ours, plain, exact):
        err, torch_err = (a - e).abs().max().item(), (p - e).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, f"{name}: ours {err:.3g} vs torch bf16 {torch_err:.3g}"


@pytest.mark.requires_cuda
@needs_cuda
@pytest.mark.parametrize("weighted", [True, False], ids=["w", "no_w"])
def test_cuda_fp32_second_order_big_vocab(weighted):
    n, d, vocab = 301, 64, 151_936
    case = _make_case(n, d, vocab, 64, "some", weighted, "mean")
    case = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    _check(case, "mean", "triton", 64)


@pytest.mark.requires_cuda
@needs_cuda
def test_cuda_chunk_beyond_int32_offsets():
    """One chunk of 16,384 x 151,936 logits (2.5e9 elements): row offsets must be int64."""
    n, d, vocab = 16_384, 64, 151_936
    gen = torch.Generator(device="cuda").manual_seed(7)
    hidden = torch.randn(n, d, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    weight = torch.randn(vocab, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    loss = linear_cross_entropy(hidden, weight, labels, reduction="none", chunk_size=n)
    (dh,) = torch.autograd.grad(loss.sum(), hidden)
    with use_backend("torch"):  # reference: the fp32 twin in small chunks
        h32 = hidden.detach().float().requires_grad_()
        ref = linear_cross_entropy(h32, weight.float(), labels, reduction="none", chunk_size=1024)
        (dh_ref,) = torch.autograd.grad(ref.sum(), h32)
    tail = slice(n - 64, n)  # the rows whose offsets pass 2^31
    torch.testing.assert_close(loss[tail], ref[tail], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dh[tail].float(), dh_ref[tail], rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)


def test_tracker_peaks_match_the_allocator_events():
    """bench/linear_ce.py sizes peaks with MemTracker (fake tensors); on real tensors its count must equal the
    CPU allocator's own events (perk_fast.profiling's default), which is not so for every workload."""
    from perk_fast.profiling import peak_memory

    n, d, vocab = 1024, 64, 8192

    def twin(h, w, y, tw):
        with use_backend("torch"):
            return linear_cross_entropy(h, w, y, token_weights=tw, chunk_size=64)

    def full(h, w, y, tw):
        return linear_cross_entropy_full(h, w, y, token_weights=tw)

    for fn in (twin, full):
        hidden, weight = torch.randn(n, d, requires_grad=True), torch.randn(vocab, d)
        labels, tw, adj = torch.randint(0, vocab, (n,)), torch.rand(n, requires_grad=True), torch.randn(n, d)
        inputs = sum(t.numel() * t.element_size() for t in (hidden, weight, labels, tw, adj))

        def step():  # the same step as _peak_loss_backward_hvp
            loss = fn(hidden, weight, labels, tw)
            dh, dw = torch.autograd.grad(loss, (hidden, tw), create_graph=True)
            hvp = torch.autograd.grad((dh, dw), (hidden, tw), (adj, torch.ones_like(dw)))
            del loss, dh, dw, hvp

        _, allocator = peak_memory(step, method="allocator")
        tracked = _peak_loss_backward_hvp(fn, n, d, vocab, fake=False) - inputs  # the tracker counts the inputs
        assert abs(tracked - allocator) <= 0.01 * allocator, (fn.__name__, tracked, allocator)


@pytest.mark.parametrize("mode", ["chunked", "full"])
def test_lm_head_loss_drops_unlabelled_tokens_without_changing_value_or_derivatives(mode):
    """lm_head_loss_sum runs the LM head on the labelled tokens only: the same loss, gradients and
    Hessian-vector products (fp64) as full logits over every token, also when no token is labelled."""
    from perk_fast.loss import labelled_tokens, lm_head_loss_sum

    gen = torch.Generator().manual_seed(3)
    n, d, v = 13, 6, 17
    weight = torch.randn(v, d, dtype=torch.float64, generator=gen)
    for labels in (torch.tensor([2, -100, 5, -100, -100, 1, 0, 16, -100, 3, 3, -100, 9]), torch.full((n,), -100)):
        hidden = torch.randn(n, d, dtype=torch.float64, generator=gen, requires_grad=True)
        w = torch.rand(n, dtype=torch.float64, generator=gen).requires_grad_(True)
        ce = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="none")
        expected = (ce * w).sum()
        got = lm_head_loss_sum(hidden, weight, labels, w, mode=mode, chunk_size=4)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        probe = torch.randn(n, d, dtype=torch.float64, generator=gen)
        derivs = []
        for loss in (got, expected):
            gh, gw = torch.autograd.grad(loss, [hidden, w], create_graph=True)
            hvp = torch.autograd.grad((gh * probe).sum(), [hidden, w], allow_unused=True, materialize_grads=True)
            derivs.append((gh, gw, *hvp))
        for a, b in zip(*derivs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    h, lab, tw = labelled_tokens(hidden, labels, w)
    assert h.shape == (0, d) and lab.numel() == 0 and tw.numel() == 0
    full = torch.arange(n) % v
    h, lab, tw = labelled_tokens(hidden, full, w)
    assert h is hidden and lab is full and tw is w  # nothing to drop: no copy
