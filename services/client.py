"""`lodestar search`: a gRPC client that shows a search's progress as it streams."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format
from rich.console import Console
from rich.live import Live
from rich.table import Table

from lodestar.v1 import search_pb2 as pb
from lodestar.v1 import search_pb2_grpc as pb_grpc


def params_to_wire(algorithm: str, params: dict[str, Any]) -> pb.AlgorithmParams:
    """The CLI's `key=value` parameters as the typed message (errors name the field)."""
    doc = dict(params)
    if algorithm == "early_rejection":
        inner = doc.pop("inner", "beam")
        doc[inner] = doc.pop("inner_params", {})
    try:
        return json_format.ParseDict({algorithm: doc}, pb.AlgorithmParams())
    except json_format.ParseError as e:
        raise ValueError(f"params: {e}") from None


def search_request(
    problem: str,
    algorithm: str,
    params: dict[str, Any],
    seed: int,
    budget: dict[str, int],
) -> pb.SearchRequest:
    return pb.SearchRequest(
        problem=pb.Problem(text=problem),
        params=params_to_wire(algorithm, params),
        budget=pb.Budget(**budget),
        seed=seed,
    )


def _progress_line(event: pb.SearchProgress) -> str:
    s = event.spend
    best = event.best_partial.strip().replace("\n", " | ")
    return (
        f"step {event.step}  tokens {s.generated_tokens}  PRM passes {s.prm_passes}  "
        f"best so far: {best[-80:]!r}"
    )


def _spend_table(result: pb.SearchResult) -> Table:
    table = Table(title=f"{result.algorithm} spend", show_header=False)
    for field, value in json_format.MessageToDict(
        result.spend, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    ).items():
        table.add_row(field, f"{value:.2f}" if isinstance(value, float) else str(value))
    table.add_row("candidates", str(len(result.candidates)))
    table.add_row("stop reason", result.stop_reason)
    return table


async def run_search(
    address: str,
    problem: str,
    algorithm: str,
    params: dict[str, Any],
    seed: int,
    budget: dict[str, int],
    timeout: float | None,
    token: str | None,
    console: Console,
) -> int:
    """Stream one search to the console; returns the process exit code (0 on success)."""
    try:
        request = search_request(problem, algorithm, params, seed, budget)
    except ValueError as e:
        console.print(f"[red]invalid request[/red]: {e}")
        return 2
    metadata = [("authorization", f"Bearer {token}")] if token else None
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        try:
            with Live("submitting...", console=console, transient=True) as live:
                async for event in stub.StreamSearch(request, timeout=timeout, metadata=metadata):
                    if event.WhichOneof("kind") == "progress":
                        live.update(_progress_line(event.progress))
                    else:
                        result = event.result
        except grpc.aio.AioRpcError as e:
            console.print(f"[red]{e.code().name}[/red]: {e.details()}")
            return 1
    console.print(f"[bold]search id[/bold]     {result.search_id}")
    console.print(f"[bold]answer[/bold]        {result.answer.strip()!r}")
    final = result.final_answer if result.HasField("final_answer") else None
    console.print(f"[bold]final answer[/bold]  {final}")
    console.print(_spend_table(result))
    return 0
