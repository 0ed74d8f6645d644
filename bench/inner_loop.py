"""The main benchmark: one PERK meta-training step (meta_loss + backward), three ways.

  reference     tests/perk_reference.py: ``higher``'s unrolled inner loop, one context at a time,
                plain LoRA modules, full logits (what the reference repository does; its memory
                profile is the plain unrolled graph)
  unrolled      perk_fast, PerkConfig(meta_grad="unrolled"): batched LoRA, chunked LM-head loss,
                one unrolled autograd graph
  checkpointed  perk_fast, PerkConfig(meta_grad="checkpointed"): step checkpointing + per-micro-batch
                replay (DESIGN.md section 3), flat in the number of segments, one adapter-sized
                tensor (the inner gradient) per step
  recomputed    perk_fast, PerkConfig(meta_grad="recomputed"): as checkpointed, but the inner
                gradients are recomputed in the reverse walk along a binomial (revolve) schedule
                holding ``--snapshots`` states: constant in T (0 snapshots: T(T+1)/2 extra
                first-order passes; 2, the default: 2T - 2 at T = 4, 48 at T = 16) (not in the default
                --modes; e.g. --sweep steps --modes reference,checkpointed,recomputed)

Same model, data, meta-parameters and seed for every mode. Per mode: peak memory of one meta-step,
median time of ``--repeats`` warm steps, both as ratios to the reference, and the largest relative
difference of the meta-gradients from the reference's (max over meta-parameter tensors of
||g - g_ref|| / ||g_ref||).

Gradient agreement needs care: through AdamW the meta-gradient is dominated by the entries whose
inner gradient is about eps (the first step is sign-like, its derivative there ~ lr / eps), so in
fp32 / bf16 it is ill-conditioned -- the reference differs from *itself* with its segments summed in
the other order (the printed "noise floor", a lower bound of the rounding noise) by 1e-2..1e-1 in fp32.
So the gradients are also compared in fp64 on a reduced problem (same preset, T, optimiser, unroll;
4 segments, 2 per micro-batch; ``--no-fp64-check`` to skip), where they agree to ~1e-9.

Peak memory is the peak of the bytes allocated *during* the step above what was resident before it
(model weights, meta-parameters), from ``perk_fast.profiling.peak_memory``: on CPU the CPU
allocator's allocation/free events (``torch.profiler``; ``--cpu-mem tracker`` uses MemTracker's live
tensor bytes instead, which over-count the inner loop), on CUDA ``max_memory_allocated``. It therefore includes
``higher``'s copy of the base weights, which the reference makes at every ``innerloop_ctx``. The
memory run is separate and untimed (it also warms up); time on CUDA comes from CUDA events.

Models are built from real configs with random weights (``--preset``): ``small`` (default, CPU-sized:
GPT-2 with 4 layers, hidden 256, vocab 50257), ``gpt2`` (124M), ``qwen2.5-0.5b``. Data are synthetic
"w<id>" words that a built-in tokenizer maps to ids spread over the model's vocabulary; every
document fills exactly one segment, so ``--segments`` x ``--segment-len`` is the context size.

``--sweep steps`` (T = 2, 4, 8, 16) and ``--sweep context`` (1k..32k tokens on CUDA, 256..2k on CPU)
run every mode over a range and plot peak memory and time (PNG); a mode that runs out of memory is
recorded and marked, and the sweep goes on. Results go to ``--out`` (default bench/results/) as
JSON with the commit, versions, device and config; the last printed line is the summary.

    python bench/inner_loop.py                                  # CPU default, < 3 minutes
    python bench/inner_loop.py --device cuda --preset qwen2.5-0.5b --dtype bfloat16
    python bench/inner_loop.py --sweep steps --device cuda --preset gpt2
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the reference implementation lives beside its tests

from perk_fast import PerkConfig, PerkModel  # noqa: E402
from perk_fast.lora import remove_lora  # noqa: E402
from perk_fast.profiling import peak_memory  # noqa: E402
from perk_reference import ReferencePerk  # noqa: E402

MODES = ("reference", "unrolled", "checkpointed", "recomputed")
DEFAULT_MODES = ("reference", "unrolled", "checkpointed")
CPU_MEM = "allocator"  # how CPU peaks are measured (--cpu-mem)
MiB = 2**20
B_SCALE = 1e-3  # LoRA B is moved off zero by this much (generic gradients, no AdamW kink at B = 0)


# ---------------------------------------------------------------------------------------- models
def build_model(preset: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A causal LM of the preset's real shape with random weights (nothing is downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if preset == "tiny":  # per-context work small next to per-call overhead (bench/throughput.py)
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=2048, n_positions=512)
        cls = GPT2LMHeadModel
    elif preset == "small":
        cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=50257, n_positions=1024)
        cls = GPT2LMHeadModel
    elif preset == "gpt2":
        cfg = GPT2Config()  # 124M: 12 layers, 768, 12 heads, vocab 50257
        cls = GPT2LMHeadModel
    elif preset == "qwen2.5-0.5b":
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768,
                          rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
        cls = Qwen2ForCausalLM
    else:
        raise ValueError(f"--preset {preset!r} is unknown: allowed tiny, small, gpt2, qwen2.5-0.5b")
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = cls(cfg)
    return model.to(dtype).eval()


class WordTokenizer:
    """Synthetic tokenizer: " w<k>" is one token (id 256 + k mod (vocab - 258)), any other
    character is its UTF-8 bytes; eos = vocab - 1, pad = vocab - 2. Works for any vocab > 258."""

    _TOKEN = re.compile(r" ?w(\d+)|.", re.S)

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = vocab_size - 1
        self.pad_token_id = vocab_size - 2
        self._words = vocab_size - 258

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Inverse of :meth:`encode` for word and byte ids (eos / pad dropped or shown as tags)."""
        out, pending = [], bytearray()
        for i in (int(x) for x in ids):
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if i >= self.vocab_size - 2:
                out.append("" if skip_special_tokens else ("<eos>" if i == self.eos_token_id else "<pad>"))
            else:
                out.append(f" w{i - 256}")
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for m in self._TOKEN.finditer(text):
            if m.group(1) is not None:
                ids.append(256 + int(m.group(1)) % self._words)
            else:
                ids.extend(m.group(0).encode("utf-8"))
        return ids


