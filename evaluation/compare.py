"""Two `lodestar eval` folders of the same matrix compared cell by cell, paired by problem: is
one setup (an engine, a model, a version) as accurate as the other?

    python -m lodestar.evaluation.compare results/hf results/vllm

For each (row, budget) both folders ran: the accuracy of each on the problems both ran, and the
mean paired difference A - B with its 95% bootstrap interval (`stats.paired_difference_interval`);
"same" when the interval holds 0. Sampling differs between the two sides wherever their random
streams do (vLLM and transformers draw differently from one seed), so the question is whether the
accuracies agree within the noise, not whether the answers are identical.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from rich.console import Console
from rich.table import Table

from lodestar.evaluation.matrix import read_rows
from lodestar.evaluation.runner import RUNS
from lodestar.evaluation.stats import paired_difference_interval
from lodestar.evaluation.summary import group_cells, per_problem


@dataclass(frozen=True)
class Comparison:
    label: str
    budget: int
    problems: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    low: float
    high: float
    failed_a: int
    failed_b: int

    @property
    def same(self) -> bool:
        return self.low <= 0 <= self.high


def compare_rows(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[Comparison]:
    """One comparison per cell present in both, in A's order; problems both ran only."""
    cells_a, cells_b = group_cells(a), group_cells(b)
    out = []
    for key in (k for k in cells_a if k in cells_b):
        pa, pb = per_problem(cells_a[key]), per_problem(cells_b[key])
        common = sorted(pa.keys() & pb.keys())
        if len(common) < 2:
            continue
        xs, ys = [pa[p] for p in common], [pb[p] for p in common]
        difference, low, high = paired_difference_interval(xs, ys)
        failed_a = sum(r["status"] != "succeeded" for r in cells_a[key])
        failed_b = sum(r["status"] != "succeeded" for r in cells_b[key])
        out.append(
            Comparison(
                *key, len(common), fmean(xs), fmean(ys), difference, low, high, failed_a, failed_b
            )
        )
    return out


def comparison_table(rows: list[Comparison], a: str, b: str) -> Table:
    table = Table(title=f"A = {a}, B = {b} (paired by problem, 95% bootstrap)")
    for column in ("row", "budget", "problems", "A", "B", "A - B", "95% interval", "verdict"):
        table.add_column(column)
    for c in rows:
        table.add_row(
            c.label,
            str(c.budget),
            str(c.problems),
            f"{c.accuracy_a:.1%}",
            f"{c.accuracy_b:.1%}",
            f"{c.difference:+.1%}",
            f"[{c.low:+.1%}, {c.high:+.1%}]",
            "same" if c.same else ("A better" if c.low > 0 else "B better"),
        )
    return table


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m lodestar.evaluation.compare DIR_A DIR_B", file=sys.stderr)
        return 2
    a, b = (Path(p) for p in args)
    rows = compare_rows(read_rows(a / RUNS), read_rows(b / RUNS))
    Console().print(comparison_table(rows, str(a), str(b)))
    same = sum(c.same for c in rows)
    print(f"{same} of {len(rows)} cells the same within their 95% interval")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
