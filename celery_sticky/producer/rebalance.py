"""Planning ``celery sticky rebalance``: idle keys from the most to the least loaded workers.

Stickiness means a new worker only gets new keys; a rebalance moves old ones
(each with :func:`~celery_sticky.producer.admin.move_key`, so with its state and
in order). Planning is pure: it takes the registry, each worker's keys and the
keys it is busy with, and returns the moves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..lease import LeaseStore, WorkerInfo
from ..placement import decode_tags, matches


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


def affinity_lookup(store: LeaseStore) -> Any:
    def affinity_of(workflow: str, key: str) -> str:
        info = store.lookup(workflow, key)
        return info.affinity if info is not None else ""

    return affinity_of
