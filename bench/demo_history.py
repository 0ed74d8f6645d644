"""Two or more demo_train runs' PERK stages side by side, step by step: the outer loss (the log's mean
over the last 50 meta-steps), the meta-gradient norm before clipping and the inner loss after the
last inner step (from the run's history), the steps the gradient-spike guard skipped, dev EM.

    python bench/demo_history.py bench/results/demo_direct bench/results/demo_direct_guard --every 250

Each run is a folder holding ``train.log`` and ``ckpt/last/trainer_state.json`` (every step, read
first when present) or ``assets/train_report.json`` (a finished run; its ``perk_history`` is sampled). A row at step s shows each run's history entry at the last recorded step <= s, the
largest gradient norm the history holds in (s - every, s], and the skips logged up to s. Prints a
table; writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import re

_LOG_LINE = re.compile(r"^\s*meta step (\d+)/(\d+)\s+loss ([0-9.]+)\s+\d+s(?:\s+dev EM ([0-9.]+)%)?")
_SKIP_LINE = re.compile(r"^\s*meta step (\d+) skipped:")


def read_run(folder: str) -> dict:
    """``{"log": {step: (loss, dev EM or None)}, "skips": [steps], "history": [entries], "total": steps,
    "history_from": path}`` of one run folder; ValueError names what is missing."""
    log_path = os.path.join(folder, "train.log")
    if not os.path.exists(log_path):
        raise ValueError(f"{folder!r} has no train.log")
    log, skips, total = {}, [], None
    with open(log_path, encoding="utf-8") as fh:
        for line in fh:
            if m := _SKIP_LINE.match(line):
                skips.append(int(m.group(1)))
            elif m := _LOG_LINE.match(line):
                log[int(m.group(1))] = (float(m.group(3)), None if m.group(4) is None else float(m.group(4)))
                total = int(m.group(2))
    for rel, key in (("ckpt/last/trainer_state.json", "history"), ("assets/train_report.json", "perk_history")):
        path = os.path.join(folder, rel)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                history = json.load(fh)[key]
            break
    else:
        raise ValueError(f"{folder!r} has neither assets/train_report.json nor ckpt/last/trainer_state.json")
    if not log:
        raise ValueError(f"{log_path}: no 'meta step N/T loss X' line")
    return {"log": log, "skips": skips, "history": history, "total": total, "history_from": rel}


def rows(runs: dict[str, dict], every: int) -> list[dict]:
    """One row per ``every`` steps up to the furthest logged step of any run."""
    if every < 1:
        raise ValueError(f"every={every} is invalid: it must be >= 1")
    last = max(max(r["log"]) for r in runs.values())
    out = []
    for s in range(every, last + 1, every):
        row = {"step": s}
        for name, run in runs.items():
            logged = run["log"].get(s)
            before = [e for e in run["history"] if e["step"] <= s]
            window = [e["grad_norm"] for e in before if e["step"] > s - every]
            at = before[-1] if before else None
            row[name] = None if logged is None else {
                "loss_mean_50": logged[0], "dev_em": logged[1],
                "history_step": at and at["step"], "grad_norm": at and at["grad_norm"],
                "inner_loss_last": at and at["inner_loss_last"], "max_grad_norm_window": max(window, default=None),
                "skipped_so_far": sum(k <= s for k in run["skips"]),
            }
        out.append(row)
    return out


def _g(x) -> str:
    return "--" if x is None else f"{x:.3g}"


def table(runs: dict[str, dict], out_rows: list[dict]) -> str:
    names = list(runs)
    head = ["step"] + [f"{n}: {c}" for n in names for c in ("loss", "grad norm (max in window)", "inner loss", "skipped", "dev EM")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in out_rows:
        cells = [f"{row['step']:,}"]
        for n in names:
            c = row[n]
            if c is None:
                cells += ["--"] * 5
                continue
            cells += [f"{c['loss_mean_50']:.3f}", f"{_g(c['grad_norm'])} ({_g(c['max_grad_norm_window'])})",
                      _g(c["inner_loss_last"]), str(c["skipped_so_far"]),
                      "" if c["dev_em"] is None else f"{c['dev_em']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (train.log + assets/ or ckpt/)")
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = ap.parse_args(argv)
    try:
        runs = {os.path.basename(os.path.normpath(f)): read_run(f) for f in args.runs}
        out_rows = rows(runs, args.every)
    except ValueError as err:
        ap.error(str(err))
    text = table(runs, out_rows)
    print(text)
    for name, run in runs.items():
        print(f"{name}: {len(run['skips'])} steps skipped by the guard, history from {run['history_from']} "
              f"({len(run['history'])} entries)")
    report = {"runs": {n: {"folder": f, "skipped_steps": runs[n]["skips"], "history_from": runs[n]["history_from"]}
                       for n, f in zip(runs, args.runs)}, "every": args.every, "rows": out_rows, "table": text}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
