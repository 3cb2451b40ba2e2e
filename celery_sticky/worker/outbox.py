"""The outbox: messages a task published, sent only after its commit.

The commit stores them with the task's applied record; they are sent right after
it and then crossed off. Whatever a crash leaves behind is sent when the task's
message is redelivered (the duplicate is recognized and its outbox flushed) and
when the worker starts again. Their task ids are derived from the publishing
task's id, so a copy sent twice is dropped by a sticky receiver.
"""

from __future__ import annotations

import logging

from celery import Celery

from ..local.node_state import NodeState

logger = logging.getLogger(__name__)


def send_outbox(app: Celery, store: NodeState, workflow: str, key: str, task_id: str) -> int:
    """Send the messages task ``task_id`` left in the outbox; returns how many."""
    messages = store.outbox(workflow, key, task_id)
    for message in messages:
        app.signature(message).apply_async()
    if messages:
        store.outbox_sent(workflow, key, task_id)
    return len(messages)


def send_pending(app: Celery, store: NodeState) -> int:
    """Send every outbox a crash left behind (at worker start)."""
    sent = 0
    for workflow, key, task_id in store.pending_outboxes():
        try:
            sent += send_outbox(app, store, workflow, key, task_id)
        except Exception:
            logger.exception("sticky: could not send the outbox of task %s", task_id)
    if sent:
        logger.info("sticky: sent %d message(s) left in the outbox by a previous run", sent)
    return sent
