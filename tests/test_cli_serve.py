"""`lodestar serve`, `lodestar search` and `lodestar batch` as a newcomer runs them: separate
processes, real Ray, the shipped models, real gRPC connections."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lodestar.services.local_redis import LocalRedis, free_port
from lodestar.tasks.arithmetic import Difficulty, generate_problems

LODESTAR = [sys.executable, "-m", "lodestar.services.cli"]


pytestmark = pytest.mark.integration  # every test runs `lodestar` in subprocesses


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
    metrics_port = free_port()
    server, address = start_server(log, "--metrics-port", str(metrics_port))
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
        assert bad.returncode == 2 and "INVALID_ARGUMENT: params.pf.n" in bad.stdout
        # /metrics binds the gRPC --host (127.0.0.1 by default), not every address
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(metrics, timeout=10) as reply:
            assert 'lodestar_searches_finished_total{state="succeeded"}' in reply.read().decode()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", metrics_port), timeout=5).close()
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

    from lodestar.services.runtime import connect_ray

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


def test_sigterm_under_load_exits_within_the_grace_and_another_server_finishes_the_searches(
    tmp_path: Path, redis_server: LocalRedis
) -> None:
    """A busy `lodestar serve` on a private Redis gets SIGTERM: it answers its open searches
    UNAVAILABLE and exits within --grace-s plus a few seconds, leaving them checkpointed,
    uncancelled and with their leases handed back; a second server on the same Redis finishes
    them, and a batch that never started, with the results of an undisturbed run. On the way,
    `lodestar batch cancel` ends a queued batch at once."""
    from typing import Any

    import grpc

    from lodestar.orchestrator.state_store import JobStatus, open_state_store
    from lodestar.v1 import search_pb2 as pb
    from lodestar.v1 import search_pb2_grpc as pb_grpc
    from tests.runtime_parts import assert_same_results, comparable, stepped
    from tests.test_distributed import reference

    redis_server.restart()
    grace_s = 3.0
    serve_args = ("--redis", redis_server.url, "--grace-s", str(grace_s), "--max-live", "4")
    long = [p.expression for p in generate_problems("test", 4, Difficulty(ops=4), seed=21)]
    problems = long + [p.expression for p in generate_problems("test", 10, Difficulty(ops=3))]
    lone_ids = [f"lone-{i}" for i in range(4)]
    work_ids = [f"work.{i:06d}" for i in range(6)]

    def batch(batch_id: str, texts: list[str], n: int) -> pb.SubmitBatchRequest:
        return pb.SubmitBatchRequest(
            batch_id=batch_id,
            items=[
                pb.BatchItem(problem=pb.Problem(text=t), key=str(i)) for i, t in enumerate(texts)
            ],
            params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=n)),
            seed=100,
        )

    log = tmp_path / "serve.log"
    server, address = start_server(log, *serve_args)

    async def load_then_sigterm() -> tuple[list[Any], float, str, list[Any], list[bool]]:
        async with (
            grpc.aio.insecure_channel(address) as channel,
            open_state_store(redis_server.url) as store,
        ):
            stub = pb_grpc.SearchServiceStub(channel)
            calls = [
                asyncio.ensure_future(
                    stub.Search(
                        pb.SearchRequest(
                            search_id=search_id,
                            problem=pb.Problem(text=problems[i]),
                            params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=32)),
                            seed=i,
                        )
                    )
                )
                for i, search_id in enumerate(lone_ids)
            ]
            await stub.SubmitBatch(batch("work", problems[4:10], 8))  # queued: 4 slots taken
            await stub.SubmitBatch(batch("ballast", problems[10:], 8))
            cancel = await asyncio.to_thread(
                subprocess.run,
                [*LODESTAR, "batch", "cancel", "ballast", "--address", address],
                capture_output=True,
                text=True,
                timeout=60,
            )
            deadline = time.monotonic() + 60
            for search_id in lone_ids:
                while not await stepped(store, search_id):
                    assert time.monotonic() < deadline, log.read_text()
                    await asyncio.sleep(0.05)
            sent = time.monotonic()
            server.send_signal(signal.SIGTERM)
            while server.poll() is None and time.monotonic() - sent < 60:
                await asyncio.sleep(0.02)
            exit_s = time.monotonic() - sent
            answers = []
            for call in calls:
                try:
                    answers.append(await call)
                except grpc.aio.AioRpcError as e:
                    answers.append((e.code(), e.details()))
            jobs = [await store.get_job(i) for i in [*lone_ids, *work_ids]]
            flags = [await store.is_cancelled(i) for i in [*lone_ids, *work_ids]]
            jobs.append(time.time())  # when the leases were read
        return answers, exit_s, cancel.stdout + cancel.stderr, jobs, flags

    try:
        answers, exit_s, cancel_out, jobs, flags = asyncio.run(load_then_sigterm())
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    print(f"\nSIGTERM to exit under load: {exit_s:.2f} s (--grace-s {grace_s})")
    assert server.returncode == 0, log.read_text()
    assert exit_s < grace_s + 6.0, f"{exit_s:.1f} s from SIGTERM to exit"
    assert "batch ballast: 4/4 finished (0 succeeded, 0 failed, 4 cancelled) - done" in cancel_out
    read_at = jobs.pop()
    for answer, job in zip(answers, jobs[:4], strict=True):
        if job.status is JobStatus.SUCCEEDED:  # its last step was the one the drain waited for
            assert isinstance(answer, pb.SearchResult) and answer.search_id == job.search_id
        else:
            assert answer[0] is grpc.StatusCode.UNAVAILABLE and "resumes it" in answer[1], answer
    for job in jobs:  # stopped mid-search with the lease handed back, or never started
        if job.status is JobStatus.RUNNING:
            assert job.lease_expires_at < read_at + 1, job  # not the 15 s a renewal gives
        else:
            assert job.status in (JobStatus.QUEUED, JobStatus.SUCCEEDED), job
    statuses = [j.status for j in jobs]
    assert statuses[:4].count(JobStatus.RUNNING) >= 2, "too late to test"
    assert statuses[4:].count(JobStatus.QUEUED) >= 2, "too late to test"
    assert not any(flags)

    server, address = start_server(tmp_path / "resume.log", *serve_args)

    async def finish_elsewhere() -> list[Any]:
        async with open_state_store(redis_server.url) as store:
            deadline = time.monotonic() + 240
            records = []
            for search_id in [*lone_ids, *work_ids]:
                while not (record := await store.get_job(search_id)).status.finished:
                    assert time.monotonic() < deadline, f"{search_id} never finished"
                    await asyncio.sleep(0.1)
                records.append(record)
            assert (await store.get_batch("work")).done
            return records

    try:
        records = asyncio.run(finish_elsewhere())
    finally:
        assert stop(server) == 0
    assert all(r.status is JobStatus.SUCCEEDED for r in records), [r.error for r in records]
    got = [comparable(r.result) for r in records]
    assert_same_results(got, reference([r.spec for r in records]))
