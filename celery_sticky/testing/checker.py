"""An honest checker of the per-key invariants over what a run recorded.

A checker that keeps one record per task id, compares sets, or looks at order on
one worker hides exactly what faults produce: a body that ran twice, a step applied
twice, two workers committing the same key at once. This one takes every body run
(one record per run, never one per task id) and each key's final state as its owner
reports it at the end, and counts, per key:

- **lost**: a published step that is not in the final state;
- **duplicated**: a step present more than once in the final state;
- **reordered**: a step applied after a later step of the same producer (publish
  order is per producer: each producer numbers its steps of a key 0, 1, 2...);
- **overlapping**: two runs whose effects are in the final state, the second of
  which began before the first had even begun to share its commit (its body, then
  its local commit and copy write, span the second's start);
- **phantom**: an entry in the final state that nobody published;
- **unreadable**: a key whose final state could not be read through its owner.

Bodies that ran more than once (**reruns**) are counted and reported but are not a
violation by themselves: after a crash a step may run again, as long as its effects
apply once. Nor is an **undecided overlap**: the second run began while the first's
copy write was under way, between the write's start and the moment the worker saw
its answer (a pause caught the answer in flight). The worker's clock cannot say
whether the write landed before the second run began; the fence decides it where it
lands (a write is refused once another worker holds the key), and a write that
landed after the key's next owner adopted the copy shows as a **lost** step. Such
pairs are counted and named, not taken for violations (seen in a RabbitMQ run:
a SIGSTOP 7.5 s long between a copy write and its answer, the next owner's first
step adopting that very write). The report gives the counts and the first
offending key with its history, readable enough to start debugging from.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: At most this many lines of the first offending key's history in a report.
HISTORY_LINES = 80
#: The violation counts, in report order.
VIOLATIONS = ("lost", "duplicated", "reordered", "overlapping", "phantom", "unreadable")


@dataclass(frozen=True)
class RunRecord:
    """One run of a step's body, as the task recorded it."""

    key: str
    producer: str
    seq: int
    node: str
    pid: int
    start: float
    end: float
    epoch: int
    task_id: str
    run_id: str
    #: When the run's commit was shared (after its copy write), if seen.
    committed: float | None = None
    #: When the run began to share it (its local commit done, the copy write next).
    sharing: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        return cls(
            key=str(data["key"]),
            producer=str(data["producer"]),
            seq=int(data["seq"]),
            node=str(data["node"]),
            pid=int(data.get("pid") or 0),
            start=float(data["start"]),
            end=float(data["end"]),
            epoch=int(data.get("epoch") or 0),
            task_id=str(data.get("task_id") or ""),
            run_id=str(data["run_id"]),
            committed=None if data.get("committed") is None else float(data["committed"]),
            sharing=None if data.get("sharing") is None else float(data["sharing"]),
        )

    @property
    def finished(self) -> float:
        """The end of the run's effects as far as they were seen: commit, else body end."""
        return self.committed if self.committed is not None else self.end

    @property
    def shared_from(self) -> float:
        """The earliest its effects may have become visible to another worker: when
        its copy write began, else when its commit was seen, else its body's end."""
        if self.sharing is not None:
            return self.sharing
        return self.finished

    def describe(self) -> str:
        commit = "-" if self.committed is None else f"{self.committed:.3f}"
        if self.sharing is not None:
            commit = f"{self.sharing:.3f}-{commit}"
        return (
            f"{self.producer}#{self.seq} on {self.node} pid {self.pid} epoch {self.epoch} "
            f"body {self.start:.3f}-{self.end:.3f} commit {commit} run {self.run_id[:8]} "
            f"task {self.task_id[:8]}"
        )


@dataclass(frozen=True)
class Applied:
    """One entry of a key's final state: which producer's step, applied by which run."""

    producer: str
    seq: int
    run_id: str

    @classmethod
    def of(cls, entry: Sequence[Any]) -> Applied:
        producer, seq, run_id = entry[:3]
        return cls(str(producer), int(seq), str(run_id))


@dataclass
class KeyReport:
    """What the checker found for one key."""

    key: str
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.counts[name] for name in VIOLATIONS)


@dataclass
class Report:
    """Counts over every key, and the keys that broke an invariant."""

    keys: int = 0
    published: int = 0
    runs: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    bad_keys: list[KeyReport] = field(default_factory=list)
    #: Keys without a violation whose runs left an undecided overlap.
    undecided_keys: list[KeyReport] = field(default_factory=list)

    @property
    def violations(self) -> int:
        return sum(self.counts[name] for name in VIOLATIONS)

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def summary(self) -> str:
        parts = [f"{name} {self.counts[name]}" for name in (*VIOLATIONS, "reruns", "undecided")]
        return (
            f"{self.keys} keys, {self.published} steps published, {self.runs} body runs: "
            + ", ".join(parts)
            + f"; {len(self.bad_keys)} keys broke an invariant"
        )

    def describe(self) -> str:
        """The summary, the first offending key with its problems and history, then
        every other offending key with its problems."""
        lines = [self.summary()]
        if self.bad_keys:
            first = self.bad_keys[0]
            lines.append(f"first offending key {first.key}:")
            lines += [f"  {problem}" for problem in first.problems]
            lines.append("  history (state entries, then every body run by start):")
            shown = first.history[:HISTORY_LINES]
            lines += [f"    {line}" for line in shown]
            if len(first.history) > len(shown):
                lines.append(f"    ... {len(first.history) - len(shown)} more runs")
            for other in self.bad_keys[1:]:
                lines.append(f"offending key {other.key}:")
                lines += [f"  {problem}" for problem in other.problems]
        for noted in self.undecided_keys:
            lines.append(f"key {noted.key} (no violation):")
            lines += [f"  {problem}" for problem in noted.problems]
        return "\n".join(lines)


