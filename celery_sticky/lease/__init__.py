"""The lease store: everything celery-sticky keeps in Redis, and nothing else.

This package talks to Redis only (no ``celery.app``, ``celery.worker`` or kombu):
producers, workers and the CLI reach the keyspace through :class:`LeaseStore` and
:class:`RedisHandoffStore`, never with raw commands. Every decision that must be
atomic across processes is one Lua script beside this file; liveness is measured
against the Redis server's clock (``TIME``), never a worker's.

The keyspace (``P`` is ``sticky_key_prefix`` followed by ``:``; ``b`` is a key's
bucket, the first 8 hex digits of ``sha1('<workflow>:<key>')`` modulo 16,384, computed
alike by :func:`store.bucket_of` and ``bucket_of`` in ``lease.lua``):

=============================  ======  ===========================================  ============
key                            type    written by                                   expires
=============================  ======  ===========================================  ============
``P leases:<b>``               hash    the leases of bucket ``b``: field            never; a
                                       ``<workflow>:<key>``, value ``<owner id>|    field goes
                                       <epoch>|<since>|<origin>|<moving_to id>|     with
                                       <moving_until>|<affinity>`` (lease.lua, put  release.lua
                                       in front of every script that reads or
                                       writes one: claim, lookup, release,
                                       move_begin, move_commit, copy_switch,
                                       reap_keys)
``P owned:<id>:<b % 4096>``    hash    the keys the node of that id holds (field    fields go
                                       ``<workflow>:<key>``, value empty): claim,   with the key;
                                       move_commit, release, reap_keys              forget_worker
``P keycount``                 hash    node -> number of keys it holds, kept equal  field with
                                       to its owned entries by the same scripts     forget_worker
``P node-id``, ``P node-name`` hash    node -> short id, id -> node (the ids        never (one
                                       leases carry; given out by claim,            entry per name
                                       move_begin; never reused)                    ever used)
``P node-seq``                 string  the last node id given out                   never
``P epoch``                    string  claim.lua, move_commit.lua, reap_keys.lua    never
                                       (INCR; starts at the server time in µs, so
                                       epochs rise even after the store restarts
                                       empty)
``P born``                     string  stamp_born.lua, heartbeat.lua, claim.lua:    never
                                       server time the store's data began (set when
                                       missing); claim.lua claims nothing for
                                       ``CLAIM_GRACE`` after it, workers watch it
``P workers``                  zset    heartbeat.lua (node -> server time of its    never; members
                                       last beat), deregister.lua (score 0)         dropped by
                                                                                    forget_worker
``P worker:<node>``            hash    heartbeat.lua (``capacity``, ``queue``,      with the node
                                       ``heartbeat``, ``tags``, ``tag:<name>``,
                                       ``max_keys``); ``draining``, ``reaped``,
                                       ``reaped_at`` by the store's methods
``P tagsets``                  set     heartbeat.lua: every tag set ever            never
                                       registered
``P reaping:<node>``           string  try_lock_reaping: the reaper that moves a    PX, 120 s
                                       dead node's queue on
``P copy:<workflow>:<key>``    string  copy_switch.lua: the version name of the     never; deleted
                                       key's hand-over copy (fenced: only the       on import or
                                       live owner under its epoch switches it)      release
``P copyseq:<wf>:<key>``       string  copy_switch.lua, with the pointer, and       with the
                                       copy_append.lua, with each entry: the        pointer
                                       copy's record of applied producer numbers
                                       (JSON ``{stream: last}``)
``P copylog:<wf>:<key>``       list    copy_append.lua (``sync`` replication): the  with the
                                       commits since the copy's version, one        pointer; a
                                       signed entry each (the fields a commit       switch empties
                                       changed, pickled, with its applied record),  it
                                       whatever the hand-over store
``P copyhead:<wf>:<key>``      hash    copy_switch.lua, copy_append.lua: where the  with the log
                                       log stands: ``seq`` (the applied count the
                                       copy reaches), ``bytes`` (the log's),
                                       ``base_bytes`` (the version's)
``P ended:<workflow>:<key>``   string  release.lua, when a workflow ended: the       EX, sticky_
                                       key's record of applied producer numbers     finished_
                                       (JSON ``{stream: last}``), for its next owner dedup_ttl
``P copyv:<wf>:<key>@<e>.<r>`` list    RedisHandoffStore: one version of a copy,    1 day until
                                       signed pickle in chunks of 4 MiB             switched, then
                                                                                    with the pointer
=============================  ======  ===========================================  ============

Why buckets: a hash of at most ``hash-max-listpack-entries`` (128 by default) fields of
at most ``hash-max-listpack-value`` (64) bytes is one compact listpack, about 20 bytes
of overhead per field instead of ~100 for a key of its own. A million leases fill each
lease bucket with about 61 and a worker holding 100,000 keys each owned bucket with
about 24: about 80 bytes of Redis memory per lease in all, where a hash per lease and a
set member took about 250 (``benchmarks/scale.py``). Past about 1.5 million keys (or
400,000 on one worker) buckets outgrow the default and Redis converts them to its
ordinary encoding: still correct, with about twice the memory per lease; raise
``hash-max-listpack-entries`` (to 256 or 512) to keep them compact. A lease whose
affinity or key is long (a value over 64 bytes) converts its own bucket the same way.
Origins are ``c`` (claimed), ``t`` (taken_over), ``m`` (moved); ``since`` and
``moving_until`` are server times in seconds with 3 decimals; the affinity comes last,
so it may hold any character.
"""

from .copies import RedisHandoffStore
from .store import (
    CLAIM_GRACE,
    CLOCK_DRIFT,
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
    "CLAIM_GRACE",
    "CLOCK_DRIFT",
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
