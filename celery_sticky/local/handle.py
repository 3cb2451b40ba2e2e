"""The state handle: a task's mapping over its key's local state.

Reads see the task's own writes; writes are buffered and committed when the task
succeeds, in one transaction with the record that the task was applied (see
:mod:`celery_sticky.local.node_state`). A task that raises, or retries, applies
nothing. Messages published with :meth:`StateHandle.publish` leave after the
commit, with task ids derived from the publishing task's id.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from .memory import MISS
from .node_state import DELETED, Change, NodeState

if TYPE_CHECKING:
    from celery.canvas import Signature

#: Namespace of outbox task ids: uuid5(namespace, "<publishing task id>/<position>").
OUTBOX_NAMESPACE = uuid.UUID("6f1f4d6c-3c0e-5a57-9b0e-5f3c8d1c2a77")


def outbox_task_id(task_id: str, position: int) -> str:
    """The id of the ``position``-th message a task publishes: the same on every run."""
    return str(uuid.uuid5(OUTBOX_NAMESPACE, f"{task_id}/{position}"))


class StateHandle(MutableMapping[str, Any]):
    """A task's view of one workflow key's state.

    Values are any picklable object. Treat values you read as read-only and
    assign a new object to change one (``state["items"] = [*items, sku]``): large
    values are shared with later tasks of the same process (the memory tier).
    """

    def __init__(
        self,
        store: NodeState,
        workflow: str,
        key: str,
        *,
        task_id: str = "",
        epoch: int = 0,
        recovered: bool | None = None,
    ) -> None:
        self._store = store
        self.workflow = workflow
        self.key = key
        self.task_id = task_id
        #: The lease epoch this task runs under: a fencing token for external writes.
        self.epoch = epoch
        #: True: the state was just imported from a hand-over or replicated copy.
        #: False: the key moved without a usable copy; it starts empty (or from
        #: what ``sticky_on_state_lost`` returned). None: nothing moved.
        self.recovered = recovered
        self._writes: dict[str, Any] = {}
        self._cleared = False
        self._fields: frozenset[str] | None = None
        self._outbox: list[dict[str, Any]] = []
        self._finish = False
        self._read_slots: list[str] = []

    # -- mapping API -----------------------------------------------------------

    def _committed_fields(self) -> frozenset[str]:
        if self._fields is None:
            self._fields = frozenset(self._store.fields(self.workflow, self.key))
        return self._fields

    def __getitem__(self, field: str) -> Any:
        if field in self._writes:
            value = self._writes[field]
            if value is DELETED:
                raise KeyError(field)
            return value
        if self._cleared:
            raise KeyError(field)
        value = self._store.read(self.workflow, self.key, field)
        if value is MISS:
            raise KeyError(field)
        self._read_slots.append(field)
        return value

    def __setitem__(self, field: str, value: Any) -> None:
        if not isinstance(field, str):
            raise TypeError(f"state fields are str, not {type(field).__name__} ({field!r:.60})")
        self._writes[field] = value

    def __delitem__(self, field: str) -> None:
        if field not in self:
            raise KeyError(field)
        self._writes[field] = DELETED

    def __contains__(self, field: object) -> bool:
        if field in self._writes:
            return self._writes[field] is not DELETED
        return not self._cleared and field in self._committed_fields()

    def _current_fields(self) -> list[str]:
        fields = set() if self._cleared else set(self._committed_fields())
        for field, value in self._writes.items():
            if value is DELETED:
                fields.discard(field)
            else:
                fields.add(field)
        return sorted(fields)

    def __iter__(self) -> Iterator[str]:
        return iter(self._current_fields())

    def __len__(self) -> int:
        return len(self._current_fields())

    def clear(self) -> None:
        self._writes.clear()
        self._cleared = True

    def __repr__(self) -> str:
        return f"<StateHandle {self.workflow}:{self.key} fields={self._current_fields()!r}>"

    # -- effects beyond the state ----------------------------------------------

    def publish(self, signature: Signature) -> str:
        """Send ``signature`` after this task commits; returns its task id.

        The id is derived from this task's id and the message's position, so a
        task that runs again after a crash publishes the same ids, and a sticky
        receiver drops the copy. Messages of a failed task are never sent.
        """
        from celery import canvas  # loaded only where tasks publish

        if not isinstance(signature, canvas.Signature):
            raise TypeError(f"state.publish() takes a signature, not {type(signature).__name__}")
        task_id = outbox_task_id(self.task_id, len(self._outbox))
        message = dict(signature)
        message["options"] = {**message.get("options", {}), "task_id": task_id}
        self._outbox.append(message)
        return task_id

    def finish(self) -> None:
        """End the workflow when this task commits: release the key, delete its state."""
        self._finish = True

    @property
    def finishing(self) -> bool:
        return self._finish

    @property
    def published(self) -> bool:
        """Whether the task published messages (its outbox is not empty)."""
        return bool(self._outbox)

    @property
    def last_commit(self) -> float | None:
        """Wall-clock time of the key's last commit (None for a new key)."""
        return self._store.last_commit(self.workflow, self.key)

    # -- commit ----------------------------------------------------------------

    def commit(
        self,
        result: Any = None,
        *,
        finish: bool = False,
        epoch: int = 0,
        stream: str = "",
        seq: int = 0,
    ) -> Change | None:
        """Write the buffered changes and the applied record (all or nothing), with
        the task's number ``seq`` in producer ``stream`` when it has one. Returns what
        changed (None when the workflow ended): what ``sync`` replication sends."""
        change = self._store.commit(
            self.workflow,
            self.key,
            self.task_id,
            writes=self._writes,
            cleared=self._cleared,
            result=result,
            outbox=self._outbox,
            finish=finish or self._finish,
            epoch=epoch or self.epoch,
            stream=stream,
            seq=seq,
        )
        self._fields = None
        self._writes = {}
        self._cleared = False
        return change

    def discard(self) -> None:
        """The task failed: forget its writes and the shared values it read."""
        self._writes.clear()
        self._outbox.clear()
        for field in self._read_slots:
            self._store.memory.discard((self._store.directory, self.workflow, self.key, field))
