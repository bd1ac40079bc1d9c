"""Pairing two eval folders' runs by problem (pure logic on rows as `lodestar eval` writes them)."""

from __future__ import annotations

import json
from pathlib import Path

from lodestar.evaluation.compare import compare_rows, main


def rows(correct: dict[str, list[int]], label: str = "pf", budget: int = 4) -> list[dict]:
    return [
        {
            "label": label,
            "algorithm": label,
            "budget": budget,
            "problem_id": pid,
            "seed": s,
            "correct": c,
            "status": "succeeded",
        }
        for pid, by_seed in correct.items()
        for s, c in enumerate(by_seed)
    ]


def test_cells_pair_by_problem_and_only_on_problems_both_ran():
    a = rows({f"p{i}": [1] for i in range(40)} | {"only-a": [0]})
    b = rows({f"p{i}": [i % 2] for i in range(40)})
    (c,) = compare_rows(a, b)
    assert (c.label, c.budget, c.problems) == ("pf", 4, 40)
    assert (c.accuracy_a, c.accuracy_b, c.difference) == (1.0, 0.5, 0.5)
    assert 0 < c.low <= 0.5 <= c.high and not c.same


def test_equal_accuracy_on_different_problems_is_the_same_within_the_interval():
    a = rows({f"p{i}": [i % 2] for i in range(60)})
    b = rows({f"p{i}": [(i + 1) % 2] for i in range(60)})
    (c,) = compare_rows(a, b)
    assert c.accuracy_a == c.accuracy_b == 0.5 and c.same


def test_a_cell_only_one_side_ran_is_left_out(tmp_path: Path, capsys):
    a = rows({"p0": [1], "p1": [0]}) + rows({"p0": [1], "p1": [1]}, label="greedy")
    b = rows({"p0": [1], "p1": [0]})
    for name, side in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in side))
    assert [c.label for c in compare_rows(a, b)] == ["pf"]
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "1 of 1 cells the same" in capsys.readouterr().out
