"""`lodestar eval`: the matrix runs through the orchestrator with the shipped models, resumes after
a kill without redoing or losing runs, and its summary, findings and plots are computed from the
runs (pure parts tested on hand-made rows beside the real run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lodestar.evaluation.datasets import DatasetError, EvalProblem, from_jsonl, is_correct
from lodestar.evaluation.matrix import Matrix, Variant, expected_accuracy, search_seed
from lodestar.evaluation.summary import findings, paired, summarise
from lodestar.orchestrator.algorithms.registry import ParamError
from lodestar.orchestrator.state_store import JobSpec
from lodestar.tasks.arithmetic import Difficulty, generate_problems
from tests.runtime_parts import shipped_workers, solve_alone

LODESTAR = str(Path(sys.executable).with_name("lodestar"))


def lodestar_eval(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [LODESTAR, "eval", "-o", str(out), "--threads", "1", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- pure parts ---------------------------------------------------------------------------------


def test_variants_parse_labels_algorithms_and_json_values() -> None:
    assert Variant.parse("pf") == Variant("pf", "pf")
    v = Variant.parse("astar-r=astar:step_cost=regret,cost_weight=0.2,k=4")
    assert v == Variant("astar-r", "astar", {"step_cost": "regret", "cost_weight": 0.2, "k": 4})
    with pytest.raises(ValueError, match="key=value"):
        Variant.parse("x=pf:oops")


def test_matrix_validates_every_cell_before_running() -> None:
    Matrix((Variant("pf", "pf"), Variant("greedy", "greedy")), (1, 2)).validate()
    with pytest.raises(ParamError, match="unknown algorithm"):
        Matrix((Variant("pff", "pff"),), (2,)).validate()
    with pytest.raises(ParamError):
        Matrix((Variant.parse("bad=pf:ess_threshold=3"),), (2,)).validate()
    cells = list(Matrix((Variant("greedy", "greedy"), Variant("pf", "pf")), (2, 4)).cells())
    assert [(v.label, b) for v, b in cells] == [("greedy", 1), ("pf", 2), ("pf", 4)]


def test_eval_default_rows_are_every_registered_algorithm_but_the_wrapper() -> None:
    from lodestar.orchestrator.algorithms.registry import ALGORITHMS
    from lodestar.services.cli import ALL_ALGORITHMS

    assert ALL_ALGORITHMS.split(",") == [a for a in ALGORITHMS if a != "early_rejection"]


def test_jsonl_dataset_unwraps_boxed_answers_and_names_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "math.jsonl"
    good.write_text(
        '{"problem": "2+2", "answer": "\\\\boxed{4}", "id": "a"}\n\n'
        '{"problem": "half", "answer": 0.50}\n'
    )
    problems = from_jsonl(good)
    assert [(p.id, p.answer) for p in problems] == [("a", "4"), ("3", "0.5")]
    assert is_correct(problems[1], "0.5") and is_correct(problems[1], ".50")
    assert not is_correct(problems[0], None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": 2}\n{"question": "x"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: expected"):
        from_jsonl(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        '{"problem": "1", "answer": 1, "id": "x"}\n{"problem": "2", "answer": 2, "id": "x"}\n'
    )
    with pytest.raises(DatasetError, match="duplicate id 'x'"):
        from_jsonl(dup)


def test_expected_accuracy_is_weight_times_correctness() -> None:
    problem = EvalProblem("p", "1+2", "3", "g")
    candidates = [
        {"weight": 0.5, "final_answer": "3"},
        {"weight": 0.3, "final_answer": "4"},
        {"weight": 0.2, "final_answer": "3.0"},
    ]
    assert expected_accuracy(problem, candidates) == pytest.approx(0.7)
    assert expected_accuracy(problem, []) == 0.0


def fake_rows(label: str, correct: list[float], budget: int = 2, tokens: int = 10) -> list[dict]:
    return [
        {
            "label": label,
            "algorithm": label,
            "budget": budget,
            "problem_id": f"p{i}",
            "correct": bool(c),
            "status": "succeeded",
            "generated_tokens": tokens,
            "prm_passes": 2,
            "wall_s": 0.1,
        }
        for i, c in enumerate(correct)
    ]


def test_summary_and_findings_come_from_the_rows() -> None:
    pf = fake_rows("pf", [1] * 30, tokens=100)
    wbon = fake_rows("weighted_best_of_n", [1] * 10 + [0] * 20, tokens=100)
    astar = fake_rows("astar", [1] * 30, tokens=40)
    rows = pf + wbon + astar
    cells = summarise(rows)
    assert [(c.label, c.accuracy) for c in cells] == [
        ("pf", 1.0),
        ("weighted_best_of_n", pytest.approx(1 / 3)),
        ("astar", 1.0),
    ]
    mean, low, high = paired(rows, ("pf", 2), ("weighted_best_of_n", 2))
    assert mean == pytest.approx(2 / 3) and 0 < low <= mean <= high
    found = findings(rows, cells)
    pf_vs_wbon = found["Does PF beat weighted best-of-N at equal budget?"]
    assert pf_vs_wbon[0] == "- In short: pf better at budget(s) 2."
    assert "pf better" in pf_vs_wbon[1]
    astar = found["Does A* reach PF's accuracy with fewer tokens?"]
    assert "at 1 of 1 pf budgets, with fewer tokens at 1" in astar[0]
    assert "(0.40x)" in astar[1]
    tie = findings(fake_rows("pf", [1, 0] * 10) + fake_rows("epf", [0, 1] * 10), [])
    assert tie["Does ePF beat PF at small budgets?"] == []  # no PF cells given: nothing claimed


# -- the real thing ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_eval_runs_resumes_after_a_kill_and_matches_the_in_process_engine(tmp_path: Path) -> None:
    out = tmp_path / "results"
    report = tmp_path / "docs" / "results.md"
    args = ["--algorithms", "greedy,weighted_best_of_n,pf", "--budgets", "2,4"]
    args += ["--problems", "3", "--ops", "2", "--seeds", "2", "--report", str(report)]
    first = lodestar_eval(out, *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = out / "runs.jsonl"
    rows = rows_of(runs)
    assert len(rows) == (1 + 2 + 2) * 3 * 2  # greedy once; 2 budgets for the others; 2 seeds
    assert len({r["key"] for r in rows}) == len(rows)
    assert all(r["status"] == "succeeded" for r in rows)
    assert all("expected_accuracy" in r for r in rows if r["algorithm"] == "pf")

    # Same runtime as the service, same answers as the in-process engine with the same seeds.
    problems = generate_problems("test", 3, Difficulty(ops=2), 0)
    jobs = [
        JobSpec(f"direct-{seed}-{i}", "pf", {"n": 4}, p.expression, search_seed(seed, i))
        for seed in (0, 1)
        for i, p in enumerate(problems)
    ]
    direct = [r["final_answer"] for r in solve_alone(shipped_workers(), jobs)]
    by_key = {r["key"]: r["final_answer"] for r in rows}
    evaluated = [by_key[f"pf|4|{s}|ops=2/{i}"] for s in (0, 1) for i in range(3)]
    assert evaluated == direct

    # A killed run: the last lines lost, one torn. The re-run redoes exactly those.
    lines = runs.read_text().splitlines(keepends=True)
    runs.write_text("".join(lines[:20]) + lines[20][:15])
    again = lodestar_eval(out, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "10 run(s) to do, 20 already" in " ".join(again.stdout.split())
    redone = rows_of(runs)
    assert sorted(r["key"] for r in redone) == sorted(r["key"] for r in rows)
    assert {r["key"]: r["final_answer"] for r in redone} == by_key
    third = lodestar_eval(out, *args)
    assert "0 run(s) to do" in " ".join(third.stdout.split())
    assert len(rows_of(runs)) == len(rows)

    summary = json.loads((out / "summary.json").read_text())
    assert [(c["label"], c["budget"]) for c in summary] == [
        ("greedy", 1),
        ("weighted_best_of_n", 2),
        ("weighted_best_of_n", 4),
        ("pf", 2),
        ("pf", 4),
    ]
    for name in ("accuracy-vs-budget", "accuracy-vs-tokens", "accuracy-vs-prm-passes"):
        png = report.parent / "results" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "Does PF beat weighted best-of-N at equal budget?" in text
    assert "- budget 2: pf - weighted_best_of_n = " in text

    other = lodestar_eval(out, *args, "--reward", "prm")
    assert other.returncode == 2 and "other models" in other.stdout


def test_eval_rejects_bad_matrices_before_loading_models(tmp_path: Path) -> None:
    bad = lodestar_eval(tmp_path / "r", "--algorithms", "pf", "--variant", "x=pf:n=0")
    assert bad.returncode == 2 and "error:" in bad.stdout
    assert not (tmp_path / "r" / "runs.jsonl").exists()
    bad = lodestar_eval(tmp_path / "r", "--budgets", "2,x")
    assert bad.returncode == 2 and "--budgets" in bad.stderr
