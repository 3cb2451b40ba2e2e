"""Checks of the per-key invariants over recorded step events (shared by tests)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any


def by_key(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        grouped[event["key"]].append(event)
    for runs in grouped.values():
        runs.sort(key=lambda e: e["start"])
    return grouped


def violations(
    events: list[dict[str, Any]], expected_steps: dict[str, list[int]], *, one_node: bool = True
) -> list[str]:
    """Every broken invariant, as readable lines (empty when all hold).

    - stickiness: all of a key's steps ran on one node (unless ``one_node`` is
      False: the key was moved on purpose);
    - serial: no step of a key started before the previous one ended;
    - order: steps ran in publish order, each exactly once.
    """
    problems = []
    grouped = by_key(events)
    for key, steps in expected_steps.items():
        runs = grouped.get(key, [])
        nodes = {e["node"] for e in runs}
        if one_node and len(nodes) != 1:
            problems.append(f"{key}: ran on {sorted(nodes)}")
        for before, after in itertools.pairwise(runs):
            if after["start"] < before["end"]:
                problems.append(f"{key}: step {after['step']} overlapped step {before['step']}")
        ran = [e["step"] for e in runs]
        if ran != steps:
            problems.append(f"{key}: ran steps {ran}, expected {steps}")
    return problems
