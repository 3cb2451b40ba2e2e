"""A worker's local state: diskcache only, no Redis, no Celery app or worker.

- :mod:`~celery_sticky.local.node_state`: one node's records on disk (fields,
  applied-task records, outbox) and the atomic commit;
- :mod:`~celery_sticky.local.memory`: the memory tier of decoded large values;
- :mod:`~celery_sticky.local.handle`: :class:`StateHandle`, the mapping a task sees.
"""

from .handle import StateHandle
from .node_state import AlreadyApplied, NodeState

__all__ = ["AlreadyApplied", "NodeState", "StateHandle"]
