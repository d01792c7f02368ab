"""Fixtures of the integration tests that start their own servers."""

from tests.integration.private_services import private_postgres, private_redis

__all__ = ["private_postgres", "private_redis"]
