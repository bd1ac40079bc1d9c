"""Between the wire (`lodestar.v1` messages) and the orchestrator (job specs, records, results).

Only what is set on the wire reaches the algorithm: an unset optional field keeps the
algorithm's default, and validation (with the field's dotted path) stays in one place, the
algorithm registry. Paths in errors are the wire's: `params.pf.n`, `budget.max_prm_passes`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.protobuf.message import Message

from lodestar.orchestrator.algorithms.early_rejection import INNER
from lodestar.orchestrator.algorithms.registry import ParamError, parse_params
from lodestar.orchestrator.state_store import BatchRecord, JobRecord, JobStatus
from lodestar.v1 import search_pb2 as pb

STATES = {
    JobStatus.QUEUED: pb.SEARCH_STATE_QUEUED,
    JobStatus.RUNNING: pb.SEARCH_STATE_RUNNING,
    JobStatus.SUCCEEDED: pb.SEARCH_STATE_SUCCEEDED,
    JobStatus.FAILED: pb.SEARCH_STATE_FAILED,
    JobStatus.CANCELLED: pb.SEARCH_STATE_CANCELLED,
}


def set_fields(message: Message) -> dict[str, Any]:
    """The fields a client set, as plain values (nested messages as dicts)."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        out[field.name] = set_fields(value) if isinstance(value, Message) else value
    return out


def problem_from_wire(problem: pb.Problem) -> str | list[dict[str, str]]:
    kind = problem.WhichOneof("kind")
    if kind == "text":
        return problem.text
    if kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in problem.chat.messages]
        if not messages:
            raise ParamError("problem.chat.messages", "must not be empty")
        return messages
    raise ParamError("problem", "set text or chat")


def wire_shape(algorithm: str, fields: Mapping[str, Any], *, to_wire: bool) -> dict[str, Any]:
    """Early rejection's parameters between their two shapes: the registry's names the inner
    search (`inner: "pf"`) and holds its fields in `inner_params`; the wire's nests the inner
    search's own message (`pf: {...}`). Other algorithms' fields are the same in both."""
    out = dict(fields)
    if algorithm == "early_rejection" and to_wire:
        out[out.pop("inner", "beam")] = out.pop("inner_params", {})
    elif algorithm == "early_rejection":
        inner = next((name for name in out if name in INNER), None)
        if inner is None:
            raise ParamError("params.early_rejection", "choose the inner search (beam, pf, ...)")
        out["inner"], out["inner_params"] = inner, out.pop(inner)
    return out


def params_from_wire(params: pb.AlgorithmParams) -> tuple[str, dict[str, Any]]:
    """(algorithm name, its parameters as the registry takes them), validated there so that
    errors name the field by its path on the wire."""
    name = params.WhichOneof("algorithm")
    if name is None:
        raise ParamError("params", "choose an algorithm (one of the AlgorithmParams fields)")
    fields = wire_shape(name, set_fields(getattr(params, name)), to_wire=False)
    parse_params(name, fields, wire=True)
    return name, fields


def spend_to_wire(spend: dict[str, Any], record: JobRecord | None = None) -> pb.Spend:
    known = {f.name for f in pb.Spend.DESCRIPTOR.fields}
    out = pb.Spend(**{k: int(v) for k, v in spend.items() if k in known})
    if record is not None and record.started_at and record.finished_at:
        out.wall_time_s = record.finished_at - record.started_at
    return out


def result_to_wire(result_json: str, record: JobRecord) -> pb.SearchResult:
    doc = json.loads(result_json)
    candidates = [
        pb.Candidate(
            text=c["text"],
            steps=c["steps"],
            final_answer=c["final_answer"],
            score=c["score"],
            weight=c["weight"],
            finished=c["finished"],
            stop=c["stop"],
            rewards=c["rewards"],
        )
        for c in doc["candidates"]
    ]
    return pb.SearchResult(
        search_id=record.search_id,
        algorithm=doc["algorithm"],
        answer=doc["answer"],
        final_answer=doc["final_answer"],
        candidates=candidates,
        chosen=-1 if doc["chosen"] is None else doc["chosen"],
        spend=spend_to_wire(doc["spend"], record),
        stop_reason=doc["stop_reason"],
    )


def status_to_wire(record: JobRecord) -> pb.SearchStatus:
    out = pb.SearchStatus(
        search_id=record.search_id,
        state=STATES[record.status],
        algorithm=record.spec.algorithm,
        error=record.error or "",
        created_at=record.created_at,
        finished_at=record.finished_at or 0.0,
    )
    if record.status is JobStatus.SUCCEEDED and record.result is not None:
        out.result.CopyFrom(result_to_wire(record.result, record))
    return out


def progress_to_wire(search_id: str, event: dict[str, Any]) -> pb.SearchEvent:
    return pb.SearchEvent(
        search_id=search_id,
        progress=pb.SearchProgress(
            step=event["generation"],
            spend=spend_to_wire(event["spend"]),
            best_partial=event.get("best", ""),
            best_final_answer=event.get("best_final_answer"),
        ),
    )


def batch_to_wire(record: BatchRecord) -> pb.BatchStatus:
    return pb.BatchStatus(
        batch_id=record.batch_id,
        size=record.size,
        succeeded=record.counts["succeeded"],
        failed=record.counts["failed"],
        cancelled=record.counts["cancelled"],
        done=record.done,
        created_at=record.created_at,
    )
