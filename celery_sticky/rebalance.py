"""Moving keys on purpose: one key (``celery sticky move``), or idle keys from the
most to the least loaded workers (``celery sticky rebalance``).

Stickiness means a new worker only gets new keys; these move old ones, each with
its state, without breaking the order of its tasks:

1. :func:`move_key` marks the lease *moving* (``move_begin.lua``): from then on
   publishers send the key's new tasks to the target, whose gate holds them.
2. It sends celery-sticky's ``move_key`` task to the owner's queue with a
   countdown of ``sticky_lease_cache_ttl`` (so tasks routed under a lease a
   producer cached before step 1 arrive before it). Due, it joins the back of
   the key's line on the owner: it runs after every task sent there.
3. It runs (:func:`run_move`): exports the key's state to the hand-over store
   and makes the target the owner under a new epoch (``move_commit.lua``). The
   target's held tasks then run there, the first one importing the state.

If the owner dies before step 3, the key fails over as usual (the move is off);
if the target dies, or the move misses its deadline (its task lost or failed),
the move is off and the owner keeps the key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery

from .errors import MoveError
from .events import ownership_changed
from .lease import ClaimStatus, LeaseStore, WorkerInfo
from .message import HEADER
from .placement import decode_tags, matches
from .settings import get_config

logger = logging.getLogger(__name__)

MOVE_KEY = "celery_sticky.move_key"

_BEGIN_ERRORS = {
    0: "nobody holds {workflow}:{key}",
    -1: "the owner of {workflow}:{key}, {owner}, is not alive (it fails over by itself)",
    -2: "worker {target!r} is not alive, or is draining",
    -3: "worker {target!r} lacks a tag the key's affinity {affinity} requires",
    -4: "{workflow}:{key} is already being moved",
    -5: "{target} owns {workflow}:{key} already",
}


def move_key(
    workflow: str,
    key: str,
    target: str,
    *,
    app: Celery | None = None,
    owner: str = "",
    timeout: float = 60.0,
) -> Any:
    """Start moving ``workflow:key`` and its state to worker ``target`` (see the module doc).

    Returns the ``AsyncResult`` of the move task sent to the key's owner; raises
    :class:`MoveError` when the key cannot be moved now, saying why. ``owner``:
    move only if the key still belongs to that worker. A move whose task has not
    committed ``timeout`` seconds after it became due (the task was lost or
    failed, or the tasks queued before it ran longer) is called off: the key
    stays with its owner, and the tasks held for it on the target go there.
    """
    from celery import current_app

    from .app import lease_store, router_of

    app = app or current_app
    config = get_config(app)
    if config.state_replication == "off":
        raise MoveError(
            "sticky_state_replication='off': a moved key would start empty on its new worker"
        )
    store = lease_store(app)
    countdown = config.lease_cache_ttl + 0.25
    status, current, epoch = store.begin_move(
        workflow, key, target, owner, deadline=countdown + timeout
    )
    if status != 1:
        info = store.lookup(workflow, key)
        affinity = info.affinity if info is not None else ""
        raise MoveError(
            _BEGIN_ERRORS[status].format(
                workflow=workflow, key=key, owner=current, target=target, affinity=affinity
            )
        )
    router = router_of(app)
    if router is not None:
        router.forget(workflow, key)  # this process's next publish goes to the target
    return app.tasks[MOVE_KEY].apply_async(
        kwargs={"workflow": workflow, "key": key, "target": target, "epoch": epoch},
        queue=config.direct_queue_name(current),
        countdown=countdown,
    )


def run_move(app: Celery, workflow: str, key: str, target: str, epoch: int, node: str) -> str:
    """The move task's body on the owner, after every task queued before it.

    Returns ``"moved"``, ``"called_off"`` (the target went away: the key stays)
    or ``"stale"`` (the lease changed meanwhile: nothing to do).
    """
    from .app import lease_store, router_of
    from .handoff import handoff_store
    from .local_state import open_node_state

    config = get_config(app)
    leases = lease_store(app)
    info = leases.lookup(workflow, key)
    if info is None or (info.owner, info.epoch, info.moving_to) != (node, epoch, target):
        return "stale"
    state = open_node_state(config, node)
    copies = handoff_store(config, leases)
    data = state.export_key(workflow, key)
    if data is not None:
        copies.put(workflow, key, data)
    lease = leases.commit_move(workflow, key, node, epoch, target)
    if lease.status is not ClaimStatus.CLAIMED:
        if data is not None and config.state_replication != "sync":
            copies.delete(workflow, key)
        logger.warning(
            "sticky: move of %s:%s to %s called off: %s gone", workflow, key, target, target
        )
        return "called_off"
    state.delete_key(workflow, key)
    router = router_of(app)
    if router is not None:
        router.forget(workflow, key)
    ownership_changed("moved", workflow, key, lease.epoch, target, previous=node)
    return "moved"


# -- rebalance -------------------------------------------------------------------


@dataclass(frozen=True)
class Move:
    workflow: str
    key: str
    source: str
    target: str


def plan_rebalance(
    workers: Iterable[WorkerInfo],
    owned: Mapping[str, Iterable[tuple[str, str]]],
    busy: Mapping[str, set[tuple[str, str]] | None],
    affinity_of: Any,
    max_moves: int,
) -> list[Move]:
    """Moves of idle keys from the most to the least loaded workers.

    ``owned`` maps each worker to its keys, ``busy`` to the keys it has tasks of
    (None: it could not tell, so none of its keys moves), ``affinity_of(workflow,
    key)`` gives a key's affinity. A move is planned only if it narrows the gap:
    the source stays at least as loaded as the target after it.
    """
    live = [w for w in workers if w.alive and not w.draining]
    keys = {w.name: w.keys for w in live}
    capacity = {w.name: max(w.capacity, 1) for w in live}
    tags = {w.name: w.tags for w in live}
    movable = {
        w.name: sorted(set(owned.get(w.name, ())) - (busy.get(w.name) or set()))
        if busy.get(w.name) is not None
        else []
        for w in live
    }
    moves: list[Move] = []
    exhausted: set[str] = set()
    while len(moves) < max_moves:
        sources = sorted(
            (n for n in keys if n not in exhausted and movable[n]),
            key=lambda n: (-keys[n] / capacity[n], n),
        )
        if not sources:
            break
        source = sources[0]
        targets = sorted((n for n in keys if n != source), key=lambda n: (keys[n] / capacity[n], n))
        chosen: tuple[tuple[str, str], str] | None = None
        for target in targets:
            if (keys[source] - 1) / capacity[source] < (keys[target] + 1) / capacity[target]:
                break  # no move from source narrows the gap any more
            for item in movable[source]:
                if matches(decode_tags(affinity_of(*item)), tags[target]):
                    chosen = (item, target)
                    break
            if chosen:
                break
        if chosen is None:
            exhausted.add(source)
            continue
        (workflow, key), target = chosen
        movable[source].remove((workflow, key))
        keys[source] -= 1
        keys[target] += 1
        moves.append(Move(workflow, key, source, target))
    return moves


def queued_keys(app: Celery, queue: str, limit: int = 10_000) -> set[tuple[str, str]] | None:
    """Keys with tasks waiting in a direct queue on a Redis broker (not prefetched).

    None when it cannot tell: the broker is not Redis and the queue is not
    empty, or the queue holds more than ``limit`` messages.
    """
    from .reaper import queue_size

    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = getattr(channel, "client", None)
        if client is None or not hasattr(channel, "_q_for_pri"):
            return set() if queue_size(app, queue) == 0 else None
        found: set[tuple[str, str]] = set()
        for priority in channel.priority_steps:
            name = channel._q_for_pri(queue, priority)
            if client.llen(name) > limit:
                return None
            for raw in client.lrange(name, 0, limit):
                try:
                    header = json.loads(raw)["headers"][HEADER]
                    found.add((str(header[0]), str(header[1])))
                except (ValueError, KeyError, TypeError, IndexError):
                    continue
        return found


def affinity_lookup(store: LeaseStore) -> Any:
    def affinity_of(workflow: str, key: str) -> str:
        info = store.lookup(workflow, key)
        return info.affinity if info is not None else ""

    return affinity_of
