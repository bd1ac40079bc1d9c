from lodestar.orchestrator.algorithms.answers import (
    canonicalize,
    extract_boxed,
    final_answer,
    has_final_answer,
    majority_vote,
)


def test_extract_boxed_takes_the_last_completed_answer():
    assert extract_boxed("x \\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("ok \\boxed{3} then \\boxed{4") == "3"


def test_incomplete_or_bare_boxed_is_not_an_answer():
    assert extract_boxed("the answer is \\boxed") is None
    assert extract_boxed("\\boxed{12") is None
    assert not has_final_answer("we will write \\boxed later")
    assert has_final_answer("so \\boxed{7}\n\n")


def test_canonicalize_numbers_and_latex():
    assert canonicalize(" 3.0 ") == "3"
    assert canonicalize("+3") == "3"
    assert canonicalize("1,000") == "1000"
    assert canonicalize("-0") == "0"
    assert canonicalize("0.50") == "0.5"
    assert canonicalize(".5") == "0.5"
    assert canonicalize("007") == "7"
    assert canonicalize("\\dfrac{1}{2}") == canonicalize("\\frac{1}{2}")
    assert canonicalize("\\left( 1, 2 \\right)") == "(1,2)"
    assert canonicalize("\\text{yes}") == "yes"
    assert canonicalize("$5$.") == "5"
    assert final_answer("... \\boxed{ 12.0 }") == "12"


def test_majority_vote_counts_and_breaks_ties_to_first_seen():
    assert majority_vote(["1", "2", "2", None]) == 1
    assert majority_vote(["1", "2", "2", "1"]) == 0
    assert majority_vote([None, None]) is None
    assert majority_vote(["1", "2", "2"], [5.0, 1.0, 1.0]) == 0
