"""SIGTERM to exit of a busy `lodestar serve` (shipped models, private Redis), and what it leaves.

    python -m lodestar.evaluation.shutdown      # default call size (256 requests)
    python -m lodestar.evaluation.shutdown --max-batch 16384 --items 16 --searches 8 \
        --particles 1024

The server runs in its own process (`app.serve`, as `lodestar serve` does, one torch thread per
actor); the client submits a batch and some `Search` calls, waits for a first checkpoint, sends
SIGTERM and times the exit. `--max-batch` sets the most requests in one actor call: large, it
makes each call last many seconds, as a real model's batches do, which is where a shutdown that
waits on the actors (a cache drop queued behind the call) shows. Printed: seconds from SIGTERM
to exit, what the `Search` callers got, and the unfinished jobs by (status, has stepped,
cancel flag): a cancel flag means the search would end CANCELLED instead of being resumed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc


def serve(redis_url: str, max_batch: int, grace_s: float) -> None:
    """The server process (`--serve`)."""
    import torch

    from lodestar.orchestrator.driver import OrchestratorConfig
    from lodestar.orchestrator.worker_pool import PoolConfig
    from lodestar.services.app import ServeConfig
    from lodestar.services.app import serve as run
    from lodestar.services.runtime import RuntimeConfig
    from lodestar.services.server import ServerConfig

    torch.set_num_threads(1)
    runtime = RuntimeConfig(
        pool=PoolConfig(threads=1, max_batch=max_batch),
        orchestrator=OrchestratorConfig(max_live=128, lease_s=15.0, scan_interval_s=1.0),
        store_url=redis_url,
    )
    config = ServeConfig(
        server=ServerConfig(address="127.0.0.1:0", grace_s=grace_s), runtime=runtime
    )
    asyncio.run(run(config, announce=lambda line: print(line, flush=True)))


async def load_and_stop(args: argparse.Namespace, server: subprocess.Popen, address: str) -> None:
    from lodestar.orchestrator.state_store import open_state_store
    from lodestar.tasks.arithmetic import Difficulty, generate_problems
    from lodestar.v1 import search_pb2 as pb
    from lodestar.v1 import search_pb2_grpc as pb_grpc

    total = args.items + args.searches
    problems = [p.expression for p in generate_problems("test", total, Difficulty(ops=4), seed=3)]
    params = pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=args.particles))
    ids = [f"busy.{i:06d}" for i in range(args.items)]
    ids += [f"lone-{i}" for i in range(args.searches)]
    async with (
        grpc.aio.insecure_channel(address) as channel,
        open_state_store(args.redis_url) as store,
    ):
        stub = pb_grpc.SearchServiceStub(channel)
        items = [pb.BatchItem(problem=pb.Problem(text=p)) for p in problems[: args.items]]
        if items:
            await stub.SubmitBatch(
                pb.SubmitBatchRequest(items=items, params=params, batch_id="busy")
            )
        calls = [
            asyncio.ensure_future(
                stub.Search(
                    pb.SearchRequest(
                        search_id=f"lone-{i}", problem=pb.Problem(text=p), params=params, seed=i
                    )
                )
            )
            for i, p in enumerate(problems[args.items :])
        ]
        while not any([await stepped(store, i) for i in ids]):
            await asyncio.sleep(0.1)
        sent = time.monotonic()
        server.send_signal(signal.SIGTERM)
        while server.poll() is None and time.monotonic() - sent < 300:
            await asyncio.sleep(0.02)
        took = time.monotonic() - sent
        alive = server.poll() is None
        print(f"{'STILL ALIVE' if alive else 'exited'} {took:.2f} s after SIGTERM")
        answers = collections.Counter()
        for call in calls:
            try:
                await call
                answers["result"] += 1
            except grpc.aio.AioRpcError as e:
                answers[f"{e.code().name}: {e.details()[:60]}"] += 1
        print("Search callers got:", dict(answers))
        left = collections.Counter()
        for search_id in ids:
            job = await store.get_job(search_id)
            if job is not None and not job.status.finished:
                step = await stepped(store, search_id)
                left[(str(job.status), step, await store.is_cancelled(search_id))] += 1
        print("unfinished jobs (status, has stepped, cancel flag):", dict(left))


async def stepped(store: Any, search_id: str) -> bool:
    """Whether the search checkpointed a step (generation 0, its initial state, is written at
    submit)."""
    checkpoint = await store.load_checkpoint(search_id)
    return checkpoint is not None and checkpoint.generation > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64, help="batch items")
    parser.add_argument("--searches", type=int, default=8, help="concurrent Search calls")
    parser.add_argument("--particles", type=int, default=256, help="PF particles per search")
    parser.add_argument("--max-batch", type=int, default=256, help="most requests per call")
    parser.add_argument("--grace-s", type=float, default=5.0)
    parser.add_argument("--serve", nargs=3, metavar=("REDIS_URL", "MAX_BATCH", "GRACE_S"))
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), float(args.serve[2]))
        return

    from lodestar.services.local_redis import LocalRedis

    with LocalRedis() as redis_server, tempfile.TemporaryDirectory() as tmp:
        args.redis_url = redis_server.url
        log = Path(tmp) / "serve.log"
        command = [sys.executable, "-m", "lodestar.evaluation.shutdown", "--serve"]
        command += [redis_server.url, str(args.max_batch), str(args.grace_s)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with log.open("w") as out:
            server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while not (found := re.search(r"SERVING on (\S+:\d+)", log.read_text())):
                if server.poll() is not None:
                    raise SystemExit(log.read_text())
                time.sleep(0.2)
            asyncio.run(load_and_stop(args, server, found.group(1)))
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()


if __name__ == "__main__":
    main()
