"""celery-sticky: sticky execution for Celery.

Every task of a workflow key runs on the worker that holds the key's state.
"""

from __future__ import annotations

from .app import install
from .errors import (
    ConfigurationError,
    ForwardingError,
    InvalidKeyError,
    LeaseStoreUnavailable,
    StateDirError,
    StateSizeLimitError,
    StickyError,
)
from .lifecycle import release
from .state import StateHandle
from .task import StickyTask, sticky_task

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "ForwardingError",
    "InvalidKeyError",
    "LeaseStoreUnavailable",
    "StateDirError",
    "StateHandle",
    "StateSizeLimitError",
    "StickyError",
    "StickyTask",
    "__version__",
    "install",
    "release",
    "sticky_task",
]
