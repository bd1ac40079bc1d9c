"""`lodestar search`: a gRPC client that shows a search's progress as it streams."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import MofNCompleteColumn, Progress
from rich.table import Table

from lodestar.services.batch_files import (
    BadLine,
    BatchLine,
    finished_lines,
    open_output,
    read_problems,
    write_result,
)
from lodestar.services.convert import wire_shape
from lodestar.services.server import ServerConfig
from lodestar.v1 import search_pb2 as pb
from lodestar.v1 import search_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = ServerConfig().channel_options


@dataclass(frozen=True)
class ClientTLS:
    """How a client checks the server: plaintext (off), TLS against gRPC's default roots (its
    bundled roots, or the file GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names), or against a CA bundle."""

    enabled: bool = False
    ca: Path | None = None
    """PEM bundle of the CAs to trust; implies TLS."""

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca is not None:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes())
        return grpc.ssl_channel_credentials() if self.enabled else None


PLAINTEXT = ClientTLS()


def open_channel(address: str, tls: ClientTLS = PLAINTEXT) -> grpc.aio.Channel:
    """A channel to a Lodestar server, with its message limits; TLS when `tls` asks for it."""
    credentials = tls.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def params_to_wire(algorithm: str, params: dict[str, Any]) -> pb.AlgorithmParams:
    """The CLI's `key=value` parameters as the typed message (errors name the field)."""
    doc = {algorithm: wire_shape(algorithm, params, to_wire=True)}
    try:
        return json_format.ParseDict(doc, pb.AlgorithmParams())
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
    tls: ClientTLS = PLAINTEXT,
) -> int:
    """Stream one search to the console; returns the process exit code: 0 on success, 2 for a
    request the server refuses (INVALID_ARGUMENT, as `lodestar solve` exits), 1 otherwise."""
    try:
        request = search_request(problem, algorithm, params, seed, budget)
    except ValueError as e:
        console.print(f"[red]invalid request[/red]: {escape(str(e))}")
        return 2
    metadata = [("authorization", f"Bearer {token}")] if token else None
    async with open_channel(address, tls) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        try:
            with Live("submitting...", console=console, transient=True) as live:
                async for event in stub.StreamSearch(request, timeout=timeout, metadata=metadata):
                    if event.WhichOneof("kind") == "progress":
                        live.update(_progress_line(event.progress))
                    else:
                        result = event.result
        except grpc.aio.AioRpcError as e:
            console.print(f"[red]{e.code().name}[/red]: {escape(e.details() or '')}")
            return 2 if e.code() is grpc.StatusCode.INVALID_ARGUMENT else 1
    console.print(f"[bold]search id[/bold]     {result.search_id}")
    console.print(f"[bold]answer[/bold]        {result.answer.strip()!r}")
    final = result.final_answer if result.HasField("final_answer") else None
    console.print(f"[bold]final answer[/bold]  {final}")
    console.print(_spend_table(result))
    return 0


def status_doc(status: pb.SearchStatus) -> dict[str, Any]:
    """One output line's fields for a finished search."""
    doc: dict[str, Any] = {
        "search_id": status.search_id,
        "status": pb.SearchState.Name(status.state).removeprefix("SEARCH_STATE_").lower(),
    }
    if status.HasField("result"):
        r = status.result
        doc["answer"] = r.answer
        doc["final_answer"] = r.final_answer if r.HasField("final_answer") else None
        doc["spend"] = json_format.MessageToDict(r.spend, preserving_proto_field_name=True)
    if status.error:
        doc["error"] = status.error
    return doc


@dataclass(frozen=True)
class BatchFileJob:
    """A problems file, where its results go, and the search settings every line shares."""

    problems: Path
    output: Path
    algorithm: str
    params: dict[str, Any]
    seed: int
    budget: dict[str, int]


