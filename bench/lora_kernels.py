"""Benchmark of the batched LoRA linear: fused Triton kernels vs eager PyTorch LoRA vs the base GEMM.

On CUDA, for bf16 layer shapes of GPT-2 (768->2304, 768->768, 768->3072, 3072->768, Conv1D
layout, with bias) and Qwen2.5-0.5B (896->896, 896->128, 896->4864, 4864->896, nn.Linear layout),
4k and 32k tokens split over 4 contexts, LoRA ranks 16 and 256 (fp32 adapters), it times
(medians of ``triton.testing.do_bench``, 20-80 % quantiles kept in the JSON):

* ``base``: the frozen layer alone, cuBLAS (``F.linear``) -- the floor;
* ``eager``: PyTorch LoRA as PEFT computes it (the PyTorch twin ``lora_linear_ref``);
* ``fused``: ``lora_linear`` with the default precision, and ``fused-input`` with
  ``precision="input"`` (low-rank operands rounded to bf16);
* ``triton-base``: the fused kernel without low-rank part, to separate kernel quality from LoRA cost;

each for the forward and for forward+backward (dX, dA, dB), with TFLOP/s of the useful flops,
overhead % over ``base`` and peak memory of forward+backward. The reference pairings (GPT-2 at
r=16, Qwen at r=256, as in PERK's configs) run first; the cross pairings follow while the time
budget lasts. The table's last line is the summary; the JSON goes to ``--out``.

Without CUDA there is nothing to time: it says so, runs a tiny correctness pass of the kernels
under the Triton interpreter against the PyTorch twin and writes that JSON instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch  # does not import triton; the interpreter switch below must precede that

CUDA = torch.cuda.is_available()
if not CUDA:  # the interpreter is the only way to run the kernels here (even if TRITON_INTERPRET=0 was set)
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402

from perk_fast.kernels import use_backend  # noqa: E402
from perk_fast.kernels.lora import lora_forward, lora_linear  # noqa: E402
from perk_fast.kernels.lora_ref import lora_linear_ref  # noqa: E402

# (model, layer, K in, N out, weight layout, bias)
LAYERS = [
    ("gpt2", "c_attn", 768, 2304, "conv1d", True),
    ("gpt2", "attn.c_proj", 768, 768, "conv1d", True),
    ("gpt2", "c_fc", 768, 3072, "conv1d", True),
    ("gpt2", "mlp.c_proj", 3072, 768, "conv1d", True),
    ("qwen2.5-0.5b", "q/o_proj", 896, 896, "linear", False),
    ("qwen2.5-0.5b", "k/v_proj", 896, 128, "linear", False),
    ("qwen2.5-0.5b", "gate/up_proj", 896, 4864, "linear", False),
    ("qwen2.5-0.5b", "down_proj", 4864, 896, "linear", False),
]
REFERENCE_RANK = {"gpt2": 16, "qwen2.5-0.5b": 256}
ALPHA = {"gpt2": 32.0, "qwen2.5-0.5b": 16.0}
TOKENS = (4096, 32768)
RANKS = (16, 256)
CONTEXTS = 4
H200_BF16_DENSE_TFLOPS = 790.0  # measured ceiling quoted in DESIGN.md section 7


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or os.environ.get("PERK_FAST_COMMIT", "unknown")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("PERK_FAST_COMMIT", "unknown")


def meta(device_name: str, mode: str) -> dict:
    return {
        "benchmark": "lora_kernels",
        "mode": mode,
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": device_name,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "autotune": os.environ.get("PERK_FAST_AUTOTUNE", "1"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def make_case(k, n, layout, bias, contexts, m, rank, alpha, device, dtype=torch.bfloat16, seed=0):
    """x (contexts, m, k), W in its layout, fp32 adapters with a non-zero B (as after a few inner steps)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(contexts, m, k, device=device, dtype=dtype, generator=gen)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k**0.5
    weight = w if layout == "linear" else w.t().contiguous()  # Conv1D stores (K, N)
    b = torch.randn(n, device=device, dtype=dtype, generator=gen) if bias else None
    adapter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    a = torch.randn(contexts, rank, k, device=device, dtype=adapter_dtype, generator=gen) / k**0.5
    bb = torch.randn(contexts, n, rank, device=device, dtype=adapter_dtype, generator=gen) * 0.01
    return dict(x=x, weight=weight, bias=b, lora_a=a, lora_b=bb, scale=alpha / rank**0.5, layout=layout)


