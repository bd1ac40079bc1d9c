"""`lodestar eval`: load the dataset and models, run the missing part of the matrix with a progress
bar, then write the summary, plots and report from every run in the folder."""

from __future__ import annotations

import asyncio
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lodestar.evaluation.datasets import EvalProblem, from_jsonl, synthetic
from lodestar.evaluation.matrix import Matrix, read_done, read_rows, run_matrix
from lodestar.evaluation.report import check_manifest, write_outputs
from lodestar.evaluation.summary import Cell
from lodestar.orchestrator.driver import OrchestratorConfig
from lodestar.orchestrator.worker_pool import PoolConfig
from lodestar.services.runtime import RuntimeConfig, open_runtime
from lodestar.tasks.arithmetic import DEFAULT_OPS
from lodestar.workers.factory import ModelConfig

RUNS = "runs.jsonl"


@dataclass(frozen=True)
class EvalOptions:
    matrix: Matrix
    out_dir: Path
    dataset: str = "synthetic"
    """"synthetic" (the shipped task) or a JSONL path of {problem, answer}."""
    problems: int = 20
    """Per difficulty group (synthetic) or the first N lines (JSONL)."""
    ops: tuple[int, ...] = DEFAULT_OPS
    """Synthetic difficulty groups: operations per expression."""
    data_seed: int = 0
    models: ModelConfig = field(default_factory=ModelConfig)
    runtime: Literal["local", "ray"] = "local"
    max_live: int = 32
    threads: int | None = None
    report: Path | None = None


def load_problems(options: EvalOptions) -> tuple[list[EvalProblem], dict[str, Any]]:
    if options.dataset == "synthetic":
        problems = synthetic(options.problems, options.ops, options.data_seed)
        name = "synthetic arithmetic (held-out split)"
    else:
        problems = from_jsonl(Path(options.dataset), options.problems)
        name = str(options.dataset)
    groups = sorted({p.group for p in problems})
    described = {"name": name, "problems": len(problems), "groups": groups}
    if options.dataset == "synthetic":
        described |= {"ops": list(options.ops), "seed": options.data_seed}
    return problems, described


def runtime_config(options: EvalOptions) -> RuntimeConfig:
    """The service's runtime over the memory store: engines in this process, or Ray actors (a
    private local Ray)."""
    return RuntimeConfig(
        pool=PoolConfig(models=options.models, threads=options.threads),
        in_process=options.runtime == "local",
        orchestrator=OrchestratorConfig(max_live=options.max_live),
    )


def evaluate(options: EvalOptions, console: Console) -> list[Cell]:
    options.matrix.validate()
    problems, dataset = load_problems(options)
    models = options.models
    manifest = {
        "command": shlex.join(["lodestar", *sys.argv[1:]]),
        "dataset": dataset,
        "models": {
            "policy": str(models.policy or "shipped arith-policy"),
            "reward": str(models.reward),
            "prm_family": models.prm_family,
            "device": models.device or "auto",
        },
        "runtime": options.runtime,
    }
    out = options.out_dir
    check_manifest(out, manifest)
    runs = out / RUNS
    done = read_done(runs)
    todo = sum(1 for _ in options.matrix.missing(problems, done))
    console.print(
        f"{len(problems)} problems, {sum(1 for _ in options.matrix.cells())} cells, "
        f"{len(options.matrix.seeds)} seed(s): {todo} run(s) to do, {len(done)} already in {runs}"
    )
    if todo:
        asyncio.run(_run(options, problems, runs, todo, console))
    cells = write_outputs(read_rows(runs), out, manifest, options.report)
    console.print(f"wrote {out / 'summary.md'}, {out / 'plots'}" + _and(options.report))
    return cells


def _and(report: Path | None) -> str:
    return f" and {report}" if report else ""


async def _run(
    options: EvalOptions, problems: list[EvalProblem], runs: Path, todo: int, console: Console
) -> None:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("eval", total=todo, acc="-")
        seen = {"n": 0, "correct": 0}

        def on_done(row: dict[str, Any]) -> None:
            seen["n"] += 1
            seen["correct"] += bool(row["correct"])
            acc = f"{seen['correct'] / seen['n']:.2f}"
            progress.update(task, advance=1, description=row["label"], acc=acc)

        async with open_runtime(runtime_config(options)) as runtime:
            await runtime.start()
            await run_matrix(
                options.matrix, problems, runtime.orchestrator, runs, options.max_live, on_done
            )
