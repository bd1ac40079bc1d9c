"""State <-> bytes. JSON so a checkpoint is readable, portable across nodes and versions checked."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from pydantic import TypeAdapter

FORMAT_VERSION = 1


@cache
def _adapter(state_type: type) -> TypeAdapter[Any]:
    return TypeAdapter(state_type)


def encode_state(algorithm: str, state: Any) -> bytes:
    body = _adapter(type(state)).dump_python(state, mode="python")
    doc = {"format": FORMAT_VERSION, "algorithm": algorithm, "state": body}
    return json.dumps(doc, separators=(",", ":"), allow_nan=True).encode()


def decode_state(data: bytes, state_type: type) -> Any:
    doc = json.loads(data)
    if doc.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format {doc.get('format')!r}")
    return _adapter(state_type).validate_python(doc["state"])


def algorithm_of(data: bytes) -> str:
    """The algorithm name recorded in a checkpoint."""
    return str(json.loads(data)["algorithm"])