# ------------------------------------------------------------------------------------------ CUDA


class _TritonBase(torch.autograd.Function):
    """The fused kernel without low-rank part: y = x W^T + bias, dx = dY W (layout flipped)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layout):
        ctx.save_for_backward(weight)
        ctx.layout = layout
        return lora_forward(x, weight, bias, None, None, scale=0.0, weight_layout=layout)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        flipped = "conv1d" if ctx.layout == "linear" else "linear"
        # weight, bias, layout: frozen / not tensors
        return lora_forward(dy, weight, None, None, None, scale=0.0, weight_layout=flipped), None, None, None


def _variants(c):
    w_nk = c["weight"] if c["layout"] == "linear" else c["weight"].t()

    def base(x, a, b):
        return torch.nn.functional.linear(x, w_nk, c["bias"])

    def triton_base(x, a, b):
        return _TritonBase.apply(x, c["weight"], c["bias"], c["layout"])

    def eager(x, a, b):
        return lora_linear_ref(x, c["weight"], c["bias"], a, b, scale=c["scale"], weight_layout=c["layout"])

    def fused(precision):
        def f(x, a, b):
            with use_backend("triton"):
                return lora_linear(x, c["weight"], c["bias"], a, b, scale=c["scale"], weight_layout=c["layout"],
                                   precision=precision)
        return f

    return {"base": base, "triton-base": triton_base, "eager": eager, "fused": fused(None),
            "fused-input": fused("input")}


def _time(fn, rep_ms):
    q = triton.testing.do_bench(fn, warmup=10, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}


def bench_case(c, rank, rep_ms):
    k = c["x"].shape[2]
    n = c["weight"].shape[0] if c["layout"] == "linear" else c["weight"].shape[1]
    tokens = c["x"].shape[0] * c["x"].shape[1]
    lora_flops = 2.0 * tokens * rank * (k + n)
    flops = {
        "fwd": {"base": 2.0 * tokens * k * n, "lora": 2.0 * tokens * k * n + lora_flops},
        "fwd+bwd": {"base": 4.0 * tokens * k * n, "lora": 4.0 * tokens * k * n + 3 * lora_flops},
    }
    x = c["x"].detach().requires_grad_()
    a = c["lora_a"].detach().requires_grad_()
    b = c["lora_b"].detach().requires_grad_()
    dy = torch.randn(x.shape[0], x.shape[1], n, device=x.device, dtype=x.dtype)
    out = {}
    for name, f in _variants(c).items():
        has_lora = name in ("eager", "fused", "fused-input")
        leaves = [x, a, b] if has_lora else [x]
        with torch.no_grad():
            t_fwd = _time(lambda: f(x, a, b), rep_ms)

        def fwd_bwd():
            return torch.autograd.grad(f(x, a, b), leaves, dy)

        t_fb = _time(fwd_bwd, rep_ms)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        kind = "lora" if has_lora else "base"
        out[name] = {
            "fwd": {**t_fwd, "tflops": flops["fwd"][kind] / t_fwd["ms"] / 1e9},
            "fwd+bwd": {**t_fb, "tflops": flops["fwd+bwd"][kind] / t_fb["ms"] / 1e9},
            "peak_mem_fwd_bwd_MiB": peak / 2**20,
        }
    for name in out:
        for mode in ("fwd", "fwd+bwd"):
            out[name][mode]["overhead_vs_base_pct"] = 100.0 * (out[name][mode]["ms"] / out["base"][mode]["ms"] - 1)
    return out


def run_cuda(args, save) -> dict:
    """Times every case; ``save(partial_result)`` runs after each one, so a killed run keeps its data."""
    device_name = torch.cuda.get_device_name(0)
    pairs = [(layer, REFERENCE_RANK[layer[0]]) for layer in LAYERS]
    pairs += [(layer, r) for layer in LAYERS for r in RANKS if r != REFERENCE_RANK[layer[0]]]
    rows, skipped, t0 = [], [], time.time()
    header = (f"{'model':13s} {'layer':13s} {'K->N':>10s} {'tokens':>6s} {'r':>4s} | "
              f"{'base ms':>8s} {'fused ms':>8s} {'eager ms':>8s} | {'base TF/s':>9s} {'fused TF/s':>10s} | "
              f"{'fused ovh%':>10s} {'input ovh%':>10s} {'eager ovh%':>10s} {'tri-base%':>9s} | "
              f"{'fused/eager':>11s} {'mem f/e':>7s}")
    print(f"device: {device_name}; bf16 x/W, fp32 adapters, {CONTEXTS} contexts; overhead % over cuBLAS base GEMM")
    print(header)
    for tokens in TOKENS:
        for (model, layer, k, n, layout, bias), rank in pairs:
            desc = dict(model=model, layer=layer, K=k, N=n, layout=layout, bias=bias, tokens=tokens, rank=rank)
            if time.time() - t0 > args.time_budget:
                skipped.append(desc)
                continue
            c = make_case(k, n, layout, bias, CONTEXTS, tokens // CONTEXTS, rank, ALPHA[model], "cuda")
            res = bench_case(c, rank, args.rep_ms)
            rows.append({**desc, "results": res})
            for mode in ("fwd", "fwd+bwd"):
                r_ = res
                print(f"{model:13s} {layer:13s} {f'{k}->{n}':>10s} {tokens:6d} {rank:4d} | "
                      f"{r_['base'][mode]['ms']:8.3f} {r_['fused'][mode]['ms']:8.3f} {r_['eager'][mode]['ms']:8.3f} | "
                      f"{r_['base'][mode]['tflops']:9.1f} {r_['fused'][mode]['tflops']:10.1f} | "
                      f"{r_['fused'][mode]['overhead_vs_base_pct']:10.1f} "
                      f"{r_['fused-input'][mode]['overhead_vs_base_pct']:10.1f} "
                      f"{r_['eager'][mode]['overhead_vs_base_pct']:10.1f} "
                      f"{r_['triton-base'][mode]['overhead_vs_base_pct']:9.1f} | "
                      f"{r_['eager'][mode]['ms'] / r_['fused'][mode]['ms']:10.2f}x "
                      f"{r_['fused']['peak_mem_fwd_bwd_MiB'] / max(r_['eager']['peak_mem_fwd_bwd_MiB'], 1e-9):7.2f}"
                      f"  [{mode}]", flush=True)
            del c
            torch.cuda.empty_cache()
            save(_cuda_result(device_name, args, rows, skipped, summary="(partial: run interrupted)"))
    if skipped:
        print(f"time budget of {args.time_budget:.0f}s reached: {len(skipped)} cases skipped (listed in the JSON)")

    def med(key, mode):
        if not rows:
            return float("nan")
        return statistics.median(r["results"][key][mode]["overhead_vs_base_pct"] for r in rows)

    speedup = statistics.median(r["results"]["eager"]["fwd+bwd"]["ms"] / r["results"]["fused"]["fwd+bwd"]["ms"]
                                for r in rows) if rows else float("nan")
    tflops = statistics.median(r["results"]["fused"]["fwd+bwd"]["tflops"] for r in rows) if rows else float("nan")
    summary = (f"SUMMARY ({len(rows)} cases, {device_name}): LoRA overhead over the base GEMM, median: "
               f"fused {med('fused', 'fwd'):.1f}% fwd / {med('fused', 'fwd+bwd'):.1f}% fwd+bwd, eager PyTorch "
               f"{med('eager', 'fwd'):.1f}% / {med('eager', 'fwd+bwd'):.1f}%; fused fwd+bwd is {speedup:.2f}x eager "
               f"at {tflops:.0f} TFLOP/s ({100 * tflops / H200_BF16_DENSE_TFLOPS:.0f}% of H200 bf16 peak)")
    print(summary)
    return _cuda_result(device_name, args, rows, skipped, summary)


def _cuda_result(device_name, args, rows, skipped, summary) -> dict:
    return {**meta(device_name, "cuda-timing"), "config": {
        "dtype": "bfloat16", "adapter_dtype": "float32", "contexts": CONTEXTS, "tokens": list(TOKENS),
        "ranks": list(RANKS), "rep_ms": args.rep_ms, "time_budget_s": args.time_budget,
        "peak_tflops_reference": H200_BF16_DENSE_TFLOPS}, "rows": rows, "skipped": skipped, "summary": summary}


# ------------------------------------------------------------------------------------------ CPU


def _relerr(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def run_cpu_interpreter() -> dict:
    """Tiny correctness pass: output, grads and a second-order product, Triton (interpreted) vs twin."""
    print("no CUDA device: nothing to time. Running a tiny correctness pass of the Triton kernels "
          "under the interpreter (TRITON_INTERPRET=1) against the PyTorch twin instead.")
    cases = [("gpt2-like", 48, 40, "conv1d", True, 3, 37, 8), ("qwen-like", 40, 56, "linear", False, 2, 29, 24)]
    rows = []
    print(f"{'case':10s} {'dtype':8s} {'K->N':>7s} {'B x M':>6s} {'r':>3s} | {'y':>9s} {'dx':>9s} {'dA':>9s} "
          f"{'dB':>9s} {'2nd-order':>9s} | {'wall s':>6s}")
    for name, k, n, layout, bias, n_ctx, m, rank in cases:
        for dtype, adapter in ((torch.float32, torch.float32), (torch.float16, torch.float32),
                               (torch.float64, torch.float64)):
            c = make_case(k, n, layout, bias, n_ctx, m, rank, 16.0, "cpu", dtype=torch.float64)
            t0 = time.time()
            got = {}
            for backend in ("triton", "torch"):
                x = c["x"].to(dtype).requires_grad_()
                a = c["lora_a"].to(adapter).requires_grad_()
                b = c["lora_b"].to(adapter).requires_grad_()
                bias_t = c["bias"].to(dtype) if c["bias"] is not None else None
                with use_backend(backend):
                    y = lora_linear(x, c["weight"].to(dtype), bias_t, a, b, scale=c["scale"], weight_layout=layout)
                dy = 0.5 + torch.arange(y.shape[-1], dtype=y.dtype) / y.shape[-1]  # broadcast: a stride-0 dY
                first = torch.autograd.grad(y, [x, a, b], dy.expand_as(y), create_graph=dtype != torch.float16)
                second = None
                if dtype != torch.float16:  # grad of |first-order grads|^2: the double backward
                    second = torch.autograd.grad(sum((g * g).sum() for g in first), [x, a, b])
                    second = torch.cat([s_.flatten().double() for s_ in second])
                got[backend] = (y, *first, second)
            wall = time.time() - t0
            errs = [_relerr(a_, b_) if a_ is not None else None for a_, b_ in zip(got["triton"], got["torch"])]
            rows.append(dict(case=name, dtype=str(dtype).replace("torch.", ""), K=k, N=n, layout=layout,
                             contexts=n_ctx, tokens_per_context=m, rank=rank,
                             rel_err={"y": errs[0], "dx": errs[1], "dA": errs[2], "dB": errs[3],
                                      "second_order": errs[4]},
                             wall_s_interpreter=wall))
            fmt = lambda e: f"{e:9.2e}" if e is not None else f"{'-':>9s}"  # noqa: E731
            print(f"{name:10s} {rows[-1]['dtype']:8s} {f'{k}->{n}':>7s} {f'{n_ctx}x{m}':>6s} {rank:3d} | "
                  + " ".join(fmt(e) for e in errs) + f" | {wall:6.2f}")
    worst = {dt: max(e for r in rows if r["dtype"] == dt for e in r["rel_err"].values() if e is not None)
             for dt in ("float64", "float32", "float16")}
    summary = ("SUMMARY (no CUDA, interpreter correctness only, no timings): worst relative error Triton vs twin "
               + ", ".join(f"{dt} {e:.1e}" for dt, e in worst.items()))
    print(summary)
    return {**meta(f"cpu ({platform.machine()}), no CUDA", "cpu-interpreter-correctness"),
            "config": {"cases": [dict(zip(["case", "K", "N", "layout", "bias", "contexts", "tokens_per_context",
                                           "rank"], c_)) for c_ in cases]},
            "rows": rows, "summary": summary,
            "note": "relative Frobenius errors of the Triton kernels (interpreted) vs the PyTorch twin; the "
                    "fp16 twin rounds the base product to fp16 before adding the low-rank term, the kernel "
                    "rounds once; wall times are interpreter times, not kernel speed"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="directory for the JSON (default: bench/results/)")
    parser.add_argument("--time-budget", type=float, default=150.0,
                        help="seconds after which remaining CUDA cases are skipped (default 150)")
    parser.add_argument("--rep-ms", type=float, default=60.0, help="do_bench repetition time per timing (ms)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if CUDA:
        slug = "".join(ch if ch.isalnum() else "_" for ch in torch.cuda.get_device_name(0).lower()).strip("_")
        path = out_dir / f"lora_kernels_{slug}.json"
        result = run_cuda(args, save=lambda partial: _write(path, partial))
    else:
        path = out_dir / "lora_kernels_cpu.json"
        result = run_cpu_interpreter()
    _write(path, result)
    print(f"wrote {path}", file=sys.stderr)


def _write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
