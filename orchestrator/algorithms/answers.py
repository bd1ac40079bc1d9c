"""Final answers: find the completed `\\boxed{...}`, canonicalise it, compare and vote.

Two answers are the same when their canonical strings are equal (the fast path, and the only
rule for plain numbers) or else when math-verify (Hugging Face; parser `latex2sympy2-extended`,
SymPy underneath) finds them mathematically equal: `\\frac12` and `0.5`, `x=3` and `3`,
`3\\text{ cm}` and `3`, `\\{1,2\\}` and `\\{2,1\\}`. Votes group equivalent answers, each
group named by its first member, so a vote depends on the order of the answers only.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from typing import Any

BOXED = "\\boxed"

_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)$")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SHORT_FRAC = re.compile(r"\\frac(\d)(\d)")
_SHORT_SQRT = re.compile(r"\\sqrt(\d)")


def extract_boxed(text: str) -> str | None:
    """Content of the last *completed* `\\boxed{...}` (balanced braces), else None.

    A bare `\\boxed` or one whose braces are still open does not count: a step that is cut off
    mid-answer has not answered.
    """
    start = text.rfind(BOXED + "{")
    while start != -1:
        depth, i = 0, start + len(BOXED)
        for i in range(start + len(BOXED), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len(BOXED) + 1 : i]
        start = text.rfind(BOXED + "{", 0, start)
    return None


def has_final_answer(text: str) -> bool:
    return extract_boxed(text) is not None


def canonicalize(answer: str) -> str:
    """Canonical form for comparing answers: LaTeX spacing and wrappers gone, numbers normalised."""
    a = answer.replace("\\$", "").replace("$", "").strip()
    a = _TEXT.sub(r"\1", a)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "^\\circ", "^{\\circ}"):
        a = a.replace(token, "")
    a = a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    a = "".join(a.split()).rstrip(".")
    a = _SHORT_FRAC.sub(r"\\frac{\1}{\2}", a)  # \frac12 -> \frac{1}{2}
    a = _SHORT_SQRT.sub(r"\\sqrt{\1}", a)  # \sqrt2 -> \sqrt{2}
    if _THOUSANDS.match(a):
        a = a.replace(",", "")
    if _NUMBER.match(a):
        a = a.lstrip("+")
        if "." in a:
            a = a.rstrip("0").rstrip(".") or "0"
        if a in ("-0", ""):
            a = "0"
        if a.startswith(("-.", ".")):
            a = a.replace(".", "0.", 1)
        body = a.lstrip("-")
        body = body.lstrip("0") or "0"
        if body.startswith("."):
            body = "0" + body
        a = ("-" if a.startswith("-") and body != "0" else "") + body
    return a


def final_answer(text: str) -> str | None:
    """The canonical final answer of a solution text, or None when it has none."""
    boxed = extract_boxed(text)
    return None if boxed is None else canonicalize(boxed)


def is_plain_number(answer: str) -> bool:
    """A canonical answer that is a plain decimal number: equal to another only as a string."""
    return _NUMBER.match(answer) is not None


def equivalent(a: str | None, b: str | None) -> bool:
    """Whether two final answers (`\\boxed{}` contents, raw or canonical) are the same answer.

    Symmetric: either side may play math-verify's reference. Canonical-string equality answers
    first; two plain numbers are never handed to math-verify (it is slow: milliseconds, where the
    fast path takes microseconds).
    """
    if a is None or b is None:
        return False
    fast = _fast_equal(a, b)
    if fast is not None:
        return fast
    return _verified(a, b) or _verified(b, a)


def matches_reference(answer: str | None, reference: str) -> bool:
    """Whether `answer` is right against a reference answer (grading: math-verify's gold side)."""
    if answer is None:
        return False
    fast = _fast_equal(reference, answer)
    return fast if fast is not None else _verified(reference, answer)


def answer_groups(answers: Sequence[str | None]) -> list[int | None]:
    """For each answer, the index of its group: the first answer equivalent to it (None: no answer).

    An answer joins the first group (in index order) whose first member it is equivalent to, so
    the grouping depends on the order of the answers only, never on hashing or timing.
    """
    groups: list[int | None] = []
    heads: list[int] = []
    by_canonical: dict[str, int] = {}  # lookups only: never iterated
    for i, answer in enumerate(answers):
        if answer is None:
            groups.append(None)
            continue
        key = _canonical(answer)
        group = by_canonical.get(key)
        if group is None:
            group = next((h for h in heads if equivalent(answers[h], answer)), i)
            if group == i:
                heads.append(i)
            by_canonical[key] = group
        groups.append(group)
    return groups


def winning_group(
    answers: Sequence[str | None], weights: Sequence[float] | None = None
) -> list[int]:
    """Indices (ascending) of the group of equivalent answers with the largest total weight (count
    by default); ties go to the group seen first. Empty when no candidate has an answer."""
    groups = answer_groups(answers)
    totals: dict[int, float] = {}
    for i, group in enumerate(groups):
        if group is not None:
            totals[group] = totals.get(group, 0.0) + (1.0 if weights is None else float(weights[i]))
    if not totals:
        return []
    best = max(totals.values())
    winner = min(g for g, total in totals.items() if total == best)
    return [i for i, group in enumerate(groups) if group == winner]


def majority_vote(
    answers: Sequence[str | None], weights: Sequence[float] | None = None
) -> int | None:
    """Index of the first candidate whose answer group has the largest total weight (count by
    default). Candidates without an answer do not vote; ties go to the answer seen first."""
    members = winning_group(answers, weights)
    return members[0] if members else None


# -- math-verify: the slow path -------------------------------------------------------------------

_MAX_VERIFY_CHARS = 128
"""Longer answers compare as canonical strings only: SymPy's cost grows with the expression."""
_MAX_EXPONENT, _MAX_SYMBOLIC_EXPONENT = 100, 16
"""Largest integer in an exponent, without and with variables (`(x+y+z)^{64}` takes 5 s)."""
_CALCULUS = re.compile(r"\\(?:sum|prod|int|iint|iiint|oint|lim)(?![a-zA-Z])")
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[a-zA-Z]+")
_WORD = re.compile(r"[a-zA-Z]{3,}")
_DIGITS = re.compile(r"\d+")


_canonical = functools.lru_cache(maxsize=8192)(canonicalize)
"""Votes and grading canonicalise the same few answers over and over (each step's progress)."""


def _fast_equal(a: str, b: str) -> bool | None:
    """The answer where strings settle it, None where math-verify must look."""
    ca, cb = _canonical(a), _canonical(b)
    if ca == cb:
        return True
    if is_plain_number(ca) and is_plain_number(cb):
        return False
    if not (_verifiable(a) and _verifiable(b)):
        return False
    words_a, words_b = _bare_words(a), _bare_words(b)
    if words_a and words_b and words_a != words_b:
        return False  # SymPy reads a bare word as a product: "east" would equal "seat"
    return None


def _bare_words(answer: str) -> list[str]:
    """Runs of 3+ letters outside commands and `\\text{}`: words, not variables."""
    return _WORD.findall(_COMMAND.sub(" ", _TEXT_GROUP.sub(" ", answer)))


def _verifiable(answer: str) -> bool:
    """Whether SymPy evaluates `answer` fast: short; no sums, integrals or limits; no exponent
    towers or large exponents; factorials and binomials of small numbers only.

    Math-verify runs with its timeouts off: they use SIGALRM, which raises off the main thread
    (the orchestrator's executors, `lodestar eval`'s threads), and a timeout would make a vote
    depend on the machine's speed. This bound is what keeps each comparison to milliseconds
    (`10^{10^{10}}` would otherwise never finish); what it refuses compares as a string.
    """
    if len(answer) > _MAX_VERIFY_CHARS or _CALCULUS.search(answer):
        return False
    body = answer.replace("\\!", "")
    numbers = _DIGITS.findall(body)
    if ("!" in body or "\\binom" in body or "\\choose" in body) and (
        any(len(n) > 3 for n in numbers) or re.search(r"[^\d\s]\s*!", body)
    ):
        return False
    symbolic = bool(_bare_letters(body))
    cap = _MAX_SYMBOLIC_EXPONENT if symbolic else _MAX_EXPONENT
    i = body.find("^")
    while i != -1:
        exponent, end = _exponent(body, i + 1)
        if "^" in exponent or "!" in exponent or body[end:].lstrip().startswith("^"):
            return False
        if any(int(n) > cap for n in _DIGITS.findall(exponent)):
            return False
        i = body.find("^", i + 1)
    return True


def _bare_letters(answer: str) -> list[str]:
    return re.findall(r"[a-zA-Z]", _COMMAND.sub(" ", _TEXT_GROUP.sub(" ", answer)))


def _exponent(text: str, start: int) -> tuple[str, int]:
    """The superscript that starts at `start` (a braced group, a command or one character) and
    the index just after it."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text):
        return "", i
    if text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j], j + 1
        return text[i + 1 :], len(text)
    if text[i] == "\\":
        m = _COMMAND.match(text, i)
        end = m.end() if m else i + 2
        return text[i:end], end
    return text[i], i + 1


@functools.cache
def _math_verify() -> Any:
    """math-verify, imported on first use (the arithmetic task never needs it). Its one-time
    warning that timeouts are off is dropped: `_verifiable` is the bound it asks callers for."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(
            lambda record: not record.getMessage().startswith("Timeout is disabled")
        )
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parsed(answer: str) -> tuple[Any, ...]:
    """math-verify's parse of one boxed answer (SymPy objects; empty when nothing parses)."""
    mv = _math_verify()
    try:
        return tuple(
            mv.parse(
                BOXED + "{" + answer + "}",
                extraction_config=[mv.LatexExtractionConfig()],
                parsing_timeout=None,
            )
        )
    except Exception:  # math-verify returns [] on its own errors; anything else: no parse
        return ()


@functools.lru_cache(maxsize=65536)
def _verified(reference: str, answer: str) -> bool:
    """math-verify's verdict with `reference` as the gold side (it is not symmetric)."""
    gold, target = _parsed(reference), _parsed(answer)
    if not gold or not target:
        return False
    try:
        return bool(_math_verify().verify(list(gold), list(target), timeout_seconds=None))
    except Exception:
        return False
