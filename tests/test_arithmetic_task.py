"""The arithmetic task: generator, splits, step checker and final-answer check."""

from __future__ import annotations

import random
import re

import pytest

from lodestar.tasks.arithmetic import (
    PROMPT_FORMAT,
    SPLITS,
    ArithmeticProblemError,
    Difficulty,
    evaluate,
    evaluate_steps,
    format_expression,
    format_problem,
    generate_problems,
    is_correct,
    iter_problems,
    parse_expression,
    problem_from_text,
    random_tree,
    solution_steps,
    solution_text,
    split_of,
    split_steps,
)

P = "(7+5)*3-4"
GOOD = ["7+5=12, so 12*3-4\n\n", "12*3=36, so 36-4\n\n", "36-4=32 \\boxed{32}"]
BARE = ["7+5=12\n\n", "12*3=36\n\n", "36-4=32 \\boxed{32}"]


# -- expressions --------------------------------------------------------------------------------
def test_parsing_follows_precedence_and_left_associativity() -> None:
    assert parse_expression("2+3*4") == ("+", 2, ("*", 3, 4))
    assert parse_expression("9-3-2") == ("-", ("-", 9, 3), 2)
    assert parse_expression(" ( 7 + 5 ) * 3 - 4 ") == ("-", ("*", ("+", 7, 5), 3), 4)
    assert evaluate(parse_expression(P)) == 32


@pytest.mark.parametrize(
    "text", ["", "7", "hello", "7+", "(7+5", "7+5)", "7/2", "-3+4", "2**3", "7 + x", "What is 2+2?"]
)
def test_non_expressions_are_rejected_with_a_clear_error(text: str) -> None:
    with pytest.raises(ArithmeticProblemError, match="not an arithmetic problem"):
        parse_expression(text)


@pytest.mark.parametrize("text", ["9-(3-2)", "2*(3*4)", "(2+3)*4", "2+3*4", "(2*3)+4", "((8))-1"])
def test_formatting_keeps_only_needed_parentheses_and_round_trips(text: str) -> None:
    tree = parse_expression(text)
    assert parse_expression(format_expression(tree)) == tree
    assert format_expression(parse_expression("(2*3)+4")) == "2*3+4"
    assert format_expression(parse_expression("((8))-1")) == "8-1"


def test_problem_text_is_canonicalised() -> None:
    p = problem_from_text(" ( 7+5 )*3 - 4")
    assert p.expression == P and p.answer == 32
    assert p == problem_from_text(P)
    assert format_problem(p) == PROMPT_FORMAT.format(expression=P) == "Q: (7+5)*3-4\nA:\n"


# -- generator and splits -----------------------------------------------------------------------
def test_generator_is_deterministic_per_seed() -> None:
    a = generate_problems("train", 50, seed=3)
    assert a == generate_problems("train", 50, seed=3)
    assert a != generate_problems("train", 50, seed=4)


@pytest.mark.parametrize("ops", [1, 2, 3, 5])
def test_generated_problems_respect_the_difficulty(ops: int) -> None:
    d = Difficulty(ops=ops, min_operand=2, max_operand=12, max_value=500, min_value=-40)
    problems = generate_problems("validation", 10 if ops == 1 else 100, d)
    assert len({p.expression for p in problems}) == len(problems)
    for p in problems:
        assert len(solution_steps(p)) == ops
        assert -40 <= p.answer <= 500
        assert all(2 <= int(x) <= 12 for x in re.findall(r"\d+", p.expression))
        for step in solution_steps(p, restate=False):  # every intermediate value is bounded too
            assert -40 <= int(step.split("=")[1].split()[0]) <= 500
    if ops > 1:  # below zero is reached, not only allowed
        values = [
            int(s.split("=")[1].split()[0])
            for p in problems
            for s in solution_steps(p, restate=False)
        ]
        assert min(values) < 0


