"""Inference cost of PERK against in-context answering, over context length (the paper's scaling claim).

    python bench/inference.py                                   # CPU default: a small Qwen2-shaped model
    python bench/inference.py --device cuda --preset qwen2.5-0.5b --dtype bfloat16

For one context of L tokens (L = 1K ... 32K by default; ``--lengths`` for more) and k questions
about it (k = 1 and 16), the time and peak memory to answer them:

* PERK: ``perk_fast.encode`` writes the context into its memory once (T inner steps over segments
  of ``--segment-len`` tokens), then the k questions are answered from that memory with no context
  in the prompt (one batched ``generate``).
* in-context: the context in the prompt, its KV cache computed once (prefill, logits of the last
  position only) and reused for each of the k questions (the cache is cropped back to the context
  after each answer): the strongest prompt-based baseline. Greedy decoding, ``--new-tokens`` tokens.

Same base model (random weights at the preset's shape: speed and memory do not depend on the
values), same synthetic context, in one run. Times are medians of ``--repeats`` runs (CUDA:
events). Prints a table, writes JSON and a PNG under bench/results/, and ends with the crossover:
the context length from which PERK answers k questions faster than in-context reading and stays
faster (log-log interpolation across the last crossing), or that it is still slower at the longest;
and the same for peak memory.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from inner_loop import WordTokenizer, environment, save_figure, time_call  # noqa: E402

from perk_fast import PerkConfig, PerkModel, encode  # noqa: E402
from perk_fast.profiling import peak_memory  # noqa: E402

MiB = 2**20


def build(preset: str, dtype: torch.dtype, device: str, max_len: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if preset == "small":  # CPU-sized: 2 layers, hidden 128, GQA, vocab 4096
        cfg = Qwen2Config(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=352, tie_word_embeddings=True)
    elif preset == "qwen2.5-0.5b":
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, intermediate_size=4864, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                          tie_word_embeddings=True)
    else:
        raise ValueError(f"--preset {preset!r}: allowed small, qwen2.5-0.5b")
    cfg.max_position_embeddings = max_len + 1024
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()


def make_context(tok: WordTokenizer, length: int, doc_len: int, seed: int = 0) -> list[str]:
    """Documents of ``doc_len - 1`` word tokens each (one segment apiece), ``length`` tokens in all."""
    gen = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < length:
        n = min(doc_len - 8, length - total)
        words = torch.randint(0, tok._words, (max(n, 1),), generator=gen).tolist()
        docs.append(" ".join(f"w{k}" for k in words))
        total += max(n, 1)
    return docs


def questions(tok: WordTokenizer, k: int) -> list[str]:
    gen = torch.Generator().manual_seed(1)
    return [" ".join(f"w{x}" for x in torch.randint(0, tok._words, (12,), generator=gen).tolist()) + "?"
            for _ in range(k)]


@torch.no_grad()
def in_context_answers(model, tok, docs: list[str], qs: list[str], new_tokens: int) -> None:
    """Prefill the context once, then answer each question from a cropped copy-free cache."""
    import inspect

    from transformers import DynamicCache

    device = next(model.parameters()).device
    # transformers >= 5.2x names the cache argument `cache`; earlier versions `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ctx_ids = []
    for i, d in enumerate(docs):
        ctx_ids += tok.encode(f"doc_{i}: {d}\n")
    cache = DynamicCache()
    ids = torch.tensor([ctx_ids], device=device)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache})
    n_ctx = len(ctx_ids)
    for q in qs:
        step = torch.tensor([tok.encode(q + "\nAnswer:")], device=device)
        for _ in range(new_tokens):
            out = model(input_ids=step, use_cache=True, logits_to_keep=1, **{name: cache})
            step = out.logits[:, -1:].argmax(-1)
        extra = cache.get_seq_length() - n_ctx
        if extra:
            cache.crop(-extra)  # drop this question's tokens (a negative count works across transformers versions)


def perk_answers(pm: PerkModel, docs: list[str], qs: list[str], new_tokens: int) -> None:
    memory = encode(pm, [docs])
    pm.generate(memory, qs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)


def crossover(lengths, perk, icl):
    """The length from which PERK stays faster: log-log interpolation across the last change from
    slower to faster (None: PERK is still slower at the longest context; lengths[0]: faster everywhere)."""
    diff = [math.log(p) - math.log(i) for p, i in zip(perk, icl)]
    if diff[-1] > 0:
        return None
    slower = [j for j, d in enumerate(diff) if d > 0]
    if not slower:
        return lengths[0]
    j = slower[-1]
    d0, d1 = diff[j], diff[j + 1]
    f = d0 / (d0 - d1)
    return math.exp(math.log(lengths[j]) + f * (math.log(lengths[j + 1]) - math.log(lengths[j])))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=["small", "qwen2.5-0.5b"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--questions", default="1,16")
    ap.add_argument("--steps", type=int, default=4, help="inner steps T")
    ap.add_argument("--segment-len", type=int, default=256)
    ap.add_argument("--segments-per-step", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    ks = [int(x) for x in args.questions.split(",")]
    model = build(args.preset, getattr(torch, args.dtype), args.device, max(lengths))
    tok = WordTokenizer(model.config.vocab_size)
    pm = PerkModel(model, tok, PerkConfig(inner_steps=args.steps, inner_lr=1e-3, segment_len=args.segment_len,
                                          segments_per_step=args.segments_per_step, lora_rank=args.rank, seed=0))
    rows = []
    warm = make_context(tok, 512, args.segment_len)
    perk_answers(pm, warm, questions(tok, 2), 2)  # warm-up (CUDA: kernels, autotuning)
    in_context_answers(model, tok, warm, questions(tok, 2), 2)
    for length in lengths:
        docs = make_context(tok, length, args.segment_len)
        for k in ks:
            qs = questions(tok, k)
            row = {"length": length, "questions": k}
            for system, fn in (("perk", lambda: perk_answers(pm, docs, qs, args.new_tokens)),
                               ("in_context", lambda: in_context_answers(model, tok, docs, qs, args.new_tokens))):
                times = [time_call(fn, args.device) for _ in range(args.repeats)]
                row[f"{system}_s"] = statistics.median(times)
                if not args.no_memory:
                    row[f"{system}_peak_bytes"] = peak_memory(fn, args.device)[1]
            rows.append(row)
            mem = "" if args.no_memory else (f"  peak MiB {row['perk_peak_bytes'] / MiB:8.1f} "
                                             f"{row['in_context_peak_bytes'] / MiB:8.1f}")
            print(f"L={length:>6} k={k:>2}  PERK {row['perk_s']:8.2f}s  in-context {row['in_context_s']:8.2f}s"
                  f"  ratio {row['perk_s'] / row['in_context_s']:5.2f}{mem}", flush=True)
    summary = {}
    for k in ks:
        sub = [r for r in rows if r["questions"] == k]
        summary[k] = crossover([r["length"] for r in sub], [r["perk_s"] for r in sub],
                               [r["in_context_s"] for r in sub])
    # peak memory depends on the context only (k questions share one memory / one KV cache)
    memory_cross = None
    if not args.no_memory:
        sub = [r for r in rows if r["questions"] == ks[0]]
        memory_cross = crossover([r["length"] for r in sub], [r["perk_peak_bytes"] for r in sub],
                                 [r["in_context_peak_bytes"] for r in sub])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"inference_{args.preset}_{args.device}"
    (out / f"{stem}.json").write_text(json.dumps({"environment": environment(args.device), "config": vars(args),
                                                  "rows": rows, "crossover_tokens": summary,
                                                  "memory_crossover_tokens": memory_cross}, indent=2))
    _plot(rows, ks, out / f"{stem}.png", f"{args.preset} on {args.device}, T={args.steps}")
    print(f"wrote {out / (stem + '.json')}")
    parts = []
    for k in ks:
        c = summary[k]
        sub = [r for r in rows if r["questions"] == k]
        last = sub[-1]
        if c is None:
            parts.append(f"k={k}: no crossover up to {lengths[-1]} tokens (PERK {last['perk_s'] / last['in_context_s']:.2f}x "
                         f"the in-context time at {lengths[-1]})")
        else:
            parts.append(f"k={k}: PERK is faster from ~{c:,.0f} tokens")
    if not args.no_memory:
        last = rows[-1]
        parts.append("peak memory: " + (f"PERK below in-context from ~{memory_cross:,.0f} tokens" if memory_cross
                                        else f"PERK above in-context up to {lengths[-1]} tokens")
                     + f" ({last['perk_peak_bytes'] / MiB:.0f} vs {last['in_context_peak_bytes'] / MiB:.0f} MiB "
                       f"at {lengths[-1]})")
    print("crossover: " + "; ".join(parts))


def _plot(rows, ks, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    has_mem = "perk_peak_bytes" in rows[0]
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(10 if has_mem else 5.5, 3.8), squeeze=False)
    for k, style in zip(ks, ("-", "--", ":")):
        sub = [r for r in rows if r["questions"] == k]
        x = [r["length"] for r in sub]
        axes[0][0].plot(x, [r["perk_s"] for r in sub], "o" + style, color="C0", label=f"PERK, k={k}")
        axes[0][0].plot(x, [r["in_context_s"] for r in sub], "s" + style, color="C1", label=f"in-context, k={k}")
        if has_mem:
            axes[0][1].plot(x, [r["perk_peak_bytes"] / MiB for r in sub], "o" + style, color="C0", label=f"PERK, k={k}")
            axes[0][1].plot(x, [r["in_context_peak_bytes"] / MiB for r in sub], "s" + style, color="C1",
                            label=f"in-context, k={k}")
    for ax, ylabel in zip(axes[0], ("seconds to answer k questions", "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, title, path)


if __name__ == "__main__":
    main()
