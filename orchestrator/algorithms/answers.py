"""Final answers: find the completed `\\boxed{...}`, canonicalise it, compare and vote."""

from __future__ import annotations

import re
from collections.abc import Sequence

BOXED = "\\boxed"

_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)$")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


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


def majority_vote(
    answers: Sequence[str | None], weights: Sequence[float] | None = None
) -> int | None:
    """Index of the first candidate whose answer has the largest total weight (count by default).

    Candidates without an answer do not vote. Ties go to the answer seen first.
    """
    totals: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        totals[ans] = totals.get(ans, 0.0) + (1.0 if weights is None else float(weights[i]))
        first.setdefault(ans, i)
    if not totals:
        return None
    best = max(totals.values())
    winner = min((first[a] for a, t in totals.items() if t == best))
    return winner