@dataclass
class Published:
    """What the producers published for one key: ``(producer, seq)`` in publish order.

    ``uncertain`` holds steps whose publish raised: they may or may not have reached
    the broker, so their absence is not a loss (and their presence not a phantom).
    """

    steps: list[tuple[str, int]] = field(default_factory=list)
    uncertain: set[tuple[str, int]] = field(default_factory=set)
    #: The task id each step was published under, when the publisher said: a lost
    #: step's id is printed, so it can be followed through the worker logs.
    task_ids: dict[tuple[str, int], str] = field(default_factory=dict)


def check(
    published: Mapping[str, Published],
    runs: Iterable[RunRecord],
    finals: Mapping[str, Sequence[Sequence[Any]] | None],
) -> Report:
    """Check every key of ``published`` against the run records and final states.

    ``finals[key]`` is the key's applied entries ``(producer, seq, run_id)`` in the
    order the state holds them, or None when the key could not be read.
    """
    by_key: dict[str, list[RunRecord]] = defaultdict(list)
    all_runs = list(runs)
    for run in all_runs:
        by_key[run.key].append(run)
    report = Report(keys=len(published), runs=len(all_runs))
    for key in sorted(published):
        report.published += len(published[key].steps)
        found = check_key(key, published[key], by_key.get(key, []), finals.get(key))
        report.counts.update(found.counts)
        if not found.ok:
            report.bad_keys.append(found)
        elif found.counts["undecided"]:
            report.undecided_keys.append(found)
    return report


def check_key(
    key: str,
    published: Published,
    runs: Sequence[RunRecord],
    final: Sequence[Sequence[Any]] | None,
) -> KeyReport:
    """The checks of :func:`check` for one key."""
    found = KeyReport(key)
    runs = sorted(runs, key=lambda r: r.start)
    per_step = Counter((r.producer, r.seq) for r in runs)
    found.counts["reruns"] = sum(n - 1 for n in per_step.values() if n > 1)
    if final is None:
        found.counts["unreadable"] = 1
        found.problems.append("the final state could not be read through the owner")
        found.history = [f"run {r.describe()}" for r in runs]
        return found
    applied = [Applied.of(entry) for entry in final]
    expected = set(published.steps)
    present = Counter((a.producer, a.seq) for a in applied)

    lost = [step for step in published.steps if step not in present]
    if lost:
        found.counts["lost"] = len(lost)
        ids = [
            f"{p}#{n} {published.task_ids[(p, n)]}" for p, n in lost if (p, n) in published.task_ids
        ]
        found.problems.append(f"lost {_steps(lost)}")
        if ids:
            found.problems.append(f"task ids of the lost steps: {', '.join(ids[:20])}")
    twice = sorted(step for step, n in present.items() if n > 1)
    if twice:
        found.counts["duplicated"] = sum(present[step] - 1 for step in twice)
        found.problems.append(f"applied more than once {_steps(twice)}")
    phantom = sorted(set(present) - expected - published.uncertain)
    if phantom:
        found.counts["phantom"] = len(phantom)
        found.problems.append(f"applied but never published {_steps(phantom)}")

    highest: dict[str, int] = {}
    late: list[tuple[str, int]] = []
    for entry in applied:
        top = highest.get(entry.producer)
        if top is not None and entry.seq < top:
            late.append((entry.producer, entry.seq))
        highest[entry.producer] = max(entry.seq, top if top is not None else entry.seq)
    if late:
        found.counts["reordered"] = len(late)
        found.problems.append(f"applied after a later step of its producer {_steps(late)}")

    run_of = {r.run_id: r for r in runs}
    effective = sorted(
        (run_of[a.run_id] for a in applied if a.run_id in run_of), key=lambda r: r.start
    )
    overlaps: list[tuple[RunRecord, RunRecord]] = []
    undecided: list[tuple[RunRecord, RunRecord]] = []
    for a, b in itertools.combinations(effective, 2):  # a started first
        if a.run_id == b.run_id:
            continue
        if b.start < a.shared_from:
            overlaps.append((a, b))
        elif b.start < a.finished:
            undecided.append((a, b))
    if overlaps:
        found.counts["overlapping"] = len(overlaps)
        a, b = overlaps[0]
        found.problems.append(
            f"{len(overlaps)} pairs of applied runs overlapped, first "
            f"{a.producer}#{a.seq} on {a.node} and {b.producer}#{b.seq} on {b.node}"
        )
    if undecided:
        found.counts["undecided"] = len(undecided)
        a, b = undecided[0]
        found.problems.append(
            f"{len(undecided)} pairs undecided (not a violation): {b.producer}#{b.seq} on "
            f"{b.node} began while the copy write of {a.producer}#{a.seq} on {a.node} "
            f"was under way"
        )
    if found.counts["reruns"]:
        found.problems.append(f"{found.counts['reruns']} bodies ran again (not a violation)")
    found.history = [
        "state " + " ".join(f"{a.producer}#{a.seq}@{a.run_id[:8]}" for a in applied),
        *(f"run {r.describe()}" for r in runs),
    ]
    return found


def _steps(steps: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{producer}#{seq}" for producer, seq in steps)