def make_data(tokenizer: WordTokenizer, n_contexts: int, segments: int, segment_len: int, seed: int = 0):
    """Contexts of ``segments`` documents, each exactly one segment of ``segment_len`` tokens."""
    gen = torch.Generator().manual_seed(seed)

    def words(n: int) -> str:
        return " ".join(f"w{k}" for k in torch.randint(0, tokenizer._words, (n,), generator=gen).tolist())

    contexts, questions, answers = [], [], []
    for _ in range(n_contexts):
        docs = []
        for i in range(segments):
            room = segment_len - len(tokenizer.encode(f"doc_{i}:")) - 1  # minus the EOS
            docs.append(words(room))  # " " + text: one token per word
        contexts.append(docs)
        questions.append("What follows " + words(3) + "?")
        answers.append(words(4))
    return contexts, questions, answers


# ---------------------------------------------------------------------------------------- measuring
def save_figure(fig, title: str, path: str, dpi: int = 110) -> None:
    """Title, lay out, write and close a benchmark figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def time_call(fn, device: str) -> float:
    """Seconds one call of ``fn`` takes: CUDA events on CUDA, the wall clock elsewhere."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def is_oom(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError / MemoryError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Bench:
    """One PerkModel + one ReferencePerk over a base model; runs meta-steps in each mode."""

    def __init__(self, hf_model, tokenizer, config: PerkConfig, data) -> None:
        self.pm = PerkModel(hf_model, tokenizer, config).eval()
        with torch.no_grad():  # off PEFT's B = 0 start (a kink of AdamW's first step), as after meta-training
            gen = torch.Generator().manual_seed(1)
            for b in self.pm.lora_B:
                b.copy_(B_SCALE * torch.randn(b.shape, generator=gen).to(b))
        self.ref = ReferencePerk(self.pm)
        self.data = data
        self.names = [n for n, _ in self.pm.named_meta_parameters()]

    def close(self) -> None:
        remove_lora(self.pm.sites)

    def step(self, mode: str) -> tuple[float, dict[str, torch.Tensor]]:
        """One meta-step (loss + backward); returns the loss and the meta-gradients."""
        contexts, questions, answers = self.data
        if mode == "reference":
            loss, leaves = self.ref.meta_loss(contexts, questions, answers, backward=True)
            grads = {n: leaves[n].grad for n in self.names}
            loss = loss.detach()
        else:
            self.pm.config = self.pm.config.replace(meta_grad=mode)
            params = dict(self.pm.named_meta_parameters())
            for p in params.values():
                p.grad = None
            loss = self.pm.meta_loss(contexts, questions, answers, seed=0)
            loss.backward()
            grads = {n: p.grad for n, p in params.items()}
            loss = loss.detach()
        return loss.item(), grads


