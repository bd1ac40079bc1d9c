"""`lodestar serve`, `lodestar search` and `lodestar batch` as a newcomer runs them: separate
processes, real Ray, the shipped models, real gRPC connections."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lodestar.services.local_redis import LocalRedis
from lodestar.tasks.arithmetic import Difficulty, generate_problems

LODESTAR = [sys.executable, "-m", "lodestar.services.cli"]


def start_server(log: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """`lodestar serve` on a free port; returns the process and its address once SERVING."""
    with log.open("a") as out:
        server = subprocess.Popen(
            [*LODESTAR, "serve", "--port", "0", "--threads", "1", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    start = len(log.read_text())
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        found = re.search(r"SERVING on (\S+:\d+)", log.read_text()[start:])
        if found:
            return server, found.group(1)
        time.sleep(0.2)


def stop(server: subprocess.Popen[bytes]) -> int:
    server.send_signal(signal.SIGTERM)
    return server.wait(timeout=60)


def test_serve_then_search_prints_the_answer_and_serve_stops_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    server, address = start_server(log)
    try:
        search = subprocess.run(
            [*LODESTAR, "search", "(7+5)*3", "--address", address, "-n", "4"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert search.returncode == 0, search.stdout + search.stderr
        assert re.search(r"final answer\s+\d+", search.stdout)
        bad = subprocess.run(
            [*LODESTAR, "search", "(7+5)*3", "--address", address, "-p", "n=0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 1 and "INVALID_ARGUMENT: params.pf.n" in bad.stdout
    finally:
        code = stop(server)
    assert code == 0, log.read_text()
    assert "shutting down" in log.read_text()


def test_a_1000_problem_batch_killed_half_way_resumes_without_loss_or_duplicates(
    tmp_path: Path, redis_server: LocalRedis
) -> None:
    """Client and server are both SIGKILLed mid-batch; a new server on the same Redis resumes
    the unfinished searches and the re-run client attaches to the same batch."""
    redis_server.restart()
    problems = generate_problems("train", 1000, Difficulty(ops=2), seed=5)
    lines = [json.dumps({"problem": p.expression}) for p in problems]
    lines[10:10] = ["{not json", json.dumps({"problem": ""})]  # reported, skipped
    source = tmp_path / "problems.jsonl"
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "results.jsonl"
    log = tmp_path / "serve.log"
    serve_args = ("--redis", redis_server.url, "--lease-s", "2", "--max-live", "128")
    submit = [*LODESTAR, "batch", "submit", str(source), "-o", str(output), "-a", "greedy"]

    server, address = start_server(log, *serve_args)
    client = subprocess.Popen([*submit, "--address", address], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not output.exists() or len(output.read_text().splitlines()) < 300:
            assert client.poll() is None, client.stdout.read() if client.stdout else ""
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.1)
    finally:
        client.kill()
        server.kill()
        client.wait()
        server.wait()
    written_before = len(output.read_text().splitlines())
    assert 300 <= written_before < 1000, "killed too late to test a resume"

    server, address = start_server(log, *serve_args)
    try:
        rerun = subprocess.run(
            [*submit, "--address", address], capture_output=True, text=True, timeout=300
        )
    finally:
        stop(server)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "problems.jsonl:11" in rerun.stdout and "problems.jsonl:12" in rerun.stdout
    results = [json.loads(line) for line in output.read_text().splitlines()]
    numbers = [r["line"] for r in results]
    assert len(numbers) == len(set(numbers)) == 1000
    assert set(numbers) == set(range(1, 1003)) - {11, 12}
    assert all(r["status"] == "succeeded" and r["final_answer"] for r in results)
    assert not output.with_name(output.name + ".batch").exists()


def test_batch_run_solves_a_file_in_process_and_a_rerun_has_nothing_to_do(tmp_path: Path) -> None:
    problems = generate_problems("train", 20, Difficulty(ops=2), seed=9)
    source = tmp_path / "problems.jsonl"
    lines = [json.dumps(p.expression) for p in problems[:10]]
    lines += ['{"problem": "1+1", "extra": 1}']
    lines += [
        json.dumps({"messages": [{"role": "user", "content": p.expression}]}) for p in problems[10:]
    ]
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "results.jsonl"
    run = [*LODESTAR, "batch", "run", str(source), "-o", str(output), "--threads", "1", "-n", "2"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "problems.jsonl:11" in first.stdout and "unknown fields ['extra']" in first.stdout
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["line"] for r in results) == [*range(1, 11), *range(12, 22)]
    assert all(r["status"] == "succeeded" for r in results)
    again = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do: 20 results" in again.stdout


def test_joining_a_cluster_retries_a_refused_connection_and_a_local_ray_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pure retry logic with `ray.init` scripted (the real refusal is a race in the head's client
    proxier, hit at random by the Helm chart's end-to-end test, which then takes this path)."""
    import ray

    from lodestar.services.app import connect_ray

    calls: list[str] = []
    refusals = {"n": 0}

    def init(address: str, **_: object) -> None:
        calls.append(address)
        if refusals["n"]:
            refusals["n"] -= 1
            raise ConnectionAbortedError("Initialization failure from server")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))

    refusals["n"] = 2
    asyncio.run(connect_ray("ray://head:10001", attempts=3, wait_s=0))
    assert calls == ["ray://head:10001", "shutdown"] * 2 + ["ray://head:10001"]

    calls.clear()
    refusals["n"] = 3
    with pytest.raises(ConnectionAbortedError):
        asyncio.run(connect_ray("ray://head:10001", attempts=3, wait_s=0))
    assert calls.count("ray://head:10001") == 3

    calls.clear()
    refusals["n"] = 1
    with pytest.raises(ConnectionAbortedError):
        asyncio.run(connect_ray("local", attempts=3, wait_s=0))
    assert calls == ["local"]
