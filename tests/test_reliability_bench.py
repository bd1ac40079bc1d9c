"""The pure parts of the reliability benchmark (evaluation/reliability.py): its percentile, its
client-safety classifier and its summaries, on hand-made inputs. The benchmark itself starts Ray,
Redis and a server and is run by hand, never here."""

from __future__ import annotations

import math

import pytest

from lodestar.evaluation.reliability import (
    OK,
    SECRET,
    HealthWatch,
    Outcome,
    by_window,
    message_flaws,
    mixed_calls,
    percentile,
    summarize,
)
from lodestar.orchestrator.errors import MAX_MESSAGE_CHARS, client_message


def test_percentile_interpolates_between_closest_ranks_like_numpy() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 25) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)  # numpy: 3.97
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


@pytest.mark.parametrize(
    ("message", "flaw"),
    [
        ('Traceback (most recent call last):\n  File "x", line 3, in f', "traceback"),
        ("\x1b[31mfailed\x1b[0m", "colour code"),
        ("worker at 10.0.0.7:6379 is gone", "address"),
        ("cannot open /srv/lodestar/models/policy", "path"),
        ("failed in driver.py", "path"),
        ("worker (pid=4242) died", "process id"),
        ("ActorID: 1f2e3d4c5b6a79880716253443526170 died", "actor id"),
        ("x" * (MAX_MESSAGE_CHARS + 1), f"{MAX_MESSAGE_CHARS + 1} chars > {MAX_MESSAGE_CHARS}"),
        ("first line\nsecond line", "more than one line"),
    ],
)
def test_each_kind_of_leak_is_named(message: str, flaw: str) -> None:
    assert flaw in message_flaws(message)


def test_the_service_own_messages_are_safe_and_another_tenants_text_is_not() -> None:
    for safe in (
        "problem.text: 1000000 characters, at most 16384 on this server",
        "params.pf.n: Input should be greater than or equal to 1",
        "search_id: must be 1-128 of A-Z a-z 0-9 . _ : -",
        "request: not a valid message of this RPC's type (strings must be UTF-8)",
        "x" * MAX_MESSAGE_CHARS,
    ):
        assert message_flaws(safe) == [], safe
    assert message_flaws(f"problem: {SECRET!r} is not arithmetic") == []  # its own text
    assert message_flaws(f"problem: {SECRET!r} is not arithmetic", [SECRET]) == [
        f"carries {SECRET[:24]!r}"
    ]
    raw = 'Traceback (most recent call last):\n  File "/srv/w.py", line 1 at 10.0.0.7 (pid=7)'
    assert message_flaws(raw)  # what a worker might raise ...
    assert message_flaws(client_message(raw)) == []  # ... and what the service passes on


def outcome(kind: str, code: str, latency_s: float, sent_at: float = 0.0, **kw) -> Outcome:
    return Outcome(kind, code, latency_s, sent_at=sent_at, **kw)


def test_summaries_count_by_code_and_take_percentiles_of_every_call() -> None:
    outcomes = [outcome("unary", OK, t) for t in (0.1, 0.2, 0.3, 0.4)]
    outcomes += [outcome("unary", "UNAVAILABLE", 1.0), outcome("unary", "UNAVAILABLE", 2.0)]
    outcomes.append(outcome("stream", "INTERNAL", 0.5, events=3, first_event_s=0.05))
    s = summarize(outcomes)
    assert (s["calls"], s["completed"]) == (7, 4)
    assert s["failed"] == {"INTERNAL": 1, "UNAVAILABLE": 2}
    assert s["p50_s"] == 0.4 and s["max_s"] == 2.0
    assert s["first_event_p50_s"] == 0.05
    assert math.isnan(summarize([])["p50_s"]) and summarize([])["completed"] == 0

    windows = by_window(outcomes[:6], start=0.0, end=1.0)  # all sent at 0.0: "during"
    assert windows["during"] == {"completed": 4, "calls": 6, "failed": {"UNAVAILABLE": 2}}
    late = by_window([outcome("unary", OK, 0.1, sent_at=2.0)], start=0.0, end=1.0)
    assert late["after"]["calls"] == 1 and late["before"]["calls"] == 0


def test_calls_mix_the_two_kinds_evenly_with_a_seed_each() -> None:
    calls = mixed_calls([f"{i}+1" for i in range(10)], streams=4, seed=100)
    kinds = [k for k, _ in calls]
    assert kinds.count("stream") == 4 and kinds.count("unary") == 6
    assert "stream" in kinds[:5] and "stream" in kinds[5:]
    assert [r.seed for _, r in calls] == list(range(100, 110))
    assert all(r.params.pf.n == 4 for _, r in calls)


def test_health_watch_tells_when_a_status_first_held() -> None:
    watch = HealthWatch(stub=None)
    watch.changes = [(0.0, "SERVING"), (5.0, "NOT_SERVING"), (8.0, "SERVING")]
    assert watch.seen("NOT_SERVING", start=4.0, end=9.0) == 1.0
    assert watch.seen("NOT_SERVING", start=4.0, end=4.5) is None
    assert watch.seen("SERVING", start=6.0) == 2.0
    assert watch.seen("SERVING", start=1.0) == 0.0  # already in force
    assert watch.timeline(origin=5.0) == [(-5.0, "SERVING"), (0.0, "NOT_SERVING"), (3.0, "SERVING")]
