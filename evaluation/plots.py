"""Accuracy against budget, generated tokens and PRM passes: one line per algorithm."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from lodestar.evaluation.summary import Cell

AXES = {
    "accuracy-vs-budget.png": ("budget", "budget (particles / samples / beams / solutions)"),
    "accuracy-vs-tokens.png": ("generated_tokens", "mean generated tokens per problem"),
    "accuracy-vs-prm-passes.png": ("prm_passes", "mean PRM passes per problem"),
}


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
    paths = []
    for name, (attr, xlabel) in AXES.items():
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
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
        positive = [getattr(c, attr) for c in cells if getattr(c, attr) > 0]
        if positive and max(positive) / min(positive) > 4:
            ax.set_xscale("log", base=2 if attr == "budget" else 10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (95% bootstrap CI)")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
