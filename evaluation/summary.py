"""From run rows to the numbers people choose an algorithm by: accuracy with bootstrap intervals,
spend per cell, paired comparisons, and the papers' questions answered from the data."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from lodestar.evaluation.stats import bootstrap_interval, paired_difference_interval

Row = dict[str, Any]


@dataclass(frozen=True)
class Cell:
    label: str
    algorithm: str
    budget: int
    runs: int
    problems: int
    accuracy: float
    ci_low: float
    ci_high: float
    expected_accuracy: float | None
    """PF/ePF: mean over runs of sum(weight x correct) over particles."""
    generated_tokens: float
    prm_passes: float
    wall_s: float
    """Mean wall time of one search (sharing batches with the cell's other searches)."""
    failed: int


def per_problem(rows: Iterable[Row]) -> dict[str, float]:
    """Problem id -> correctness averaged over seeds: the unit the bootstrap resamples."""
    by_problem: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_problem[row["problem_id"]].append(float(row["correct"]))
    return {pid: fmean(values) for pid, values in by_problem.items()}


def group_cells(rows: Iterable[Row]) -> dict[tuple[str, int], list[Row]]:
    cells: dict[tuple[str, int], list[Row]] = defaultdict(list)
    for row in rows:
        cells[(row["label"], row["budget"])].append(row)
    return cells


def summarise(rows: Sequence[Row]) -> list[Cell]:
    """One cell per (label, budget): labels in the order they first ran, budgets ascending."""
    order = {label: i for i, label in reversed(list(enumerate(r["label"] for r in rows)))}
    out = []
    cells = group_cells(rows).items()
    for (label, budget), cell in sorted(cells, key=lambda kv: (order[kv[0][0]], kv[0][1])):
        scores = list(per_problem(cell).values())
        low, high = bootstrap_interval(scores)
        ok = [r for r in cell if r["status"] == "succeeded"] or cell
        expected = [r["expected_accuracy"] for r in cell if "expected_accuracy" in r]
        out.append(
            Cell(
                label=label,
                algorithm=cell[0]["algorithm"],
                budget=budget,
                runs=len(cell),
                problems=len(scores),
                accuracy=fmean(scores),
                ci_low=low,
                ci_high=high,
                expected_accuracy=fmean(expected) if expected else None,
                generated_tokens=fmean(r.get("generated_tokens", 0) for r in ok),
                prm_passes=fmean(r.get("prm_passes", 0) for r in ok),
                wall_s=fmean(r["wall_s"] for r in ok),
                failed=sum(r["status"] != "succeeded" for r in cell),
            )
        )
    return out


def paired(rows: Sequence[Row], a: tuple[str, int], b: tuple[str, int]) -> tuple[float, ...] | None:
    """Accuracy of cell a minus cell b on the problems both ran, with its 95% interval."""
    cells = group_cells(rows)
    if a not in cells or b not in cells:
        return None
    pa, pb = per_problem(cells[a]), per_problem(cells[b])
    common = sorted(pa.keys() & pb.keys())
    if len(common) < 2:
        return None
    return paired_difference_interval([pa[p] for p in common], [pb[p] for p in common])


def verdict(diff: tuple[float, ...], better: str, worse: str) -> str:
    _, low, high = diff
    if low > 0:
        return f"{better} better"
    if high < 0:
        return f"{worse} better"
    return "no significant difference"


def compare_at_equal_budget(
    rows: Sequence[Row], cells: Sequence[Cell], a: str, b: str, budgets: Sequence[int] | None = None
) -> list[str]:
    """A one-line answer, then one line per budget both labels ran: a - b with its interval and
    the verdict."""
    have_a = {c.budget for c in cells if c.label == a}
    have_b = {c.budget for c in cells if c.label == b}
    lines, wins = [], defaultdict(list)
    for budget in sorted(have_a & have_b):
        if budgets is not None and budget not in budgets:
            continue
        diff = paired(rows, (a, budget), (b, budget))
        if diff is None:
            continue
        mean, low, high = diff
        said = verdict(diff, a, b)
        wins[said].append(budget)
        lines.append(
            f"- budget {budget}: {a} - {b} = {mean:+.3f} [{low:+.3f}, {high:+.3f}]: {said}"
        )
    if not lines:
        return []
    tally = "; ".join(f"{said} at budget(s) {', '.join(map(str, bs))}" for said, bs in wins.items())
    return [f"- In short: {tally}.", *lines]


def versus_greedy(rows: Sequence[Row], cells: Sequence[Cell]) -> list[str]:
    """Each other label at its largest budget against greedy, paired on the same problems."""
    if not any(c.label == "greedy" for c in cells):
        return []
    largest: dict[str, int] = {}
    for c in cells:
        if c.label != "greedy":
            largest[c.label] = max(largest.get(c.label, 0), c.budget)
    lines = []
    for label, budget in largest.items():
        diff = paired(rows, (label, budget), ("greedy", 1))
        if diff is not None:
            mean, low, high = diff
            lines.append(
                f"- {label} at budget {budget}: {mean:+.3f} [{low:+.3f}, {high:+.3f}] vs greedy: "
                f"{verdict(diff, label, 'greedy')}"
            )
    return lines


def tokens_to_match(cells: Sequence[Cell], target: str, reference: str) -> list[str]:
    """A one-line answer, then for each reference cell: the fewest tokens any target cell spent
    to reach at least its accuracy (point estimates), or that none did."""
    lines, cheaper, matched = [], 0, 0
    targets = [c for c in cells if c.label == target]
    references = sorted((c for c in cells if c.label == reference), key=lambda c: c.budget)
    for ref in references:
        reached = [c for c in targets if c.accuracy >= ref.accuracy]
        head = (
            f"- {reference} budget {ref.budget}: accuracy {ref.accuracy:.3f} with "
            f"{ref.generated_tokens:.0f} tokens"
        )
        if not reached:
            lines.append(f"{head}; {target} never reached it")
            continue
        best = min(reached, key=lambda c: c.generated_tokens)
        ratio = best.generated_tokens / ref.generated_tokens if ref.generated_tokens else 0.0
        matched += 1
        cheaper += ratio < 1
        lines.append(
            f"{head}; {target} budget {best.budget} reached {best.accuracy:.3f} with "
            f"{best.generated_tokens:.0f} tokens ({ratio:.2f}x)"
        )
    if not references or not targets:
        return []
    best_target = max(c.accuracy for c in targets)
    short = (
        f"- In short: {target} reached {reference}'s accuracy at {matched} of "
        f"{len(references)} {reference} budgets, with fewer tokens at {cheaper}; its best "
        f"accuracy was {best_target:.3f} (vs {max(c.accuracy for c in references):.3f})."
    )
    return [short, *lines]


def best_settings(cells: Sequence[Cell]) -> list[str]:
    """Where several labels share an algorithm (a settings sweep): the best by mean accuracy over
    budgets, ties to fewer tokens."""
    by_algorithm: dict[str, dict[str, list[Cell]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        by_algorithm[cell.algorithm][cell.label].append(cell)
    lines = []
    for algorithm, labels in sorted(by_algorithm.items()):
        if len(labels) < 2:
            continue
        ranked = sorted(
            labels.items(),
            key=lambda kv: (
                -fmean(c.accuracy for c in kv[1]),
                fmean(c.generated_tokens for c in kv[1]),
            ),
        )
        parts = [
            f"{label} {fmean(c.accuracy for c in cs):.3f} "
            f"({fmean(c.generated_tokens for c in cs):.0f} tok)"
            for label, cs in ranked
        ]
        lines.append(f"- {algorithm}: " + " > ".join(parts))
    return lines


def findings(rows: Sequence[Row], cells: Sequence[Cell]) -> dict[str, list[str]]:
    budgets = sorted({c.budget for c in cells if c.label == "pf"})
    small = budgets[: max(1, len(budgets) // 2)]
    return {
        "Does search beat greedy decoding (largest budget)?": versus_greedy(rows, cells),
        "Does PF beat weighted best-of-N at equal budget?": compare_at_equal_budget(
            rows, cells, "pf", "weighted_best_of_n"
        ),
        "Does ePF beat PF at small budgets?": compare_at_equal_budget(
            rows, cells, "epf", "pf", small
        ),
        "Does A* reach PF's accuracy with fewer tokens?": tokens_to_match(cells, "astar", "pf"),
        "Settings compared (one algorithm under several labels)": best_settings(cells),
    }


def markdown_table(cells: Sequence[Cell]) -> str:
    lines = [
        "| algorithm | budget | problems x seeds | accuracy [95% CI] | expected acc. "
        "| gen. tokens | PRM passes | s / search | failed |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        expected = "" if c.expected_accuracy is None else f"{c.expected_accuracy:.3f}"
        lines.append(
            f"| {c.label} | {c.budget} | {c.runs} | {c.accuracy:.3f} [{c.ci_low:.3f}, "
            f"{c.ci_high:.3f}] | {expected} | {c.generated_tokens:.0f} | {c.prm_passes:.1f} "
            f"| {c.wall_s:.2f} | {c.failed} |"
        )
    return "\n".join(lines)
