"""An orchestrator in its own process, for the test that kills one with SIGKILL.

    python -m tests.orchestrator_process REDIS_URL SPECS_JSON

Submits the jobs in SPECS_JSON (a list of JobSpec fields) to the Redis store at REDIS_URL, runs
them on the shipped policy (paced, so they are mid-flight for a while) with the verifier reward,
and never finishes on its own: the test kills it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import torch

from lodestar.orchestrator.driver import Orchestrator, OrchestratorConfig
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.orchestrator.state_store import JobSpec, open_state_store
from tests.runtime_parts import Paced, shipped_workers

LEASE = dict(lease_s=1.0, scan_interval_s=0.2)


async def main(url: str, specs_file: str) -> None:
    torch.set_num_threads(1)
    policy, reward = shipped_workers()
    store = open_state_store(url)
    config = OrchestratorConfig(resume_orphans=False, owner="doomed", **LEASE)
    orch = Orchestrator(store, LocalWorkers(Paced(policy, 0.2), reward), config)
    await orch.start()
    for fields in json.loads(Path(specs_file).read_text()):
        await orch.submit(JobSpec(**fields))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))
