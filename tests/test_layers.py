"""The package's shape: layers whose imports point one way, and a producer that stays light.

Layers, lowest first: the pure modules (no I/O); ``lease/`` (Redis) and ``local/``
(diskcache), which never import each other; ``handoff`` and ``context``; the
producer side; the worker side; the CLI and the test helpers on top. An import
may only point to the same or a lower layer, counting imports made inside
functions, and the package has no import cycle.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "celery_sticky"

PURE = {
    "errors",
    "settings",
    "keys",
    "placement",
    "wire",
    "sequence",
    "faults",
    "metrics",
    "events",
    "urls",
}


def _layer(module: str) -> tuple[int, str]:
    """``(rank, layer name)`` of a module of the package (``celery_sticky.x.y``)."""
    parts = module.split(".")[1:]
    head = parts[0] if parts else ""
    if head in PURE:
        return 0, "pure"
    if head in ("lease", "local"):
        return 1, head
    if head in ("handoff", "context"):
        return 2, head
    if head == "producer":
        return 3, "producer"
    if head == "":
        return 4, "package"  # __init__: the public API, re-exported from the layers
    if head == "worker":
        return 5, "worker"
    if head in ("cli", "testing"):
        return 6, head
    raise AssertionError(f"module {module} belongs to no layer: add it to tests/test_layers.py")


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(package edges, external modules)`` per module, every ``import`` statement counted
    (inside functions too, and under ``TYPE_CHECKING``, which costs nothing at run time
    but still shows where a module's knowledge reaches)."""
    modules = _modules()
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        base = name.split(".") if is_package else name.split(".")[:-1]
        inside: set[str] = set()
        outside: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - (node.level - 1)]
                    target = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target in modules:
                    if target != name:
                        inside.add(target)
                else:
                    outside.add(target)
        edges[name] = inside
        external[name] = outside
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle() -> None:
    edges, _ = import_graph()
    assert cycles(edges) == []


def test_the_cycle_check_can_fail() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_to_the_same_or_a_lower_layer() -> None:
    edges, _ = import_graph()
    wrong = []
    for module, targets in sorted(edges.items()):
        rank, layer = _layer(module)
        for target in sorted(targets):
            target_rank, target_layer = _layer(target)
            sideways = rank == target_rank == 1 and layer != target_layer  # lease <-> local
            if target_rank > rank or sideways:
                wrong.append(f"{module} ({layer}) imports {target} ({target_layer})")
    assert wrong == []


def test_lease_and_local_keep_to_their_store() -> None:
    _, external = import_graph()
    banned = {
        "lease": ("celery.app", "celery.worker", "kombu", "diskcache"),
        "local": ("redis", "celery.app", "celery.worker", "kombu"),
    }
    wrong = [
        f"{module} imports {target}"
        for module, targets in sorted(external.items())
        for target in sorted(targets)
        if _layer(module)[1] in banned
        and any(target == b or target.startswith(f"{b}.") for b in banned[_layer(module)[1]])
    ]
    assert wrong == []


_PROBE = """
import json, os, sys
from celery import Celery

app = Celery("probe", broker=os.environ["URL"], set_as_current=False)
app.conf.update(task_default_queue=os.environ["PREFIX"] + ".default",
                sticky_key_prefix=os.environ["PREFIX"], sticky_queue_prefix=os.environ["PREFIX"])
if os.environ["KIND"] == "sticky":
    from celery_sticky import sticky_task

    @sticky_task(key="order_id", app=app)
    def step(order_id, *, state):
        return None
else:
    @app.task(shared=False)
    def step(order_id):
        return None

app.finalize()
step.delay("o-1")
roots = ("celery", "celery_sticky")
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in roots)))
"""


def _loaded_after_publishing(kind: str, url: str, prefix: str) -> set[str]:
    env = {**os.environ, "URL": url, "PREFIX": prefix, "KIND": kind}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PROBE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_publishing_loads_nothing_of_the_worker(prefix: str) -> None:
    """A producer imports no module of ``celery_sticky.worker`` and no Celery module
    that publishing a plain task does not load too (measured here, in the same run)."""
    url = os.environ["STICKY_TEST_REDIS_URL"]
    run = f"{prefix}layers{uuid.uuid4().hex[:6]}"  # cleaned up with the session's keys
    plain = _loaded_after_publishing("plain", url, run)
    sticky = _loaded_after_publishing("sticky", url, run)
    assert sorted(m for m in sticky if m.startswith("celery_sticky.worker")) == []
    extra_celery = sorted(m for m in sticky - plain if m.split(".")[0] == "celery")
    assert extra_celery == []


@pytest.mark.parametrize("kind", ["plain", "sticky"])
def test_the_probe_publishes(kind: str, prefix: str) -> None:
    """The probe above really publishes (a broken probe would load nothing and pass)."""
    run = f"{prefix}layers{uuid.uuid4().hex[:6]}"
    loaded = _loaded_after_publishing(kind, os.environ["STICKY_TEST_REDIS_URL"], run)
    assert "celery.app.amqp" in loaded
    assert ("celery_sticky.producer.router" in loaded) == (kind == "sticky")
