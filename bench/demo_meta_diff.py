"""How two demo_train runs' memories differ where they start and what they learned: the first
meta-step's losses (the same batch when both continue the same run), the mean losses of the last
logged meta-steps (where each run ended), the learned inner rates and the LoRA initialisation's B norms, split at the smaller run's rank (for a memory grown by
``demo_train.meta_state_for_model``: the learned components against the new ones).

    python bench/demo_meta_diff.py bench/results/demo_curriculum9/assets bench/results/demo_curriculum11/assets
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from perk_fast.io import load_tensors

LAST_LOGGED = 25  # entries of train_report.json's perk_history averaged for where a run ended
_LOSSES = ("loss", "inner_loss_first", "inner_loss_last")


def read_run(assets: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``train_report.json`` and the meta-parameters of the demo_train run in ``assets``
    (ValueError names a folder that is not one)."""
    if not os.path.exists(os.path.join(assets, "train_report.json")):
        raise ValueError(f"{assets!r} is not a demo_train output folder (no train_report.json)")
    with open(os.path.join(assets, "train_report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    return report, load_tensors(os.path.join(assets, "perk"), "meta_parameters.safetensors")


def summary(report: dict, meta: dict[str, torch.Tensor], split_rank: int) -> dict:
    """The first meta-step's losses, the mean losses of the last :data:`LAST_LOGGED` logged
    meta-steps (``last_logged``, with the first and last of their steps), the mean |inner rate| and the
    B norms (columns below ``split_rank`` and from it on, over every LoRA site) of one run (:func:`read_run`)."""
    first, last = report["perk_history"][0], report["perk_history"][-LAST_LOGGED:]
    bs = [v for k, v in meta.items() if k.startswith("lora_B.")]
    norm = lambda parts: float(torch.sqrt(sum((p.double() ** 2).sum() for p in parts)))  # noqa: E731
    return {
        "rank": bs[0].shape[1], "first_step": {k: first[k] for k in ("step",) + _LOSSES},
        "last_logged": {"steps": (last[0]["step"], last[-1]["step"]),
                        **{k: sum(h[k] for h in last) / len(last) for k in _LOSSES}},
        "inner_lr_mean_abs": float(meta["inner_lrs"].abs().mean()),
        "b_norm_first": norm([b[:, :split_rank] for b in bs]), "b_norm_rest": norm([b[:, split_rank:] for b in bs]),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs=2, help="two demo_train output folders (assets)")
    args = ap.parse_args(argv)
    try:
        runs = {run: read_run(run) for run in args.runs}
    except ValueError as err:
        ap.error(str(err))
    split = min(meta["lora_B.0"].shape[1] for _, meta in runs.values())
    out = {run: summary(report, meta, split) for run, (report, meta) in runs.items()}
    print(f"{'run':<48} {'rank':>4} {'step-1 outer':>12} {'inner first':>11} {'inner last':>10} "
          f"{'mean |lr|':>9} {f'|B| cols<{split}':>12} {'|B| rest':>8}   last {LAST_LOGGED} logged steps: "
          f"{'outer':>6} {'inner first':>11} {'inner last':>10}")
    for run, s in out.items():
        f = s["first_step"]
        print(f"{run:<48} {s['rank']:>4} {f['loss']:>12.3f} {f['inner_loss_first']:>11.3f} "
              f"{f['inner_loss_last']:>10.3f} {s['inner_lr_mean_abs']:>9.2e} {s['b_norm_first']:>12.2f} "
              f"{s['b_norm_rest']:>8.2f}   {'%d-%d' % s['last_logged']['steps']:>19}: "
              f"{s['last_logged']['loss']:>6.3f} {s['last_logged']['inner_loss_first']:>11.3f} "
              f"{s['last_logged']['inner_loss_last']:>10.3f}")
    return out


if __name__ == "__main__":
    main()
