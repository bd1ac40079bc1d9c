"""The evaluation matrix: every (algorithm, budget, seed, problem) run through the orchestrator
the service uses, one JSONL line per run, resumable (finished keys are skipped on a re-run)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lodestar.evaluation.datasets import EvalProblem, as_written, is_correct
from lodestar.orchestrator.algorithms.particle_gibbs import ParticleGibbsParams
from lodestar.orchestrator.algorithms.registry import ParamError, start_search
from lodestar.orchestrator.driver import Orchestrator
from lodestar.orchestrator.state_store import JobSpec, JobStatus
from lodestar.services.batch_files import cut_torn_tail

BUDGET_FREE = frozenset({"greedy"})
"""Algorithms whose budget does nothing: run once, at budget 1."""
BEAM_LIKE, BEAM_WIDTH = frozenset({"beam", "dvts"}), 4
WEIGHTED = frozenset({"pf", "epf", "pg"})
"""Algorithms whose candidates carry particle weights: expected accuracy is reported (PG's are
its last sweep's final weights, references included)."""
SWEPT = frozenset({"pg"})
"""Algorithms whose budget is particles x sweeps (its_hub's ParticleGibbs): n = budget // sweeps."""


@dataclass(frozen=True)
class Variant:
    """A row of the matrix: an algorithm under a label, with fixed extra parameters (so one run
    can compare settings, e.g. `astar-regret=astar:step_cost=regret`)."""

    label: str
    algorithm: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """`pf`, or `LABEL=ALGORITHM:key=value,key=value` (values JSON where they parse)."""
        label, sep, rest = text.partition("=")
        if not sep:
            return cls(text.strip(), text.strip())
        algorithm, _, settings = rest.partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, settings.split(",")):
            key, eq, raw = item.partition("=")
            if not eq:
                raise ValueError(f"variant {text!r}: expected key=value, got {item!r}")
            try:
                params[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                params[key.strip()] = raw.strip()
        return cls(label.strip(), algorithm.strip(), params)


@dataclass(frozen=True)
class Matrix:
    variants: tuple[Variant, ...]
    budgets: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    max_generated_tokens: int | None = None

    def params(self, variant: Variant, budget: int) -> dict[str, Any]:
        if variant.algorithm in BUDGET_FREE:
            return dict(variant.params)
        params = {"n": budget, **variant.params}
        if variant.algorithm in BEAM_LIKE and "m" not in params:
            # n must be a multiple of the beam width m: below the default width, narrow it.
            params["m"] = math.gcd(budget, BEAM_WIDTH)
        if variant.algorithm in SWEPT and "n" not in variant.params:
            params |= _swept(budget, variant.params)
        return params

    def cells(self) -> Iterator[tuple[Variant, int]]:
        for variant in self.variants:
            budgets = (1,) if variant.algorithm in BUDGET_FREE else self.budgets
            for budget in budgets:
                yield variant, budget

    def missing(
        self, problems: Sequence[EvalProblem], done: set[str]
    ) -> Iterator[tuple[Variant, int, int, int]]:
        """(variant, budget, seed, problem index) of every run not in `done`, cell by cell."""
        for variant, budget in self.cells():
            for seed in self.seeds:
                for index, problem in enumerate(problems):
                    if run_key(variant.label, budget, seed, problem.id) not in done:
                        yield variant, budget, seed, index

    def validate(self) -> None:
        """Every cell's parameters, checked before any model is loaded."""
        for variant, budget in self.cells():
            try:
                start_search(variant.algorithm, "1+1", self.params(variant, budget), 0, self.caps)
            except ParamError as e:
                raise ParamError(f"{variant.label}[budget {budget}].{e.field}", e.message) from None

    @property
    def caps(self) -> dict[str, int] | None:
        if self.max_generated_tokens is None:
            return None
        return {"max_generated_tokens": self.max_generated_tokens}


def _swept(budget: int, params: dict[str, Any]) -> dict[str, Any]:
    """PG at budget B: n = B // sweeps particles per sweep and, unless the row sets them, no more
    sweeps than B (budget 1 is PF with one particle) and no more references than n - 1."""
    fields = ParticleGibbsParams.model_fields
    sweeps = params.get("num_iterations", fields["num_iterations"].default)
    if not isinstance(sweeps, int) or sweeps < 1:
        return {}  # validation names the bad field
    out: dict[str, Any] = {}
    if "num_iterations" not in params and sweeps > budget:
        sweeps = out["num_iterations"] = max(1, budget)
    n = out["n"] = max(1, budget // sweeps)
    if "num_ref_particles" not in params:
        out["num_ref_particles"] = min(fields["num_ref_particles"].default, n - 1)
    return out


def run_key(label: str, budget: int, seed: int, problem_id: str) -> str:
    return f"{label}|{budget}|{seed}|{problem_id}"


def read_done(path: Path) -> set[str]:
    """Keys already written; a torn last line (a killed run) is cut off so appends stay valid."""
    cut_torn_tail(path)
    if not path.exists():
        return set()
    return {row["key"] for row in read_rows(path)}


def search_seed(seed: int, index: int) -> int:
    """Distinct per (seed, problem) and the same for every algorithm: paired comparisons."""
    return seed * 1_000_003 + index


def expected_accuracy(problem: EvalProblem, candidates: Sequence[dict[str, Any]]) -> float:
    """PF paper's estimator: sum over particles of normalised weight x correctness."""
    total = sum(c["weight"] for c in candidates)
    if not candidates or total <= 0 or not math.isfinite(total):
        return 0.0
    right = [
        is_correct(problem, as_written(c.get("text", ""), c["final_answer"])) for c in candidates
    ]
    return sum(c["weight"] * r for c, r in zip(candidates, right, strict=True)) / total


def run_row(
    variant: Variant, budget: int, seed: int, problem: EvalProblem, record: Any, wall_s: float
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": run_key(variant.label, budget, seed, problem.id),
        "label": variant.label,
        "algorithm": variant.algorithm,
        "params": variant.params,
        "budget": budget,
        "seed": seed,
        "problem_id": problem.id,
        "group": problem.group,
        "reference": problem.answer,
        "status": record.status.value,
        "wall_s": round(wall_s, 4),
    }
    if record.status is not JobStatus.SUCCEEDED or record.result is None:
        row |= {"correct": False, "final_answer": None, "error": record.error}
        return row
    result = json.loads(record.result)
    spend = result["spend"]
    row |= {
        "final_answer": result["final_answer"],
        "correct": is_correct(problem, as_written(result["answer"], result["final_answer"])),
        "generated_tokens": spend["generated_tokens"],
        "prm_passes": spend["prm_passes"],
        "policy_calls": spend["policy_calls"],
        "steps": spend["steps"],
        "candidates": len(result["candidates"]),
        "stop_reason": result["stop_reason"],
    }
    if variant.algorithm in WEIGHTED:
        row["expected_accuracy"] = expected_accuracy(problem, result["candidates"])
    return row


async def run_matrix(
    matrix: Matrix,
    problems: Sequence[EvalProblem],
    orchestrator: Orchestrator,
    out: Path,
    max_live: int = 32,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Run every missing run of the matrix on a started orchestrator, cell by cell (one
    (variant, budget) at a time, its problems and seeds concurrently, so batches hold comparable
    searches); append each finished run to `out` at once. Returns the number of runs this call
    did."""
    done = read_done(out)
    gate = asyncio.Semaphore(max_live)
    ids = itertools.count()
    finished = 0

    async def one(variant: Variant, budget: int, seed: int, index: int, sink: Any) -> None:
        nonlocal finished
        problem = problems[index]
        spec = JobSpec(
            f"eval-{next(ids)}",  # run keys hold characters search ids may not
            variant.algorithm,
            matrix.params(variant, budget),
            problem.problem,
            search_seed(seed, index),
            matrix.caps,
        )
        async with gate:
            started = time.perf_counter()
            record = await orchestrator.solve(spec)
            wall = time.perf_counter() - started
        row = run_row(variant, budget, seed, problem, record, wall)
        sink.write(json.dumps(row) + "\n")
        sink.flush()
        finished += 1
        if on_done is not None:
            on_done(row)

    with out.open("a", encoding="utf-8") as sink:
        runs = matrix.missing(problems, done)
        for _, cell in itertools.groupby(runs, key=lambda run: (run[0].label, run[1])):
            await asyncio.gather(*(one(*run, sink) for run in cell))
    return finished


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
