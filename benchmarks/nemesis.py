"""The invariants under combined faults: a long seeded nemesis run on real workers.

Starts ``--workers`` prefork workers (``benchmarks/nemesis_app.py``) with a lease store
of their own (a ``redis-server`` the harness restarts) and their broker behind a TCP
proxy, streams steps of ``--keys`` keys from ``--producers`` producers for
``--minutes`` minutes under the fault schedule drawn from ``--seed`` (``kill -9`` of a
worker's process group and a restart within or after the TTL, SIGSTOP of the group
past the TTL, SIGTERM and restart, lease-store restarts empty and with data, broker
cuts and blackholes, overlapping), heals everything, and checks every key with
``celery_sticky.testing.checker``. Prints a table: faults applied by kind, keys,
steps, body runs, each violation count, and the first offending key's history.

    python benchmarks/nemesis.py --minutes 10 --seed 1 [--workers 4] [--keys 40]
        [--producers 2] [--ttl 3] [--broker amqp://guest:guest@127.0.0.1:5672//]

``BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/9``) holds the records and the
results and is the broker unless ``--broker`` says otherwise. The exit status is 1
only when the benchmark itself fails; violations are reported in the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import against_redis, log, positive

from celery_sticky.testing import FAULT_KINDS, Nemesis, NemesisConfig, NemesisResult, Probe
from celery_sticky.testing.checker import VIOLATIONS, Report

DEFAULT_URL = "redis://127.0.0.1:6379/9"
HERE = Path(__file__).resolve().parent


def table(result: NemesisResult, elapsed: float) -> str:
    report = result.report
    rows: list[tuple[str, str]] = [("seed", str(result.config.seed))]
    rows.append(("minutes under faults", f"{result.config.duration / 60:g}"))
    rows.append(("wall time (s)", f"{elapsed:.0f}"))
    rows.append(("workers x concurrency", f"{result.config.workers} x {result.config.concurrency}"))
    for kind in FAULT_KINDS:
        rows.append((f"fault: {kind}", str(result.faults.get(kind, 0))))
    rows.append(("faults in all", str(sum(result.faults.values()))))
    rows.append(("workers that exited by themselves", str(sum(result.crashes.values()))))
    rows.append(("keys", str(report.keys)))
    rows.append(("steps published", str(report.published)))
    rows.append(("body runs", str(report.runs)))
    rows.append(("bodies run again (not a violation)", str(report.counts["reruns"])))
    rows.append(("overlaps undecided (not a violation)", str(report.counts["undecided"])))
    rows.append(("every published step ran", "yes" if result.settled else "no"))
    for name in VIOLATIONS:
        rows.append((f"violation: {name}", str(report.counts[name])))
    rows.append(("keys with a violation", f"{len(report.bad_keys)} of {report.keys}"))
    width = max(len(label) for label, _ in rows)
    lines = [f"| {'':<{width}} | value |", f"| {'-' * width} | ----- |"]
    lines += [f"| {label:<{width}} | {value} |" for label, value in rows]
    return "\n".join(lines)


def bench(url: str, args: argparse.Namespace) -> None:
    broker = args.broker or url
    prefix = f"bench-nemesis-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="sticky-nemesis-"))
    config = NemesisConfig(
        seed=args.seed,
        duration=args.minutes * 60,
        keys=args.keys,
        producers=args.producers,
        workers=args.workers,
        concurrency=args.concurrency,
        ttl=args.ttl,
        publish_interval=args.publish_interval,
        fault_interval=(args.fault_min, args.fault_max),
        settle_timeout=args.settle,
        faults=tuple(args.faults),
    )
    failed = True
    try:
        with Nemesis(config, broker_url=broker, records_url=url) as nemesis:
            sys.path.insert(0, str(HERE))
            os.environ.update(nemesis_env(prefix, url, broker, nemesis.lease_url, workdir, args))
            import nemesis_app

            app = nemesis_app.app
            app.finalize()
            probe = Probe.named()
            log(f"nemesis: seed {args.seed}, {args.minutes:g} min, logs in {workdir}")
            started = time.monotonic()
            result = nemesis.run(
                app,
                "nemesis_app:app",
                workdir / "logs",
                publish=probe.publish(app),
                read=probe.read(app),
                env=nemesis_env(prefix, url, broker, nemesis.lease_url, workdir, args),
                cwd=str(HERE),
                worker_options={"queues": [f"{prefix}.default"]},
            )
            elapsed = time.monotonic() - started
        print(table(result, elapsed))
        print()
        print(result.describe())
        if args.keep_logs:
            keep_histories(result.report, workdir)
        failed = False
    finally:
        if failed or args.keep_logs:
            log(f"worker logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def keep_histories(report: Report, workdir: Path) -> None:
    """Each offending key's whole history (the report prints the first lines of the
    first key only): its final state, then every body run with its task id, node and
    epoch, to follow through the worker logs."""
    for found in [*report.bad_keys, *report.undecided_keys]:
        path = workdir / f"history-{found.key}.txt"
        path.write_text("\n".join([*found.problems, *found.history]) + "\n")
        log(f"history of {found.key} in {path}")


def nemesis_env(
    prefix: str, url: str, broker: str, lease_url: str, workdir: Path, args: argparse.Namespace
) -> dict[str, str]:
    return {
        "NEMESIS_PREFIX": prefix,
        "NEMESIS_REDIS_URL": url,
        "NEMESIS_BROKER_URL": broker,
        "NEMESIS_LEASE_URL": lease_url,
        "NEMESIS_STATE_DIR": str(workdir / "state"),
        "NEMESIS_LEASE_TTL": str(args.ttl),
        "NEMESIS_REPLICATION": args.replication,
        "NEMESIS_GAP_TIMEOUT": str(args.gap_timeout),
    }


def fault_kinds(value: str) -> list[str]:
    kinds = [part.strip() for part in value.split(",") if part.strip()]
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {unknown}; known: {FAULT_KINDS}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=positive(float), default=10.0, help="time under faults")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    parser.add_argument("--workers", type=positive(int), default=4)
    parser.add_argument("--concurrency", type=positive(int), default=2)
    parser.add_argument("--keys", type=positive(int), default=40)
    parser.add_argument("--producers", type=positive(int), default=2)
    parser.add_argument("--ttl", type=positive(float), default=3.0, help="sticky_lease_ttl")
    parser.add_argument("--publish-interval", type=positive(float), default=0.05)
    parser.add_argument("--fault-min", type=positive(float), default=1.0, help="s between faults")
    parser.add_argument("--fault-max", type=positive(float), default=4.0, help="s between faults")
    parser.add_argument("--settle", type=positive(float), default=180.0, help="s to finish")
    parser.add_argument("--replication", choices=["sync", "on_handoff", "off"], default="sync")
    parser.add_argument("--broker", default="", help="broker URL (default: BENCH_REDIS_URL)")
    parser.add_argument(
        "--faults",
        type=fault_kinds,
        default=list(FAULT_KINDS),
        help=f"comma-separated fault kinds (default: all of {','.join(FAULT_KINDS)})",
    )
    parser.add_argument(
        "--gap-timeout", type=positive(float), default=30.0, help="sticky_gap_timeout"
    )
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    return against_redis(DEFAULT_URL, lambda url: bench(url, args))


if __name__ == "__main__":
    sys.exit(main())
