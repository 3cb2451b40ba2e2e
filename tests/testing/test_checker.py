"""The checker on hand-made histories: each count can fail, and a clean history passes."""

from __future__ import annotations

from typing import Any

from celery_sticky.testing.checker import Published, RunRecord, check


def run(seq: int, node: str = "n1", start: float | None = None, **extra: Any) -> RunRecord:
    start = float(seq) if start is None else start
    fields: dict[str, Any] = {
        "key": "k",
        "producer": "p0",
        "seq": seq,
        "node": node,
        "pid": 1,
        "start": start,
        "end": start + 0.5,
        "epoch": 1,
        "task_id": f"t{seq}",
        "run_id": f"r{seq}-{node}-{start}",
        **extra,
    }
    return RunRecord.from_dict(fields)


def entry(r: RunRecord) -> list[Any]:
    return [r.producer, r.seq, r.run_id]


def published(*seqs: int, producer: str = "p0") -> dict[str, Published]:
    return {"k": Published(steps=[(producer, s) for s in seqs])}


def test_a_clean_history_passes() -> None:
    runs = [run(0), run(1), run(2)]
    report = check(published(0, 1, 2), runs, {"k": [entry(r) for r in runs]})
    assert report.ok, report.describe()
    assert (report.keys, report.published, report.runs) == (1, 3, 3)


def test_lost_step() -> None:
    runs = [run(0), run(1), run(2)]
    report = check(published(0, 1, 2), runs, {"k": [entry(runs[0]), entry(runs[2])]})
    assert report.counts["lost"] == 1 and not report.ok
    assert report.bad_keys[0].key == "k"
    assert "lost p0#1" in report.describe()


def test_a_lost_steps_task_id_is_named() -> None:
    """A lost step's task id, when the publisher gave one, is in the report: the step
    can be followed through the worker logs."""
    runs = [run(0), run(2)]
    sent = published(0, 1, 2)
    sent["k"].task_ids = {("p0", 1): "lost-task-id", ("p0", 2): "t2"}
    report = check(sent, runs, {"k": [entry(runs[0]), entry(runs[1])]})
    assert "task ids of the lost steps: p0#1 lost-task-id" in report.describe()


def test_every_offending_key_is_named_with_its_problems() -> None:
    """The report names every key that broke an invariant, not only the first (whose
    history it shows): a run's reordered key hid behind an unreadable one."""
    runs = [run(0), run(1), run(2)]
    other = [run(seq, key="k2") for seq in (0, 1, 2)]
    sent = {**published(0, 1, 2), "k2": published(0, 1, 2)["k"]}
    final = {"k": [entry(runs[0]), entry(runs[2])], "k2": [entry(other[0]), entry(other[1])]}
    report = check(sent, runs + other, final)
    text = report.describe()
    assert [bad.key for bad in report.bad_keys] == ["k", "k2"], text
    assert "offending key k2:" in text and "lost p0#2" in text, text


def test_step_applied_twice() -> None:
    first, again = run(0), run(0, node="n2", start=5.0)
    report = check(published(0), [first, again], {"k": [entry(first), entry(again)]})
    assert report.counts["duplicated"] == 1
    assert report.counts["reruns"] == 1


def test_steps_out_of_publish_order() -> None:
    runs = [run(0), run(1, start=3.0), run(2, start=2.0)]
    final = [entry(runs[0]), entry(runs[2]), entry(runs[1])]
    report = check(published(0, 1, 2), runs, {"k": final})
    assert report.counts["reordered"] == 1, report.describe()


def test_order_is_per_producer() -> None:
    a0, b0, a1 = run(0), run(0, producer="p1", start=1.0), run(1, start=2.0)
    pub = {"k": Published(steps=[("p0", 0), ("p1", 0), ("p0", 1)])}
    report = check(pub, [a0, b0, a1], {"k": [entry(b0), entry(a0), entry(a1)]})
    assert report.ok, report.describe()


def test_applied_runs_that_overlapped_on_two_workers() -> None:
    a = run(0, node="n1", start=0.0)
    b = run(1, node="n2", start=0.2)  # n1's body ran until 0.5
    report = check(published(0, 1), [a, b], {"k": [entry(a), entry(b)]})
    assert report.counts["overlapping"] == 1
    assert "on n1 and" in report.describe()


def test_a_commit_long_after_the_body_counts_as_overlap() -> None:
    """A zombie: its body ended early, its commit came after a later step ran elsewhere."""
    zombie = run(0, node="n1", start=0.0, committed=9.0)
    later = run(1, node="n2", start=5.0)
    report = check(published(0, 1), [zombie, later], {"k": [entry(zombie), entry(later)]})
    assert report.counts["overlapping"] == 1


def test_a_zombie_that_began_sharing_after_a_later_step_started_overlaps() -> None:
    """Its local commit and copy write began after the next owner's step had started."""
    zombie = run(0, node="n1", start=0.0, sharing=8.0, committed=8.1)
    later = run(1, node="n2", start=5.0)
    report = check(published(0, 1), [zombie, later], {"k": [entry(zombie), entry(later)]})
    assert report.counts["overlapping"] == 1
    assert report.counts["undecided"] == 0


def test_a_copy_write_whose_answer_a_pause_held_is_undecided_not_a_violation() -> None:
    """The write began at 0.6 and its answer was seen at 9.0 (the worker was paused in
    between); the next owner's step started at 5.0: when the write landed cannot be told
    from the worker's clock. Counted and named, not a violation."""
    held = run(0, node="n1", start=0.0, sharing=0.6, committed=9.0)
    later = run(1, node="n2", start=5.0)
    report = check(published(0, 1), [held, later], {"k": [entry(held), entry(later)]})
    assert report.ok, report.describe()
    assert report.counts["undecided"] == 1
    assert "k (no violation)" in report.describe()
    assert "p0#1 on n2 began while the copy write of p0#0 on n1" in report.describe()


def test_a_rerun_whose_effects_apply_once_is_counted_not_a_violation() -> None:
    crashed, rerun = run(0, node="n1"), run(0, node="n2", start=4.0)
    report = check(published(0), [crashed, rerun], {"k": [entry(rerun)]})
    assert report.ok, report.describe()
    assert report.counts["reruns"] == 1


def test_phantom_and_unreadable() -> None:
    ghost = run(7)
    report = check(published(), [ghost], {"k": [entry(ghost)]})
    assert report.counts["phantom"] == 1
    report = check(published(0), [run(0)], {"k": None})
    assert report.counts["unreadable"] == 1


def test_an_uncertain_publish_is_neither_lost_nor_phantom() -> None:
    pub = {"k": Published(steps=[("p0", 0)], uncertain={("p0", 1)})}
    r0, r1 = run(0), run(1)
    assert check(pub, [r0], {"k": [entry(r0)]}).ok
    assert check(pub, [r0, r1], {"k": [entry(r0), entry(r1)]}).ok


def test_the_report_names_the_first_offending_key_with_its_history() -> None:
    runs = [run(0), run(1)]
    report = check(published(0, 1), runs, {"k": [entry(runs[1])]})
    text = report.describe()
    assert "first offending key k" in text
    assert "history" in text and "p0#1 on n1" in text
