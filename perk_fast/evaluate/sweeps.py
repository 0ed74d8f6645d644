"""Sweeps: several systems over context lengths and fact positions (pre / mid / post), on the same data.

``sweep`` prints a table (:func:`format_sweep_table`), returns every cell's summary and, with an
``out_dir``, writes per-cell predictions, ``sweep.json`` and a plot (:mod:`perk_fast.evaluate.plots`).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Mapping, Sequence

from ..config import check_int
from ..model import PerkModel
from ..tasks import generate
from .plots import MISSING_MATPLOTLIB, plot_sweep, plotting_available
from .scoring import evaluate

__all__ = ["sweep", "format_sweep_table"]


def _run_system(system: Any, data: list, *, batch_size: int, max_new_tokens: int, out_dir) -> dict:
    if isinstance(system, PerkModel):
        return evaluate(system, data, batch_size=batch_size, max_new_tokens=max_new_tokens, out_dir=out_dir,
                        progress=False)
    if callable(system):
        return system(data, out_dir=out_dir)
    raise TypeError(f"a sweep system must be a PerkModel or a callable(dataset, out_dir=...) -> dict, got "
                    f"{type(system).__name__}")


def format_sweep_table(results: Mapping[str, Mapping[int, Mapping[str, dict]]], *, metric: str = "exact_match") -> str:
    """Text table: one row per (system, length), one column per position, ``metric`` in percent
    (``-`` where a length was not evaluated at that position)."""
    systems = list(results)
    if not systems:
        return ""
    lengths = list(results[systems[0]])
    positions = list(dict.fromkeys(p for length in lengths for p in results[systems[0]][length]))
    name_w = max(len("system"), *(len(s) for s in systems))
    header = f"{'system':<{name_w}}  {'length':>6}  " + "  ".join(f"{p:>6}" for p in positions) + "     n"
    lines = [header, "-" * len(header)]
    for s in systems:
        for length in lengths:
            cells = results[s][length]
            vals = "  ".join(f"{100 * cells[p][metric]:6.1f}" if p in cells else f"{'-':>6}" for p in positions)
            n = next(iter(cells.values()))["n"]
            lines.append(f"{s:<{name_w}}  {length:>6}  {vals}  {n:>4}")
    return "\n".join(lines)


def sweep(
    systems: Mapping[str, Any],
    *,
    task: str = "needle",
    lengths: Sequence[int] = (256, 1024),
    positions: Sequence[str] | Mapping[int, Sequence[str]] = ("pre", "mid", "post"),
    n: int = 16,
    seed: int | str = "sweep",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    out_dir: str | os.PathLike | None = None,
    metric: str = "exact_match",
    verbose: bool = True,
    plot: bool | str = "auto",
    **task_kwargs: Any,
) -> dict:
    """Evaluate several systems over context lengths and fact positions on the same data.

    Args:
        systems: name -> a PerkModel (scored with :func:`evaluate`) or a callable
            ``f(dataset, out_dir=...) -> dict`` (e.g. a ``functools.partial`` of
            :func:`evaluate_in_context`).
        task, lengths, positions, n, seed, task_kwargs: the data of each cell is
            ``tasks.generate(task, n, seed=seed, context_tokens=length, position=position, **task_kwargs)``,
            the same for every system. ``positions`` is one list for every length, or a mapping
            length -> its positions (e.g. ``"random"`` alone where the facts take more than a third
            of the context, so that pre / mid / post cannot hold them).
        out_dir: when given, per-cell predictions go to ``out_dir/<system>/L<length>_<position>/``
            (``<system>``: the name with every run of other characters than letters, digits, ``.``
            and ``-`` replaced by ``_``),
            and ``sweep.json`` and ``sweep.png`` (one panel per position, ``metric`` vs length) to
            ``out_dir``.
        verbose: print the table (:func:`format_sweep_table`).
        plot: with ``out_dir``: ``"auto"`` (default) writes ``sweep.png`` when matplotlib is
            installed and otherwise warns once that it was skipped; ``True`` requires it (ImportError
            naming the extra); ``False`` never plots.

    Returns:
        ``{"results": {system: {length: {position: summary}}}, "table": str, "n": n, ...}``
        (summaries without their prediction lists).
    """
    if not systems:
        raise ValueError("systems is empty: pass at least one name -> system")
    if plot not in (True, False, "auto"):
        raise ValueError(f"plot={plot!r} is invalid: allowed True, False, 'auto'")
    check_int("n", n)
    lengths = [int(x) for x in lengths]
    if isinstance(positions, Mapping):
        missing = [length for length in lengths if length not in positions]
        if missing:
            raise ValueError(f"positions has no entry for the lengths {missing}")
        per_length = {length: list(positions[length]) for length in lengths}
        positions = list(dict.fromkeys(p for length in lengths for p in per_length[length]))
    else:
        positions = list(positions)
        per_length = {length: positions for length in lengths}
    results: dict[str, dict[int, dict[str, dict]]] = {name: {} for name in systems}
    for length in lengths:
        for pos in per_length[length]:
            data = generate(task, n, seed=seed, context_tokens=length, position=pos, **task_kwargs)
            for name, system in systems.items():
                folder = re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") or "system"
                cell_dir = None if out_dir is None else os.path.join(out_dir, folder, f"L{length}_{pos}")
                summary = _run_system(system, data, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                      out_dir=cell_dir)
                summary = {k: v for k, v in summary.items() if k != "predictions"}
                results[name].setdefault(length, {})[pos] = summary
    table = format_sweep_table(results, metric=metric)
    if verbose:
        print(table)
    report = {"task": task, "seed": seed, "n": n, "lengths": lengths, "positions": positions, "metric": metric,
              "task_kwargs": task_kwargs, "results": results, "table": table}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "sweep.json"), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str)
        if plot is True or (plot == "auto" and plotting_available()):
            plot_sweep(results, lengths, positions, os.path.join(out_dir, "sweep.png"), metric)
        elif plot == "auto":
            warnings.warn(f"sweep: sweep.png not written -- {MISSING_MATPLOTLIB}", stacklevel=2)
    return report
