"""The Ray actor that holds models: a policy, a reward, or both (one combined actor per GPU).

`ModelHost` is a plain class; `worker_pool` turns it into actors with `num_gpus`, `num_cpus`,
`max_restarts`, `max_task_retries` and `CONCURRENT_CALLS` call threads: the engines that run one
batch at a time take their calls one at a time (one lock for all of them, so a combined actor's
policy and PRM never run at once on its threads), a concurrent engine (vLLM) takes them as they
come. A restart re-runs `__init__`, so everything here is rebuildable: the models reload from
their directories and the KV caches start empty (a miss is always correct). Methods are
idempotent for the same reason Ray may call them twice: sampling is seeded per request, so a
retried `extend` returns what the first attempt would have.

The device is chosen inside the actor: Ray sets CUDA_VISIBLE_DEVICES to the GPUs it granted, so a
`num_gpus=0.5` actor on a GPU node loads on CUDA and the same code with `num_gpus=0` runs on CPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any, Literal

import ray
import torch

from lodestar.workers.contract import PolicyEngine, RewardEngine, host_info
from lodestar.workers.factory import ModelConfig, build_policy, build_reward
from lodestar.workers.messages import (
    ExtendRequest,
    RequestFailed,
    ScoreRequest,
    StepOutput,
    StepScores,
)

Role = Literal["policy", "reward"]
CONTROL = "control"
"""Actor concurrency group for `info`: the health watchdog's probe never waits behind a batch
(model calls stay one at a time in the default group)."""


class ModelHost:
    """Serves `extend` and/or `score` for the searches routed to it."""

    def __init__(
        self,
        config: ModelConfig,
        roles: Sequence[Role],
        threads: int | None = None,
        spec: str = "",
    ):
        """`spec`: a fingerprint of how the creator built this host, reported by `info()` (a
        shared fleet's keeper replaces hosts built from another config)."""
        unknown = set(roles) - {"policy", "reward"}
        if unknown or not roles:
            raise ValueError(f"roles must be a non-empty subset of policy, reward; got {roles}")
        if threads is not None:
            torch.set_num_threads(threads)
        self.roles = tuple(roles)
        self.spec = spec
        self.policy = build_policy(config) if "policy" in roles else None
        self.reward = build_reward(config) if "reward" in roles else None
        self._one_at_a_time = threading.Lock()

    def _turn(self, engine: PolicyEngine | RewardEngine) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if engine.concurrent else self._one_at_a_time

    def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput | RequestFailed]:
        if self.policy is None:
            raise RuntimeError("this worker holds no policy")
        with self._turn(self.policy):
            return self.policy.extend(requests)

    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores | RequestFailed]:
        if self.reward is None:
            raise RuntimeError("this worker holds no reward model")
        with self._turn(self.reward):
            return self.reward.score(requests)

    def release_prefix(self, prefix: str) -> int:
        """Drop one search's caches from every model held here (after the call running on
        one, or at once on a concurrent engine: it aborts the search's requests); how many."""
        dropped = 0
        for engine in (self.policy, self.reward):
            if engine is not None:
                with self._turn(engine):
                    dropped += engine.release_prefix(prefix)
        return dropped

    @ray.method(concurrency_group=CONTROL)
    def info(self) -> dict[str, Any]:
        """Where this actor runs and what it has done: for placement checks and monitoring. Runs
        on its own thread (the CONTROL group), so it answers while a model call is running."""
        node, gpus = ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()
        return host_info(self.policy, self.reward) | {
            "node_id": node,
            "gpu_ids": list(map(str, gpus)),
            "placement_group_id": ray.get_runtime_context().get_placement_group_id(),
            "spec": self.spec,
        }
