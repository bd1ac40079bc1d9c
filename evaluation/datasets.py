"""Problems with reference answers: the shipped synthetic task at several difficulties, or any
JSONL of `{"problem": ..., "answer": ...}` (e.g. MATH500 for a real policy)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lodestar.orchestrator.algorithms.answers import canonicalize, extract_boxed, matches_reference
from lodestar.tasks.arithmetic import DEFAULT_OPS, Difficulty, generate_problems


class DatasetError(ValueError):
    """A dataset that cannot be read, with the file and line that broke it."""


@dataclass(frozen=True)
class EvalProblem:
    id: str
    """Stable across runs: the resume key."""
    problem: str
    answer: str
    """Reference final answer, canonical form."""
    group: str
    """Difficulty or source label, for per-group tables."""
    reference: str | None = None
    """The reference as written (`\\boxed{}` unwrapped), which math-verify reads; None: `answer`."""


def synthetic(per_group: int, ops: Sequence[int] = DEFAULT_OPS, seed: int = 0) -> list[EvalProblem]:
    """Held-out ("test" split) arithmetic problems, `per_group` for each operation count; the
    shipped models never saw them in training."""
    problems = []
    for n_ops in ops:
        group = f"ops={n_ops}"
        for i, p in enumerate(generate_problems("test", per_group, Difficulty(ops=n_ops), seed)):
            problems.append(EvalProblem(f"{group}/{i}", p.expression, str(p.answer), group))
    return problems


def from_jsonl(path: Path, limit: int | None = None) -> list[EvalProblem]:
    """One `{"problem": str, "answer": str | number, "id"?: str}` per line. A `\\boxed{}` answer
    is unwrapped; answers are compared canonicalised, then by math-verify (`is_correct`)."""
    problems: list[EvalProblem] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw)
                problem, answer = doc["problem"], doc["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(
                    f'{path}:{number}: expected {{"problem": ..., "answer": ...}} ({e})'
                ) from None
            if not isinstance(problem, str) or not problem.strip():
                raise DatasetError(f"{path}:{number}: problem must be a non-empty string")
            answer = str(answer)
            written = extract_boxed(answer) or answer
            pid = str(doc.get("id", number))
            if pid in seen:
                raise DatasetError(f"{path}:{number}: duplicate id {pid!r}")
            seen.add(pid)
            group = str(doc.get("group", path.stem))
            problems.append(EvalProblem(pid, problem, canonicalize(written), group, written))
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise DatasetError(f"{path}: no problems")
    return problems


def as_written(text: str, final_answer: str | None) -> str | None:
    """A solution's `\\boxed{}` content as written (math-verify reads the LaTeX canonicalising
    strips), given its text and canonical final answer; None when it has no answer."""
    return None if final_answer is None else extract_boxed(text) or final_answer


def is_correct(problem: EvalProblem, final_answer: str | None) -> bool:
    """Whether a `\\boxed{}` content (canonical, as results carry it, or as written) is the
    reference answer: equal canonicalised, or else equivalent by math-verify (`\\frac12` and
    `0.5`, `x=3` and `3`); plain numbers compare as canonical strings only."""
    return matches_reference(final_answer, problem.reference or problem.answer)
