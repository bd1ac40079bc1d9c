"""Batch files: problems in (JSONL), results out (JSONL), resumable.

Input: one problem per line, either a JSON string or an object with `problem` (text) or
`messages` ([{role, content}]), and optionally `seed` and `id`. A bad line is reported with its
number and skipped, never silently dropped. Output: one object per finished problem, keyed by its
input line, appended and flushed as results arrive; a re-run skips the lines already written, so a
run killed at any point and started again loses and duplicates nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True)
class BatchLine:
    line: int
    """1-based line number in the input file: the item's key."""
    problem: str | list[dict[str, str]]
    seed: int | None = None
    id: str | None = None


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


def read_problems(path: Path) -> tuple[list[BatchLine], list[BadLine]]:
    good, bad = [], []
    with path.open(encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                good.append(_parse(n, raw))
            except (ValueError, TypeError) as e:
                bad.append(BadLine(n, str(e)))
    return good, bad


def _parse(n: int, raw: str) -> BatchLine:
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if isinstance(doc, str):
        doc = {"problem": doc}
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON string or object")
    unknown = set(doc) - {"problem", "messages", "seed", "id"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    if ("problem" in doc) == ("messages" in doc):
        raise ValueError('give exactly one of "problem" and "messages"')
    problem = doc.get("problem", doc.get("messages"))
    if isinstance(problem, str):
        if not problem.strip():
            raise ValueError("empty problem")
    elif not (
        isinstance(problem, list)
        and problem
        and all(isinstance(m, dict) and set(m) == {"role", "content"} for m in problem)
    ):
        raise ValueError('"messages" must be a non-empty list of {role, content}')
    seed = doc.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError('"seed" must be a non-negative integer')
    return BatchLine(n, problem, seed, None if doc.get("id") is None else str(doc["id"]))


def finished_lines(path: Path) -> set[int]:
    """Lines whose results are already in the output file (a torn last line is ignored and
    rewritten)."""
    done: set[int] = set()
    if not path.exists():
        return done
    with path.open(encoding="utf-8") as f:
        for raw in f:
            try:
                done.add(int(json.loads(raw)["line"]))
            except (ValueError, KeyError, TypeError):
                continue
    return done


def cut_torn_tail(path: Path) -> None:
    """Cut a torn last line (a writer killed mid-line) off a JSONL file, so it reads cleanly and
    appends start on a fresh line."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def open_output(path: Path) -> TextIO:
    """Append mode, a torn last line cut off first."""
    cut_torn_tail(path)
    return path.open("a", encoding="utf-8")


def write_result(out: TextIO, item: BatchLine, status: dict[str, Any]) -> None:
    out.write(json.dumps({"line": item.line, "id": item.id, **status}) + "\n")
    out.flush()
