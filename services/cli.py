"""The `lodestar` command line."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console()


@app.callback()
def _root() -> None:
    """Lodestar: PRM-guided search decoding."""


def _parse_param(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value that parses as JSON (numbers, true, null) is JSON, else text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--param")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@app.command()
def solve(
    problem: Annotated[str, typer.Argument(help='The problem as a user writes it: "(7+5)*3".')],
    algorithm: Annotated[str, typer.Option("--algorithm", "-a", help="Search algorithm.")] = "pf",
    budget: Annotated[
        int | None, typer.Option("--budget", "-n", help="Particles / samples / beams / solutions.")
    ] = 8,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="Algorithm parameter key=value.")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Policy model directory (default: the shipped policy).")
    ] = None,
    reward: Annotated[
        str, typer.Option(help='"verifier", "prm" (the shipped PRM), or a PRM directory.')
    ] = "verifier",
    prm_family: Annotated[
        str | None,
        typer.Option(help="Family of a --reward directory: qwen_prm, math_shepherd, outcome."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Search seed.")] = 0,
    max_tokens: Annotated[int | None, typer.Option(help="Cap on generated tokens.")] = None,
    max_prm_passes: Annotated[int | None, typer.Option(help="Cap on PRM passes.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: auto).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON.")] = False,
) -> None:
    """Run one search in this process and print the answer and what it spent."""
    from lodestar.orchestrator.algorithms.registry import ParamError, start_search
    from lodestar.orchestrator.local_engine import LocalEngine, SearchJob
    from lodestar.workers.factory import ModelConfig, build_policy, build_reward

    params = _parse_param(param or [])
    if budget is not None and algorithm != "greedy":
        target = params.setdefault("inner_params", {}) if algorithm == "early_rejection" else params
        target.setdefault("n", budget)
    caps = {"max_generated_tokens": max_tokens, "max_prm_passes": max_prm_passes}
    caps = {k: v for k, v in caps.items() if v is not None}
    job = SearchJob(algorithm, problem, params, seed, caps)
    try:  # validate before loading any model
        start_search(job.algorithm, job.problem, job.params, job.seed, job.budget)
    except ParamError as e:
        raise typer.BadParameter(str(e)) from None

    config = ModelConfig(policy=policy, reward=reward, prm_family=prm_family, device=device)
    started = time.perf_counter()
    engine = LocalEngine(build_policy(config), build_reward(config))
    loaded = time.perf_counter()
    finished = asyncio.run(engine.solve(job))
    result, wall = finished.result, finished.wall_time_s

    if as_json:
        doc = dataclasses.asdict(result)
        doc["spend"]["wall_time_s"] = round(wall, 4)
        typer.echo(json.dumps(doc, indent=2))
        return
    console.print(f"[bold]answer[/bold]        {result.answer.strip()!r}")
    console.print(f"[bold]final answer[/bold]  {result.final_answer}")
    table = Table(title=f"{algorithm} spend", show_header=False)
    for key, value in dataclasses.asdict(result.spend).items():
        table.add_row(key, str(value))
    table.add_row("candidates", str(len(result.candidates)))
    table.add_row("stop reason", result.stop_reason)
    table.add_row("search wall time (s)", f"{wall:.2f}")
    table.add_row("model load time (s)", f"{loaded - started:.2f}")
    console.print(table)


def main() -> None:
    app()