def measure(bench: Bench, mode: str, repeats: int, device: str) -> dict:
    """Peak memory (one step) and median time (``repeats`` steps) of one mode."""
    out: dict = {"mode": mode}
    for p in bench.pm.meta_parameters():  # nothing of an earlier mode stays resident
        p.grad = None
    try:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        (loss, grads), out["peak_bytes"] = peak_memory(lambda: bench.step(mode), device, method=CPU_MEM)
        out["loss"] = loss
        grads = {n: None if g is None else g.detach().clone() for n, g in grads.items()}
        times = []
        for i in range(repeats):
            gc.collect()
            # the reference's last timed step sums its segments in reverse order: same maths, same
            # cost, other rounding -- its gradient difference is the dtype's noise floor
            probe = mode == "reference" and i == repeats - 1
            bench.ref.reverse_segments = probe
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                _, step_grads = bench.step(mode)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                _, step_grads = bench.step(mode)
                times.append(time.perf_counter() - t0)
            if probe:
                out["noise_floor"] = grad_rel_diff(step_grads, grads)
            bench.ref.reverse_segments = False
        out["times_s"] = times
        out["median_s"] = statistics.median(times) if times else math.nan
        out["status"] = "ok"
        out["_grads"] = grads
    except Exception as err:  # noqa: BLE001 - an OOM is a result; anything else is re-raised
        if not is_oom(err):
            if mode == "checkpointed" and isinstance(err, (ImportError, ModuleNotFoundError)):
                out.update(status="unavailable", error=f"{type(err).__name__}: {err}")
                return out
            raise
        out.update(status="oom", error=f"{type(err).__name__}: {str(err)[:200]}")
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def grad_rel_diff(grads: dict, ref: dict) -> float:
    """max over tensors of ||g - g_ref|| / ||g_ref|| (a tensor unused by both counts 0)."""
    worst = 0.0
    for name, g_ref in ref.items():
        g = grads.get(name)
        g_ref = torch.zeros(()) if g_ref is None else g_ref.double()
        g = torch.zeros(()) if g is None else g.double()
        diff, norm = (g - g_ref).norm().item(), g_ref.norm().item()
        worst = max(worst, diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf))
    return worst


def run_point(hf_model, tokenizer, config: PerkConfig, data, modes, repeats, device) -> list[dict]:
    bench = Bench(hf_model, tokenizer, config, data)
    try:
        rows = [measure(bench, mode, repeats, device) for mode in modes]
    finally:
        bench.close()
    ref = next((r for r in rows if r["mode"] == "reference" and r["status"] == "ok"), None)
    for r in rows:
        if ref is not None and r["status"] == "ok":
            r["peak_vs_reference"] = r["peak_bytes"] / ref["peak_bytes"]
            r["time_vs_reference"] = r["median_s"] / ref["median_s"]
            r["grad_rel_diff"] = grad_rel_diff(r["_grads"], ref["_grads"])
    for r in rows:
        r.pop("_grads", None)
    return rows


