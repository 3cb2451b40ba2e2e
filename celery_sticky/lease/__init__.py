"""The lease store: everything celery-sticky keeps in Redis, and nothing else.

This package talks to Redis only (no ``celery.app``, ``celery.worker`` or kombu):
producers, workers and the CLI reach the keyspace through :class:`LeaseStore` and
:class:`RedisHandoffStore`, never with raw commands. Every decision that must be
atomic across processes is one Lua script beside this file; liveness is measured
against the Redis server's clock (``TIME``), never a worker's.

The keyspace (``P`` is ``sticky_key_prefix`` followed by ``:``):

=============================  ======  ===========================================  ============
key                            type    written by                                   expires
=============================  ======  ===========================================  ============
``P lease:<workflow>:<key>``   hash    claim.lua (``owner``, ``epoch``, ``since``,   never; deleted
                                       ``origin``, ``affinity``), move_begin.lua    by release.lua
                                       (``moving_to``, ``moving_until``),
                                       move_commit.lua
``P epoch``                    string  claim.lua, move_commit.lua (INCR; starts at  never
                                       the server time in µs, so epochs rise even
                                       after the store restarts empty)
``P workers``                  zset    heartbeat.lua (node -> server time of its    never; members
                                       last beat), deregister.lua (score 0)         dropped by
                                                                                    forget_worker
``P worker:<node>``            hash    heartbeat.lua (``capacity``, ``queue``,      with the node
                                       ``heartbeat``, ``tags``, ``tag:<name>``,
                                       ``max_keys``); ``draining``, ``reaped``,
                                       ``reaped_at`` by the store's methods
``P owned:<node>``             set     claim.lua, move_commit.lua, release.lua      with the node
                                       (members ``<workflow>:<key>``)
``P tagsets``                  set     heartbeat.lua: every tag set ever            never
                                       registered
``P reaping:<node>``           string  try_lock_reaping: the reaper that moves a    PX, 120 s
                                       dead node's queue on
``P copy:<workflow>:<key>``    string  copy_switch.lua: the version name of the     never; deleted
                                       key's hand-over copy (fenced: only the       on import or
                                       live owner under its epoch switches it)      release
``P copyseq:<wf>:<key>``       string  copy_switch.lua, with the pointer: the       with the
                                       copy's record of applied producer numbers    pointer
                                       (JSON ``{stream: last}``)
``P ended:<workflow>:<key>``   string  release.lua, when a workflow ended: the       EX, sticky_
                                       key's record of applied producer numbers     finished_
                                       (JSON ``{stream: last}``), for its next owner dedup_ttl
``P copyv:<wf>:<key>@<e>.<r>`` list    RedisHandoffStore: one version of a copy,    1 day until
                                       signed pickle in chunks of 4 MiB             switched, then
                                                                                    with the pointer
=============================  ======  ===========================================  ============
"""

from .copies import RedisHandoffStore
from .store import (
    ClaimStatus,
    Heartbeat,
    Lease,
    LeaseInfo,
    LeaseStore,
    WorkerInfo,
    instance_token,
    redact_url,
)

__all__ = [
    "ClaimStatus",
    "Heartbeat",
    "Lease",
    "LeaseInfo",
    "LeaseStore",
    "RedisHandoffStore",
    "WorkerInfo",
    "instance_token",
    "redact_url",
]
