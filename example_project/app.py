"""A document pipeline whose per-document state grows step by step.

Each document (key ``doc_id``) is ingested, cut into chunks, indexed one chunk per
``add_chunk`` step, then summarized. Every step reads what the earlier steps left
in the document's state on the worker's local disk and extends it: no step loads
the document from a shared store, which is what sticky execution is for.

Workers: ``celery -A example_project.app worker`` (``python -m example_project``
starts three and drives them).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import redis
from celery import Celery, Task
from celery.canvas import Signature

from celery_sticky import StateHandle, sticky_task

app = Celery("example_project")
app.config_from_object("example_project.celeryconfig")

_WORD = re.compile(r"[a-z']+")

#: Postings of the inverted index: term -> [(chunk number, position in chunk), ...].
Index = dict[str, list[tuple[int, int]]]


def words(text: str) -> list[str]:
    """The words of ``text`` as the index sees them."""
    return _WORD.findall(text.lower())


def steps_key() -> str:
    """The Redis list every step appends its record to; the driver reads it."""
    return f"{app.conf.example_run_id}:steps"


@functools.cache
def _records() -> redis.Redis:
    # Created on first use, in the pool process (redis-py also reconnects after a fork).
    return redis.Redis.from_url(app.conf.broker_url)


@contextlib.contextmanager
def journaled(task: Task, state: StateHandle) -> Iterator[None]:
    """Run one step: add it to the document's journal and record where and when it ran.

    The journal is part of the state, so it commits together with the step's other
    writes: a step applied twice, lost or reordered shows in it. The record (node,
    start and end time, journal length seen, state size) goes to Redis, where the
    driver checks stickiness and timing across workers.
    """
    request = task.request
    journal: list[str] = state.get("journal", [])
    record: dict[str, Any] = {
        "doc": state.key,
        "task": request.id,
        "node": request.hostname,
        "pid": os.getpid(),
        "seen": len(journal),
        "start": time.time(),
    }
    try:
        state["journal"] = [*journal, request.id]
        yield
        record["size"] = len(pickle.dumps(dict(state)))
    except BaseException as exc:
        record["error"] = repr(exc)
        raise
    finally:
        record["end"] = time.time()
        _records().rpush(steps_key(), json.dumps(record))


@sticky_task(key="doc_id", bind=True, acks_late=True)
def ingest(self: Task, doc_id: str, text: str, *, state: StateHandle) -> int:
    """Keep the raw text: the next steps read it from local disk, not from a message."""
    with journaled(self, state):
        state["text"] = text
        return len(text)


@sticky_task(key="doc_id", bind=True, acks_late=True)
def tokenize(self: Task, doc_id: str, chunks: int, *, state: StateHandle) -> int:
    """Cut the text into ``chunks`` runs of words and start an empty index."""
    with journaled(self, state):
        found = words(state["text"])
        size = -(-len(found) // chunks)
        state["chunks"] = [found[n * size : (n + 1) * size] for n in range(chunks)]
        state["index"] = {}
        return len(found)


@sticky_task(key="doc_id", bind=True, acks_late=True)
def add_chunk(self: Task, doc_id: str, chunk_no: int, *, state: StateHandle) -> int:
    """Fold one chunk into the index built by the earlier ``add_chunk`` steps."""
    with journaled(self, state):
        postings: Index = {}
        for position, word in enumerate(state["chunks"][chunk_no]):
            postings.setdefault(word, []).append((chunk_no, position))
        # Values read from the state are not ours to change: build new ones, assign them.
        index: Index = state["index"]
        state["index"] = {**index, **{t: [*index.get(t, ()), *p] for t, p in postings.items()}}
        return len(state["index"])


@sticky_task(key="doc_id", bind=True, acks_late=True)
def finalize(self: Task, doc_id: str, *, state: StateHandle) -> dict[str, Any]:
    """Summarize the document from its finished index."""
    with journaled(self, state):
        index: Index = state["index"]
        frequency = Counter({term: len(postings) for term, postings in index.items()})
        summary = {
            "words": frequency.total(),
            "terms": len(index),
            "top": [term for term, _ in frequency.most_common(5)],
        }
        state["summary"] = summary
        return summary


@sticky_task(key="doc_id", bind=True, acks_late=True)
def describe(self: Task, doc_id: str, *, state: StateHandle) -> dict[str, Any]:
    """Report the document's state as the next step would find it (changes nothing)."""
    index: Index = state.get("index", {})
    return {
        "node": self.request.hostname,
        "fields": sorted(state),
        "journal": state.get("journal", []),
        "postings": sum(len(postings) for postings in index.values()),
        "summary": state.get("summary"),
    }


def pipeline(doc_id: str, text: str, chunks: int) -> list[Signature]:
    """The steps of one document, in the order they must run."""
    return [
        ingest.si(doc_id, text),
        tokenize.si(doc_id, chunks),
        *(add_chunk.si(doc_id, n) for n in range(chunks)),
        finalize.si(doc_id),
    ]
