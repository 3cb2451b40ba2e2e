"""celery-sticky: sticky execution for Celery.

Every task of a workflow key runs on the worker that holds the key's state.
"""

from __future__ import annotations

from .errors import (
    ConfigurationError,
    ForwardingError,
    InvalidKeyError,
    LeaseStoreUnavailable,
    MoveError,
    StateDirError,
    StateSizeLimitError,
    StickyError,
)
from .local.handle import StateHandle
from .producer.admin import move_key, release
from .producer.install import install
from .producer.task import INJECTED, StickyTask, StickyTaskProxy, sticky_task

__version__ = "0.1.0"

__all__ = [
    "INJECTED",
    "ConfigurationError",
    "ForwardingError",
    "InvalidKeyError",
    "LeaseStoreUnavailable",
    "MoveError",
    "StateDirError",
    "StateHandle",
    "StateSizeLimitError",
    "StickyError",
    "StickyTask",
    "StickyTaskProxy",
    "__version__",
    "install",
    "move_key",
    "release",
    "sticky_task",
]
