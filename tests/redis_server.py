"""The tests' Redis: a real private server, and a failure (never a skip) when there is none."""

from __future__ import annotations

import pytest

from lodestar.services.local_redis import LocalRedis, RedisServerMissing


def new_redis_server() -> LocalRedis:
    try:
        return LocalRedis()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
