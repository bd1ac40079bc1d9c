"""The plot layout: no panel with more than MAX_SERIES lines, every measured label drawn."""

from __future__ import annotations

from lodestar.evaluation.plots import MAX_SERIES, panels

PLAIN = [
    "greedy",
    "best_of_n",
    "weighted_best_of_n",
    "self_consistency",
    "beam",
    "dvts",
    "pf",
    "epf",
    "pg",
    "astar",
]


def test_panels_hold_at_most_max_series_with_greedy_as_the_reference_everywhere() -> None:
    algorithm_of = {label: label for label in PLAIN}
    algorithm_of |= {f"astar-v{i}": "astar" for i in range(9)}
    algorithm_of |= {"epf-lam": "epf", "pf-ess0.5": "pf"}
    layout = panels(algorithm_of)
    drawn = {label for _, labels in layout for label in labels}
    assert drawn == set(algorithm_of)
    for title, labels in layout:
        assert len(labels) <= MAX_SERIES, title
        assert labels[0] == "greedy", title
        assert len(set(labels)) == len(labels)
    titles = [title for title, _ in layout]
    assert titles[:2] == ["baselines", "particle methods and A*"]
    assert titles.count("astar variants (1)") == 1 and "astar variants (2)" in titles
    epf = dict(layout)["epf variants"]
    assert epf == ["greedy", "epf", "epf-lam"]  # a variant beside the algorithm it varies


def test_a_matrix_without_greedy_or_variants_gets_only_its_panels() -> None:
    layout = panels({"pf": "pf", "best_of_n": "best_of_n"})
    assert layout == [("baselines", ["best_of_n"]), ("particle methods and A*", ["pf"])]
