"""`lodestar bench` end to end at quick sizes: real models, real Ray, a real Redis and gRPC server
started by the bench itself. Only orderings that hold on a noisy shared machine are asserted;
timings themselves never are."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from rich.console import Console

from lodestar.evaluation.its_hub_adapter import ALGORITHMS
from lodestar.evaluation.systems import BenchOptions, Row, run_bench

SECTIONS = {
    1: "orchestration overhead",
    2: "policy KV reuse",
    3: "incremental PRM scoring",
    4: "in-process vs service",
    5: "cross-search batching",
    6: "its_hub 1.2.0 vs Lodestar",
}


@pytest.mark.integration
@pytest.mark.slow
def test_quick_bench_measures_every_row_and_its_checks_hold() -> None:
    console = Console(record=True, width=240)
    options = BenchOptions(quick=True)
    rows = run_bench(options, console)
    sized = options.sized()

    assert {r.section: r.name for r in rows} == SECTIONS
    counts = {s: sum(r.section == s for r in rows) for s in SECTIONS}
    peers = 2 * len(ALGORITHMS)  # its_hub vs Lodestar per algorithm, 1 and n live
    assert counts == {1: 2, 2: 1, 3: len(sized.steps), 4: 1, 5: len(sized.concurrency), 6: peers}
    for r in rows:
        for value in (r.a_s, r.b_s, r.ratio):
            assert math.isfinite(value) and value > 0, r
        assert r.ratio == pytest.approx(r.b_s / r.a_s)
        assert all(r.checks.values()), r  # answers identical, PRM rewards equal
    checked = {r.section for r in rows if r.checks}
    assert checked == {2, 3, 4, 5, 6}

    prm = sorted((r for r in rows if r.section == 3), key=lambda r: r.extra["tokens_full"])
    deepest = prm[-1]
    assert str(max(sized.steps)) in deepest.setting
    assert deepest.a_s < deepest.b_s  # cached per-step cost below full rescoring's
    for r in prm:  # incremental encodes each token once; full rescoring re-encodes prefixes
        assert r.extra["tokens_cached"] < r.extra["tokens_full"]

    for r in (r for r in rows if r.section == 6):
        assert 0 <= r.extra["accuracy_a"] <= 1 and 0 <= r.extra["accuracy_b"] <= 1, r
        if r.setting.startswith(f"{sized.problems} PF") and ", 1 live" in r.setting:
            # its_hub's PF, alone on the engines, sends each step's particles in one call
            assert r.extra["mean_policy_batch_b"] > 1, r

    doc = json.loads(json.dumps([dataclasses.asdict(r) for r in rows]))  # what --json writes
    assert [Row(**d) for d in doc] == rows
    printed = console.export_text()
    assert "lodestar bench" in printed and all(name in printed for name in SECTIONS.values())