def _rmsnorm_keep_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def fp64_check(args, modes) -> dict:
    """Meta-gradients of every mode against the reference's, in fp64, on a reduced problem.

    Why: through AdamW the meta-gradient is dominated by the entries whose inner gradient is
    about eps (there the first, sign-like step has derivative ~ lr / eps), so in fp32 / bf16 two
    correct implementations -- or the reference against itself with reordered sums -- differ by
    1e-2..1. fp64 shows whether they compute the same function. Same preset, T, optimiser and
    unroll; at most 4 segments, 2 per micro-batch (micro-batching exercised), one context.
    Qwen2's RMSNorm is made to keep fp64 (it computes in fp32), as in tests/test_vs_reference.py.
    """
    from transformers.models.qwen2 import modeling_qwen2

    original = modeling_qwen2.Qwen2RMSNorm.forward
    modeling_qwen2.Qwen2RMSNorm.forward = _rmsnorm_keep_dtype
    try:
        hf_model = build_model(args.preset, torch.float64, args.device)
        tokenizer = WordTokenizer(hf_model.config.vocab_size)
        segments = min(args.segments, 4)
        config = perk_config(args, args.steps).replace(segments_per_step=min(args.segments_per_step, 2))
        bench = Bench(hf_model, tokenizer, config, make_data(tokenizer, 1, segments, args.segment_len))
        try:
            grads = {}
            for mode in ["reference"] + [m for m in modes if m != "reference"]:
                try:
                    grads[mode] = {n: None if g is None else g.clone() for n, g in bench.step(mode)[1].items()}
                except (ImportError, ModuleNotFoundError):
                    continue
        finally:
            bench.close()
    finally:
        modeling_qwen2.Qwen2RMSNorm.forward = original
    ref = grads.pop("reference")
    return {"segments": segments, "segments_per_step": config.segments_per_step,
            "grad_rel_diff": {m: grad_rel_diff(g, ref) for m, g in grads.items()}}


# ---------------------------------------------------------------------------------------- reporting
def environment(device: str) -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
            device_name = f"{names[0]} ({torch.get_num_threads()} threads)" if names else device_name
        except OSError:
            pass
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": device_name,
    }


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def print_table(rows: list[dict]) -> None:
    print(f"{'mode':<13} {'status':<11} {'peak MiB':>12} {'vs ref':>8} {'median s':>10} {'vs ref':>8} {'grad rel diff':>14}")
    for r in rows:
        ok = r["status"] == "ok"
        print(
            f"{r['mode']:<13} {r['status']:<11} {fmt_bytes(r.get('peak_bytes')) if ok else '-':>12} "
            f"{r.get('peak_vs_reference', math.nan):>8.3f} {r.get('median_s', math.nan):>10.3f} "
            f"{r.get('time_vs_reference', math.nan):>8.3f} {r.get('grad_rel_diff', math.nan):>14.2e}"
        )
    ref = next((r for r in rows if r["mode"] == "reference" and "noise_floor" in r), None)
    if ref is not None:
        print(f"noise floor: the reference against itself with its segments summed in reverse order "
              f"differs by {ref['noise_floor']:.2e} (same maths, other rounding)")


def summary(rows: list[dict], where: str = "", fp64: dict | None = None, dtype: str = "") -> str:
    by = {r["mode"]: r for r in rows}
    ref = by.get("reference")
    for mode in ("checkpointed", "recomputed", "unrolled"):
        r = by.get(mode)
        if r is None or r["status"] != "ok":
            continue
        if ref is None or ref["status"] != "ok" or "peak_vs_reference" not in r:
            state = "not run" if ref is None else ref["status"].replace("oom", "out of memory")
            return f"{mode}{where}: peak {fmt_bytes(r['peak_bytes'])} MiB, {r['median_s']:.3f} s; reference {state}"
        noise = f", noise floor {ref['noise_floor']:.0e}" if "noise_floor" in ref else ""
        run_diff = f"{r['grad_rel_diff']:.0e}"
        if fp64 and mode in fp64["grad_rel_diff"]:
            grad = f"{fp64['grad_rel_diff'][mode]:.0e} in fp64 ({dtype} run: {run_diff}{noise})"
        else:
            grad = f"{run_diff}" + (f" ({noise[2:]})" if noise else "")
        return (
            f"{mode} vs reference{where}: {1 / r['peak_vs_reference']:.1f}x less peak memory, "
            f"{r['time_vs_reference']:.2f}x time, max grad rel diff {grad}"
        )
    return "no perk_fast mode ran: " + ", ".join(f"{r['mode']} {r['status']}" for r in rows)