def test_splits_never_share_a_problem() -> None:
    sets = {s: {p.expression for p in generate_problems(s, 300)} for s in SPLITS}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    for s, exprs in sets.items():
        assert all(split_of(e) == s for e in exprs)


def test_split_depends_on_the_problem_not_its_spelling() -> None:
    assert split_of("(7+5)*3-4") == split_of(" ( (7+5)*3 )-4")


def test_split_proportions_are_about_80_10_10() -> None:
    rng = random.Random(0)
    trees = (random_tree(rng, Difficulty(ops=4)) for _ in range(4000))
    exprs = {format_expression(t) for t in trees if t is not None}
    counts = {s: sum(split_of(e) == s for e in exprs) / len(exprs) for s in SPLITS}
    assert counts["train"] == pytest.approx(0.8, abs=0.04)
    assert counts["test"] == pytest.approx(0.1, abs=0.03)


def test_an_exhausted_split_says_so() -> None:
    tiny = Difficulty(ops=1, min_operand=1, max_operand=2)
    with pytest.raises(RuntimeError, match="no new test problems"):
        generate_problems("test", 20, tiny)
    assert len(list(zip(range(50), iter_problems("train", tiny, unique=False), strict=False))) == 50


def test_invalid_difficulty_is_rejected() -> None:
    with pytest.raises(ValueError):
        Difficulty(ops=0)
    with pytest.raises(ValueError):
        Difficulty(min_operand=5, max_operand=3)


# -- solutions and the step checker -------------------------------------------------------------
def test_reference_solution_format() -> None:
    assert solution_steps(P) == GOOD
    assert solution_text(P) == "7+5=12, so 12*3-4\n\n12*3=36, so 36-4\n\n36-4=32 \\boxed{32}"
    assert solution_steps(P, restate=False) == BARE
    assert split_steps(solution_text(P)) == GOOD
    assert split_steps("7+5=12\n\n") == ["7+5=12\n\n"]


def test_steps_without_the_restatement_are_accepted() -> None:
    assert evaluate_steps(P, BARE) == [True] * 3
    assert evaluate_steps(P, [GOOD[0], BARE[1], GOOD[2]]) == [True] * 3


def test_a_restatement_must_be_what_is_left() -> None:
    assert evaluate_steps(P, ["7+5=12, so (12*3) - 4\n\n"]) == [True]  # any spelling
    assert evaluate_steps(P, ["7+5=12, so 12*3-5\n\n"]) == [False]
    assert evaluate_steps(P, ["7+5=12, so 12*(3-4)\n\n"]) == [False]
    assert evaluate_steps(P, ["7+5=12, so 36-4\n\n"]) == [False]  # skipped ahead
    assert evaluate_steps(P, ["7+5=12, so 12*3-\n\n"]) == [False]
    assert evaluate_steps(P, [*GOOD[:2], "36-4=32, so 32 \\boxed{32}"]) == [True] * 3


def test_every_generated_reference_solution_checks_out() -> None:
    for p in generate_problems("test", 200, Difficulty(ops=4)):
        steps = solution_steps(p)
        assert evaluate_steps(p, steps) == [True] * len(steps)
        assert is_correct(p, "".join(steps))


@pytest.mark.parametrize("restate", [True, False])
def test_every_random_legal_order_is_accepted(restate: bool) -> None:
    rng = random.Random(1)
    for p in generate_problems("test", 100, Difficulty(ops=5)):
        steps = solution_steps(p, rng, restate=restate)
        assert evaluate_steps(p, steps) == [True] * len(steps)


def test_independent_subexpressions_may_be_reduced_in_either_order() -> None:
    p = "(2+3)*(4+1)"
    assert evaluate_steps(p, ["2+3=5\n\n", "4+1=5\n\n", "5*5=25 \\boxed{25}"]) == [True] * 3
    assert evaluate_steps(p, ["4+1=5\n\n", "2+3=5\n\n", "5*5=25 \\boxed{25}"]) == [True] * 3


