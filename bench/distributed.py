"""Meta-training throughput on 1 and on N processes (torch.distributed, launched by torchrun).

    python bench/distributed.py                    # CPU default: the `small` preset, B = 8, 1 and 2 ranks
    python bench/distributed.py --ranks 1,2,4 --device cuda --preset qwen2.5-0.5b --batch 16

For each world size the script starts ``torchrun --nproc_per_node N`` on itself (worker mode);
every rank builds the same model (bench/inner_loop.py's presets: real shapes, random weights)
and the same synthetic contexts, and runs ``perk_fast.meta_train`` with ``batch_size`` contexts
per step, split over the ranks (1 thread per rank on CPU). The first ``--warmup`` steps are not
timed; the rest are timed on rank 0 between the ends of steps (each step ends with the gradient
all-reduce, which waits for the slowest rank). Throughput = contexts per second over the timed steps.

Prints a table, writes JSON under bench/results/ and ends with
``2 ranks: N.NNx the contexts/s of 1 rank``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from inner_loop import B_SCALE, WordTokenizer, build_model, environment, make_data  # noqa: E402

from perk_fast import PerkConfig, PerkModel, meta_train  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    """One rank: build, meta-train, time; rank 0 writes ``args.result``."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    hf_model = build_model(args.preset, getattr(torch, args.dtype), device)
    tokenizer = WordTokenizer(hf_model.config.vocab_size)
    config = PerkConfig(inner_steps=args.steps, inner_lr=1e-3, unroll="full", segment_len=args.segment_len,
                        segments_per_step=args.segments_per_step, lora_rank=args.rank, lora_alpha=32.0,
                        meta_grad=args.meta_grad, seed=0, outer_lr=1e-5)
    pm = PerkModel(hf_model, tokenizer, config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for b in pm.lora_B:
            b.copy_(B_SCALE * torch.randn(b.shape, generator=gen).to(b))
    n = args.batch * (args.warmup + args.timed)
    contexts, questions, answers = make_data(tokenizer, n, args.segments, args.segment_len)
    data = [{"context": c, "question": q, "answer": a} for c, q, a in zip(contexts, questions, answers)]
    marks: list[float] = []

    def on_step(record: dict) -> None:  # rank 0 only, after the step's gradient all-reduce
        marks.append(time.perf_counter())

    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    history = meta_train(pm, data, steps=args.warmup + args.timed, batch_size=args.batch, progress=False,
                         shuffle=False, on_step=on_step)
    if dist.is_initialized():
        dist.barrier()
    end = time.perf_counter()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0:
        # every step ends with collectives (status, gradients) that wait for the slowest rank, so
        # rank 0's step marks are step boundaries of the whole job
        t0 = marks[args.warmup - 1] if args.warmup else start
        timed_s = (marks[-1] if marks else end) - t0
        out = {"world_size": world, "threads_per_rank": args.threads, "steps_timed": args.timed,
               "contexts_per_step": args.batch, "timed_s": timed_s,
               "step_s": [b - a for a, b in zip([t0] + marks[args.warmup:-1], marks[args.warmup:])],
               "contexts_per_s": args.batch * args.timed / timed_s, "wall_s": end - start,
               "losses": [h["loss"] for h in history]}
        with open(args.result, "w") as fh:
            json.dump(out, fh, indent=2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=["small", "gpt2", "qwen2.5-0.5b"])
    ap.add_argument("--ranks", default="1,2", help="world sizes to measure, e.g. 1,2")
    ap.add_argument("--batch", type=int, default=8, help="contexts per meta-step (split over the ranks)")
    ap.add_argument("--steps", type=int, default=4, help="inner steps T")
    ap.add_argument("--segments", type=int, default=16)
    ap.add_argument("--segment-len", type=int, default=24)
    ap.add_argument("--segments-per-step", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--meta-grad", default="checkpointed", choices=["checkpointed", "recomputed", "unrolled"])
    ap.add_argument("--warmup", type=int, default=1, help="untimed meta-steps")
    ap.add_argument("--timed", type=int, default=3, help="timed meta-steps")
    ap.add_argument("--threads", type=int, default=1, help="threads per rank (CPU)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.batch < max(ranks):
        raise SystemExit(f"--batch {args.batch} is smaller than the largest world size {max(ranks)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for world in ranks:
        result = out_dir / f".distributed_w{world}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(_free_port()), __file__, "--worker", "--result", str(result)]
        for key in ("preset", "batch", "steps", "segments", "segment_len", "segments_per_step", "rank", "meta_grad",
                    "warmup", "timed", "threads", "device", "dtype"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        print(f"world size {world}: {' '.join(cmd[3:6])} ...", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"torchrun with {world} ranks failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(result.read_text()))
        result.unlink()
    base = rows[0]["contexts_per_s"]
    print(f"\n{'ranks':>5} {'threads/rank':>12} {'contexts/step':>13} {'timed steps':>11} {'s/step':>8} "
          f"{'contexts/s':>10} {'vs 1 rank':>9}")
    for r in rows:
        r["speedup"] = r["contexts_per_s"] / base
        print(f"{r['world_size']:>5} {r['threads_per_rank']:>12} {r['contexts_per_step']:>13} {r['steps_timed']:>11} "
              f"{r['timed_s'] / r['steps_timed']:>8.2f} {r['contexts_per_s']:>10.3f} {r['speedup']:>8.2f}x")
    same = all(r["losses"] == rows[0]["losses"] for r in rows)
    diffs = [max(abs(a - b) / abs(b) for a, b in zip(r["losses"], rows[0]["losses"])) for r in rows]
    print(f"losses of every world size agree to {max(diffs):.1e} relative" + (" (identical)" if same else ""))
    report = {"environment": environment(args.device), "config": {k: v for k, v in vars(args).items()
                                                                  if k not in ("worker", "result")},
              "rows": rows, "max_loss_rel_diff": max(diffs)}
    path = out_dir / f"distributed_{args.preset}_{args.device}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    best = rows[-1]
    print(f"{best['world_size']} ranks: {best['speedup']:.2f}x the contexts/s of 1 rank")


if __name__ == "__main__":
    main()
