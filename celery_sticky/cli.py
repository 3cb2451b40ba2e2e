"""``celery sticky``: see and move workflow keys from the command line.

Registered with Celery through the ``celery.commands`` entry point, so it runs as
``celery -A proj sticky <command>`` with the app Celery loaded (``ctx.obj.app``).
Every command prints plain columns (the same whether or not rich is installed), or
JSON with ``--json``. Exit codes: 0 ok, 1 not found (an unknown worker or key),
2 usage or configuration error, 3 the lease store or the broker does not answer,
4 timed out waiting for a worker.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click
import redis
from celery import Celery
from celery.bin.base import COMMA_SEPARATED_LIST
from celery.utils import text
from celery.utils.debug import humanbytes
from celery.utils.time import humanize_seconds
from kombu.exceptions import OperationalError

from .context import get_config, lease_store
from .errors import ConfigurationError, LeaseStoreUnavailable, MoveError
from .lease import LeaseStore, WorkerInfo, redact_url
from .placement import affinity_queues
from .producer import admin
from .producer.install import install
from .producer.queues import queued_keys
from .producer.rebalance import affinity_lookup, plan_rebalance
from .wire import inflight_key

# Imported with this plugin (Celery loads it at start): `celery inspect` and
# `celery control` then know sticky_key_info and sticky_drain too.
from .worker import control  # noqa: F401

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_TIMEOUT = 4

#: Lease (or owned) buckets read per call. Fixed, so a cursor that resumes inside a
#: batch sees the same batch again (see :func:`_scan_page`).
SCAN_COUNT = 256


class CommandError(click.ClickException):
    """A one-line error on stderr (``Error: ...``); exit code 1 unless a subclass says."""


class NotFound(CommandError):
    exit_code = EXIT_NOT_FOUND


class BadSetup(CommandError):
    exit_code = EXIT_USAGE


class Unavailable(CommandError):
    exit_code = EXIT_UNAVAILABLE


class TimedOut(CommandError):
    exit_code = EXIT_TIMEOUT


class StickyGroup(click.Group):
    """Turns the errors an operator can act on into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LeaseStoreUnavailable as exc:
            raise Unavailable(str(exc)) from None
        except ConfigurationError as exc:
            raise BadSetup(str(exc)) from None
        except OperationalError as exc:
            raise Unavailable(f"broker at {_broker_url(ctx)} does not answer: {exc}") from None
        except redis.RedisError as exc:
            raise Unavailable(f"lease store at {_lease_url(ctx)}: {exc}") from None


# -- context -------------------------------------------------------------------


def _app(ctx: click.Context) -> Celery:
    obj = ctx.find_root().obj
    app = getattr(obj, "app", None)
    if app is None:
        raise BadSetup("run this as `celery -A <your app> sticky ...`")
    return app


def _store(ctx: click.Context) -> LeaseStore:
    app = _app(ctx)
    try:
        return lease_store(app)
    except ValueError as exc:  # redis-py refusing the URL
        url = redact_url(get_config(app).redis_url)
        raise BadSetup(f"sticky_redis_url {url!r}: {exc}") from None


def _lease_url(ctx: click.Context) -> str:
    try:
        return redact_url(get_config(_app(ctx)).redis_url)
    except Exception:
        return "(unknown)"


def _broker_url(ctx: click.Context) -> str:
    try:
        return redact_url(_app(ctx).connection_for_write().as_uri())
    except Exception:
        return "(unknown)"


def _server_time(store: LeaseStore) -> float:
    return store.server_time()


@contextlib.contextmanager
def _broker(app: Celery) -> Iterator[Any]:
    """A broker connection that fails fast instead of retrying for minutes."""
    with app.connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=5)
        except Exception as exc:
            raise Unavailable(
                f"broker at {redact_url(connection.as_uri())} does not answer: {exc}"
            ) from None
        yield connection


def _ask(
    app: Celery, command: str, worker: str, timeout: float, **arguments: Any
) -> dict[str, Any] | None:
    """Send a remote control command to one worker; its reply, or None if it said nothing."""
    with _broker(app) as connection:
        replies = app.control.broadcast(
            command,
            arguments=arguments,
            destination=[worker],
            reply=True,
            timeout=timeout,
            connection=connection,
        )
    for reply in replies or ():
        if worker in reply:
            answer = reply[worker]
            return answer if isinstance(answer, dict) else {"ok": answer}
    return None


