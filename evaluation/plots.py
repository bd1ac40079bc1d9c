"""Accuracy against budget, generated tokens and PRM passes: one line per algorithm, at most
`MAX_SERIES` lines per panel (the baselines, the particle methods and A*, then each algorithm's
variants beside it), every panel with greedy as its reference."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lodestar.evaluation.summary import Cell

AXES = {
    "accuracy-vs-budget.png": ("budget", "budget (particles / samples / beams / solutions)"),
    "accuracy-vs-tokens.png": ("generated_tokens", "mean generated tokens per problem"),
    "accuracy-vs-prm-passes.png": ("prm_passes", "mean PRM passes per problem"),
}


MAX_SERIES = 8
BASELINES = ("greedy", "best_of_n", "weighted_best_of_n", "self_consistency", "beam", "dvts")
SEARCHES = ("greedy", "weighted_best_of_n", "pf", "epf", "pg", "astar")
"""The two panels of plain algorithms; weighted best-of-N is in both, PF's paper comparison."""


def panels(algorithm_of: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(title, labels) per panel, labels in matrix order: the baselines, the searches, then the
    variants of each algorithm next to their algorithm (split so no panel has more than
    `MAX_SERIES` lines); greedy, where measured, is in every panel as the reference."""
    labels = list(algorithm_of)
    plain = [label for label in labels if label == algorithm_of[label]]
    reference = ["greedy"] if "greedy" in plain else []
    out = []
    for title, names in (("baselines", BASELINES), ("particle methods and A*", SEARCHES)):
        chosen = [label for label in plain if label in names]
        if [c for c in chosen if c not in reference]:
            out.append((title, chosen))
    others = [label for label in plain if label not in BASELINES + SEARCHES]
    if others:
        out.append(("other algorithms", [*reference, *others]))
    variants: dict[str, list[str]] = {}
    for label in labels:
        if label not in plain:
            variants.setdefault(algorithm_of[label], []).append(label)
    for algorithm, names in variants.items():
        base = [algorithm] if algorithm in plain and algorithm not in reference else []
        room = MAX_SERIES - len(reference) - len(base)
        for lo in range(0, len(names), room):
            part = f" ({lo // room + 1})" if len(names) > room else ""
            out.append((f"{algorithm} variants{part}", [*reference, *base, *names[lo : lo + room]]))
    return out


def plot_all(cells: Sequence[Cell], out_dir: Path, title: str = "") -> list[Path]:
    """Write the three PNGs; returns their paths. Single-point labels (greedy) are drawn as a
    dashed horizontal reference line on the budget plot and as a point elsewhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    by_label: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        by_label[cell.label].append(cell)
    colors = plt.get_cmap("tab20").colors
    style = {
        label: {"color": colors[(2 * i) % 20 + (i // 10) % 2], "linestyle": "-" if i < 10 else "--"}
        for i, label in enumerate(by_label)  # matrix order; variants after the 9 algorithms
    }
    layout = panels({label: group[0].algorithm for label, group in by_label.items()})
    cols = min(2, len(layout))
    rows = -(-len(layout) // cols)
    paths = []
    for name, (attr, xlabel) in AXES.items():
        fig, axes = plt.subplots(
            rows, cols, figsize=(6.5 * cols, 4.2 * rows), dpi=100, squeeze=False
        )
        for ax, (panel, labels) in zip(axes.flat, layout, strict=False):
            _draw(ax, {label: by_label[label] for label in labels}, attr, style)
            ax.set_title(panel, fontsize=9)
            ax.set_xlabel(xlabel)
        for ax in list(axes.flat)[len(layout) :]:
            ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _draw(
    ax: Any, by_label: dict[str, list[Cell]], attr: str, style: dict[str, dict[str, Any]]
) -> None:
    """One panel: a line per label (greedy, measured at one budget, as a reference line)."""
    for label, group in by_label.items():
        group = sorted(group, key=lambda c: getattr(c, attr))
        xs = [max(getattr(c, attr), 1e-9) for c in group]
        ys = [c.accuracy for c in group]
        errs = [
            [c.accuracy - c.ci_low for c in group],
            [c.ci_high - c.accuracy for c in group],
        ]
        if len(group) == 1 and attr == "budget":
            ax.axhline(ys[0], linestyle=":", linewidth=1.2, color="black", label=label)
            continue
        ax.errorbar(
            xs,
            ys,
            yerr=errs,
            marker="o",
            markersize=3,
            capsize=2,
            elinewidth=0.6,
            label=label,
            **style[label],
        )
    positive = [v for group in by_label.values() for c in group if (v := getattr(c, attr)) > 0]
    if positive and max(positive) / min(positive) > 4:
        ax.set_xscale("log", base=2 if attr == "budget" else 10)
    ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