async def run_batch_file(
    address: str, token: str | None, job: BatchFileJob, console: Console, tls: ClientTLS = PLAINTEXT
) -> int:
    """`drive_batch_file` against a server."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    async with open_channel(address, tls) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        return await drive_batch_file(stub, metadata, job, console)


async def drive_batch_file(stub: Any, metadata: Any, job: BatchFileJob, console: Console) -> int:
    """Submit (or re-attach to) the batch of a problems file and append results as they come.

    `stub` is a channel's SearchService stub (for `lodestar batch run` too: its server is on
    loopback in the same process). The batch id goes to `<output>.batch` first: a re-run
    attaches to that batch while the service still has it, else submits only the lines the
    output file lacks."""
    problems, output = job.problems, job.output
    good, bad = read_problems(problems)
    for b in bad:
        console.print(f"[yellow]{problems}:{b.line}[/yellow]: {b.reason} (skipped)")
    done = finished_lines(output)
    todo = [b for b in good if b.line not in done]
    if not todo:
        console.print(f"nothing to do: {len(done)} results already in {output}")
        return 0
    state = output.with_name(output.name + ".batch")
    try:
        batch_id = await _attach(stub, state, metadata)
        if batch_id is None:
            batch_id, refused = await _submit_servable(stub, metadata, job, todo)
            for line, reason in refused:
                console.print(f"[yellow]{problems}:{line.line}[/yellow]: {reason} (skipped)")
                bad.append(BadLine(line.line, reason))
            skipped = {r.line for r, _ in refused}
            todo = [b for b in todo if b.line not in skipped]
            state.write_text(json.dumps({"batch_id": batch_id}))
        by_key = {str(b.line): b for b in todo}
        console.print(f"batch {batch_id}: {len(todo)} to go, {len(done)} already done")
        counts: dict[str, int] = {}
        columns = (*Progress.get_default_columns(), MofNCompleteColumn())
        with open_output(output) as out, Progress(*columns, console=console) as bar:
            task = bar.add_task("solving", total=len(todo))
            results = stub.StreamBatchResults(
                pb.StreamBatchResultsRequest(batch_id=batch_id), metadata=metadata
            )
            async for item in results:
                line = by_key.pop(item.key, None)
                if line is None:  # written by an earlier run
                    continue
                doc = status_doc(item.status)
                write_result(out, line, doc)
                counts[doc["status"]] = counts.get(doc["status"], 0) + 1
                bar.advance(task)
    except grpc.aio.AioRpcError as e:
        console.print(f"[red]{e.code().name}[/red]: {escape(e.details() or '')}")
        return 1
    except ValueError as e:
        console.print(f"[red]invalid request[/red]: {escape(str(e))}")
        return 2
    state.unlink(missing_ok=True)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    console.print(f"{summary}; {len(bad)} bad lines skipped; results in {output}")
    return 0 if not by_key else 1


async def _submit_servable(
    stub: Any, metadata: Any, job: BatchFileJob, todo: list[BatchLine]
) -> tuple[str, list[tuple[BatchLine, str]]]:
    """Submit the lines; when the server refuses some items (INVALID_ARGUMENT listing them as
    `items[i]` field violations), drop those and submit the rest once more. Returns the batch
    id and the refused lines with the server's reasons."""
    refused: list[tuple[BatchLine, str]] = []
    for _ in range(2):
        request = pb.SubmitBatchRequest(
            items=[_item(b, job.seed) for b in todo],
            params=params_to_wire(job.algorithm, job.params),
            budget=pb.Budget(**job.budget),
            seed=job.seed,
        )
        try:
            return (await stub.SubmitBatch(request, metadata=metadata)).batch_id, refused
        except grpc.aio.AioRpcError as e:
            bad = refused_items(e)
            if not bad or len(bad) >= len(todo):
                raise
            refused += [(todo[i], reason) for i, reason in bad.items()]
            todo = [b for i, b in enumerate(todo) if i not in bad]
    raise RuntimeError("the server refused items it had accepted before")


def refused_items(error: grpc.aio.AioRpcError) -> dict[int, str]:
    """Index -> reason of the batch items an INVALID_ARGUMENT names in its BadRequest details."""
    if error.code() is not grpc.StatusCode.INVALID_ARGUMENT:
        return {}
    status = rpc_status.from_call(error)
    out: dict[int, str] = {}
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            for v in bad.field_violations:
                if (m := re.match(r"items\[(\d+)\]", v.field)) is not None:
                    out[int(m.group(1))] = f"{v.field}: {v.description}"
    return out


async def _attach(stub: Any, state: Path, metadata: Any) -> str | None:
    """The batch of an interrupted run, if the server still has it."""
    if not state.exists():
        return None
    batch_id = json.loads(state.read_text())["batch_id"]
    try:
        await stub.GetBatch(pb.GetBatchRequest(batch_id=batch_id), metadata=metadata)
    except grpc.aio.AioRpcError as e:
        if e.code() is grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return batch_id


def _item(line: BatchLine, seed: int) -> pb.BatchItem:
    """Seeds follow the line, so a problem gets the same seed in every run of the file."""
    if isinstance(line.problem, str):
        problem = pb.Problem(text=line.problem)
    else:
        messages = [pb.ChatMessage(**m) for m in line.problem]
        problem = pb.Problem(chat=pb.ChatMessages(messages=messages))
    item_seed = line.seed if line.seed is not None else seed + line.line
    return pb.BatchItem(problem=problem, seed=item_seed, key=str(line.line))


async def show_batch(
    address: str,
    batch_id: str,
    token: str | None,
    console: Console,
    tls: ClientTLS = PLAINTEXT,
    *,
    cancel: bool = False,
) -> int:
    """Print a batch's counts (`GetBatch`); with `cancel`, cancel its unfinished items first
    (`CancelBatch`: queued ones never start, running ones stop at their next step)."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    async with open_channel(address, tls) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        try:
            if cancel:
                request = pb.CancelBatchRequest(batch_id=batch_id)
                status = await stub.CancelBatch(request, metadata=metadata)
            else:
                request = pb.GetBatchRequest(batch_id=batch_id)
                status = await stub.GetBatch(request, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            console.print(f"[red]{e.code().name}[/red]: {escape(e.details() or '')}")
            return 1
    finished = status.succeeded + status.failed + status.cancelled
    console.print(
        f"batch {status.batch_id}: {finished}/{status.size} finished "
        f"({status.succeeded} succeeded, {status.failed} failed, {status.cancelled} cancelled)"
        + (" - done" if status.done else "")
    )
    return 0
