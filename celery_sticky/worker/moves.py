"""The owner's half of a move: the ``move_key`` task's body.

:func:`celery_sticky.producer.admin.move_key` marked the lease *moving* and sent
``move_key`` into the key's line on its owner; when its turn comes, this exports
the key's state to the hand-over store and makes the target the owner under a
new epoch, atomically with the check that the move is still on
(``move_commit.lua``). See :mod:`celery_sticky.producer.admin` for the whole
protocol.
"""

from __future__ import annotations

import logging
from typing import Any

from ..context import context
from ..events import app_sender, ownership_changed
from ..lease import ClaimStatus
from ..local.node_state import open_node_state
from ..sequence import StreamRecord

logger = logging.getLogger(__name__)


def run_move(
    app: Any,
    workflow: str,
    key: str,
    target: str,
    epoch: int,
    node: str,
    number: tuple[str, int] | None = None,
) -> str:
    """The move task's body on the owner, after every task queued before it.

    ``number``: the move task's own place in its producer's sequence of the key,
    recorded as done in the copy the target adopts.

    Returns ``"moved"``, ``"called_off"`` (the target went away: the key stays)
    or ``"stale"`` (the lease changed meanwhile: nothing to do).
    """
    ctx = context(app)
    leases = ctx.leases
    info = leases.lookup(workflow, key)
    if info is None or (info.owner, info.epoch, info.moving_to) != (node, epoch, target):
        return "stale"
    state = open_node_state(ctx.config, node)
    copies = ctx.copies
    data = state.export_key(workflow, key)
    if data is not None and number is not None:
        record = StreamRecord.parse(data.get("streams"))
        record.advance(*number)
        data["streams"] = record.as_dict()
    published = data is not None and copies.publish(workflow, key, data, owner=node, epoch=epoch)
    lease = leases.commit_move(workflow, key, node, epoch, target)
    if lease.status is not ClaimStatus.CLAIMED:
        if published and ctx.config.state_replication != "sync":
            copies.retire(workflow, key, owner=node, epoch=epoch)
        logger.warning(
            "sticky: move of %s:%s to %s called off: %s gone", workflow, key, target, target
        )
        return "called_off"
    state.delete_key(workflow, key)
    ctx.routes.forget(workflow, key)
    with app_sender(app, hostname=node) as send:
        ownership_changed("moved", workflow, key, lease.epoch, target, previous=node, send=send)
    return "moved"
