"""Answer equivalence (canonical strings, then math-verify), the votes built on it, and grading."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from lodestar.evaluation.datasets import as_written, from_jsonl, is_correct
from lodestar.orchestrator.algorithms import answers
from lodestar.orchestrator.algorithms.answers import (
    answer_groups,
    equivalent,
    majority_vote,
    matches_reference,
    winning_group,
)
from lodestar.orchestrator.algorithms.expansion import candidate, choose
from lodestar.orchestrator.algorithms.state import Trajectory

EQUIVALENT = [
    # latex fractions, \dfrac, decimals vs fractions
    ("\\frac12", "\\frac{1}{2}"),
    ("\\frac{2}{4}", "\\frac12"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\frac{1}{2}", "0.5"),
    ("1/3", "\\frac13"),
    ("2.5", "\\frac{5}{2}"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    # negative numbers
    ("-\\frac{3}{4}", "\\frac{-3}{4}"),
    ("-\\frac{1}{2}", "-0.5"),
    ("-5", "- 5"),
    # `x =` and units
    ("x=3", "3"),
    ("y = -2", "-2"),
    ("3\\text{ cm}", "3"),
    ("5\\text{ inches}", "5"),
    ("12\\,\\text{cm}^2", "12"),
    ("90^\\circ", "90"),
    ("\\$3.50", "3.5"),
    # intervals and sets
    ("[1,2)", "[1, 2)"),
    ("(1,\\infty)", "(1, \\infty)"),
    ("(-\\infty,0)\\cup(1,\\infty)", "(1,\\infty)\\cup(-\\infty,0)"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("1, 2", "2, 1"),
    # expressions and text
    ("x^2+1", "1+x^2"),
    ("\\text{(A)}", "A"),
    # plain numbers (the fast path)
    ("3", "3"),
    ("3.0", "3"),
    ("007", "7"),
    ("1,000", "1000"),
    ("-0", "0"),
]

NOT_EQUIVALENT = [
    ("3", "4"),
    ("-3", "3"),
    ("1000000", "1000001"),
    ("0.5", "0.50001"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("\\frac{1}{3}", "0.33"),
    ("0.1", "\\frac{1}{9}"),
    ("-\\frac{3}{4}", "\\frac{3}{4}"),
    ("\\sqrt{2}", "2"),
    ("\\pi", "3.14"),
    ("x=3", "x=4"),
    ("x = 3", "4"),
    ("3\\text{ cm}", "4\\text{ cm}"),
    ("(1,2)", "[1,2]"),
    ("[1,2]", "[1,3]"),
    ("\\{1,2\\}", "\\{1,3\\}"),
    ("x^2", "x^3"),
    ("\\text{yes}", "\\text{no}"),
    ("east", "seat"),  # bare words are not products of variables
    ("\\text{(A)}", "\\text{(B)}"),
]


@pytest.mark.parametrize(("a", "b"), EQUIVALENT)
def test_equivalent_answers_are_equivalent_both_ways(a, b):
    assert equivalent(a, b) and equivalent(b, a)


@pytest.mark.parametrize(("a", "b"), NOT_EQUIVALENT)
def test_different_answers_are_not_equivalent_either_way(a, b):
    assert not equivalent(a, b) and not equivalent(b, a)


def test_no_answer_is_equivalent_to_nothing():
    assert not equivalent(None, "3") and not equivalent("3", None) and not equivalent(None, None)


def test_plain_numbers_and_equal_strings_never_reach_math_verify(monkeypatch):
    def slow_path(*_):
        raise AssertionError("math-verify called on the fast path")

    monkeypatch.setattr(answers, "_verified", slow_path)
    for a, b, same in [("3", "3", True), ("3", "4", False), ("12", "12.0", True),
                       ("-0", "0", True), ("1,000", "1000", True), ("0.5", ".50", True),
                       ("7", "-7", False), ("\\frac{1}{2}", "\\dfrac12", True),
                       ("\\text{yes}", "yes", True), ("2.5", "2.50001", False)]:  # fmt: skip
        assert equivalent(a, b) is same and matches_reference(b, a) is same, (a, b)
    assert answer_groups(["4", "5", "4.0", None, "005"]) == [0, 1, 0, None, 1]


def test_the_fast_path_is_fast():
    started = time.perf_counter()
    for i in range(2000):
        equivalent(str(i), str(i + 1))
        equivalent(str(i), f"{i}.0")
    assert time.perf_counter() - started < 1.0  # ~10 us a pair here; math-verify takes ms


@pytest.mark.parametrize(
    "monster", ["10^{10^{10}}", "2^{99999}", "(x+1)^{1000}", "100000000!", "\\sum_{i=1}^{n} i"]
)
def test_answers_sympy_cannot_evaluate_quickly_compare_as_strings(monster):
    started = time.perf_counter()
    assert not equivalent(monster, "5") and equivalent(monster, monster)
    assert time.perf_counter() - started < 1.0  # unguarded, 10^{10^{10}} never finishes


def test_equivalence_works_off_the_main_thread_and_in_asyncio():
    """math-verify's default timeouts use SIGALRM, which raises off the main thread; Lodestar
    turns them off, so a worker thread or an executor gets the same verdicts."""
    pairs = [("\\frac{7}{14}", "0.5"), ("z=11", "11"), ("\\frac{7}{15}", "0.5")]
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.extend(equivalent(a, b) for a, b in pairs))
    thread.start()
    thread.join()

    async def in_executor() -> list[bool]:
        return await asyncio.to_thread(lambda: [equivalent(b, a) for a, b in pairs])

    assert seen == [True, True, False] and asyncio.run(in_executor()) == [True, True, False]


# -- grouping and votes --------------------------------------------------------------------------


def test_groups_are_named_by_their_first_member():
    got = answer_groups(["\\frac12", "3", "0.5", None, "x=3", "\\dfrac{1}{2}", "4", "3.0"])
    assert got == [0, 1, 0, None, 1, 0, 6, 1]


@pytest.mark.integration
def test_grouping_does_not_depend_on_the_hash_seed():
    script = (
        "from lodestar.orchestrator.algorithms.answers import answer_groups, winning_group;"
        "a = ['\\\\frac12', 'x=3', '0.5', '3', '\\\\{1,2\\\\}', '\\\\{2,1\\\\}', 'y=3',"
        " '\\\\text{a}'];"
        "print(answer_groups(a), winning_group(a, [0.3, 0.2, 0.1, 0.2, 0.45, 0.05, 0.1, 0.3]))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("0", "1", "4242")
    }
    # "y=3" matches "3" but not the head of its group, "x=3": groups compare with their heads
    assert outs == {"[0, 1, 0, 1, 4, 4, 6, 7] [4, 5]\n"}


@pytest.mark.parametrize(
    ("votes", "weights", "members"),
    [
        (["3", "x=3", "4", "4"], None, [0, 1]),  # 2 : 2, the first seen wins (strings: "4")
        (["\\frac12", "7", "0.5", "7", "\\dfrac{1}{2}"], None, [0, 2, 4]),
        (["0.5", "7", "\\frac{1}{2}", "7"], [0.4, 0.45, 0.4, 0.3], [0, 2]),  # 0.8 > 0.75
        ([None, "2", None], None, [1]),
        ([None, None], None, []),
    ],
)
def test_votes_count_equivalent_answers_together(votes, weights, members):
    assert winning_group(votes, weights) == members
    assert majority_vote(votes, weights) == (members[0] if members else None)


def _finished(answer: str, score: float, i: int) -> Trajectory:
    return Trajectory(
        seq_id=str(i + 1),
        parent_id=None,
        steps=[f"so \\boxed{{{answer}}}\n\n"],
        rewards=[score],
        score=score,
        finished=True,
        stop="answer",
    )


def test_weighted_vote_selection_groups_equivalent_answers():
    """The selection PF, ePF, beam and A* use: three ways of writing 1/2 outweigh one 0.9."""
    pool = [("\\frac12", 0.4), ("9", 0.9), ("0.5", 0.45), ("\\dfrac{1}{2}", 0.3)]
    candidates = [candidate(_finished(a, s, i), s) for i, (a, s) in enumerate(pool)]
    assert choose(candidates, "weighted_vote") == 2  # the best-scored member of the 1/2 group
    assert choose(candidates, "argmax") == 1


# -- grading: `lodestar eval` ---------------------------------------------------------------------


def test_eval_grades_math_style_answers_by_equivalence(tmp_path):
    rows = [
        {"id": "half", "problem": "p", "answer": "\\boxed{\\frac{1}{2}}"},
        {"id": "three", "problem": "p", "answer": 3},
        {"id": "set", "problem": "p", "answer": "\\{1, 2\\}"},
        {"id": "units", "problem": "p", "answer": "12\\text{ cm}^2"},
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    half, three, pair, units = from_jsonl(path)
    assert half.answer == "\\frac{1}{2}" and units.reference == "12\\text{ cm}^2"
    assert all(is_correct(half, a) for a in ["0.5", "\\dfrac12", "\\frac{2}{4}", ".5"])
    assert not is_correct(half, "\\frac{1}{3}") and not is_correct(half, None)
    assert all(is_correct(three, a) for a in ["3", "x=3", "3\\text{ cm}", "3.0"])
    assert not is_correct(three, "4") and not is_correct(three, "-3")
    assert is_correct(pair, "\\{2,1\\}") and not is_correct(pair, "\\{1,3\\}")
    assert is_correct(units, "12") and not is_correct(units, "13")


def test_grading_reads_the_answer_as_written():
    text = "so the area is \\boxed{12\\text{ cm}^2}"
    assert as_written(text, "12cm^2") == "12\\text{ cm}^2"
    assert as_written("no answer", None) is None
    assert matches_reference(as_written(text, "12cm^2"), "12")
