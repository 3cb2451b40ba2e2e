"""Helpers to test sticky tasks for real: an embedded Redis, worker subprocesses, a
TCP proxy that cuts connections, and a nemesis with an honest checker."""

from .checker import Published, Report, RunRecord, check
from .cluster import Worker, WorkerCluster, kill_all_groups, wait_for
from .nemesis import (
    FAULT_KINDS,
    Nemesis,
    NemesisConfig,
    NemesisResult,
    Probe,
    applied_log,
    record_step,
    register_probe,
    run_nemesis,
)
from .proxy import TcpProxy
from .redis_server import RedisServer, answers, redis_at, start_server

__all__ = [
    "FAULT_KINDS",
    "Nemesis",
    "NemesisConfig",
    "NemesisResult",
    "Probe",
    "Published",
    "RedisServer",
    "Report",
    "RunRecord",
    "TcpProxy",
    "Worker",
    "WorkerCluster",
    "answers",
    "applied_log",
    "check",
    "kill_all_groups",
    "record_step",
    "redis_at",
    "register_probe",
    "run_nemesis",
    "start_server",
    "wait_for",
]
