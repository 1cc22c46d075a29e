"""``python -m tools.perf.compare A.json B.json``: how far two ``make bench`` runs lie apart.

Prints, for every (case, mode) both runs timed, each run's jlstm/torch and jlstm/flax ratios, and
jlstm's time right after torch's over its time alone (``jlstm-after-torch/jlstm``), and the
difference between them, then the largest difference: the run-to-run spread that a figure from
one run should be read with. Two consecutive quiet runs on the same machine measure the benchmark's
own noise; a run before and after a change measures the change against it. A run's JSON is
``runs/bench/bench.json``, or a CPU's committed result in ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from experiments.bench.adapters import AFTER_TORCH
from experiments.bench.report import marks

RATIOS = (("jlstm", "torch"), ("jlstm", "flax"), (AFTER_TORCH, "jlstm"))


def ratios(record: dict) -> dict[str, float]:
    """``{"jlstm/torch": ..., "jlstm/flax": ..., "jlstm-after-torch/jlstm": ...}`` of one (case,
    mode) record, each where both of its times were measured.

    >>> ratios({"impls": {"torch": {"median_s": 2.0}, "jlstm": {"median_s": 1.0}, "flax": {}}})
    {'jlstm/torch': 0.5}
    >>> ratios({"impls": {"jlstm": {"median_s": 1.0}, "jlstm-after-torch": {"median_s": 3.0}}})
    {'jlstm-after-torch/jlstm': 3.0}
    """
    t = {name: impl.get("median_s") for name, impl in record["impls"].items()}
    return {f"{a}/{b}": t[a] / t[b] for a, b in RATIOS if t.get(a) and t.get(b)}


def spread(first: dict, second: dict) -> list[tuple[str, str, str, float, float, str]]:
    """``(case, mode, ratio name, first, second, marks)`` for every ratio both runs have; the
    marks are each run's, ``A/B``, empty where neither is marked."""
    later = {(r["case"], r["mode"]): r for r in second["results"]}
    rows = []
    for record in first["results"]:
        key = (record["case"], record["mode"])
        if (other := later.get(key)) is None:
            continue
        both = f"{marks(record)}/{marks(other)}" if marks(record) or marks(other) else ""
        other_ratios = ratios(other)
        for name, value in ratios(record).items():
            if name in other_ratios:
                rows.append((*key, name, value, other_ratios[name], both))
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    first, second = (json.loads(Path(p).read_text()) for p in argv)
    rows = spread(first, second)
    print(f"A: {argv[0]} ({first.get('date')}); B: {argv[1]} ({second.get('date')})")
    print("| case | mode | ratio | A | B | B - A | marks A/B |\n|---|---|---|---|---|---|---|")
    for case, mode, name, a, b, marked in rows:
        print(f"| {case} | {mode} | {name} | {a:.2f} | {b:.2f} | {b - a:+.2f} | {marked} |")
    if any(row[5] for row in rows):
        print("marked: * under load, ~ while the machine ran slow; not a quiet run's spread")
    if rows:
        worst = max(rows, key=lambda r: abs(r[4] - r[3]))
        print(
            f"largest difference: {worst[4] - worst[3]:+.2f} ({worst[0]} {worst[1]} {worst[2]}); "
            f"median |B - A| {sorted(abs(r[4] - r[3]) for r in rows)[len(rows) // 2]:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
