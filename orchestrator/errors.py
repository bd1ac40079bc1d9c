"""Typed search failures and the short messages a client may see.

A search fails with an `ErrorKind` and a message. The kind decides the status code (the service
maps it without reading the message); the message is what the client reads, so it is short,
names the field or the cause, and carries nothing from another search or from the machine: no
traceback, host address, actor id or source path. Full detail goes to the server log under the
search id.
"""

from __future__ import annotations

import re

from lodestar.workers.messages import ErrorKind, RequestFailed

MAX_MESSAGE_CHARS = 300
"""The longest error message a client receives."""

_SCRUB = (
    (re.compile(r"\x1b\[[0-9;]*[A-Za-z]"), ""),  # ANSI colour codes
    (re.compile(r"Traceback \(most recent call last\):.*", re.S), ""),
    (re.compile(r"\((?:pid|ip|actor_id|node_id)=[^)]*\)"), ""),  # Ray's "(pid=.., ip=..)"
    (re.compile(r"\b(?:pid|ip|actor_id|node_id|worker_id|ActorID|NodeID|WorkerID)[=:]\s*\S+"), ""),
    (re.compile(r'File "[^"]*"(?:, line \d+)?(?:, in \S+)?'), ""),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "<address>"),
    (re.compile(r"\[[0-9a-fA-F:]*:[0-9a-fA-F:]+\](?::\d+)?"), "<address>"),
    (re.compile(r"(?:[A-Za-z]:)?(?:/[\w.@+-]+){2,}/?"), "<path>"),
    (re.compile(r"(?<![\w.:-])[0-9a-f]{24,}\b"), "<id>"),  # not inside an id like s-<hex>
    (re.compile(r"\s+"), " "),
)


def client_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` made safe to hand to a client: one line, no traceback, address, path or long hex
    id, at most `limit` characters."""
    for pattern, replacement in _SCRUB:
        text = pattern.sub(replacement, text)
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


class SearchError(Exception):
    """A search cannot go on, for a reason of `kind`; `message` is client-safe."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, kind: ErrorKind | None = None) -> None:
        self.message = client_message(message)
        if kind is not None:
            self.kind = kind
        super().__init__(self.message)

    @classmethod
    def from_outcome(cls, failed: RequestFailed) -> SearchError:
        return cls(failed.message, failed.kind)


class WorkersUnavailable(SearchError):
    """A worker is gone for good (its restarts or retries ran out): the search cannot go on
    here, but nothing is wrong with the request. The service answers UNAVAILABLE."""

    kind = ErrorKind.UNAVAILABLE


class DeadlineExceeded(SearchError):
    kind = ErrorKind.DEADLINE_EXCEEDED
