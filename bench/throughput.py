"""Throughput where the reference cannot batch: meta-training and test-time encoding, side by side.

    python bench/throughput.py                          # CPU default (small GPT-2 preset), < 10 minutes
    python bench/throughput.py --device cuda --preset qwen2.5-0.5b --segment-len 256 --dtype bfloat16

The reference trains and encodes one context at a time (its collator keeps one example per batch);
perk_fast writes B contexts into B adapters in one batched inner loop. Same model, meta-parameters
and contexts for both, in one run:

* meta-training: contexts per second of one meta-step (meta_loss + backward) at B = 1, 4, 16 with
  perk_fast's default ``meta_grad`` (checkpointed), against the reference approach (``higher``'s
  unrolled inner loop, one context after the other; tests/perk_reference.py) over the same 16
  contexts; and the peak memory of each.
* test-time encoding: contexts per second of ``perk_fast.encode`` at B = 1, 8, 32 against the
  reference approach (``higher`` without the higher-order graph, one context at a time) over the
  same 32 contexts.

Times are medians of ``--repeats`` warm runs (CUDA: events). JSON and a PNG go to bench/results/;
the last line is ``batched meta-training at B=16: N.Nx the reference's contexts/s; batched encode
at B=32: N.Nx``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from inner_loop import B_SCALE, WordTokenizer, build_model, environment, make_data, save_figure, time_call  # noqa: E402

from perk_fast import PerkConfig, PerkModel, encode  # noqa: E402
from perk_fast.profiling import peak_memory  # noqa: E402
from perk_reference import ReferencePerk  # noqa: E402

MiB = 2**20


def _median(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (and, on CUDA, compilation / autotuning)
    return statistics.median(time_call(fn, device) for _ in range(repeats))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "gpt2", "qwen2.5-0.5b"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=4, help="inner steps T")
    ap.add_argument("--segments", type=int, default=4, help="segments per context")
    ap.add_argument("--segment-len", type=int, default=24)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--train-batches", default="1,4,16")
    ap.add_argument("--encode-batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    train_bs = [int(b) for b in args.train_batches.split(",")]
    enc_bs = [int(b) for b in args.encode_batches.split(",")]
    dtype = getattr(torch, args.dtype)
    hf_model = build_model(args.preset, dtype, args.device)
    tok = WordTokenizer(hf_model.config.vocab_size)
    config = PerkConfig(inner_steps=args.steps, inner_lr=1e-3, segment_len=args.segment_len,
                        segments_per_step=args.segments, lora_rank=args.rank, lora_alpha=32.0, seed=0)
    pm = PerkModel(hf_model, tok, config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for b in pm.lora_B:
            b.copy_(B_SCALE * torch.randn(b.shape, generator=gen).to(b))
    ref = ReferencePerk(pm)
    n_train, n_enc = max(train_bs), max(enc_bs)
    contexts, questions, answers = make_data(tok, max(n_train, n_enc), args.segments, args.segment_len)
    rows = {"train": [], "encode": []}

    # ---- meta-training
    def ref_train():
        ref.meta_loss(contexts[:n_train], questions[:n_train], answers[:n_train], backward=True)

    def perk_step(b):
        def run():
            for p in pm.meta_parameters():
                p.grad = None
            pm.meta_loss(contexts[:b], questions[:b], answers[:b], seed=0).backward()
        return run

    def one_ref_context():
        ref.meta_loss(contexts[:1], questions[:1], answers[:1], backward=True)

    _, ref_peak = peak_memory(one_ref_context, args.device)
    t_ref = _median(ref_train, args.repeats, args.device)
    rows["train"].append({"system": "reference", "batch": 1, "contexts": n_train, "seconds": t_ref,
                          "contexts_per_s": n_train / t_ref, "peak_bytes": ref_peak})
    for b in train_bs:
        _, peak = peak_memory(perk_step(b), args.device)
        t = _median(perk_step(b), args.repeats, args.device)
        rows["train"].append({"system": "perk_fast", "batch": b, "contexts": b, "seconds": t,
                              "contexts_per_s": b / t, "peak_bytes": peak})
    # ---- test-time encoding
    segs = pm.segment_contexts(contexts[:n_enc])

    def ref_encode():
        for s in segs:
            ref.encode_context(s)

    t_ref_enc = _median(ref_encode, args.repeats, args.device)
    rows["encode"].append({"system": "reference", "batch": 1, "contexts": n_enc, "seconds": t_ref_enc,
                           "contexts_per_s": n_enc / t_ref_enc})
    for b in enc_bs:
        t = _median(lambda: encode(pm, contexts[:b]), args.repeats, args.device)
        rows["encode"].append({"system": "perk_fast", "batch": b, "contexts": b, "seconds": t,
                               "contexts_per_s": b / t})
    # the two encoders agree (same maths): a check that the comparison is fair
    ours = encode(pm, contexts[:2])
    theirs = ref.encode_context(segs[1])
    agree = max(((a[1] - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(ours.tensors, theirs))

    for kind in ("train", "encode"):
        base = rows[kind][0]["contexts_per_s"]
        for r in rows[kind]:
            r["vs_reference"] = r["contexts_per_s"] / base
    print(f"{args.preset} on {args.device} ({args.dtype}), T={args.steps}, {args.segments} segments x "
          f"{args.segment_len} tokens per context, rank {args.rank}, meta_grad={config.meta_grad}")
    print(f"{'':14} {'system':<10} {'B':>4} {'contexts/s':>11} {'vs ref':>7} {'peak MiB':>9}")
    for kind, label in (("train", "meta-training"), ("encode", "encode")):
        for r in rows[kind]:
            peak = f"{r['peak_bytes'] / MiB:9.1f}" if "peak_bytes" in r else f"{'-':>9}"
            print(f"{label:<14} {r['system']:<10} {r['batch']:>4} {r['contexts_per_s']:>11.3f} "
                  f"{r['vs_reference']:>6.2f}x {peak}")
    print(f"batched encode vs the reference's encoder on the same context: adapters agree to {agree:.1e} (relative)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"throughput_{args.preset}_{args.device}"
    report = {"environment": environment(args.device), "config": vars(args), "rows": rows,
              "encode_agreement": agree}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    _plot(rows, out / f"{stem}.png", f"{args.preset} on {args.device}")
    best_t = next(r for r in rows["train"] if r["system"] == "perk_fast" and r["batch"] == n_train)
    best_e = next(r for r in rows["encode"] if r["system"] == "perk_fast" and r["batch"] == n_enc)
    print(f"wrote {out / (stem + '.json')}")
    print(f"batched meta-training at B={n_train}: {best_t['vs_reference']:.1f}x the reference's contexts/s; "
          f"batched encode at B={n_enc}: {best_e['vs_reference']:.1f}x")


def _plot(rows, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, kind, label in ((axes[0], "train", "meta-training"), (axes[1], "encode", "test-time encoding")):
        ours = [r for r in rows[kind] if r["system"] == "perk_fast"]
        ax.plot([r["batch"] for r in ours], [r["contexts_per_s"] for r in ours], "o-", label="perk_fast (batched)")
        ax.axhline(rows[kind][0]["contexts_per_s"], color="gray", ls="--", label="reference (one at a time)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("contexts per batch B")
        ax.set_ylabel("contexts / s")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, title, path)


if __name__ == "__main__":
    main()