def test_commutative_operands_may_be_swapped_but_not_for_subtraction() -> None:
    assert evaluate_steps(P, ["5+7=12\n\n", "3*12=36\n\n", "36-4=32 \\boxed{32}"]) == [True] * 3
    assert evaluate_steps("9-4", ["4-9=5 \\boxed{5}"]) == [False]


def test_repeated_subexpressions_keep_every_reading() -> None:
    p = "(3+4)*2-(3+4)"
    steps = ["3+4=7\n\n", "7*2=14\n\n", "3+4=7\n\n", "14-7=7 \\boxed{7}"]
    assert evaluate_steps(p, steps) == [True] * 4
    # a restatement picks one reading, and the next step must fit it
    assert evaluate_steps(p, ["3+4=7, so (3+4)*2-7\n\n", "7*2=14\n\n"]) == [True, False]
    assert evaluate_steps(p, ["3+4=7, so 7*2-(3+4)\n\n", "7*2=14\n\n"]) == [True, True]


def test_spacing_inside_a_step_is_tolerated() -> None:
    assert (
        evaluate_steps(P, ["7 + 5 = 12\n\n", " 12*3 =36\n\n", "36 - 4 = 32  \\boxed{ 32 }"])
        == [True] * 3
    )


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # wrong result
        (["7+5=13\n\n", "13*3=39\n\n", "39-4=35 \\boxed{35}"], [False, False, False]),
        # operands not available yet (5*3 is not an innermost operation)
        (["5*3=15\n\n", "7+15=22\n\n"], [False, False]),
        # an operation that is not in the expression
        (["7*5=35\n\n"], [False]),
        # operands of a later operation before its inputs are computed
        (["7+5=12\n\n", "36-4=32\n\n"], [True, False]),
        # two operations in one step
        (["7+5*3=22\n\n"], [False]),
        # not an equation
        (["Let's add 7 and 5\n\n"], [False]),
        (["\n\n"], [False]),
        # an error poisons every later step, even a right one
        (["7+5=12\n\n", "12*3=35\n\n", "36-4=32 \\boxed{32}"], [True, False, False]),
        # premature answer
        (["7+5=12 \\boxed{12}\n\n"], [False]),
        # boxed answer differs from the step's own result
        (["7+5=12\n\n", "12*3=36\n\n", "36-4=32 \\boxed{31}"], [True, True, False]),
        # steps after the answer
        ([*GOOD, "\n\n32+0=32"], [True, True, True, False]),
        # last reduction without the box, then the box on its own
        (["7+5=12\n\n", "12*3=36\n\n", "36-4=32\n\n", "\\boxed{32}"], [True] * 4),
        (["7+5=12\n\n", "12*3=36\n\n", "36-4=32\n\n", "\\boxed{33}"], [True, True, True, False]),
        # a bare box before the expression is reduced
        (["7+5=12\n\n", "\\boxed{32}"], [True, False]),
        # reusing a value already consumed
        (["7+5=12\n\n", "7+5=12\n\n"], [True, False]),
    ],
)
def test_each_kind_of_wrong_step_is_caught(steps: list[str], expected: list[bool]) -> None:
    assert evaluate_steps(P, steps) == expected


def test_partial_solutions_and_empty_lists() -> None:
    assert evaluate_steps(P, []) == []
    assert evaluate_steps(P, GOOD[:2]) == [True, True]


def test_final_answer_check() -> None:
    assert is_correct(P, solution_text(P))
    assert is_correct(P, "\\boxed{32}")
    assert is_correct(P, "so \\boxed{ 32.0 }")
    assert not is_correct(P, "36-4=31 \\boxed{31}")
    assert not is_correct(P, "36-4=32")  # no boxed answer
    assert not is_correct(P, "36-4=32 \\boxed{32")  # unfinished box
    assert is_correct(P, "\\boxed{5} then \\boxed{32}")  # the last completed box counts