# -- output ----------------------------------------------------------------------

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _table(
    ctx: click.Context, columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str = ""
) -> None:
    """Plain columns, the same whatever is installed (stable for people and for grep)."""
    cells = [["" if cell is None else str(cell) for cell in row] for row in rows]
    if title:
        click.echo(title)
    widths = [len(column) for column in columns]
    for row in cells:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    for row in [list(columns), ["-" * width for width in widths], *cells]:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo(line.rstrip())


def _fields(ctx: click.Context, pairs: Sequence[tuple[str, Any]]) -> None:
    """A record, one ``name  value`` line each."""
    width = max(len(name) for name, _ in pairs)
    for name, value in pairs:
        click.echo(f"{name.ljust(width)}  {'' if value is None else value}".rstrip())


def _ago(seconds: float | None) -> str:
    """``3.20 seconds``, ``1.25 minutes`` (Celery's ``humanize_seconds``); ``-`` for None."""
    if seconds is None:
        return "-"
    return str(humanize_seconds(max(seconds, 0.0), microseconds=True))


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp).astimezone()
    return f"{moment.isoformat(timespec='seconds')} ({_ago(time.time() - timestamp)} ago)"


def _state_of(worker: WorkerInfo) -> str:
    """alive; draining (alive, handing its keys over); dead (waits for a reaper); reaped."""
    if worker.alive:
        return "draining" if worker.draining else "alive"
    return "reaped" if worker.reaped else "dead"


# -- the group -------------------------------------------------------------------


@click.group(cls=StickyGroup)
def sticky() -> None:
    """celery-sticky: workers, keys, draining, reaping.

    Exit codes: 0 ok, 1 not found (unknown worker or key), 2 usage or
    configuration error, 3 lease store or broker unreachable, 4 timed out waiting
    for a worker. Every command takes --json.
    """


# -- status ----------------------------------------------------------------------


def _queue_depths(
    app: Celery, queues: Sequence[str]
) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """Messages waiting in each queue (not those a worker prefetched), and on a Redis
    broker those in each queue's in-flight list; None: unknown."""
    depths: dict[str, int | None] = dict.fromkeys(queues)
    in_flight: dict[str, int | None] = dict.fromkeys(queues)
    if not queues:
        return depths, in_flight
    try:
        with _broker(app) as connection:
            channel = connection.channel()
            try:
                for queue in queues:
                    try:
                        depths[queue] = int(
                            channel.queue_declare(queue=queue, passive=True).message_count
                        )
                    except connection.channel_errors:
                        depths[queue] = 0  # never declared, or emptied and gone (Redis)
                        with contextlib.suppress(Exception):
                            channel.close()
                        channel = connection.channel()
                client = getattr(channel, "client", None)
                if client is not None and hasattr(channel, "_q_for_pri"):  # Redis
                    for queue in queues:
                        in_flight[queue] = int(client.llen(inflight_key(queue)))
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    except CommandError as exc:
        click.echo(f"warning: queue depths unknown: {exc.message}", err=True)
    return depths, in_flight


