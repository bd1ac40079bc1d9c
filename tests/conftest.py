"""Suite-wide settings.

torch runs single-threaded in tests: on these shared 2-core machines a small matmul with two
threads was measured 100x slower than with one (thread contention), and tests time behaviour, not
throughput. The setting is restored before every test because training code sets its own.
"""

import asyncio

import pytest
import torch

INTEGRATION_FIXTURES = {"ray_cluster", "redis_server"}
"""A test that uses one of these needs another process (a Ray cluster, a redis-server)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `integration` every test that starts or needs another process: by its fixtures (Ray,
    Redis, the Redis side of `backend`) or by its module's own `pytestmark`. `pytest -m "not
    integration"` then runs the pure and single-process tests: the developer's fast loop."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        on_redis = callspec is not None and callspec.params.get("backend") == "redis"
        if names & INTEGRATION_FIXTURES or on_redis:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _single_torch_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (start-up costs 4-7 s). `address="local"` never joins
    a stale cluster; one logical GPU lets placement tests ask for GPU shares on a CPU machine."""
    import ray

    from lodestar.services.runtime import connect_ray

    asyncio.run(connect_ray("local", 1, num_cpus=8, num_gpus=1))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def redis_server():
    """A private redis-server on a free port for one test module; fails (never skips) when the
    binary is missing."""
    from tests.redis_server import new_redis_server

    with new_redis_server() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest):
    """A state-store backend for contract tests: memory, then a flushed private Redis."""
    import redis

    from lodestar.orchestrator.state_store import MemoryStateStore, StoreConfig
    from lodestar.orchestrator.state_store.redis_store import RedisStateStore, RedisStoreConfig
    from tests.store_backends import Backend

    if request.param == "memory":
        return Backend("memory", lambda **s: MemoryStateStore(StoreConfig(**s)))
    server = request.getfixturevalue("redis_server")
    with redis.Redis.from_url(server.url) as client:
        client.flushall()
    return Backend("redis", lambda **s: RedisStateStore(RedisStoreConfig(url=server.url, **s)))
