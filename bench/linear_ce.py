"""Benchmark: chunked linear cross-entropy (perk_fast) vs full-logits PyTorch (vs Liger-Kernel).

Two modes, both with token weights (PERK's inner loss):
  fwd_bwd      loss + backward (dH, dw)
  fwd_bwd_hvp  loss + create_graph backward + Hessian-vector product (grad of (dH, dw) against
               random adjoints), i.e. what the inner loop's second order costs
Liger-Kernel's fused linear CE (first order, unweighted, it has no token weights) is added to
fwd_bwd when ``liger_kernel`` imports; it is not installed by this project.

CUDA: bf16, V = 50,257 (d = 768, GPT-2) and V = 151,936 (d = 896, Qwen2.5-0.5B), N = 2k..32k;
median time with 20/80 % quantiles from ``triton.testing.do_bench``, peak memory from
``torch.cuda.max_memory_allocated``, TFLOP/s of the op's GEMMs against the H200 bf16 ceiling.

CPU: the PyTorch twin. Peak memory comes from ``MemTracker`` (live tensor bytes) on fake tensors
at the GPU sizes in fp32 -- including the target point N = 8192, V = 151,936, d = 896 -- after
checking at a reduced size that fake and real tensors give byte-identical peaks (the op's
allocations do not depend on values). Time is reported only as a side-by-side ratio (twin / full)
at reduced sizes measured in the same process, interleaved.

Writes ``linear_ce_<device>.json`` (commit, versions, device, config, numbers) and a PNG of peak
memory vs N into ``--out`` (default bench/results/); prints a table whose last line is the summary.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from perk_fast.profiling import DeviceMemTracker

from perk_fast.kernels.linear_ce import default_chunk_size, linear_cross_entropy
from perk_fast.kernels.linear_ce_ref import linear_cross_entropy_full

GiB = 2**30
H200_BF16_TFLOPS = 790.0  # measured dense bf16 ceiling (DESIGN.md section 7)
VOCABS = {50_257: 768, 151_936: 896}  # vocabulary -> hidden size (GPT-2, Qwen2.5-0.5B)
GPU_NS = [2048, 4096, 8192, 16384, 32768]
TARGET = dict(n=8192, vocab=151_936, d=896)  # the CPU memory target: twin <= 1/8 of full logits
MODES = ("fwd_bwd", "fwd_bwd_hvp")
# GEMMs of size N x V x d per mode: ours (logits + grad) and (+ logits, U W^T, grad) for the HVP
GEMMS = {"fwd_bwd": 2, "fwd_bwd_hvp": 5}



# the measured step ------------------------------------------------------------------------------

def make_inputs(n, d, vocab, dtype, device, seed=0):
    kw = dict(device=device, generator=torch.Generator(device=device).manual_seed(seed))
    hidden = torch.randn(n, d, dtype=dtype, **kw).requires_grad_()
    weight = torch.randn(vocab, d, dtype=dtype, **kw) / d**0.5
    labels = torch.randint(0, vocab, (n,), **kw)
    labels[::7] = -100
    weights = (torch.rand(n, dtype=torch.float32, **kw) + 0.25).requires_grad_()
    adj_hidden = torch.randn(n, d, dtype=dtype, **kw)
    adj_weights = torch.randn(n, dtype=torch.float32, **kw)
    return hidden, weight, labels, weights, adj_hidden, adj_weights


def ours(hidden, weight, labels, weights):
    return linear_cross_entropy(hidden, weight, labels, token_weights=weights)


def full(hidden, weight, labels, weights):
    return linear_cross_entropy_full(hidden, weight, labels, token_weights=weights)


def liger_fn():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None

    def liger(hidden, weight, labels, weights):
        return liger_fused_linear_cross_entropy(hidden, weight, labels)

    return liger


IMPLS = {"perk_fast": ours, "full_logits": full}
UNWEIGHTED = {"liger"}  # Liger has no token weights: it is timed without them


def step(fn, mode, inputs, weighted=True):
    hidden, weight, labels, weights, adj_hidden, adj_weights = inputs
    loss = fn(hidden, weight, labels, weights if weighted else None)
    params = (hidden, weights) if weighted else (hidden,)
    if mode == "fwd_bwd":
        torch.autograd.grad(loss, params)
        return
    grads = torch.autograd.grad(loss, params, create_graph=True)
    torch.autograd.grad(grads, params, (adj_hidden, adj_weights)[: len(grads)])


def input_bytes(inputs):
    return sum(t.numel() * t.element_size() for t in inputs)


def tracked_peak(fn, mode, n, d, vocab, dtype, fake):
    """MemTracker peak of live tensor bytes (inputs included) on CPU, real or fake tensors."""
    with FakeTensorMode() if fake else contextlib.nullcontext():
        inputs = make_inputs(n, d, vocab, dtype, "cpu") if not fake else _fake_inputs(n, d, vocab, dtype)
        tracker = DeviceMemTracker()
        tracker.track_external(*inputs)
        with tracker:
            step(fn, mode, inputs)
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def _fake_inputs(n, d, vocab, dtype):
    hidden = torch.empty(n, d, dtype=dtype).requires_grad_()
    weight = torch.empty(vocab, d, dtype=dtype)
    labels = torch.zeros(n, dtype=torch.long)
    weights = torch.empty(n).requires_grad_()
    return hidden, weight, labels, weights, torch.empty(n, d, dtype=dtype), torch.empty(n)


# CPU ---------------------------------------------------------------------------------------------

def run_cpu(args):
    rows, notes = [], []
    dtype = torch.float32
    # 1. fake == real check at a reduced size, both implementations
    n, d, vocab = 512, 64, 8192
    for name, fn in IMPLS.items():
        real = tracked_peak(fn, "fwd_bwd_hvp", n, d, vocab, dtype, fake=False)
        fake = tracked_peak(fn, "fwd_bwd_hvp", n, d, vocab, dtype, fake=True)
        notes.append(dict(check="fake_vs_real_peak", impl=name, n=n, d=d, vocab=vocab, real=real, fake=fake))
        if real != fake:
            raise SystemExit(f"MemTracker peak differs between fake ({fake}) and real ({real}) tensors for {name}")

    # 2. memory vs N at the GPU sizes (fake tensors), fp32
    for vocab, d in VOCABS.items():
        for n in args.ns or GPU_NS:
            for mode in MODES:
                for name, fn in IMPLS.items():
                    peak = tracked_peak(fn, mode, n, d, vocab, dtype, fake=True)
                    rows.append(dict(impl=name, mode=mode, n=n, d=d, vocab=vocab, dtype="float32",
                                     peak_bytes=peak, measured="MemTracker/fake"))
    target = {m: {name: next(r["peak_bytes"] for r in rows if r["impl"] == name and r["mode"] == m
                             and r["n"] == TARGET["n"] and r["vocab"] == TARGET["vocab"])
                  for name in IMPLS} for m in MODES}

    # 3. side-by-side time ratio at reduced sizes (real tensors, interleaved runs)
    t_vocab, t_d = 50_257, 128
    for n in args.cpu_time_ns:
        inputs = make_inputs(n, t_d, t_vocab, dtype, "cpu")
        for mode in MODES:
            times = {name: [] for name in IMPLS}
            for _ in range(args.cpu_reps):
                for name, fn in IMPLS.items():
                    start = time.perf_counter()
                    step(fn, mode, inputs)
                    times[name].append(time.perf_counter() - start)
            med = {name: statistics.median(v) for name, v in times.items()}
            for name in IMPLS:
                rows.append(dict(impl=name, mode=mode, n=n, d=t_d, vocab=t_vocab, dtype="float32",
                                 time_ratio_vs_full=med[name] / med["full_logits"],
                                 measured="cpu time, side by side"))
    return rows, notes, target


# CUDA --------------------------------------------------------------------------------------------

def run_cuda(args):
    import triton.testing

    rows = []
    impls = dict(IMPLS)
    liger = liger_fn()
    if liger is not None:
        impls["liger"] = liger
    dtype = torch.bfloat16
    for vocab, d in VOCABS.items():
        for n in args.ns or GPU_NS:
            inputs = make_inputs(n, d, vocab, dtype, "cuda")
            for mode in MODES:
                for name, fn in impls.items():
                    if name == "liger" and mode != "fwd_bwd":
                        continue
                    row = dict(impl=name, mode=mode, n=n, d=d, vocab=vocab, dtype="bfloat16")
                    try:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                        weighted = name not in UNWEIGHTED
                        step(fn, mode, inputs, weighted)  # warm-up (autotuning) and the memory measurement
                        torch.cuda.synchronize()
                        row["peak_bytes"] = torch.cuda.max_memory_allocated()
                        ms, lo, hi = triton.testing.do_bench(
                            lambda: step(fn, mode, inputs, weighted), quantiles=[0.5, 0.2, 0.8], warmup=50, rep=300
                        )
                        row.update(time_ms=ms, time_ms_q20=lo, time_ms_q80=hi)
                        if name == "perk_fast":
                            flops = GEMMS[mode] * 2.0 * n * vocab * d
                            row["gemm_tflops"] = flops / (ms * 1e-3) / 1e12
                            row["fraction_of_bf16_peak"] = row["gemm_tflops"] / H200_BF16_TFLOPS
                    except torch.cuda.OutOfMemoryError:
                        row["oom"] = True
                    rows.append(row)
            del inputs
    return rows


# report ------------------------------------------------------------------------------------------

def git_commit():
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "perk_fast/kernels/linear_ce.py",
                                "perk_fast/kernels/linear_ce_ref.py", "bench/linear_ce.py"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else "unknown"
    except OSError:
        return "unknown"


def versions():
    out = dict(python=platform.python_version(), torch=torch.__version__)
    for mod in ("triton", "liger_kernel"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(VOCABS), figsize=(6 * len(VOCABS), 4.5), squeeze=False)
    for ax, (vocab, d) in zip(axes[0], VOCABS.items()):
        for impl, color in (("perk_fast", "tab:blue"), ("full_logits", "tab:red"), ("liger", "tab:green")):
            for mode, style in (("fwd_bwd", "--"), ("fwd_bwd_hvp", "-")):
                pts = sorted((r["n"], r["peak_bytes"] / GiB) for r in rows
                             if r["impl"] == impl and r["mode"] == mode and r["vocab"] == vocab
                             and r.get("peak_bytes") is not None)
                if pts:
                    ax.plot(*zip(*pts), style, color=color, marker="o", label=f"{impl} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel("peak memory (GiB)")
        ax.set_title(f"V = {vocab:,}, d = {d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows):
    head = f"{'impl':<12} {'mode':<12} {'N':>6} {'V':>7} {'d':>4} {'peak GiB':>9} {'time':>16} {'TFLOP/s':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        peak = f"{r['peak_bytes'] / GiB:9.3f}" if r.get("peak_bytes") is not None else (
            "      OOM" if r.get("oom") else "        -")
        if "time_ms" in r:
            t = f"{r['time_ms']:9.2f} ms"
        elif "time_ratio_vs_full" in r:
            t = f"x{r['time_ratio_vs_full']:.2f} vs full"
        else:
            t = "-"
        tf = f"{r['gemm_tflops']:8.1f}" if "gemm_tflops" in r else ""
        print(f"{r['impl']:<12} {r['mode']:<12} {r['n']:>6} {r['vocab']:>7} {r['d']:>4} {peak} {t:>16} {tf:>8}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="directory for the JSON and PNG (default: bench/results/)")
    parser.add_argument("--ns", type=int, nargs="*", default=None, help="token counts (default 2k..32k)")
    parser.add_argument("--cpu-time-ns", type=int, nargs="*", default=[512, 1024, 2048],
                        help="CPU token counts for the time ratio (V = 50,257, d = 128)")
    parser.add_argument("--cpu-reps", type=int, default=3)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    notes, target = [], None
    if device == "cuda":
        rows = run_cuda(args)
        device_name = torch.cuda.get_device_name()
    else:
        rows, notes, target = run_cpu(args)
        device_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    print_table(rows)
    summary = summarize(device, rows, target)
    record = dict(
        benchmark="linear_ce",
        commit=git_commit(),
        versions=versions(),
        device=device_name,
        config=dict(vocabs=VOCABS, ns=args.ns or GPU_NS, modes=MODES, target=TARGET,
                    cpu_time_ns=args.cpu_time_ns, cpu_reps=args.cpu_reps,
                    chunk_size_at_target=default_chunk_size(TARGET["n"], TARGET["vocab"], torch.float32),
                    token_weights=True, ignore_every=7),
        results=rows,
        checks=notes,
        target=target,
        summary=summary,
        wall_s=round(time.time() - started, 1),
        argv=sys.argv[1:],
    )
    stem = f"linear_ce_{device}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    plot(rows, out / f"{stem}.png", f"linear CE peak memory vs N ({device_name})")
    print(summary)


def summarize(device, rows, target):
    n, vocab = TARGET["n"], TARGET["vocab"]
    if device == "cpu":
        t = target["fwd_bwd_hvp"]
        ratio = t["perk_fast"] / t["full_logits"]
        times = [r["time_ratio_vs_full"] for r in rows
                 if r["impl"] == "perk_fast" and r["mode"] == "fwd_bwd_hvp" and "time_ratio_vs_full" in r]
        verdict = "PASS" if ratio <= 1 / 8 else "FAIL"
        return (f"SUMMARY loss+backward+HVP peak at N={n}, V={vocab:,}, d={TARGET['d']}, fp32 (MemTracker): "
                f"twin {t['perk_fast'] / GiB:.2f} GiB vs full logits {t['full_logits'] / GiB:.2f} GiB = "
                f"1/{1 / ratio:.1f} (target <= 1/8: {verdict}); CPU time twin/full "
                f"{min(times):.2f}-{max(times):.2f}x")

    def pick(impl, mode, key):
        return next((r.get(key) for r in rows if r["impl"] == impl and r["mode"] == mode
                     and r["n"] == n and r["vocab"] == vocab), None)

    mem_o, mem_f = pick("perk_fast", "fwd_bwd_hvp", "peak_bytes"), pick("full_logits", "fwd_bwd_hvp", "peak_bytes")
    t_o, t_f = pick("perk_fast", "fwd_bwd_hvp", "time_ms"), pick("full_logits", "fwd_bwd_hvp", "time_ms")
    mem = f"1/{mem_f / mem_o:.1f}" if mem_o and mem_f else "n/a (full OOM)"
    tim = f"{t_o / t_f:.2f}x" if t_o and t_f else "n/a"
    return (f"SUMMARY bf16 N={n}, V={vocab:,}, loss+backward+HVP: perk_fast peak memory {mem} of full logits, "
            f"time {tim} of full logits ({t_o or float('nan'):.1f} ms)")


if __name__ == "__main__":
    main()