@sticky.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Workers: liveness, keys, queue depth, heartbeat.

    Every worker in the lease store's registry: alive, draining (alive, handing its
    keys over), dead (waiting for a reaper) or reaped; the keys it owns; the
    messages waiting in its direct queue (not those it prefetched); the age of its
    last heartbeat (Redis server clock). ``--json`` adds ``in_flight``: on a Redis
    broker, the messages it took from its direct queue and has not acknowledged
    (its in-flight list; a dead worker's go back to its queue when it is reaped).
    """
    store = _store(ctx)
    workers = store.workers()
    now = _server_time(store)
    depths, in_flight = _queue_depths(_app(ctx), [w.queue for w in workers if w.queue])
    rows: list[dict[str, Any]] = []
    for w in workers:
        age = now - w.heartbeat if w.heartbeat > 0 else None
        rows.append(
            {
                "worker": w.name,
                "state": _state_of(w),
                "alive": w.alive,
                "draining": w.draining,
                "reaped": w.reaped,
                "keys": w.keys,
                "capacity": w.capacity,
                "tags": w.tags,
                "queue": w.queue,
                "queue_depth": depths.get(w.queue),
                "in_flight": in_flight.get(w.queue),
                "heartbeat_age": None if age is None else round(age, 3),
            }
        )
    if as_json:
        _emit_json({"lease_store": redact_url(store.url), "workers": rows})
        return
    if not rows:
        click.echo(f"no workers registered in the lease store at {redact_url(store.url)}")
        return
    tagged = any(r["tags"] for r in rows)  # a tags column only where workers have tags
    columns = ["worker", "state", "keys", "capacity", *(["tags"] if tagged else [])]
    _table(
        ctx,
        [*columns, "queue", "depth", "heartbeat"],
        [
            [
                r["worker"],
                r["state"],
                r["keys"],
                r["capacity"],
                *([",".join(f"{k}={v}" for k, v in sorted(r["tags"].items()))] if tagged else []),
                r["queue"],
                "?" if r["queue_depth"] is None else r["queue_depth"],
                "stopped" if r["heartbeat_age"] is None else f"{_ago(r['heartbeat_age'])} ago",
            ]
            for r in rows
        ],
    )
    alive = sum(1 for w in workers if w.alive and not w.draining)
    click.echo(
        f"{alive} of {len(workers)} worker(s) alive; {sum(w.keys for w in workers)} key(s) owned"
    )


# -- keys ------------------------------------------------------------------------


def _glob_escape(text: str) -> str:
    return "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in text)


def _parse_cursor(cursor: str | None) -> tuple[int, str | None]:
    if not cursor:
        return 0, None
    number, _, after = cursor.partition(":")
    if not number.isdigit():
        raise click.BadParameter(
            f"{cursor!r} is not a cursor this command printed", param_hint="--cursor"
        )
    return int(number), after or None


def _scan_page(
    scan: Callable[[int], tuple[int, list[str]]], cursor: str | None, limit: int
) -> tuple[list[str], str | None]:
    """At most ``limit`` names from a SCAN-like call, and the cursor of the next page.

    Redis hands names out in batches; a page that ends inside a batch resumes at
    the same Redis cursor (same COUNT, so the same batch) after the last name it
    returned, in sorted order. The cursor is ``<redis cursor>[:<last name>]``.
    """
    position, after = _parse_cursor(cursor)
    found: list[str] = []
    while True:
        following, batch = scan(position)
        names = sorted({str(name) for name in batch})
        if after is not None:
            names = [name for name in names if name > after]
        room = limit - len(found)
        if len(names) > room:
            found += names[:room]
            return found, f"{position}:{found[-1]}"
        found += names
        after = None
        position = int(following)
        if position == 0:
            return found, None
        if len(found) == limit:
            return found, str(position)


@sticky.command()
@click.option("--worker", "-w", help="Only the keys this worker (nodename) owns.")
@click.option("--workflow", "-f", help="Only the keys of this workflow.")
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Keys per page.",
)
@click.option("--cursor", "-c", help="Resume where the previous page ended.")
@json_option
@click.pass_context
def keys(
    ctx: click.Context,
    worker: str | None,
    workflow: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """Leased keys, a page at a time.

    Pages come from the lease buckets a batch at a time (the worker's owned buckets
    with --worker), never KEYS: Redis is not blocked however many keys there are. Pass
    the cursor a page ends with to get the next one, with the same filters.
    """
    store = _store(ctx)
    match = f"{_glob_escape(workflow)}:*" if workflow else None
    if worker is not None:
        if not store.is_registered(worker):
            raise NotFound(f"unknown worker {worker!r}: not in the lease store's registry")

        def scan(position: int) -> tuple[int, list[str]]:
            return store.scan_owned(worker, position, match, SCAN_COUNT)

    else:

        def scan(position: int) -> tuple[int, list[str]]:
            return store.scan_leases(position, match, SCAN_COUNT)

    members, next_cursor = _scan_page(scan, cursor, limit)
    pairs = [tuple(member.split(":", 1)) for member in members]
    pairs = [pair for pair in pairs if len(pair) == 2]
    leases = store.lease_rows(pairs)
    alive = {w.name: w.alive and not w.draining for w in store.workers()}
    rows: list[dict[str, Any]] = []
    for (wf, key), (owner, epoch, origin) in sorted(zip(pairs, leases, strict=True)):
        if owner is None:
            continue  # released between the scan and the read
        rows.append(
            {
                "workflow": wf,
                "key": key,
                "owner": owner,
                "epoch": int(epoch or 0),
                "alive": alive.get(owner, False),
                "origin": origin or "claimed",
            }
        )
    if as_json:
        _emit_json({"keys": rows, "cursor": next_cursor})
        return
    _table(
        ctx,
        ["workflow", "key", "owner", "epoch", "owner state", "origin"],
        [
            [r["workflow"], r["key"], r["owner"], r["epoch"], _liveness(r["alive"]), r["origin"]]
            for r in rows
        ],
    )
    if next_cursor is not None:
        click.echo(f"{len(rows)} key(s); more with --cursor {shlex.quote(next_cursor)}")
    else:
        click.echo(f"{len(rows)} key(s); no more")


def _liveness(alive: bool) -> str:
    return "alive" if alive else "not alive"


# -- show ------------------------------------------------------------------------


@sticky.command()
@click.argument("workflow")
@click.argument("key")
@click.option(
    "--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait for the owner."
)
@json_option
@click.pass_context
def show(ctx: click.Context, workflow: str, key: str, timeout: float, as_json: bool) -> None:
    """One key: owner, epoch, and the owner's view.

    From the lease store: owner, epoch, whether the owner is alive, origin
    (claimed, or taken over from a dead owner). From the owner (remote control
    command sticky_key_info): the key's place in its gate, its last commit and last
    task, and the size of its local state.
    """
    store = _store(ctx)
    info = store.lookup(workflow, key)
    if info is None:
        raise NotFound(f"no lease for {workflow}:{key}: nobody owns it")
    since = store.lease_since(workflow, key)
    result: dict[str, Any] = {
        "workflow": workflow,
        "key": key,
        "owner": info.owner,
        "epoch": info.epoch,
        "alive": info.alive,
        "origin": info.origin,
        "since": since,
        "affinity": info.affinity or None,
        "moving_to": info.moving_to or None,
        "on_owner": None,
        "owner_error": None,
    }
    if info.alive:
        reply = _ask(_app(ctx), "sticky_key_info", info.owner, timeout, workflow=workflow, key=key)
        if reply is None:
            result["owner_error"] = (
                f"{info.owner} did not answer within {timeout:g}s "
                "(is worker_enable_remote_control off?)"
            )
        elif "error" in reply:
            result["owner_error"] = str(reply["error"])
        else:
            result["on_owner"] = {"gate": reply.get("gate"), "local": reply.get("local")}
    else:
        result["owner_error"] = f"{info.owner} is not alive"
    if as_json:
        _emit_json(result)
        return
    pairs: list[tuple[str, Any]] = [
        ("workflow", workflow),
        ("key", key),
        ("owner", f"{info.owner} ({_liveness(info.alive)})"),
        ("epoch", info.epoch),
        ("origin", info.origin),
        ("owned since", _when(result["since"])),
    ]
    if info.affinity:
        pairs.append(("affinity", info.affinity))
    if info.moving_to:
        pairs.append(("moving to", info.moving_to))
    on_owner = result["on_owner"]
    if on_owner is None:
        pairs.append(("on the owner", result["owner_error"]))
    else:
        gate = on_owner.get("gate") or {}
        queued = int(gate.get("queued") or 0)
        if gate.get("running"):
            pairs.append(("gate", f"a task running, {queued - 1} waiting"))
        else:
            pairs.append(("gate", f"{queued} waiting" if queued else "idle"))
        head = gate.get("head")
        if head:
            where = (
                "in the pool"
                if head.get("in_pool")
                else "started"
                if head.get("started")
                else "waiting"
            )
            pairs.append(
                (
                    "first in line",
                    f"task {head.get('task_id')} (number {head.get('seq')} of stream "
                    f"{head.get('stream')}), {where}, here {head.get('seconds_here')} s",
                )
            )
        local = on_owner.get("local")
        if local is None:
            pairs.append(("local state", "none on the owner"))
        else:
            pairs += [
                ("last commit", _when(local.get("last_commit"))),
                ("last task", local.get("last_task") or "-"),
                ("tasks applied", local.get("tasks_applied")),
                ("state", f"{local.get('fields')} field(s), {_size(local.get('bytes') or 0)}"),
                ("state epoch", local.get("epoch")),
            ]
    _fields(ctx, pairs)


def _size(count: int) -> str:
    """``2KB``, ``4.77MB`` (Celery's ``humanbytes``)."""
    return str(humanbytes(count))


# -- release ---------------------------------------------------------------------


@sticky.command()
@click.argument("workflow")
@click.argument("key")
@click.option("--wait", is_flag=True, help="Wait until the owner ended the workflow.")
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds --wait waits."
)
@json_option
@click.pass_context
def release(
    ctx: click.Context, workflow: str, key: str, wait: bool, timeout: float, as_json: bool
) -> None:
    """End a key's workflow: state deleted, lease freed.

    Sends celery-sticky's end_workflow task to the key's owner; it runs after the
    tasks already queued for the key, deletes the key's local state and releases
    its lease. Prints the task id.
    """

    app = _app(ctx)
    install(app)  # the end_workflow task and the router that sends it to the owner
    store = _store(ctx)
    info = store.lookup(workflow, key)
    if info is None:
        raise NotFound(f"no lease for {workflow}:{key}: nobody owns it")
    with _broker(app):  # fail fast when the broker is down
        pass
    sent = admin.release(workflow, key, app=app)
    if sent is None:
        raise NotFound(f"no lease for {workflow}:{key}: nobody owns it")
    result: dict[str, Any] = {
        "workflow": workflow,
        "key": key,
        "owner": info.owner,
        "epoch": info.epoch,
        "task_id": sent.id,
        "released": None,
    }
    if not as_json:
        click.echo(f"sent end_workflow for {workflow}:{key} to {info.owner}: task {sent.id}")
    if wait:
        _wait_released(store, sent, workflow, key, info.epoch, timeout)
        result["released"] = True
        if not as_json:
            click.echo(f"released {workflow}:{key}")
    if as_json:
        _emit_json(result)


def _wait_released(
    store: LeaseStore, sent: Any, workflow: str, key: str, epoch: int, timeout: float
) -> None:
    from celery.exceptions import TimeoutError as CeleryTimeout

    deadline = time.monotonic() + timeout
    try:
        sent.get(timeout=timeout, propagate=True, disable_sync_subtasks=False)
    except NotImplementedError:
        pass  # no result backend: watch the lease instead
    except CeleryTimeout:
        raise TimedOut(f"{workflow}:{key} was not released within {timeout:g}s") from None
    except Exception as exc:
        raise CommandError(f"end_workflow for {workflow}:{key} failed: {exc!r}") from None
    while True:
        info = store.lookup(workflow, key)
        if info is None or info.epoch != epoch:
            return
        if time.monotonic() > deadline:
            raise TimedOut(f"{workflow}:{key} was not released within {timeout:g}s")
        time.sleep(0.1)


# -- drain -----------------------------------------------------------------------


@sticky.command()
@click.argument("worker")
@click.option("--wait", is_flag=True, help="Wait until the worker has drained.")
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds --wait waits (the worker first finishes its running tasks).",
)
@json_option
@click.pass_context
def drain(ctx: click.Context, worker: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Drain a worker: its keys move on, then it stops.

    Sends the remote control command sticky_drain: the worker shuts down warm
    (finishes its running tasks), hands each key's state over, moves its queue to
    the keys' new owners and releases its leases.
    """
    store = _store(ctx)
    found = {w.name: w for w in store.workers()}.get(worker)
    if found is None:
        raise NotFound(f"unknown worker {worker!r}: not in the lease store's registry")
    if not found.alive:
        raise NotFound(
            f"worker {worker!r} is not alive ({_state_of(found)}): nothing to drain; "
            "`celery sticky reap` moves a dead worker's queue on"
        )
    reply = _ask(_app(ctx), "sticky_drain", worker, timeout=min(timeout, 5.0))
    if reply is None:
        raise TimedOut(
            f"{worker} did not answer the drain request (is worker_enable_remote_control off?)"
        )
    if "error" in reply:
        raise NotFound(f"{worker}: {reply['error']}")
    result: dict[str, Any] = {"worker": worker, "keys": found.keys, "drained": None}
    if not as_json:
        click.echo(f"{worker} is draining: {found.keys} key(s) to hand over")
    if wait:
        deadline = time.monotonic() + timeout
        while True:
            now = {w.name: w for w in store.workers()}.get(worker)
            if now is None or (now.reaped and not now.alive):
                break
            if time.monotonic() > deadline:
                raise TimedOut(f"{worker} did not finish draining within {timeout:g}s")
            time.sleep(0.2)
        result["drained"] = True
        if not as_json:
            click.echo(f"{worker} drained: its keys moved on, its queue is empty")
    if as_json:
        _emit_json(result)


# -- reap ------------------------------------------------------------------------


@sticky.command()
@json_option
@click.pass_context
def reap(ctx: click.Context, as_json: bool) -> None:
    """Move dead workers' queues on now.

    What every worker's reaper does once a worker's heartbeat is older than
    sticky_lease_ttl, done now from here: the dead worker's unacknowledged and
    queued tasks go, in publish order, to their keys' new owners. Keys with no
    queued task stay with the dead worker until their next task takes them over.
    """
    from .worker.reaper import reap as reap_worker  # the CLI reaps as a worker would

    app = _app(ctx)
    store = _store(ctx)
    reaper = f"cli:{socket.gethostname()}:{os.getpid()}"
    before = {w.name: w for w in store.workers()}
    results = []
    with _broker(app):  # fail fast when the broker is down
        pass
    # What Reaper.run_once does, one worker at a time, to say what moved where.
    for node in store.dead_workers():
        row: dict[str, Any] = {
            "worker": node,
            "moved": 0,
            "keys_before": before[node].keys if node in before else 0,
            "keys_after": 0,
            "already_reaped": node in before and before[node].reaped,
            "skipped": None,
            "forgotten": False,
        }
        if not store.try_lock_reaping(node, reaper, 120):
            row["skipped"] = "another reaper holds it"
        else:
            try:
                row["moved"] = reap_worker(app, store, node)
            finally:
                store.unlock_reaping(node)
            after = {w.name: w for w in store.workers()}.get(node)
            row["forgotten"] = after is None
            row["keys_after"] = 0 if after is None else after.keys
        results.append(row)
    if as_json:
        _emit_json({"reaped": results, "moved": sum(r["moved"] for r in results)})
        return
    if not results:
        click.echo("no dead workers")
        return
    _table(
        ctx,
        ["worker", "tasks moved", "keys before", "keys after", "note"],
        [
            [
                r["worker"],
                r["moved"],
                r["keys_before"],
                r["keys_after"],
                r["skipped"] or _reap_note(r),
            ]
            for r in results
        ],
    )
    click.echo(f"moved {sum(r['moved'] for r in results)} task(s)")


# -- dead letters ----------------------------------------------------------------


@sticky.command()
@click.option("--requeue", is_flag=True, help="Send them back through their task's normal routing.")
@click.option("--limit", default=1000, show_default=True, help="Most messages to look at.")
@json_option
@click.pass_context
def dead(ctx: click.Context, requeue: bool, limit: int, as_json: bool) -> None:
    """List the dead-letter queue (<sticky_queue_prefix>.dead), or requeue it.

    Messages land there when a worker, reaper or drain cannot handle them: a
    malformed sticky header, or arguments that cannot be decoded to find the key.
    --requeue drops the sticky header and routes each one again from its task's
    arguments; messages that still cannot be routed stay.
    """
    from .worker.deadletter import list_dead, requeue_dead

    app = _app(ctx)
    with _broker(app):  # fail fast when the broker is down
        pass
    if requeue:
        sent, kept = requeue_dead(app, limit)
        if as_json:
            _emit_json(
                {
                    "requeued": [d.as_dict() for d in sent],
                    "kept": [d.as_dict() for d in kept],
                }
            )
            return
        click.echo(f"requeued {len(sent)} message(s); {len(kept)} cannot be routed and stay")
        return
    letters = list_dead(app, limit)
    if as_json:
        _emit_json({"dead": [d.as_dict() for d in letters]})
        return
    if not letters:
        click.echo("no dead letters")
        return
    _table(
        ctx,
        ["task", "id", "from", "reason"],
        [[d.task, d.task_id, d.source, d.reason] for d in letters],
    )
    click.echo(f"{len(letters)} dead letter(s)")


# -- move and rebalance ----------------------------------------------------------


@sticky.command()
@click.argument("workflow")
@click.argument("key")
@click.argument("worker")
@click.option("--wait", is_flag=True, help="Wait until the key belongs to WORKER.")
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds --wait waits."
)
@json_option
@click.pass_context
def move(
    ctx: click.Context,
    workflow: str,
    key: str,
    worker: str,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Move a key, with its state, to WORKER.

    New tasks of the key go to WORKER at once and wait there; the owner runs the
    tasks it already has, then hands the state over. A busy key is moved too,
    after its queued tasks (rebalance moves only idle ones).
    """

    app = _app(ctx)
    install(app)
    store = _store(ctx)
    info = store.lookup(workflow, key)
    if info is None:
        raise NotFound(f"no lease for {workflow}:{key}: nobody owns it")
    if worker not in {w.name for w in store.workers()}:
        raise NotFound(f"unknown worker {worker!r}: not in the lease store's registry")
    with _broker(app):  # fail fast when the broker is down
        pass
    try:
        sent = admin.move_key(workflow, key, worker, app=app, owner=info.owner)
    except MoveError as exc:
        raise CommandError(str(exc)) from None
    result: dict[str, Any] = {
        "workflow": workflow,
        "key": key,
        "from": info.owner,
        "to": worker,
        "task_id": sent.id,
        "moved": None,
    }
    if not as_json:
        click.echo(f"moving {workflow}:{key} from {info.owner} to {worker}: task {sent.id}")
    if wait:
        result["moved"] = _wait_moved(store, [(workflow, key, worker)], timeout)[0]
        if not as_json:
            click.echo(f"{workflow}:{key} now belongs to {worker}")
    if as_json:
        _emit_json(result)


@sticky.command()
@click.option(
    "--max-moves",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Most keys moved in this run.",
)
@click.option("--dry-run", is_flag=True, help="Print the moves without making them.")
@click.option("--wait", is_flag=True, help="Wait until every move is done.")
@click.option(
    "--timeout", type=float, default=120.0, show_default=True, help="Seconds --wait waits."
)
@json_option
@click.pass_context
def rebalance(
    ctx: click.Context, max_moves: int, dry_run: bool, wait: bool, timeout: float, as_json: bool
) -> None:
    """Move idle keys from the most to the least loaded workers.

    Load is owned keys per unit of capacity. Only idle keys move (no task queued,
    running or scheduled on their owner, none waiting in its direct queue), each
    with its state, and only while a move narrows the gap between two workers.
    A key's affinity is kept: it only moves to a worker carrying its tags.
    """

    app = _app(ctx)
    install(app)
    store = _store(ctx)
    workers = [w for w in store.workers() if w.alive and not w.draining]
    owned = {w.name: store.owned_keys(w.name) for w in workers}
    busy: dict[str, set[tuple[str, str]] | None] = {}
    with _broker(app):  # fail fast when the broker is down
        pass
    for w in workers:
        reply = _ask(app, "sticky_busy_keys", w.name, timeout=5.0)
        queued = queued_keys(app, w.queue)
        if reply is None or "error" in reply or queued is None:
            busy[w.name] = None  # cannot tell: none of its keys moves
            continue
        busy[w.name] = {(str(k[0]), str(k[1])) for k in reply["keys"]} | queued
    moves = plan_rebalance(workers, owned, busy, affinity_lookup(store), max_moves)
    rows: list[dict[str, Any]] = []
    for m in moves:
        row: dict[str, Any] = {"workflow": m.workflow, "key": m.key, "from": m.source}
        row.update({"to": m.target, "task_id": None, "error": None})
        if not dry_run:
            try:
                moving = admin.move_key(m.workflow, m.key, m.target, app=app, owner=m.source)
                row["task_id"] = moving.id
            except MoveError as exc:
                row["error"] = str(exc)
        rows.append(row)
    unknown = sorted(name for name, keys in busy.items() if keys is None)
    if wait and not dry_run:
        started = [(r["workflow"], r["key"], r["to"]) for r in rows if r["task_id"]]
        _wait_moved(store, started, timeout)
    if as_json:
        _emit_json({"dry_run": dry_run, "moves": rows, "skipped_workers": unknown})
        return
    for name in unknown:
        click.echo(f"{name}: could not tell which of its keys are idle; none of them moves")
    if not rows:
        click.echo("balanced: no move narrows the gap between two workers")
        return
    _table(
        ctx,
        ["workflow", "key", "from", "to", "note"],
        [
            [
                r["workflow"],
                r["key"],
                r["from"],
                r["to"],
                r["error"] or ("planned" if dry_run else "moving"),
            ]
            for r in rows
        ],
    )
    verb = "would move" if dry_run else "moving"
    click.echo(f"{verb} {sum(1 for r in rows if not r['error'])} key(s)")


def _wait_moved(store: LeaseStore, moves: list[tuple[str, str, str]], timeout: float) -> list[bool]:
    deadline = time.monotonic() + timeout
    pending = set(moves)
    while pending:
        for workflow, key, target in list(pending):
            info = store.lookup(workflow, key)
            if info is not None and info.owner == target:
                pending.discard((workflow, key, target))
            elif info is None or not info.moving_to:
                raise CommandError(f"the move of {workflow}:{key} to {target} was called off")
        if pending and time.monotonic() > deadline:
            raise TimedOut(f"{len(pending)} move(s) not done within {timeout:g}s")
        if pending:
            time.sleep(0.1)
    return [True] * len(moves)


def _reap_note(row: dict[str, Any]) -> str:
    if row["forgotten"]:
        return "forgotten (long dead: registry entry and queue deleted)"
    if row["already_reaped"]:
        return "already reaped (stragglers moved)" if row["moved"] else "already reaped"
    return "reaped"


# -- purge -----------------------------------------------------------------------


def sticky_queues(app: Celery, store: LeaseStore) -> list[str]:
    """The direct queue of every registered worker and every affinity queue a tag set
    ever registered serves: the queues ``celery purge`` does not know."""
    prefix = get_config(app).queue_prefix
    workers = store.workers()
    names = {w.queue for w in workers if w.queue}
    for tags in [*(w.tags for w in workers), *store.tagsets()]:
        names.update(affinity_queues(prefix, tags))
    return sorted(names)


@sticky.command()
@click.option("-f", "--force", is_flag=True, help="Don't prompt for verification.")
@click.option(
    "-Q",
    "--queues",
    type=COMMA_SEPARATED_LIST,
    help="Comma separated list of queue names to purge (of the sticky queues).",
)
@click.option(
    "-X",
    "--exclude-queues",
    type=COMMA_SEPARATED_LIST,
    help="Comma separated list of queue names not to purge.",
)
@json_option
@click.pass_context
def purge(
    ctx: click.Context,
    force: bool,
    queues: list[str] | None,
    exclude_queues: list[str] | None,
    as_json: bool,
) -> None:
    """Erase the messages waiting in the sticky queues.

    `celery purge` erases the app's known queues, which are not the direct queues
    (`<sticky_queue_prefix>.<nodename>`) nor the affinity queues: this erases those,
    for every worker in the lease store's registry (alive or not) and every tag set
    ever registered. Same flags as `celery purge`; -Q names queues of that set (an
    unknown name is an error). Messages a worker already prefetched are not waiting
    and stay. There is no undo.
    """
    app = _app(ctx)
    store = _store(ctx)
    known = sticky_queues(app, store)
    if queues:
        unknown = sorted(set(queues) - set(known))
        if unknown:
            raise NotFound(
                f"not a sticky queue: {', '.join(unknown)} (`celery purge -Q` erases others)"
            )
    names = sorted(set(queues or known) - set(exclude_queues or ()))
    if not names:
        if as_json:
            _emit_json({"queues": {}, "purged": 0})
        else:
            click.echo("no sticky queues to purge")
        return
    headline = text.pluralize(len(names), "queue")
    if not force:
        click.confirm(
            f"WARNING: This will remove all tasks from {headline}: {', '.join(names)}.\n"
            "         There is no undo for this operation!\n\n"
            "(to skip this prompt use the -f option)\n"
            "Are you sure you want to delete all tasks?",
            abort=True,
        )
    purged: dict[str, int] = {}
    with _broker(app) as connection:
        channel = connection.channel()
        try:
            for name in names:
                try:
                    purged[name] = int(channel.queue_purge(name) or 0)
                except connection.channel_errors:
                    purged[name] = 0  # never declared: RabbitMQ answers 404, closing the channel
                    with contextlib.suppress(Exception):
                        channel.close()
                    channel = connection.channel()
        finally:
            with contextlib.suppress(Exception):
                channel.close()
    total = sum(purged.values())
    if as_json:
        _emit_json({"queues": purged, "purged": total})
    elif total:
        click.echo(
            f"Purged {total} {text.pluralize(total, 'message')} from "
            f"{len(names)} sticky {headline}."
        )
    else:
        click.echo(f"No messages purged from {len(names)} sticky {headline}.")


# -- celery worker options --------------------------------------------------------


def add_worker_options() -> None:
    """``celery worker --sticky-tag NAME=VALUE --sticky-capacity N --sticky-metrics-port P``.

    Celery imports this module (the ``celery.commands`` entry point) before it
    parses a command line, while the app's own ``user_options`` are read before
    the app has bound its sticky tasks; so the options are added to Celery's
    worker command here. The worker passes them to every step: ``StickyWorker``
    takes the tag and capacity, ``MetricsStep`` the port.
    """
    from celery.bin.worker import worker

    if any(param.name == "sticky_tag" for param in worker.params):
        return
    worker.params.extend(
        [
            click.Option(
                ["--sticky-tag"],
                multiple=True,
                metavar="NAME=VALUE",
                help="A tag this worker advertises to sticky placement (repeatable); "
                "adds to sticky_worker_tags.",
            ),
            click.Option(
                ["--sticky-metrics-port"],
                type=click.IntRange(min=1, max=65535),
                default=None,
                help="Serve this worker's Prometheus metrics on this port "
                "(sticky_metrics_port; needs the prometheus extra).",
            ),
            click.Option(
                ["--sticky-capacity"],
                type=click.IntRange(min=1),
                default=None,
                help="Capacity this worker advertises to sticky placement "
                "(sticky_worker_capacity).",
            ),
        ]
    )


add_worker_options()

__all__ = ["sticky"]
