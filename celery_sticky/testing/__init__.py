"""Helpers to test sticky tasks for real: an embedded Redis and worker subprocesses."""

from .cluster import Worker, WorkerCluster
from .redis_server import answers, redis_at, start_server

__all__ = ["Worker", "WorkerCluster", "answers", "redis_at", "start_server"]