def plot_sweep(points: list[dict], axis: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    modes = [m for m in MODES if any(r["mode"] == m for p in points for r in p["rows"])]
    for k, mode in enumerate(modes):
        xs, mem, tim, oom_x = [], [], [], []
        for p in points:
            r = next((r for r in p["rows"] if r["mode"] == mode), None)
            if r is None:
                continue
            if r["status"] == "ok":
                xs.append(p["x"])
                mem.append(r["peak_bytes"] / MiB)
                tim.append(r["median_s"])
            elif r["status"] == "oom":
                oom_x.append(p["x"])
        line = ax_mem.plot(xs, mem, "o-", label=mode)[0]
        ax_time.plot(xs, tim, "o-", label=mode, color=line.get_color())
        if oom_x:  # an X per out-of-memory point along the top edge, one row per mode
            for ax in (ax_mem, ax_time):
                ax.plot(oom_x, [0.95 - 0.05 * k] * len(oom_x), "X", ms=9, color=line.get_color(),
                        transform=ax.get_xaxis_transform(), label=f"{mode}: out of memory", ls="none")
    xlabel = "inner steps T" if axis == "steps" else "context tokens (segments x segment length)"
    for ax, ylabel in ((ax_mem, "peak memory of a meta-step (MiB)"), (ax_time, "median meta-step time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    save_figure(fig, title, path, dpi=120)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "gpt2", "qwen2.5-0.5b"])
    ap.add_argument("--steps", type=int, default=4, help="inner steps T")
    ap.add_argument("--segments", type=int, default=16, help="segments per context")
    ap.add_argument("--segment-len", type=int, default=None, help="tokens per segment (default 24 CPU, 256 CUDA)")
    ap.add_argument("--segments-per-step", type=int, default=4, help="segments per micro-batch (perk_fast)")
    ap.add_argument("--contexts", type=int, default=1, help="contexts per meta-step")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--unroll", default="full", choices=["full", "truncated", "first_order"])
    ap.add_argument("--unroll-start", type=int, default=None, help="truncated: first second-order step (default T/2)")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--snapshots", type=int, default=PerkConfig.recompute_snapshots,
                    help="states the recomputed mode's revolve schedule may hold (0: rebuild every step from p_0)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float64"],
                    help="base model dtype (default float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cpu-mem", default="allocator", choices=["allocator", "tracker"],
                    help="CPU peak memory from the allocator's events (default) or MemTracker's live tensors")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help="comma-separated subset of " + ",".join(MODES) + " (default: " + ",".join(DEFAULT_MODES) + ")")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per mode (default 2 CPU, 5 CUDA)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default 1: OpenMP spin-waiting makes 2+ threads many times slower on a "
                         "shared, oversubscribed machine; the side-by-side ratios are what count on CPU)")
    ap.add_argument("--sweep", choices=["steps", "context"], default=None)
    ap.add_argument("--fp64-check", action=argparse.BooleanOptionalAction, default=True,
                    help="also compare the meta-gradients in fp64 on a reduced problem (single runs only)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for JSON / PNG")
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; allowed {list(MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    cuda = args.device == "cuda"
    args.segment_len = args.segment_len or (256 if cuda else 24)
    if args.segment_len < 12:
        ap.error(f"--segment-len {args.segment_len} is too short: a segment holds a 'doc_<i>:' prefix, words and EOS "
                 "(allowed: >= 12)")
    args.repeats = 2 if args.repeats is None and not cuda else (5 if args.repeats is None else args.repeats)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    return args


def perk_config(args, steps: int) -> PerkConfig:
    unroll_start = args.unroll_start if args.unroll_start is not None else steps // 2
    return PerkConfig(
        inner_steps=steps, inner_lr=1e-3, inner_optimizer=args.optimizer, unroll=args.unroll,
        unroll_start=min(unroll_start, steps), segment_len=args.segment_len,
        segments_per_step=args.segments_per_step, lora_rank=args.rank, lora_alpha=args.alpha, seed=0,
        recompute_snapshots=args.snapshots,
    )


def main(argv=None) -> None:
    global CPU_MEM
    args = parse_args(argv)
    CPU_MEM = args.cpu_mem
    if args.device == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    dtype = getattr(torch, args.dtype)
    t_start = time.perf_counter()
    hf_model = build_model(args.preset, dtype, args.device)
    tokenizer = WordTokenizer(hf_model.config.vocab_size)
    env = environment(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"inner_loop_{args.preset}_{args.device}"
    base = {"preset": args.preset, "dtype": args.dtype, "contexts": args.contexts, "segments": args.segments,
            "segment_len": args.segment_len, "segments_per_step": args.segments_per_step, "rank": args.rank,
            "alpha": args.alpha, "unroll": args.unroll, "optimizer": args.optimizer, "repeats": args.repeats,
            "recompute_snapshots": args.snapshots,
            "modes": args.modes, "cpu_mem": args.cpu_mem if args.device == "cpu" else None, "n_params": sum(p.numel() for p in hf_model.parameters())}

    if args.sweep is None:
        config = perk_config(args, args.steps)
        data = make_data(tokenizer, args.contexts, args.segments, args.segment_len)
        rows = run_point(hf_model, tokenizer, config, data, args.modes, args.repeats, args.device)
        check = None
        if args.fp64_check and "reference" in args.modes and args.dtype != "float64":
            del hf_model
            gc.collect()
            check = fp64_check(args, args.modes)
        line = summary(rows, fp64=check, dtype=args.dtype)
        perk = {**config.to_dict(), "meta_grad": "per mode"}
        result = {"benchmark": "inner_loop", **env, "config": {**base, "steps": args.steps,
                  "perk_config": perk}, "results": rows, "fp64_check": check, "summary": line,
                  "wall_s": time.perf_counter() - t_start}
        path = out_dir / f"{tag}.json"
        print(f"{args.preset} ({base['n_params'] / 1e6:.1f}M params, {args.dtype}) on {env['device_name']}: "
              f"T={args.steps}, {args.contexts} context(s) x {args.segments} segments x {args.segment_len} tokens, "
              f"{args.segments_per_step} segments per micro-batch, unroll={args.unroll}, {args.optimizer}")
        print_table(rows)
        if check is not None:
            print(f"fp64 check ({check['segments']} segments, {check['segments_per_step']} per micro-batch, same T): "
                  "max grad rel diff " + ", ".join(f"{m} {d:.1e}" for m, d in check["grad_rel_diff"].items()))
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        print(line)
        return

    if args.sweep == "steps":
        xs = [2, 4, 8, 16]
    else:
        xs = [1024, 2048, 4096, 8192, 16384, 32768] if args.device == "cuda" else [256, 512, 1024, 2048]
    points = []
    for x in xs:
        steps = x if args.sweep == "steps" else args.steps
        segments = args.segments if args.sweep == "steps" else max(1, x // args.segment_len)
        config = perk_config(args, steps)
        data = make_data(tokenizer, args.contexts, segments, args.segment_len)
        rows = run_point(hf_model, tokenizer, config, data, args.modes, args.repeats, args.device)
        x = steps if args.sweep == "steps" else segments * args.segment_len  # actual context tokens
        points.append({"x": x, "steps": steps, "segments": segments, "rows": rows})
        print(f"--- {args.sweep} = {x} (T={steps}, {segments} segments x {args.segment_len} tokens)")
        print_table(rows)
    last = points[-1]
    line = summary(last["rows"], where=f" at {args.sweep}={last['x']}")
    path = out_dir / f"{tag}_sweep_{args.sweep}.json"
    png = path.with_suffix(".png")
    title = (f"PERK meta-step, {args.preset} {args.dtype} on {env['device_name']}, unroll={args.unroll}, "
             f"{args.segments_per_step} segments/micro-batch" + (f", {args.segments}x{args.segment_len} tokens"
                                                                 if args.sweep == "steps" else f", T={args.steps}"))
    plot_sweep(points, args.sweep, png, title)
    result = {"benchmark": "inner_loop_sweep", **env, "sweep": args.sweep, "config": base, "points": points,
              "summary": line, "wall_s": time.perf_counter() - t_start}
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} and {png.name}")
    print(line)


if __name__ == "__main__":
    main()
